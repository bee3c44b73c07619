"""retool.tracking against a real MLflow server on loopback, and with the server gone."""

from __future__ import annotations

import json

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from retool import tracking

from .servers import free_port, mlflow_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One real MLflow server for the module (starting one takes 20-30 s here)."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


@pytest.fixture
def fresh_tracking(tmp_path, monkeypatch):
    monkeypatch.setenv(tracking.BUFFER_ENV, str(tmp_path / "buffer.jsonl"))
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    tracking._state.update(offline_run=None, warned=False)
    yield tmp_path
    while mlflow.active_run():
        mlflow.end_run()


def test_flatten_names_nested_keys():
    assert tracking.flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {
        "a.b": "1",
        "a.c": "[1, 2]",
        "d": "None",
    }


def test_parent_child_runs_params_and_stepped_metrics_on_a_real_server(fresh_tracking, server, monkeypatch):
    url = server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    mlflow.set_tracking_uri(url)
    with tracking.stage_run("pipeline", experiment="t-real", tags={"git.commit": "abc"}) as parent:
        monkeypatch.setenv(tracking.PARENT_ENV, parent)
        with tracking.stage_run("rl", experiment="t-real", params={"grpo": {"lr": 1e-4}}) as child:
            for step in range(3):
                tracking.log_metrics(
                    {"rollout/reward_mean": 0.1 * step, "bad": float("nan"), "eval/pass@4": 0.5}, step=step
                )
    client = MlflowClient(url)
    child_run = client.get_run(child)
    assert child_run.data.tags["mlflow.parentRunId"] == parent
    assert child_run.data.params["grpo.lr"] == "0.0001"
    history = client.get_metric_history(child, "rollout/reward_mean")
    assert [m.step for m in history] == [0, 1, 2]
    assert "bad" not in child_run.data.metrics  # NaN is dropped, not sent
    assert child_run.data.metrics["eval/pass_at_4"] == 0.5  # '@' is not allowed in MLflow names
    assert client.get_run(parent).data.tags["git.commit"] == "abc"
    assert child_run.info.status == "FINISHED"


def test_unreachable_server_keeps_metrics_locally_then_syncs(fresh_tracking, server, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    mlflow.set_tracking_uri(dead)
    with tracking.stage_run("sft", experiment="t-offline", params={"lr": 3e-3}) as run_id:
        assert run_id.startswith("offline-")
        for step in range(4):
            tracking.log_metrics({"train/loss": 2.0 - step * 0.5}, step=step)  # never raises
    records = [json.loads(x) for x in (fresh_tracking / "buffer.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records][:2] == ["start", "params"]
    assert sum(r["kind"] == "metrics" for r in records) == 4

    url = server
    mlflow.set_tracking_uri(url)
    sent = tracking.sync_buffer(fresh_tracking / "buffer.jsonl")
    assert sent == len(records)
    client = MlflowClient(url)
    exp = client.get_experiment_by_name("t-offline")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.params["lr"] == "0.003"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2.0, 1.5, 1.0, 0.5]
    assert run.info.status == "FINISHED"
    assert not (fresh_tracking / "buffer.jsonl").exists()  # renamed, never sent twice
    assert (fresh_tracking / "buffer.jsonl.synced").exists()


def test_a_failing_stage_ends_its_run_failed(fresh_tracking, monkeypatch):
    uri = f"sqlite:///{fresh_tracking / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    with pytest.raises(RuntimeError), tracking.stage_run("rl", experiment="t-fail"):
        tracking.log_metrics({"x": 1.0}, step=0)
        raise RuntimeError("boom")
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("t-fail").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.metrics["x"] == 1.0
