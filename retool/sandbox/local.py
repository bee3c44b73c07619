"""`Sandbox`: a pool of warm fork-server workers, each inside the chosen isolation tier."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from retool.sandbox import tiers
from retool.sandbox.config import SandboxConfig
from retool.sandbox.result import ExecResult

log = logging.getLogger(__name__)
_HDR = struct.Struct("!I")


class SandboxError(RuntimeError):
    """The sandbox itself failed (a worker could not start); never raised for the code's own errors."""


class _Worker:
    """One fork-server process (for bwrap: the outer bwrap process) and its request/response pipes."""

    def __init__(
        self, index: int, kind: str, tier: str, wcfg: dict[str, Any], cfg: SandboxConfig, scratch: str | None
    ):
        self.index, self.kind, self.tier = index, kind, tier
        lnch = tiers.launch(tier, index, wcfg, cfg.uid_base, scratch, name=kind)
        self.proc = subprocess.Popen(
            lnch.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None if os.environ.get("RETOOL_SANDBOX_DEBUG") else subprocess.DEVNULL,
            env=tiers.MIN_ENV,
            cwd="/",
            start_new_session=True,
            close_fds=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.wfd, self.rfd = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        self.max_response = 16 * cfg.max_output_bytes + (1 << 16)
        self.start_timeout_s = cfg.start_timeout_s

    def wait_ready(self) -> None:
        msg = self._read(time.monotonic() + self.start_timeout_s)
        if not msg or not msg.get("ready"):
            why = (msg or {}).get("fatal") or "no answer"
            self.kill()
            raise SandboxError(f"sandbox worker {self.index}{self.kind} ({self.tier}) failed to start: {why}")
        self.pid_inside = msg.get("pid")
        self.huge_mb = int(msg.get("huge_mb") or 0)

    def _read_exact(self, n: int, deadline: float) -> bytes | None:
        chunks, got = [], 0
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([self.rfd], [], [], left)
            if not r:
                return None
            b = os.read(self.rfd, n - got)
            if not b:
                return None
            chunks.append(b)
            got += len(b)
        return b"".join(chunks)

    def _read(self, deadline: float) -> dict[str, Any] | None:
        head = self._read_exact(_HDR.size, deadline)
        if head is None:
            return None
        n = _HDR.unpack(head)[0]
        if n > self.max_response:
            return None
        body = self._read_exact(n, deadline)
        return None if body is None else json.loads(body)

    def call(self, req: dict[str, Any], deadline: float) -> dict[str, Any] | None:
        data = json.dumps(req).encode()
        try:
            self._write_all(_HDR.pack(len(data)) + data)
        except OSError:
            return None
        return self._read(deadline)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.wfd, view) :]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self, grace_s: float = 3.0) -> None:
        """Ask the worker to stop (EOF), then kill its process group; always reaps."""
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.kill()
        if self.proc.stdout:
            self.proc.stdout.close()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f:
                    f.close()
            except OSError:
                pass


class _Slot:
    """One unit of concurrency: a fork server with every preload module, plus (fast path) one with only the
    standard-library ones, whose smaller image forks and exits several times faster."""

    def __init__(self, heavy: _Worker, light: _Worker | None):
        self.heavy, self.light = heavy, light

    def workers(self) -> list[_Worker]:
        return [w for w in (self.heavy, self.light) if w is not None]


