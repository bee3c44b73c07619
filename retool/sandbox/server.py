"""`retool sandbox serve`: our Sandbox behind a SandboxFusion-compatible HTTP API, for rollout workers on
other nodes.

    POST /run_code  {"code": str, "language": "python", "run_timeout": float}
      -> {"status": "Success" | "Failed" | "SandboxError", "message": str, "compile_result": null,
          "run_result": {"status": "Finished" | "TimeLimitExceeded", "execution_time": float,
                         "return_code": int | null, "stdout": str, "stderr": str},
          "executor_pod_name": null, "files": {}, "retool": {<our ExecResult, lossless>}}
    GET /v1/ping -> "pong";  GET /info -> {"isolation", "workers", limits}

Safe defaults: binds 127.0.0.1; refuses to listen beyond loopback without a bearer token; checks the token
(when one is set) on every request but the ping; caps request bodies (413); answers 429 when more calls are
in flight than workers + queue, 503 while shutting down, instead of queueing without bound. Responses are
bounded by construction: stdout and stderr are each capped by the sandbox.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import logging
import os
import signal
import sys
from typing import Any

from aiohttp import web

from retool.sandbox.config import SandboxConfig
from retool.sandbox.local import Sandbox
from retool.sandbox.result import ExecResult

log = logging.getLogger(__name__)
TOKEN_ENV = "RETOOL_SANDBOX_TOKEN"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def to_fusion(res: ExecResult) -> dict[str, Any]:
    """Our ExecResult in SandboxFusion's response shape, with the exact result under "retool"."""
    run_status = "TimeLimitExceeded" if res.status == "timeout" else "Finished"
    return {
        "status": "Success" if res.status == "ok" else "Failed",
        "message": "",
        "compile_result": None,
        "run_result": {
            "status": run_status,
            "execution_time": res.duration_s,
            "return_code": res.exit_code,
            "stdout": res.stdout,
            "stderr": res.stderr,
        },
        "executor_pod_name": None,
        "files": {},
        "retool": res.to_dict(),
    }


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"status": "SandboxError", "message": message}, status=status, headers=headers)


