"""The Ray runner against a real local Ray head (loopback), and the local subprocess runner."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from retool.backends.slime.commands import JobSpec, StageResources, package_root
from retool.backends.slime.runner import JobFailedError, LocalRunner, RayJobRunner

STANDIN = str(Path(__file__).with_name("standin_job.py"))


def spec(*args: str, name: str = "standin", env: dict[str, str] | None = None, ship: bool = False) -> JobSpec:
    runtime_env: dict = {"env_vars": {"PYTHONUNBUFFERED": "1", **(env or {})}}
    if ship:
        runtime_env["py_modules"] = [str(package_root())]
    return JobSpec(
        name=name,
        argv=[sys.executable, STANDIN, *args],
        runtime_env=runtime_env,
        resources=StageResources(entrypoint_cpus=0.5),
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); count it as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _wait_file(path: Path, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return int(path.read_text())


def _wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        assert time.monotonic() < deadline, f"process {pid} still running"
        time.sleep(0.1)


# ------------------------------------------------------------------------------------------ Ray


class TestRayJobRunner:
    def test_success_and_failure_concurrently(self, ray_head: str) -> None:
        """Two jobs at once (also keeps the suite short): one succeeds, one fails."""
        from concurrent.futures import ThreadPoolExecutor

        lines: list[str] = []
        good = spec(
            "--lines", "4", "--show-env", "RETOOL_MARK", "--show-env", "PYTHONPATH", "--import-retool",
            env={"RETOOL_MARK": "x42", "PYTHONPATH": "/opt/fake-megatron:/opt/fake-slime"}, ship=True,
        )  # fmt: skip
        bad = spec("--lines", "2", "--exit-code", "3", name="broken")
        with ThreadPoolExecutor(2) as pool:
            fut_ok = pool.submit(RayJobRunner(ray_head, poll_interval_s=0.3).run, good, lines.append)
            fut_bad = pool.submit(RayJobRunner(ray_head, poll_interval_s=0.3).run, bad, lambda _: None)
            result, failed = fut_ok.result(), fut_bad.result()

        assert result.ok, result.log_tail
        assert result.status == "SUCCEEDED" and result.job_id.startswith("retool-standin-")
        assert [ln for ln in lines if ln.startswith("line ")] == [f"line {i}" for i in range(4)]
        assert "ENV RETOOL_MARK=x42" in lines
        assert "DONE" in result.log_tail
        shipped = next(ln for ln in lines if ln.startswith("RETOOL_FROM "))
        # py_modules puts the uploaded copy first on the job's path, not this checkout
        assert not shipped.split(" ", 1)[1].startswith(str(package_root())), shipped
        # ...and keeps the slime / Megatron-LM entries our env_vars put on PYTHONPATH
        pythonpath = next(ln for ln in lines if ln.startswith("ENV PYTHONPATH=")).split("=", 1)[1].split(":")
        assert "/opt/fake-megatron" in pythonpath and "/opt/fake-slime" in pythonpath
        assert result.duration_s > 0

        assert failed.status == "FAILED" and failed.job_id.startswith("retool-broken-")
        assert "failing on purpose" in failed.log_tail
        with pytest.raises(JobFailedError, match="FAILED"):
            failed.raise_for_status()

    def test_stop_stops_only_our_job(self, ray_head: str, tmp_path: Path) -> None:
        pid_file = tmp_path / "pid"
        runner = RayJobRunner(ray_head, poll_interval_s=0.3)
        ready = threading.Event()

        def log(line: str) -> None:
            if line == "READY":
                ready.set()

        box: dict = {}
        t = threading.Thread(
            target=lambda: box.setdefault("r", runner.run(spec("--hang", "--pid-file", str(pid_file)), log))
        )
        t.start()
        assert ready.wait(60), "job never became ready"
        pid = _wait_file(pid_file)
        assert _alive(pid)
        started = time.monotonic()
        runner.stop()
        t.join(60)
        assert not t.is_alive()
        assert box["r"].status == "STOPPED"
        assert time.monotonic() - started < 40
        _wait_gone(pid)

    async def test_cancellation_stops_the_job(self, ray_head: str, tmp_path: Path) -> None:
        from ray.job_submission import JobStatus, JobSubmissionClient

        pid_file = tmp_path / "pid"
        runner = RayJobRunner(ray_head, poll_interval_s=0.3)
        task = asyncio.create_task(runner.arun(spec("--hang", "--pid-file", str(pid_file)), lambda _: None))
        pid = await asyncio.to_thread(_wait_file, pid_file, 60)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert runner.job_id is not None
        assert JobSubmissionClient(ray_head).get_job_status(runner.job_id) == JobStatus.STOPPED
        await asyncio.to_thread(_wait_gone, pid)


# ------------------------------------------------------------------------------------------ local


class TestLocalRunner:
    def test_success_and_failure(self) -> None:
        lines: list[str] = []
        ok = LocalRunner().run(
            spec("--lines", "3", "--show-env", "RETOOL_MARK", env={"RETOOL_MARK": "y"}), lines.append
        )
        assert ok.status == "SUCCEEDED" and ok.returncode == 0
        assert [ln for ln in lines if ln.startswith("line ")] == ["line 0", "line 1", "line 2"]
        assert "ENV RETOOL_MARK=y" in lines
        bad = LocalRunner().run(spec("--exit-code", "5"), lambda _: None)
        assert bad.status == "FAILED" and bad.returncode == 5
        assert "failing on purpose" in bad.log_tail

    def test_stop_kills_its_process_group_only(self, tmp_path: Path) -> None:
        import subprocess

        bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            pid_file = tmp_path / "pid"
            runner = LocalRunner(stop_grace_s=5)
            box: dict = {}
            t = threading.Thread(
                target=lambda: box.setdefault(
                    "r", runner.run(spec("--hang", "--pid-file", str(pid_file)), lambda _: None)
                )
            )
            t.start()
            pid = _wait_file(pid_file)
            runner.stop()
            t.join(30)
            assert box["r"].status == "STOPPED"
            _wait_gone(pid)
            assert bystander.poll() is None, "the runner touched a process it did not start"
        finally:
            bystander.kill()
            bystander.wait()
