"""Real servers on loopback for the pipeline tests (MLflow, Prefect, moto S3), stopped by process group."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited early with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status < 500:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server and everything it spawned (its own session), nothing else."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    # Children that outlived the leader (e.g. MLflow's huey consumers) are still in the group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def _server(
    cmd: list[str], workdir: Path, log_name: str, health_url: str, timeout_s: float
) -> Iterator[None]:
    """Run a server in its own session until the block ends; its output goes to workdir/log_name."""
    log = open(workdir / log_name, "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(health_url, timeout_s, proc)
        yield
    finally:
        stop_group(proc)
        log.close()


@contextlib.contextmanager
def mlflow_server(workdir: Path) -> Iterator[str]:
    url = f"http://127.0.0.1:{free_port()}"
    port = url.rsplit(":", 1)[1]
    cmd = [
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        port,
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{workdir / 'server.db'}",
        "--default-artifact-root",
        str(workdir / "artifacts"),
    ]
    with _server(cmd, workdir, "mlflow-server.log", f"{url}/health", 120):
        yield url


@contextlib.contextmanager
def moto_server(workdir: Path) -> Iterator[str]:
    url = f"http://127.0.0.1:{free_port()}"
    cmd = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", url.rsplit(":", 1)[1]]
    with _server(cmd, workdir, "moto.log", f"{url}/", 60):
        yield url
