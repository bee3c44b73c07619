"""A stage killed mid-run promotes nothing half-written, and the rerun completes (resuming training)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time

from .conftest import BIN, dvc, make_project, project_env


def test_killed_sft_stage_promotes_nothing_and_the_rerun_resumes(tmp_path):
    project = make_project(
        tmp_path / "project", {"local.sft.max_steps": 400, "local.sft.checkpoint_every": 3}
    )
    prep = dvc(project, "repro", "sft_data", "convert")  # every input of the sft stage
    assert prep.returncode == 0, prep.stderr
    ckpts = project / "checkpoints" / "sft"
    proc = subprocess.Popen(
        [str(BIN / "dvc"), "repro", "--single-item", "sft"],
        cwd=project,
        env=project_env(project),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not any(ckpts.glob("step-*")):
            assert proc.poll() is None, "sft finished before it could be killed"
            time.sleep(0.2)
        assert any(ckpts.glob("step-*")), "no checkpoint appeared"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # Nothing half-written was promoted: the model folder is absent (or has no complete model).
    assert not (project / "models" / "sft" / "config.json").exists()

    # Shorter run now: the rerun must pick up the checkpoint rather than start from zero.
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("max_steps: 400", "max_steps: 8"))
    result = dvc(project, "repro", "sft")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (project / "models" / "sft" / "config.json").exists()
    metrics = json.loads((project / "metrics" / "sft.json").read_text())
    assert metrics["resumed_from"] > 0