class Sandbox:
    """Isolated, fast Python execution: `run` (thread-safe) and `arun` (async), N calls at once.

    Each worker imports and warms the preload modules once, then forks a fresh child per call, so a call
    costs a fork rather than an interpreter start plus imports, and starts from clean state. Code that
    names none of the non-stdlib preload modules (numpy, sympy, ...) runs on a stdlib-only fork server of
    the same slot: same isolation, cheaper fork. This routing is only about speed: both servers are equally
    contained, and code that reaches a heavy module indirectly still works there (importing it from disk).
    """

    def __init__(self, config: SandboxConfig | None = None):
        self.config = cfg = config or SandboxConfig()
        self.isolation: str = tiers.resolve(cfg.isolation)
        self._closed = False
        self._lock = threading.Lock()
        self._scratch: str | None = None
        if self.isolation == "process":
            self._scratch = tempfile.mkdtemp(prefix="retool-sandbox-", dir=cfg.scratch_root)
            os.chmod(self._scratch, 0o711)
        heavy = [m for m in cfg.preload if m.split(".")[0] not in sys.stdlib_module_names]
        light = [m for m in cfg.preload if m.split(".")[0] in sys.stdlib_module_names]
        self._heavy_re = (
            re.compile(r"\b(" + "|".join(re.escape(m.split(".")[0]) for m in heavy) + r")\b")
            if heavy
            else None
        )
        self._fast = cfg.fast_path and bool(heavy)
        limits = {
            "wall_timeout_s": cfg.wall_timeout_s,
            "cpu_time_s": cfg.cpu_time_s,
            "memory_mb": cfg.memory_mb,
            "max_output_bytes": cfg.max_output_bytes,
            "max_processes": cfg.max_processes,
            "fsize": cfg.max_file_mb << 20,
            "nofile": cfg.max_open_files,
        }
        self._wcfg = {
            "heavy": {"preload": list(cfg.preload), "warmup": cfg.warmup, "limits": limits},
            "light": {"preload": light, "warmup": cfg.warmup, "limits": limits},
        }
        # bwrap's --die-with-parent watches the thread that started it: start workers from one thread
        # that lives as long as the sandbox.
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-spawn")
        self._calls = ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="sandbox-call")
        self._idle: queue.Queue[_Slot] = queue.Queue()
        self._slots: list[_Slot] = []
        self._workers: list[_Worker] = []  # every live worker process, for cleanup
        try:
            kinds = ["h", "l"] if self._fast else ["h"]
            started = self._spawner.submit(
                lambda: [[self._spawn(i, k) for k in kinds] for i in range(cfg.workers)]
            ).result()
            for ws in started:
                self._workers.extend(ws)
            for ws in started:
                for w in ws:
                    w.wait_ready()
                slot = _Slot(ws[0], ws[1] if len(ws) > 1 else None)
                self._slots.append(slot)
                self._idle.put(slot)
        except BaseException:
            self.close()
            raise
        self._finalizer = weakref.finalize(self, Sandbox._cleanup, self._workers, self._scratch)
        log.info(
            "sandbox ready: %d workers, isolation=%s, fast path=%s, %d MB of worker images in huge pages",
            cfg.workers,
            self.isolation,
            self._fast,
            sum(w.huge_mb for w in self._workers),
        )

    def _spawn(self, index: int, kind: str) -> _Worker:
        return _Worker(
            index,
            kind,
            self.isolation,
            self._wcfg["heavy" if kind == "h" else "light"],
            self.config,
            self._scratch,
        )

    def _restart(self, slot: _Slot, w: _Worker) -> None:
        w.kill()
        new = self._spawner.submit(self._spawn, w.index, w.kind).result()
        with self._lock:
            self._workers[self._workers.index(w)] = new
        new.wait_ready()
        if slot.heavy is w:
            slot.heavy = new
        else:
            slot.light = new

    # ------------------------------------------------------------------ public API

    @property
    def workers(self) -> int:
        return self.config.workers

    def run(self, code: str, timeout_s: float | None = None) -> ExecResult:
        """Run `code` in a fresh sandboxed process; blocks until a worker is free. Thread-safe."""
        if self._closed:
            raise SandboxError("sandbox is closed")
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, got {type(code).__name__}")
        cfg = self.config
        timeout = float(timeout_s) if timeout_s else cfg.wall_timeout_s
        req = {"code": code, "timeout": timeout}
        while True:  # wait for a free slot, but never past close()
            if self._closed:
                raise SandboxError("sandbox is closed")
            try:
                slot = self._idle.get(timeout=0.25)
                break
            except queue.Empty:
                continue
        use_heavy = (
            not self._fast or slot.light is None or bool(self._heavy_re and self._heavy_re.search(code))
        )
        w = slot.heavy if use_heavy else slot.light
        assert w is not None
        t0 = time.monotonic()
        try:
            res = w.call(req, time.monotonic() + timeout + 10.0)
            if res is None:
                # the worker died or hung (not the code: its limits are enforced inside the worker)
                if self._closed:
                    raise SandboxError("sandbox is closed")
                log.warning("sandbox worker %d%s failed; restarting it", w.index, w.kind)
                self._restart(slot, w)
                return ExecResult(
                    "error",
                    "",
                    "SandboxError: the interpreter crashed; state was reset",
                    False,
                    None,
                    time.monotonic() - t0,
                )
        finally:
            if not self._closed:
                self._idle.put(slot)
        return ExecResult(
            status=res["status"],
            stdout=res["stdout"],
            stderr=res["stderr"],
            truncated=bool(res["truncated"]),
            exit_code=res["exit_code"],
            duration_s=float(res["duration_s"]),
            timeout_s=res.get("timeout_s"),
            memory_mb=cfg.memory_mb,
            output_limit=cfg.max_output_bytes,
        )

    async def arun(self, code: str, timeout_s: float | None = None) -> ExecResult:
        """`run` from async code: the blocking part runs on the sandbox's own threads, never the loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._calls, self.run, code, timeout_s)

    def close(self) -> None:
        """Stop every worker (nothing of theirs survives) and remove scratch space. Idempotent."""
        if self._closed:
            return
        self._closed = True
        Sandbox._cleanup(self._workers, self._scratch)
        self._calls.shutdown(wait=False, cancel_futures=True)
        self._spawner.shutdown(wait=True)
        if hasattr(self, "_finalizer"):
            self._finalizer.detach()

    @staticmethod
    def _cleanup(workers: list[_Worker], scratch: str | None) -> None:
        for w in list(workers):
            with contextlib.suppress(OSError):
                w.proc.stdin.close() if w.proc.stdin else None
        for w in list(workers):
            w.close()
        if scratch and os.path.isdir(scratch):
            shutil.rmtree(scratch, ignore_errors=True)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Sandbox(isolation={self.isolation!r}, workers={self.config.workers})"