class SandboxServer:
    """The aiohttp application around one Sandbox."""

    def __init__(self, sandbox: Any, *, token: str | None, max_queue: int, max_timeout_s: float):
        self.sandbox = sandbox
        self.token = token
        self.capacity = sandbox.workers + max_queue
        self.max_timeout_s = max_timeout_s
        self.in_flight = 0
        self.closing = False

    def authorized(self, request: web.Request) -> bool:
        if not self.token:
            return True
        got = request.headers.get("Authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {self.token}".encode())

    async def run_code(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            return _error(401, "missing or wrong bearer token", **{"WWW-Authenticate": "Bearer"})
        if self.closing:
            return _error(503, "server is shutting down", **{"Retry-After": "5"})
        if self.in_flight >= self.capacity:
            return _error(
                429,
                f"busy: {self.in_flight} calls in flight (capacity {self.capacity})",
                **{"Retry-After": "1"},
            )
        # admit before the first await, so requests arriving together cannot all pass the check
        self.in_flight += 1
        try:
            return await self._run_admitted(request)
        finally:
            self.in_flight -= 1

    async def _run_admitted(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except web.HTTPRequestEntityTooLarge:
            raise
        except Exception:
            return _error(400, "the body must be a JSON object")
        if not isinstance(body, dict) or not isinstance(body.get("code"), str):
            return _error(400, 'the body must be a JSON object with a string "code"')
        language = body.get("language", "python")
        if language not in ("python", "python3"):
            return _error(400, f"unsupported language {language!r}: this server runs python only")
        timeout = body.get("run_timeout")
        if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
            return _error(400, '"run_timeout" must be a positive number of seconds')
        timeout = min(float(timeout), self.max_timeout_s) if timeout else None
        try:
            res = await self.sandbox.arun(body["code"], timeout)
        except Exception as e:
            log.exception("sandbox call failed")
            return _error(500, f"sandbox failure: {type(e).__name__}")
        return web.json_response(to_fusion(res))

    async def ping(self, request: web.Request) -> web.Response:
        return web.Response(text="pong")

    async def info(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            return _error(401, "missing or wrong bearer token", **{"WWW-Authenticate": "Bearer"})
        cfg = self.sandbox.config
        return web.json_response(
            {
                "isolation": self.sandbox.isolation,
                "workers": self.sandbox.workers,
                "capacity": self.capacity,
                "in_flight": self.in_flight,
                "wall_timeout_s": cfg.wall_timeout_s,
                "memory_mb": cfg.memory_mb,
                "max_output_bytes": cfg.max_output_bytes,
            }
        )

    def app(self, max_request_bytes: int) -> web.Application:
        app = web.Application(client_max_size=max_request_bytes)
        app.router.add_post("/run_code", self.run_code)
        app.router.add_get("/v1/ping", self.ping)
        app.router.add_get("/info", self.info)
        return app


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="retool sandbox serve",
        description="Serve the retool sandbox over a SandboxFusion-compatible HTTP API (POST /run_code).",
    )
    ap.add_argument(
        "--host", default="127.0.0.1", help="bind address (default 127.0.0.1; others need a token)"
    )
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--token", default=None, help=f"bearer token clients must send (default: ${TOKEN_ENV})")
    ap.add_argument("--workers", type=int, default=None, help="sandbox workers (calls run at once)")
    ap.add_argument("--isolation", choices=["auto", "bwrap", "namespaces", "process"], default=None)
    ap.add_argument("--wall-timeout", type=float, default=None, help="default and maximum seconds per call")
    ap.add_argument("--memory-mb", type=int, default=None)
    ap.add_argument("--max-output-bytes", type=int, default=None)
    ap.add_argument("--max-request-bytes", type=int, default=1 << 20, help="largest request body (413 above)")
    ap.add_argument(
        "--max-queue", type=int, default=None, help="calls waiting beyond the workers (default 2x workers)"
    )
    ap.add_argument("--log-level", default="INFO")
    return ap


def cli_main(argv: list[str]) -> int:
    """Entry point of `retool sandbox serve`; returns the process exit code."""
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(args.host) and not token:
        print(
            f"error: refusing to listen on {args.host} without a bearer token: pass --token or set {TOKEN_ENV} "
            "(only loopback addresses may run without one)",
            file=sys.stderr,
        )
        return 2
    overrides: dict[str, Any] = {}
    for key, val in (
        ("workers", args.workers),
        ("isolation", args.isolation),
        ("wall_timeout_s", args.wall_timeout),
        ("memory_mb", args.memory_mb),
        ("max_output_bytes", args.max_output_bytes),
    ):
        if val is not None:
            overrides[key] = val
    try:
        cfg = SandboxConfig(**overrides)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    max_queue = args.max_queue if args.max_queue is not None else 2 * cfg.workers
    try:
        asyncio.run(_serve(cfg, args.host, args.port, token, max_queue, args.max_request_bytes))
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


async def _serve(
    cfg: SandboxConfig, host: str, port: int, token: str | None, max_queue: int, max_req: int
) -> None:
    sandbox = await asyncio.to_thread(Sandbox, cfg)
    server = SandboxServer(sandbox, token=token, max_queue=max_queue, max_timeout_s=cfg.wall_timeout_s)
    runner = web.AppRunner(server.app(max_req), access_log=None)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        socks = getattr(site._server, "sockets", None) or []
        bound = socks[0].getsockname() if socks else (host, port)
        print(
            f"retool sandbox serving on http://{bound[0]}:{bound[1]} (isolation={sandbox.isolation}, "
            f"workers={sandbox.workers}, auth={'bearer' if token else 'none'})",
            flush=True,
        )
        await stop.wait()
    finally:
        server.closing = True
        await runner.cleanup()
        await asyncio.to_thread(sandbox.close)


if __name__ == "__main__":
    raise SystemExit(cli_main(sys.argv[1:]))
