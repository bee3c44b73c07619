"""`Sandbox`: a pool of warm fork-server workers, each inside the chosen isolation tier."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
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
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from retool.sandbox import tiers
from retool.sandbox.config import SandboxConfig
from retool.sandbox.result import ExecResult

log = logging.getLogger(__name__)
_HDR = struct.Struct("!I")  # start-up messages: 4-byte length + JSON
# Calls, in binary (the same layouts as in _worker.py): request = _REQ + code as UTF-8, response = _RESP +
# stdout + stderr as raw bytes.
_REQ = struct.Struct("!dI")  # wall timeout, code length
_RESP = struct.Struct("!BBiddII")  # status, flags, exit code, duration, timeout applied, stdout/err lengths
_STATUS = ("ok", "error", "timeout", "memory")
_F_TRUNCATED, _F_EXIT_CODE, _F_TIMEOUT = 1, 2, 4


def request(code: str, timeout: float) -> bytes:
    data = code.encode("utf-8", "surrogatepass")
    return _REQ.pack(timeout, len(data)) + data


def _reply_size(head: bytes | bytearray, cap: int) -> int | None:
    """Length of the whole response this header starts; None if the header is malformed."""
    status, _f, _rc, _d, _t, n_out, n_err = _RESP.unpack_from(head)
    if status >= len(_STATUS) or n_out > cap or n_err > cap:
        return None
    return _RESP.size + n_out + n_err


def _parse_reply(data: bytes | bytearray) -> dict[str, Any]:
    status, flags, rc, duration, timeout_s, n_out, n_err = _RESP.unpack_from(data)
    out = bytes(data[_RESP.size : _RESP.size + n_out])
    err = bytes(data[_RESP.size + n_out : _RESP.size + n_out + n_err])
    return {
        "status": _STATUS[status],
        "stdout": out.decode("utf-8", "replace"),
        "stderr": err.decode("utf-8", "replace"),
        "truncated": bool(flags & _F_TRUNCATED),
        "exit_code": rc if flags & _F_EXIT_CODE else None,
        "duration_s": duration,
        "timeout_s": timeout_s if flags & _F_TIMEOUT else None,
    }


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
        # non-blocking requests: the event loop never waits on a full pipe (threads wait in select instead)
        fcntl.fcntl(self.wfd, fcntl.F_SETFL, fcntl.fcntl(self.wfd, fcntl.F_GETFL) | os.O_NONBLOCK)
        self.max_output = cfg.max_output_bytes  # the worker caps each stream at this
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
            try:
                if not select.select([self.rfd], [], [], left)[0]:
                    return None
                b = os.read(self.rfd, n - got)
            except (OSError, ValueError):  # the pipe was closed under us (close())
                return None
            if not b:
                return None
            chunks.append(b)
            got += len(b)
        return b"".join(chunks)

    def _read(self, deadline: float) -> dict[str, Any] | None:
        """A start-up message (ready or fatal)."""
        head = self._read_exact(_HDR.size, deadline)
        if head is None:
            return None
        n = _HDR.unpack(head)[0]
        if n > 1 << 20:
            return None
        body = self._read_exact(n, deadline)
        return None if body is None else json.loads(body)

    def call(self, data: bytes, deadline: float) -> dict[str, Any] | None:
        try:
            self._write_all(data, deadline)
        except OSError:
            return None
        return self.read_reply(bytearray(), deadline)

    def read_reply(self, buf: bytearray, deadline: float) -> dict[str, Any] | None:
        """Read the rest of a call's response, `buf` being what already came in."""
        if len(buf) < _RESP.size:
            b = self._read_exact(_RESP.size - len(buf), deadline)
            if b is None:
                return None
            buf += b
        size = _reply_size(buf, self.max_output)
        if size is None:
            return None
        if len(buf) < size:
            b = self._read_exact(size - len(buf), deadline)
            if b is None:
                return None
            buf += b
        return _parse_reply(buf)

    def _write_all(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.wfd, view) :]
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([], [self.wfd], [], left)[1]:
                    raise TimeoutError("sandbox worker is not reading its requests") from None

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


