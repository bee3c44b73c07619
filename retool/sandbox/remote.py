"""`RemoteSandbox`: the Sandbox API (run/arun/isolation/close) against a SandboxFusion-compatible server,
ours (`retool sandbox serve`) or SandboxFusion itself, so rollout workers on many nodes can share hosts."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
import weakref
from typing import Any

import httpx

from retool.sandbox.result import ExecResult

RETRY_STATUS = {429, 502, 503, 504}


class RemoteSandboxError(RuntimeError):
    """The remote service refused or failed the request (auth, bad request, still busy after retries)."""


def from_fusion(body: dict[str, Any], timeout_s: float | None) -> ExecResult:
    """An ExecResult from a /run_code answer: exact when our server sent "retool", mapped otherwise."""
    ours = body.get("retool")
    if isinstance(ours, dict):
        return ExecResult(
            status=ours["status"],
            stdout=ours.get("stdout", ""),
            stderr=ours.get("stderr", ""),
            truncated=bool(ours.get("truncated")),
            exit_code=ours.get("exit_code"),
            duration_s=float(ours.get("duration_s", 0.0)),
            timeout_s=ours.get("timeout_s"),
            memory_mb=ours.get("memory_mb"),
            output_limit=ours.get("output_limit"),
        )
    run = body.get("run_result") or {}
    stdout, stderr = run.get("stdout") or "", run.get("stderr") or ""
    rc = run.get("return_code")
    if run.get("status") == "TimeLimitExceeded":
        status = "timeout"
    elif body.get("status") == "Success":
        status = "ok"
    elif "MemoryError" in stderr:
        status = "memory"
    else:
        status = "error"
    if body.get("status") == "SandboxError" and not stderr:
        stderr = f"SandboxError: {body.get('message', '')}"
    return ExecResult(
        status=status,  # type: ignore[arg-type]
        stdout=stdout,
        stderr=stderr,
        truncated=False,
        exit_code=rc,
        duration_s=float(run.get("execution_time") or 0.0),
        timeout_s=timeout_s if status == "timeout" else None,
    )


class RemoteSandbox:
    """Same API as `Sandbox`; `run` is thread-safe, `arun` never blocks the event loop.

    Busy answers (429/503) are retried with jittered backoff up to `retries` times, honouring Retry-After.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout_s: float = 10.0,
        retries: int = 8,
        max_connections: int = 64,
    ):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self._client = httpx.Client(headers=self._headers, limits=self._limits, timeout=timeout_s + 30)
        # one async client per event loop (a client is bound to the loop it first ran on)
        self._aclients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        self._closed = False
        self.isolation = "remote"
        self.workers = 1
        try:
            r = self._client.get(f"{self.url}/info")
            if r.status_code == 401:
                raise RemoteSandboxError(f"{self.url}: bearer token refused (HTTP 401)")
            if r.status_code == 200:
                info = r.json()
                self.isolation = f"remote:{info.get('isolation', 'unknown')}"
                self.workers = int(info.get("workers", 1))
        except httpx.HTTPError as e:
            self._client.close()
            raise RemoteSandboxError(f"cannot reach sandbox server {self.url}: {e}") from e

    def _payload(self, code: str, timeout_s: float | None) -> dict[str, Any]:
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, got {type(code).__name__}")
        return {"code": code, "language": "python", "run_timeout": timeout_s or self.timeout_s}

    def _handle(self, r: httpx.Response, timeout_s: float | None) -> ExecResult:
        if r.status_code == 200:
            return from_fusion(r.json(), timeout_s or self.timeout_s)
        try:
            msg = r.json().get("message", r.text)
        except ValueError:
            msg = r.text
        raise RemoteSandboxError(f"{self.url}/run_code: HTTP {r.status_code}: {str(msg)[:300]}")

    @staticmethod
    def _delay(r: httpx.Response | None, attempt: int) -> float:
        if r is not None and r.headers.get("Retry-After", "").isdigit():
            base = float(r.headers["Retry-After"])
        else:
            base = 0.05 * 2**attempt
        return min(5.0, base) * (0.5 + random.random())

    def run(self, code: str, timeout_s: float | None = None) -> ExecResult:
        """Run code remotely; blocks. Raises RemoteSandboxError if the service refuses or stays busy."""
        if self._closed:
            raise RemoteSandboxError("remote sandbox client is closed")
        payload = self._payload(code, timeout_s)
        r: httpx.Response | None = None
        for attempt in range(self.retries + 1):
            try:
                r = self._client.post(f"{self.url}/run_code", json=payload)
            except httpx.TransportError as e:
                if attempt == self.retries:
                    raise RemoteSandboxError(f"{self.url}: {e}") from e
                r = None
                time.sleep(self._delay(None, attempt))
                continue
            if r.status_code not in RETRY_STATUS or attempt == self.retries:
                break
            time.sleep(self._delay(r, attempt))
        assert r is not None
        return self._handle(r, timeout_s)

    def _aclient(self) -> httpx.AsyncClient:
        key = asyncio.get_running_loop()
        with self._lock:
            c = self._aclients.get(key)
            if c is None:
                c = httpx.AsyncClient(headers=self._headers, limits=self._limits, timeout=self.timeout_s + 30)
                self._aclients[key] = c
            return c

    async def arun(self, code: str, timeout_s: float | None = None) -> ExecResult:
        if self._closed:
            raise RemoteSandboxError("remote sandbox client is closed")
        payload = self._payload(code, timeout_s)
        client = self._aclient()
        r: httpx.Response | None = None
        for attempt in range(self.retries + 1):
            try:
                r = await client.post(f"{self.url}/run_code", json=payload)
            except httpx.TransportError as e:
                if attempt == self.retries:
                    raise RemoteSandboxError(f"{self.url}: {e}") from e
                r = None
                await asyncio.sleep(self._delay(None, attempt))
                continue
            if r.status_code not in RETRY_STATUS or attempt == self.retries:
                break
            await asyncio.sleep(self._delay(r, attempt))
        assert r is not None
        return self._handle(r, timeout_s)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._client.close()
        for c in list(self._aclients.values()):
            try:
                asyncio.get_running_loop().create_task(c.aclose())
            except RuntimeError:  # no running loop here: close it on a fresh one
                with contextlib.suppress(Exception):
                    asyncio.run(c.aclose())
        self._aclients.clear()

    def __enter__(self) -> RemoteSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
