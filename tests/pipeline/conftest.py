"""A throwaway project on the smoke profile: the real dvc.yaml, params.yaml shrunk to seconds."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from retool.config import set_dotted

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# The tiny profile shrunk until every stage takes seconds; the stages, code paths and servers are real.
SMOKE = {
    "data.synthetic.sft_size": 240,
    "data.synthetic.train_size": 16,
    "data.synthetic.eval_size": 4,
    "local.progress": False,
    "local.model.num_hidden_layers": 1,
    "local.model.hidden_size": 32,
    "local.model.intermediate_size": 64,
    "local.model.num_attention_heads": 2,
    "local.model.num_key_value_heads": 1,
    "local.sft.max_steps": 12,
    "local.sft.batch_size": 8,
    "local.sft.warmup_steps": 2,
    "local.sft.checkpoint_every": 4,
    "local.sft.log_every": 2,
    "local.grpo.steps": 2,
    "local.grpo.prompts_per_step": 2,
    "local.grpo.n_samples": 2,
    "local.grpo.micro_batch_size": 4,
    "local.grpo.checkpoint_every": 1,
    "local.eval.n_samples": 2,
    "local.eval.max_problems": 2,
    "local.rollout.max_turns": 2,
    "local.rollout.max_new_tokens": 48,
    "local.rollout.max_context_tokens": 320,
    "sandbox.workers": 1,
}


def project_env(project: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
    env["RETOOL_MLFLOW_BUFFER"] = str(project / ".retool" / "mlflow-buffer.jsonl")
    for key in ("MLFLOW_RUN_ID", "RETOOL_MLFLOW_PARENT_RUN_ID", "PREFECT_API_URL"):
        env.pop(key, None)
    return env


def make_project(dest: Path, overrides: dict | None = None) -> Path:
    """dest gets dvc.yaml, a smoke params.yaml and the code the stages list as deps; git + dvc initialised."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".dvcignore", "prefect.yaml"):
        shutil.copy2(ROOT / name, dest / name)
    for pkg in ("retool", "flows", "tasks"):
        shutil.copytree(ROOT / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in {**SMOKE, **(overrides or {})}.items():
        set_dotted(params, key, value)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (dest / ".gitignore").write_text("/mlflow.db\n/.retool/\n")
    env = project_env(dest)
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)
    return dest


def dvc(project: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "dvc"), *args],
        cwd=project,
        env=project_env(project),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def reproduced_project(tmp_path_factory) -> Path:
    """One smoke project reproduced end to end with `dvc repro` (shared by the tests that only read it)."""
    project = make_project(tmp_path_factory.mktemp("smoke") / "project")
    result = dvc(project, "repro")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return project
