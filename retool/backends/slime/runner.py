"""Run a ``JobSpec``: on an existing Ray cluster (Job Submission API) or as a local subprocess.

Both runners stream the job's output line by line into a callback (the Prefect task passes its
logger), return a ``JobResult``, and stop the job when the caller is cancelled (KeyboardInterrupt,
``asyncio.CancelledError``) or calls ``stop()``. They only ever stop what they started: the Ray
job they submitted (by its submission id) or the process group of the subprocess they spawned.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from retool.backends.slime.commands import JobSpec

LogFn = Callable[[str], None]
Status = Literal["SUCCEEDED", "FAILED", "STOPPED"]
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"


class JobFailedError(RuntimeError):
    """A stage's job ended in anything but success."""

    def __init__(self, result: JobResult):
        tail = "\n".join(result.log_tail[-20:])
        super().__init__(
            f"stage {result.name!r} job {result.job_id} {result.status} after {result.duration_s:.1f}s"
            f"{': ' + result.message if result.message else ''}\n--- last log lines ---\n{tail}"
        )
        self.result = result


@dataclass
class JobResult:
    name: str
    job_id: str
    status: Status
    duration_s: float
    log_tail: list[str] = field(default_factory=list)
    returncode: int | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "SUCCEEDED"

    def raise_for_status(self) -> JobResult:
        if not self.ok:
            raise JobFailedError(self)
        return self


class Runner(Protocol):
    def run(self, spec: JobSpec, log: LogFn) -> JobResult: ...

    def stop(self) -> None: ...


class _LineSplitter:
    """Turns arbitrary output chunks into whole lines for the logger, keeping the last N."""

    def __init__(self, log: LogFn, keep: int):
        self._log = log
        self._partial = ""
        self.tail: deque[str] = deque(maxlen=keep)

    def feed(self, chunk: str) -> None:
        text = self._partial + chunk
        *lines, self._partial = text.split("\n")
        for line in lines:
            self._emit(line.rstrip("\r"))

    def close(self) -> None:
        if self._partial:
            self._emit(self._partial)
            self._partial = ""

    def _emit(self, line: str) -> None:
        self.tail.append(line)
        with contextlib.suppress(Exception):  # a broken logger must not lose the job
            self._log(line)


def resolve_address(address: str | None = None) -> str:
    """Ray dashboard address: explicit, else RAY_ADDRESS, else the local default."""
    return address or os.environ.get("RAY_ADDRESS") or DEFAULT_DASHBOARD


# --------------------------------------------------------------------------------------------------


class RayJobRunner:
    """Submits stages to an existing Ray cluster through ``JobSubmissionClient``.

    The cluster is never started or stopped here; a stop request stops only the submitted job.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        poll_interval_s: float = 1.0,
        tail_lines: int = 200,
        stop_timeout_s: float = 60.0,
        log_drain_timeout_s: float = 10.0,
        submit_retry_s: float = 60.0,
    ):
        self.address = resolve_address(address)
        self.poll_interval_s = poll_interval_s
        self.tail_lines = tail_lines
        self.stop_timeout_s = stop_timeout_s
        self.log_drain_timeout_s = log_drain_timeout_s
        self.submit_retry_s = submit_retry_s
        self._stop = threading.Event()
        self._client_obj: Any = None
        self.job_id: str | None = None

    def _client(self) -> Any:
        if self._client_obj is None:
            from ray.job_submission import JobSubmissionClient

            self._client_obj = JobSubmissionClient(self.address)
        return self._client_obj

    def stop(self) -> None:
        """Ask the running ``run``/``arun`` to stop its job (thread-safe)."""
        self._stop.set()

    def submit(self, spec: JobSpec) -> str:
        res = spec.resources
        job_id = f"retool-{spec.name}-{uuid.uuid4().hex[:10]}"
        deadline = time.monotonic() + self.submit_retry_s
        while True:
            try:
                self._client().submit_job(
                    entrypoint=spec.entrypoint,
                    submission_id=job_id,
                    runtime_env=spec.runtime_env,
                    metadata={"retool_stage": spec.name},
                    entrypoint_num_cpus=res.entrypoint_cpus,
                    entrypoint_num_gpus=res.entrypoint_gpus or None,
                )
                break
            except RuntimeError as err:
                # a freshly started head answers 500 "No available agent" until its job agent is up
                if "No available agent" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
        self.job_id = job_id
        return job_id

    def run(self, spec: JobSpec, log: LogFn) -> JobResult:
        """Blocking run (uses its own event loop; safe to call from a thread that has none)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.arun(spec, log))
        # called from inside an event loop: run ours on a helper thread
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["result"] = asyncio.run(self.arun(spec, log))
            except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
                box["error"] = err

        t = threading.Thread(target=target, name=f"ray-job-{spec.name}", daemon=True)
        t.start()
        try:
            t.join()
        except BaseException:
            self.stop()
            t.join(self.stop_timeout_s + 5)
            raise
        if "error" in box:
            raise box["error"]
        return box["result"]

    async def arun(self, spec: JobSpec, log: LogFn) -> JobResult:
        self._stop.clear()
        client = self._client()
        started = time.monotonic()
        job_id = await asyncio.to_thread(self.submit, spec)
        lines = _LineSplitter(log, self.tail_lines)
        lines.feed(f"[retool] submitted {spec.name} as Ray job {job_id} to {self.address}\n")
        stream = asyncio.create_task(self._stream_logs(client, job_id, lines))
        stopped_by_us = False
        try:
            while True:
                status = await asyncio.to_thread(client.get_job_status, job_id)
                if status.is_terminal():
                    break
                if self._stop.is_set() and not stopped_by_us:
                    stopped_by_us = True
                    lines.feed(f"[retool] stop requested: stopping Ray job {job_id}\n")
                    await asyncio.to_thread(client.stop_job, job_id)
                await asyncio.sleep(self.poll_interval_s)
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(stream), self.log_drain_timeout_s)
        except (asyncio.CancelledError, KeyboardInterrupt):
            stream.cancel()
            self._stop_blocking(client, job_id, lines)
            raise
        finally:
            if not stream.done():
                stream.cancel()
                with contextlib.suppress(BaseException):
                    await stream
            lines.close()
        info = await asyncio.to_thread(client.get_job_info, job_id)
        status_name = str(getattr(info.status, "value", info.status))
        final: Status = (
            "SUCCEEDED" if status_name == "SUCCEEDED" else "STOPPED" if status_name == "STOPPED" else "FAILED"
        )
        return JobResult(
            name=spec.name,
            job_id=job_id,
            status=final,
            duration_s=time.monotonic() - started,
            log_tail=list(lines.tail),
            returncode=getattr(info, "driver_exit_code", None),
            message=info.message or "",
        )

    def _stop_blocking(self, client: Any, job_id: str, lines: _LineSplitter) -> None:
        """Stop our job and wait (bounded) until Ray reports it terminal; used while being cancelled."""
        try:
            lines.feed(f"[retool] cancelled: stopping Ray job {job_id}\n")
            client.stop_job(job_id)
            deadline = time.monotonic() + self.stop_timeout_s
            while time.monotonic() < deadline:
                if client.get_job_status(job_id).is_terminal():
                    return
                time.sleep(0.5)
            lines.feed(f"[retool] Ray job {job_id} still not terminal after {self.stop_timeout_s:.0f}s\n")
        except Exception as err:  # noqa: BLE001 - report, the cancellation itself continues
            lines.feed(f"[retool] stopping Ray job {job_id} failed: {err}\n")

    async def _stream_logs(self, client: Any, job_id: str, lines: _LineSplitter) -> None:
        """Follow the job's output; if the websocket tail fails, fall back to polling the full log."""
        try:
            async for chunk in client.tail_job_logs(job_id):
                lines.feed(chunk)
            return
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001
            lines.feed(f"[retool] log tail interrupted ({err}); polling instead\n")
        seen = 0
        while True:
            text = await asyncio.to_thread(client.get_job_logs, job_id)
            if len(text) > seen:
                lines.feed(text[seen:])
                seen = len(text)
            status = await asyncio.to_thread(client.get_job_status, job_id)
            if status.is_terminal():
                text = await asyncio.to_thread(client.get_job_logs, job_id)
                if len(text) > seen:
                    lines.feed(text[seen:])
                return
            await asyncio.sleep(self.poll_interval_s)


