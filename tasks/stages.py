"""Run one pipeline stage through DVC, so unchanged stages are skipped and dvc.lock records what ran."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

_SKIPPED = re.compile(r"Stage '([^']+)' didn't change, skipping")
_RUNNING = re.compile(r"Running stage '([^']+)'")


@dataclass
class StageOutcome:
    stage: str
    ran: bool
    seconds: float
    returncode: int


def dvc_executable() -> str:
    """The dvc next to this interpreter (the project's venv), else the one on PATH."""
    local = Path(sys.executable).with_name("dvc")
    return str(local) if local.exists() else (shutil.which("dvc") or "dvc")


def repro(stage: str, project_dir: Path, env: dict[str, str] | None = None, log: Any = None) -> StageOutcome:
    """`dvc repro --single-item STAGE`, streaming its output line by line into ``log``."""
    start = time.monotonic()
    full_env = {**os.environ, **(env or {})}
    bin_dir = str(Path(sys.executable).parent)
    full_env["PATH"] = bin_dir + os.pathsep + full_env.get("PATH", "")
    proc = subprocess.Popen(
        [dvc_executable(), "repro", "--single-item", stage],
        cwd=project_dir,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
    )
    ran = False
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            line = line.rstrip()
            if _RUNNING.search(line):
                ran = True
            if log is not None and line:
                log.info("[%s] %s", stage, line)
        rc = proc.wait()
    except BaseException:
        # Cancellation: stop exactly the stage we started (its own process group), then re-raise.
        _stop_group(proc)
        raise
    outcome = StageOutcome(stage, ran, round(time.monotonic() - start, 2), rc)
    if rc != 0:
        raise RuntimeError(f"stage {stage!r} failed (dvc repro exit {rc}); see the log above")
    return outcome


def _stop_group(proc: subprocess.Popen[str]) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@task(name="stage", task_run_name="{stage}", retries=1, retry_delay_seconds=5)
def run_stage(stage: str, project_dir: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """One pipeline stage; a retry resumes from the stage's last checkpoint (DVC `persist` outputs)."""
    logger = get_run_logger()
    outcome = repro(stage, Path(project_dir), env, logger)
    logger.info(
        "stage %s %s in %.1f s", stage, "ran" if outcome.ran else "unchanged, skipped", outcome.seconds
    )
    return asdict(outcome)
