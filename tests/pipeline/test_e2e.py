"""The whole pipeline on the smoke profile, through `dvc repro` and through the Prefect flow."""

from __future__ import annotations

import csv
import json
import shutil
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from .conftest import dvc, project_env


def test_dvc_repro_runs_every_stage_and_records_it(reproduced_project):
    p = reproduced_project
    lock = yaml.safe_load((p / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"download", "convert", "sft_data", "sft", "rl", "eval", "export"}

    evals = json.loads((p / "metrics" / "eval.json").read_text())
    assert set(evals) == {"base", "sft", "rl"}
    for row in evals.values():
        for key in ("acc", "tool_call_rate", "answer_rate", "reward_mean"):
            assert 0.0 <= row[key] <= 1.0 or key == "reward_mean"
        assert any(k.startswith("pass@") for k in row)
    samples = [json.loads(x) for x in (p / "metrics" / "eval_samples.jsonl").read_text().splitlines()]
    assert {s["checkpoint"] for s in samples} == {"base", "sft", "rl"}

    with (p / "metrics" / "rl_curve.csv").open() as fh:
        curve = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in curve] == [1, 2] or [int(r["step"]) for r in curve] == [0, 1]
    assert (p / "export" / "model" / "config.json").exists()
    assert (p / "export" / "MODEL_CARD.md").read_text().count("|") > 10

    client = MlflowClient(f"sqlite:///{p / 'mlflow.db'}")
    exp = client.get_experiment_by_name("retool")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert {"download", "sft", "rl", "eval", "eval:base", "eval:sft", "eval:rl"} <= set(runs)
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert "eval/eval/acc" in runs["eval:rl"].data.metrics
    rl_hist = client.get_metric_history(runs["rl"].info.run_id, "rollout/reward_mean")
    assert len(rl_hist) >= 2 and sorted(m.step for m in rl_hist) == [m.step for m in rl_hist]
    assert runs["rl"].data.params["local.grpo.steps"] == "2"


def test_second_repro_with_nothing_changed_runs_no_stage(reproduced_project):
    start = time.monotonic()
    result = dvc(reproduced_project, "repro")
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    assert "Running stage" not in result.stdout
    assert elapsed < 5.0, f"no-op dvc repro took {elapsed:.1f} s"


@pytest.fixture
def project_copy(reproduced_project, tmp_path):
    dest = tmp_path / "copy"
    shutil.copytree(reproduced_project, dest, symlinks=True)
    return dest


def test_prefect_flow_skips_unchanged_stages_and_reruns_what_a_param_touches(project_copy, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import retool_pipeline

    for key, value in project_env(project_copy).items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(project_copy)
    with prefect_test_harness():
        result = retool_pipeline(project_dir=str(project_copy), overrides={"local.eval.n_samples": 1})
    ran = {o["stage"]: o["ran"] for o in result["stages"]}
    assert ran == {
        "download": False,
        "convert": False,
        "sft_data": False,
        "sft": False,
        "rl": False,
        "eval": True,
        "export": True,
    }
    assert yaml.safe_load((project_copy / "params.yaml").read_text())["local"]["eval"]["n_samples"] == 1
    assert {row["checkpoint"] for row in result["eval"]} == {"base", "sft", "rl"}

    client = MlflowClient(f"sqlite:///{project_copy / 'mlflow.db'}")
    parent = client.get_run(result["mlflow_parent_run"])
    assert parent.info.run_name == "pipeline" and parent.info.status == "FINISHED"
    assert any(k.startswith("dvc.sft.models/sft") for k in parent.data.tags)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_name = {c.info.run_name: c for c in children}
    assert {"eval", "export"} <= set(by_name)
    checkpoints = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{by_name['eval'].info.run_id}'",
    )
    assert {c.info.run_name for c in checkpoints} == {"eval:base", "eval:sft", "eval:rl"}
    assert all("eval/eval/acc" in c.data.metrics for c in checkpoints)
    assert not (project_copy / ".retool" / "mlflow-buffer.jsonl").exists()  # nothing fell back offline


def test_flow_rejects_a_bad_override_before_writing_anything(project_copy):
    from flows.pipeline import apply_params
    from retool.config import ConfigError

    before = (project_copy / "params.yaml").read_text()
    with pytest.raises(ConfigError, match="local.grpo.stepz"):
        apply_params(project_copy, None, {"local.grpo.stepz": 3})
    assert (project_copy / "params.yaml").read_text() == before
