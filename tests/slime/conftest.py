"""Fixtures for the slime backend tests: a real Ray head on loopback, started and stopped by us."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _pids_mentioning(marker: str) -> list[int]:
    """Processes whose command line names our private temp dir (only this fixture's Ray uses it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


@pytest.fixture(scope="session")
def ray_head() -> Iterator[str]:
    """A one-node Ray cluster bound to 127.0.0.1; yields the dashboard (job API) address.

    ``ray start --block`` runs in a session of its own, so its daemons share its process group;
    teardown signals that group, then any straggler whose command line names our temp dir, by pid.
    ``ray stop`` is never used: it would stop every Ray on the machine.
    """
    ray_bin = VENV_BIN / "ray"
    if not ray_bin.exists():
        pytest.skip(f"ray CLI not found at {ray_bin}")
    temp_dir = tempfile.mkdtemp(prefix="rtray", dir="/tmp")
    gcs, dash, client, agent_http, agent_grpc, metrics, node_mgr, obj_mgr, rt_env = _free_ports(9)
    worker_lo = 20000 + (os.getpid() % 200) * 100
    cmd = [
        str(ray_bin), "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1", "--port", str(gcs),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
        "--ray-client-server-port", str(client),
        "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
        "--metrics-export-port", str(metrics), "--node-manager-port", str(node_mgr),
        "--object-manager-port", str(obj_mgr), "--runtime-env-agent-port", str(rt_env),
        "--min-worker-port", str(worker_lo), "--max-worker-port", str(worker_lo + 99),
        "--num-cpus", "2", "--num-gpus", "0",
        "--temp-dir", temp_dir, "--disable-usage-stats",
    ]  # fmt: skip
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"Ray dashboard at {address} not up:\n{log_path.read_text()[-3000:]}"
                    ) from None
                time.sleep(0.5)
        yield address
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        for pid in _pids_mentioning(temp_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def _mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite store for the session: creating MLflow's tables takes seconds; tests use fresh runs."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # creates the schema once
    mlflow.set_tracking_uri(uri)
    return uri


@pytest.fixture()
def mlflow_store(_mlflow_db: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A real MLflow sqlite store; MLFLOW_TRACKING_URI points at it for this test."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", _mlflow_db)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(_mlflow_db)
    return _mlflow_db
