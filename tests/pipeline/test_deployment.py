"""`prefect deployment run 'retool-pipeline/tiny'` against a real `prefect server start` and worker."""

from __future__ import annotations

import json
import shutil
import subprocess

import yaml

from .conftest import BIN, project_env
from .servers import free_port, stop_group, wait_http


def test_deployment_run_through_a_real_server_and_process_worker(reproduced_project, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(reproduced_project, project, symlinks=True)
    port = free_port()
    env = project_env(project)
    env.update(
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="INFO",
    )
    prefect = str(BIN / "prefect")

    def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [prefect, *args], cwd=project, env=env, capture_output=True, text=True, timeout=timeout
        )

    server_log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=server_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    worker = None
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", 180, server)
        created = cli("work-pool", "create", "retool-local", "--type", "process")
        assert created.returncode == 0, created.stdout + created.stderr
        deployed = cli("--no-prompt", "deploy", "--all")
        assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
        worker_log = (tmp_path / "worker.log").open("wb")
        worker = subprocess.Popen(
            [prefect, "worker", "start", "--pool", "retool-local"],
            cwd=project,
            env=env,
            stdout=worker_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        params = json.dumps({"overrides": {"local.eval.n_samples": 1}})
        run = cli("deployment", "run", "retool-pipeline/tiny", "--params", params, "--watch", timeout=900)
        logs = (tmp_path / "worker.log").read_text(errors="replace")
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:] + logs[-4000:]
        assert "Completed" in run.stdout
        # The deployment ran in the project folder and DVC reran only what the override touched.
        assert yaml.safe_load((project / "params.yaml").read_text())["local"]["eval"]["n_samples"] == 1
        assert "stage eval ran" in logs and "stage sft unchanged, skipped" in logs
    finally:
        if worker is not None:
            stop_group(worker)
        stop_group(server)
        server_log.close()