class _AsyncCall:
    """One request/response with a worker driven by the event loop's own readiness callbacks (no thread)."""

    def __init__(self, w: _Worker, data: bytes, limit_s: float, loop: asyncio.AbstractEventLoop):
        self.w, self.loop = w, loop
        self.fut: asyncio.Future[dict[str, Any] | None] = loop.create_future()
        self.buf = bytearray()
        self.pending = memoryview(data)
        self.timer = loop.call_later(limit_s, self._finish, None)
        self.attached, self.writing = True, False
        loop.add_reader(w.rfd, self._on_readable)
        self._on_writable()

    def _on_writable(self) -> None:
        try:
            while self.pending:
                self.pending = self.pending[os.write(self.w.wfd, self.pending) :]
        except BlockingIOError:  # a request larger than the pipe: the rest when the worker has read some
            if not self.writing:
                self.writing = True
                self.loop.add_writer(self.w.wfd, self._on_writable)
            return
        except OSError:
            self._finish(None)
            return
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.w.wfd)

    def _on_readable(self) -> None:
        try:
            b = os.read(self.w.rfd, 1 << 16)
        except OSError:
            b = b""
        if not b:  # the worker died
            self._finish(None)
            return
        self.buf += b
        if len(self.buf) < _RESP.size:
            return
        size = _reply_size(self.buf, self.w.max_output)
        if size is None:
            self._finish(None)
        elif len(self.buf) >= size:
            self._finish(_parse_reply(self.buf))

    def _finish(self, msg: dict[str, Any] | None) -> None:
        self.detach()
        if not self.fut.done():
            self.fut.set_result(msg)

    def abort(self) -> None:
        """From any thread: end the call as failed (the sandbox is closing and its pipes will close)."""
        with contextlib.suppress(RuntimeError):  # its loop is already closed
            self.loop.call_soon_threadsafe(self._finish, None)

    def detach(self) -> None:
        if self.attached:
            self.attached = False
            self.timer.cancel()
            self.loop.remove_reader(self.w.rfd)
            if self.writing:
                self.writing = False
                self.loop.remove_writer(self.w.wfd)

    def rest_in_thread(self, deadline: float) -> dict[str, Any] | None:
        """The awaiting task was cancelled mid-call: finish the exchange here, off the loop."""
        try:
            if self.pending:
                self.w._write_all(bytes(self.pending), deadline)
        except OSError:
            return None
        return self.w.read_reply(self.buf, deadline)


