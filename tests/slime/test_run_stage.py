"""run_stage end to end with the local runner and a stand-in slime: hooks log into the stage's MLflow run
(the run id travels through the job's environment), TensorBoard curves are mirrored, and a rerun after a
crash resumes from the last checkpoint instead of starting over."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from retool.backends.slime import JobFailedError, LocalRunner, SlimeConfig, run_stage
from retool.backends.slime.config import PathsConfig

FAKE_SLIME = Path(__file__).with_name("fake_slime")


def test_rl_stage_logs_mirrors_and_resumes(
    mlflow_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    cfg = SlimeConfig.model_validate(
        {
            "cluster": {"slime_dir": str(FAKE_SLIME), "megatron_dir": str(tmp_path / "no-megatron"), "python": sys.executable},
            "rl": {
                "rollout": {"num_rollout": 6},
                "save_interval": 2,
                "custom": {
                    # the integrator re-exports these from hooks.py; the bridge module is the source
                    "custom_rollout_log_function_path": "retool.backends.slime.mlflow_bridge.log_rollout_data",
                    "custom_eval_rollout_log_function_path": "retool.backends.slime.mlflow_bridge.log_eval_rollout_data",
                },
            },
            "tracking": {"mirror_interval_s": 0.2},
        }
    )  # fmt: skip
    paths = PathsConfig(rl_save=str(tmp_path / "rl"), tensorboard_dir=str(tmp_path / "tb"))
    client = MlflowClient()
    exp = client.get_experiment_by_name("slime-stage") or client.get_experiment(
        client.create_experiment("slime-stage")
    )
    run_id = client.create_run(exp.experiment_id).info.run_id

    lines: list[str] = []
    monkeypatch.setenv("FAKE_FAIL_AT", "3")
    with pytest.raises(JobFailedError, match="simulated crash at rollout 3"):
        run_stage("rl", cfg, paths, LocalRunner(), lines.append, run_id=run_id)
    assert (tmp_path / "rl" / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert "start_rollout_id=0" in lines

    monkeypatch.delenv("FAKE_FAIL_AT")
    lines.clear()
    result = run_stage(
        "rl", cfg, paths, LocalRunner(), lines.append, run_id=run_id, extra_env={"RETOOL_MARK": "m1"}
    )
    assert result.ok
    assert any("resuming from" in ln and "iteration 1" in ln for ln in lines)
    assert "start_rollout_id=2" in lines  # continued after the saved iteration, not from zero
    assert "RETOOL_MARK=m1" in lines  # extra job env (e.g. the hooks' settings) reaches the job

    steps = sorted(h.step for h in client.get_metric_history(run_id, "rollout/acc"))
    assert steps == [0, 1, 2, 2, 3, 4, 5]  # rollout 2 ran in the crashed attempt and again after resume
    assert client.get_run(run_id).data.metrics["rollout/acc"] == pytest.approx(0.5)
    loss_steps = sorted(h.step for h in client.get_metric_history(run_id, "train/loss"))
    assert loss_steps == [0, 1, 2, 3, 4, 5]  # mirrored once per step across both attempts
    assert client.get_run(run_id).data.metrics["eval/aime/acc"] == 1.0