# --------------------------------------------------------------------------------------------------


class LocalRunner:
    """Runs the same argv as a subprocess on this machine (a single GPU box).

    The child gets a session (and process group) of its own; stopping signals that group only:
    SIGTERM, then SIGKILL after ``stop_grace_s``.
    """

    def __init__(self, *, tail_lines: int = 200, stop_grace_s: float = 20.0, cwd: str | None = None):
        self.tail_lines = tail_lines
        self.stop_grace_s = stop_grace_s
        self.cwd = cwd
        self._stop = threading.Event()
        self.proc: subprocess.Popen[str] | None = None

    def stop(self) -> None:
        self._stop.set()

    def environment(self, spec: JobSpec) -> dict[str, str]:
        """os.environ + the job's env_vars; py_modules become PYTHONPATH entries (their parents)."""
        env = dict(os.environ)
        job_env = spec.env_vars
        paths: list[str] = []
        for module in spec.runtime_env.get("py_modules", []):
            paths.append(os.path.dirname(os.path.abspath(module)))
        if job_env.get("PYTHONPATH"):
            paths.append(job_env["PYTHONPATH"])
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env.update(job_env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def run(self, spec: JobSpec, log: LogFn) -> JobResult:
        self._stop.clear()
        started = time.monotonic()
        lines = _LineSplitter(log, self.tail_lines)
        proc = subprocess.Popen(
            spec.argv,
            env=self.environment(spec),
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            start_new_session=True,
        )
        self.proc = proc
        job_id = f"local-{spec.name}-{proc.pid}"
        lines.feed(f"[retool] started {spec.name} as pid {proc.pid} (process group {proc.pid})\n")

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.feed(line)

        reader = threading.Thread(target=pump, name=f"local-job-{spec.name}", daemon=True)
        reader.start()
        stopped = False
        try:
            while proc.poll() is None:
                if self._stop.is_set() and not stopped:
                    stopped = True
                    lines.feed(f"[retool] stop requested: terminating process group {proc.pid}\n")
                    self._terminate(proc)
                time.sleep(0.1)
        except BaseException:
            lines.feed(f"[retool] cancelled: terminating process group {proc.pid}\n")
            self._terminate(proc)
            reader.join(5)
            lines.close()
            raise
        reader.join(10)
        lines.close()
        rc = proc.returncode
        status: Status = "STOPPED" if stopped else ("SUCCEEDED" if rc == 0 else "FAILED")
        return JobResult(
            name=spec.name,
            job_id=job_id,
            status=status,
            duration_s=time.monotonic() - started,
            log_tail=list(lines.tail),
            returncode=rc,
            message="" if rc == 0 else f"exit code {rc}",
        )

    def _terminate(self, proc: subprocess.Popen[str]) -> None:
        """SIGTERM our child's process group, SIGKILL it after the grace period; nothing else."""
        pgid = proc.pid  # start_new_session: the child leads its own group
        for sig, wait_s in ((signal.SIGTERM, self.stop_grace_s), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
            try:
                proc.wait(wait_s)
                # the leader is gone; take down anything it left in its group
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                return
            except subprocess.TimeoutExpired:
                continue