class _SlotPool:
    """Idle slots and the callers waiting for one, threads and coroutines alike, served in arrival order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: deque[_Slot] = deque()
        self._waiters: deque[_Waiter] = deque()
        self.closed = False

    def put(self, slot: _Slot) -> None:
        with self._lock:
            while self._waiters:
                if self._waiters.popleft().offer(slot):
                    return
            self._idle.append(slot)

    def get(self) -> _Slot:
        with self._lock:
            if self.closed:
                raise SandboxError("sandbox is closed")
            if self._idle:
                return self._idle.popleft()
            waiter = _ThreadWaiter()
            self._waiters.append(waiter)
        return waiter.wait()

    async def aget(self) -> _Slot:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.closed:
                raise SandboxError("sandbox is closed")
            if self._idle:
                return self._idle.popleft()
            waiter = _LoopWaiter(self, loop)
            self._waiters.append(waiter)
        return await waiter.fut

    def close(self) -> None:
        with self._lock:
            self.closed = True
            waiters, self._waiters = list(self._waiters), deque()
        for w in waiters:
            w.offer(None)


class _ThreadWaiter:
    def __init__(self) -> None:
        self._event = threading.Event()
        self._slot: _Slot | None = None

    def offer(self, slot: _Slot | None) -> bool:
        self._slot = slot
        self._event.set()
        return True

    def wait(self) -> _Slot:
        self._event.wait()
        if self._slot is None:
            raise SandboxError("sandbox is closed")
        return self._slot


class _LoopWaiter:
    def __init__(self, pool: _SlotPool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool, self.loop = pool, loop
        self.fut: asyncio.Future[_Slot] = loop.create_future()

    def offer(self, slot: _Slot | None) -> bool:
        if self.fut.done():  # its caller was cancelled
            return False
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        try:
            if running is self.loop:
                self.loop.call_soon(self._deliver, slot)
            else:
                self.loop.call_soon_threadsafe(self._deliver, slot)
        except RuntimeError:  # that loop is closed
            return False
        return True

    def _deliver(self, slot: _Slot | None) -> None:
        if self.fut.cancelled():
            if slot is not None:
                self.pool.put(slot)
        elif slot is None:
            self.fut.set_exception(SandboxError("sandbox is closed"))
        else:
            self.fut.set_result(slot)


_Waiter = _ThreadWaiter | _LoopWaiter


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
        # threads for what must not run on an event loop: restarting a worker, finishing a cancelled call
        self._calls = ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="sandbox-call")
        self._pool = _SlotPool()
        self._active: set[_AsyncCall] = set()  # calls driven by an event loop right now
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
                self._pool.put(slot)
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
        req, timeout = self._request(code, timeout_s)
        slot = self._pool.get()
        w = self._pick(slot, code)
        t0 = time.monotonic()
        res = None
        try:
            res = w.call(req, time.monotonic() + timeout + 10.0)
        finally:
            self._release(slot, w, res)
        return self._result(res, time.monotonic() - t0)

    async def arun(self, code: str, timeout_s: float | None = None) -> ExecResult:
        """`run` from async code, driven by the event loop itself: the loop never blocks, and no thread
        sits between it and the worker (a call costs a pipe write and a read callback)."""
        req, timeout = self._request(code, timeout_s)
        slot = await self._pool.aget()
        w = self._pick(slot, code)
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            call = _AsyncCall(w, req, timeout + 10.0, loop)
        except BaseException:
            self._pool.put(slot)
            raise
        with self._lock:
            self._active.add(call)
        try:
            res = await call.fut
        except asyncio.CancelledError:
            if call.fut.done() and not call.fut.cancelled():  # the answer came in as the caller gave up
                self._settle(slot, w, call.fut.result())
            elif not self._closed:
                # the worker is mid-call: a thread finishes the exchange and frees the slot, whatever
                # becomes of this loop
                call.detach()
                self._background(self._finish_in_thread, slot, w, call, time.monotonic() + timeout + 10.0)
            raise
        finally:
            with self._lock:
                self._active.discard(call)
        if res is None:  # restarting the worker blocks: not on the loop
            try:
                await loop.run_in_executor(self._calls, self._release, slot, w, None)
            except RuntimeError:  # closed meanwhile (its threads no longer take work)
                raise SandboxError("sandbox is closed") from None
        else:
            self._release(slot, w, res)
        return self._result(res, time.monotonic() - t0)

    def _settle(self, slot: _Slot, w: _Worker, res: dict[str, Any] | None) -> None:
        """`_release` from the event loop without waiting: a restart goes to a thread."""
        if res is None:
            self._background(self._release, slot, w, None)
        else:
            self._release(slot, w, res)

    def _background(self, fn: Any, *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the sandbox closed meanwhile: nothing is left to free
            self._calls.submit(fn, *args)

    def _request(self, code: str, timeout_s: float | None) -> tuple[bytes, float]:
        if self._closed:
            raise SandboxError("sandbox is closed")
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, got {type(code).__name__}")
        timeout = float(timeout_s) if timeout_s else self.config.wall_timeout_s
        return request(code, timeout), timeout

    def _pick(self, slot: _Slot, code: str) -> _Worker:
        light = self._fast and slot.light is not None and not (self._heavy_re and self._heavy_re.search(code))
        w = slot.light if light else slot.heavy
        assert w is not None
        return w

    def _release(self, slot: _Slot, w: _Worker, res: dict[str, Any] | None) -> None:
        """Give the slot back, first restarting its worker if the call got no answer from it (the worker
        died or hung; never the code's own doing: its limits are enforced inside the worker). Blocks for
        a restart; raises SandboxError if the sandbox closed meanwhile."""
        try:
            if res is None:
                if self._closed:
                    raise SandboxError("sandbox is closed")
                log.warning("sandbox worker %d%s failed; restarting it", w.index, w.kind)
                self._restart(slot, w)
        finally:
            if not self._closed:
                self._pool.put(slot)

    def _finish_in_thread(self, slot: _Slot, w: _Worker, call: _AsyncCall, deadline: float) -> None:
        res = None
        try:
            res = call.rest_in_thread(deadline)
        finally:
            self._release(slot, w, res)

    def _result(self, res: dict[str, Any] | None, elapsed_s: float) -> ExecResult:
        if res is None:
            return ExecResult(
                "error", "", "SandboxError: the interpreter crashed; state was reset", False, None, elapsed_s
            )
        cfg = self.config
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

    def close(self) -> None:
        """Stop every worker (nothing of theirs survives) and remove scratch space. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._pool.close()
        with self._lock:
            active, self._active = list(self._active), set()
        for call in active:
            call.abort()
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
