"""A scripted model behind a real HTTP server speaking SGLang's native ``/generate``.

Run: ``python rt_server.py --tokenizer DIR [--port 0] [--script FILE]``; it prints ``{"port": N}`` on
its first stdout line. Deterministic: the script is chosen by a ``[[name]]`` tag in the prompt and the
turn by how many assistant turns the conversation already holds (``<|im_start|>assistant`` headers plus
``</interpreter>`` observations). A turn is a string, or an object with ``text`` and optional
``fail`` (answer HTTP 500 that many times first), ``abort`` (finish_reason abort), ``delay_s``.
Generation follows SGLang's rules: tokens are emitted one by one; a stop string or a stop token id ends
the turn (its tokens included, as with no_stop_trim); ``max_new_tokens`` ends it with ``length``; at the
end of the turn text the model emits ``<|im_end|>``. Log-probabilities are a fixed function of token and
position. ``POST /script`` registers scripts at run time; ``GET /stats`` reports requests, the
max_new_tokens each request asked for, and the server's own handling time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from tokenizers import Tokenizer

TAG_RE = re.compile(r"\[\[([\w.-]+)\]\]")


def logprob(token_id: int, pos: int) -> float:
    return -(((token_id * 31 + pos * 7) % 97) + 1) / 100.0


class ScriptedModel:
    def __init__(self, tokenizer: Tokenizer, scripts: dict[str, list[Any]]) -> None:
        self.tok = tokenizer
        self.scripts = scripts
        self.im_end = tokenizer.token_to_id("<|im_end|>")
        self.fail_counts: dict[tuple[str, int], int] = {}
        self.requests = 0
        self.busy_s = 0.0
        self.max_new_seen: list[int] = []
        self._gen_cache: dict[tuple[Any, ...], tuple[list[int], str, str | int | None]] = {}

    def turn_for(self, ids: list[int]) -> tuple[str, int, dict[str, Any]]:
        text = self.tok.decode(ids, skip_special_tokens=False)
        match = TAG_RE.search(text)
        if not match:
            raise web.HTTPBadRequest(text="prompt has no [[script]] tag")
        name = match.group(1)
        if name not in self.scripts:
            raise web.HTTPBadRequest(text=f"unknown script {name!r}")
        turn = text.count("<|im_start|>assistant") - 1 + text.count("</interpreter>")
        turns = self.scripts[name]
        spec = turns[min(turn, len(turns) - 1)] if turns else ""
        if isinstance(spec, str):
            spec = {"text": spec}
        return name, turn, spec

    def emit(self, text: str, sp: dict[str, Any]) -> tuple[list[int], str, str | int | None]:
        stop = sp.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        stop_ids = set(sp.get("stop_token_ids") or [])
        max_new = int(sp.get("max_new_tokens", 128))
        key = (text, tuple(stop), tuple(sorted(stop_ids)), max_new)
        hit = self._gen_cache.get(key)
        if hit is not None:
            return hit
        planned = self.tok.encode(text, add_special_tokens=False).ids + [self.im_end]
        out: list[int] = []
        reason, matched = "length", None
        for token in planned:
            if len(out) >= max_new:
                break
            out.append(token)
            if token in stop_ids or token == self.im_end:
                reason, matched = "stop", token
                break
            if stop:
                decoded = self.tok.decode(out, skip_special_tokens=False)
                hit_stop = next((s for s in stop if s in decoded), None)
                if hit_stop is not None:
                    reason, matched = "stop", hit_stop
                    break
        result = (out, reason, matched)
        self._gen_cache[key] = result
        return result

    async def generate(self, request: web.Request) -> web.Response:
        start = time.perf_counter()
        self.requests += 1
        body = await request.json()
        if not body.get("return_logprob"):
            raise web.HTTPBadRequest(text="return_logprob must be true")
        ids = [int(i) for i in body["input_ids"]]
        sp = body.get("sampling_params") or {}
        self.max_new_seen.append(int(sp.get("max_new_tokens", -1)))
        name, turn, spec = self.turn_for(ids)
        if spec.get("fail"):
            key = (name, turn)
            seen = self.fail_counts.get(key, 0)
            if seen < int(spec["fail"]):
                self.fail_counts[key] = seen + 1
                self.busy_s += time.perf_counter() - start
                return web.Response(status=500, text="scripted failure")
        if spec.get("delay_s"):
            await asyncio.sleep(float(spec["delay_s"]))
        if spec.get("abort"):
            out: list[int] = []
            finish: dict[str, Any] = {"type": "abort", "message": "scripted abort"}
        else:
            out, reason, matched = self.emit(spec.get("text", ""), sp)
            finish = {"type": reason}
            if reason == "length":
                finish["length"] = len(out)
            else:
                finish["matched"] = matched
        meta = {
            "id": f"req-{self.requests}",
            "finish_reason": finish,
            "prompt_tokens": len(ids),
            "completion_tokens": len(out),
            "cached_tokens": 0,
            "output_token_logprobs": [[logprob(t, i), t, None] for i, t in enumerate(out)],
            "e2e_latency": time.perf_counter() - start,
        }
        payload = {
            "text": self.tok.decode(out, skip_special_tokens=False),
            "output_ids": out,
            "meta_info": meta,
        }
        response = web.Response(text=json.dumps(payload), content_type="application/json")
        self.busy_s += time.perf_counter() - start
        return response

    async def add_script(self, request: web.Request) -> web.Response:
        data = await request.json()
        if not isinstance(data, dict):
            raise web.HTTPBadRequest(text="expected {name: [turns]}")
        self.scripts.update(data)
        return web.json_response({"ok": True, "scripts": len(self.scripts)})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"requests": self.requests, "busy_s": self.busy_s, "max_new_tokens": self.max_new_seen[-2000:]}
        )

    async def reset_stats(self, request: web.Request) -> web.Response:
        self.requests, self.busy_s, self.max_new_seen = 0, 0.0, []
        return web.json_response({"ok": True})


async def _main(args: argparse.Namespace) -> None:
    tok = Tokenizer.from_file(f"{args.tokenizer}/tokenizer.json")
    scripts = json.loads(Path(args.script).read_text()) if args.script else {}
    model = ScriptedModel(tok, scripts)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/generate", model.generate)
    app.router.add_post("/script", model.add_script)
    app.router.add_get("/stats", model.stats)
    app.router.add_post("/reset_stats", model.reset_stats)
    app.router.add_get("/health", lambda r: web.Response(text="ok"))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port, backlog=1024)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(json.dumps({"port": port}), flush=True)
    await asyncio.Event().wait()


class ServerHandle:
    """A running scripted server (a child process in its own session); ``stop()`` ends it by pid."""

    def __init__(self, tokenizer_dir: str, script: str | None = None) -> None:
        import os
        import subprocess

        cmd = [sys.executable, os.path.abspath(__file__), "--tokenizer", str(tokenizer_dir)]
        if script:
            cmd += ["--script", script]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, start_new_session=True, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("scripted server failed to start")
        self.port = int(json.loads(line)["port"])
        self.url = f"http://127.0.0.1:{self.port}"

    def _request(self, method: str, path: str, data: Any = None) -> Any:
        import urllib.request

        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body, method=method)
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def add_scripts(self, scripts: dict[str, list[Any]]) -> None:
        self._request("POST", "/script", scripts)

    def stats(self) -> dict[str, Any]:
        return self._request("GET", "/stats")

    def reset_stats(self) -> None:
        self._request("POST", "/reset_stats", {})

    def stop(self) -> None:
        import os
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except Exception:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self.proc.stdout:
            self.proc.stdout.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--script", default=None)
    try:
        asyncio.run(_main(parser.parse_args()))
    except KeyboardInterrupt:
        sys.exit(0)
