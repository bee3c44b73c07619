"""slime's log hooks and the TensorBoard mirror against a real MLflow sqlite store.

Inputs are slime-shaped: a stand-in Sample with slime's field names (and a nested Status enum), tool
calls as our generate hook stores them, and event files written by torch's SummaryWriter exactly as
slime's TensorBoard adapter writes them.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from retool.backends.slime import mlflow_bridge
from retool.backends.slime.tensorboard_mirror import TensorBoardMirror
from retool.rollout import ToolCallRecord
from tests.slime_sample import Sample


def call(status: str = "ok", code: str = "print(1)\nprint(2)") -> ToolCallRecord:
    return ToolCallRecord(
        name="code_interpreter", arguments={"code": code}, fmt="tool_call", status=status, error=None,
        observation="1\n2", duration_s=0.01, turn=0, char_pos=5, token_pos=2,
    )  # fmt: skip


def sample(
    group: int, correct: bool, *, calls: int = 1, truncated: bool = False, resp_len: int = 6
) -> Sample:
    pred = "12" if correct else ("7" if calls else None)
    return Sample(
        group_index=group,
        index=group * 10 + calls,
        prompt=f"question {group}",
        tokens=list(range(4 + resp_len)),
        response="x" * 20,
        response_length=resp_len,
        label="12",
        reward={"score": 1.0 if correct else -0.6, "acc": float(correct), "pred": pred or ""},
        loss_mask=[1] * resp_len,
        rollout_log_probs=[-0.1] * resp_len,
        status=Sample.Status.TRUNCATED if truncated else Sample.Status.COMPLETED,
        metadata={"tool_calls": [call("error" if not correct else "ok") for _ in range(calls)], "num_turns": calls + 1,
                  "pred": pred, "correct": correct},
    )  # fmt: skip


ARGS = SimpleNamespace(
    reward_key="score", eval_reward_key=None, n_samples_per_prompt=2, n_samples_per_eval_prompt=2,
    rollout_batch_size=2, global_batch_size=4, wandb_always_use_train_step=False,
)  # fmt: skip


@pytest.fixture()
def run_id(mlflow_store: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A stage run in the sqlite store; the hooks find it through MLFLOW_RUN_ID, as in a job."""
    client = MlflowClient()
    exp = client.get_experiment_by_name("slime-bridge")
    exp_id = exp.experiment_id if exp else client.create_experiment("slime-bridge")
    rid = client.create_run(exp_id).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", rid)
    return rid


def metrics(rid: str) -> dict[str, float]:
    return MlflowClient().get_run(rid).data.metrics


def test_rollout_hook_logs_shared_names_and_lets_slime_log(run_id: str) -> None:
    samples = [
        sample(0, True),
        sample(0, False, calls=2),
        sample(1, False, calls=0, truncated=True),
        sample(1, True),
    ]
    before = copy.deepcopy(samples)
    extra = {"rollout/zero_std/count": 1, "note": "text is skipped"}
    assert mlflow_bridge.log_rollout_data(7, ARGS, samples, extra, 12.5) is False
    assert samples == before  # slime's own logging sees the samples untouched
    m = metrics(run_id)
    assert m["rollout/acc"] == pytest.approx(0.5)
    assert m["rollout/reward_mean"] == pytest.approx((1 - 0.6 - 0.6 + 1) / 4)
    assert m["rollout/tool_call_rate"] == pytest.approx(0.75)
    assert m["rollout/tool_calls_per_response"] == pytest.approx(1.0)
    assert m["rollout/code_error_rate"] == pytest.approx(2 / 4)
    assert m["rollout/truncated_rate"] == pytest.approx(0.25)
    assert m["rollout/answer_rate"] == pytest.approx(0.75)
    assert m["rollout/turns_mean"] == pytest.approx((2 + 3 + 1 + 2) / 4)
    assert m["rollout/zero_std/count"] == 1 and m["rollout/time_s"] == 12.5
    assert "rollout/note" not in m
    assert [h.step for h in MlflowClient().get_metric_history(run_id, "rollout/acc")] == [7]


def test_eval_hook_logs_per_dataset_with_pass_at_k(run_id: str) -> None:
    samples = [sample(0, True), sample(0, False), sample(1, False), sample(1, False)]
    data = {
        "aime": {
            "rewards": [s.reward["score"] for s in samples],
            "truncated": [False] * 4,
            "samples": samples,
        },
        "math500": {"rewards": [1.0, -0.6], "truncated": [True, False]},  # no samples: rewards only
    }
    snapshot = copy.deepcopy(data)
    assert mlflow_bridge.log_eval_rollout_data(20, ARGS, data, {"eval/aime/time_s": 3.0}) is False
    assert data == snapshot
    m = metrics(run_id)
    assert m["eval/aime/acc"] == pytest.approx(0.25)
    # MLflow refuses '@' in names: pass@k is stored as pass_at_k
    assert m["eval/aime/pass_at_2"] == pytest.approx(0.5)  # one of two problems solved within 2 samples
    assert m["eval/aime/pass_at_1"] == pytest.approx(0.25)
    assert m["eval/math500/reward_mean"] == pytest.approx(0.2)
    assert m["eval/math500/truncated_rate"] == pytest.approx(0.5)
    assert m["eval/aime/time_s"] == 3.0


def test_hooks_never_raise(mlflow_store: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # an unreachable tracking server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_RUN_ID", "0" * 32)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    mlflow.set_tracking_uri("http://127.0.0.1:9")
    started = time.monotonic()
    assert mlflow_bridge.log_rollout_data(1, ARGS, [sample(0, True)], None, 1.0) is False
    # garbage that is not a Sample at all
    assert mlflow_bridge.log_rollout_data(1, ARGS, [object(), 3], None, 1.0) is False
    assert mlflow_bridge.log_eval_rollout_data(1, ARGS, {"aime": "not a dict"}, None) is False
    assert time.monotonic() - started < 30


def _write_events(logdir: Path, steps: range) -> None:
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(logdir))
    for step in steps:
        w.add_scalar("train/loss", 1.0 / (step + 1), step)
        w.add_scalar("train/grad_norm", 0.5 + step, step)
        w.add_scalar("train/lr-pg_0", 1e-6, step)
        w.add_scalar("rollout/raw_reward", 0.1 * step, step)  # slime's own rollout curve: not mirrored
    w.flush()
    w.close()


def test_tensorboard_mirror_tails_flushes_and_is_idempotent(run_id: str, tmp_path: Path) -> None:
    logdir = tmp_path / "tb" / "rl"
    _write_events(logdir, range(0, 3))
    mirror = TensorBoardMirror(logdir, run_id, prefixes=["train/"], interval_s=0.1).start()
    deadline = time.monotonic() + 20
    while mirror.logged < 9:
        assert time.monotonic() < deadline, "mirror thread logged nothing"
        time.sleep(0.05)
    _write_events(logdir, range(3, 5))  # a second event file appears while the job runs
    total = mirror.stop()  # the final flush picks up what the thread has not seen yet
    assert total == 15
    client = MlflowClient()
    loss = sorted((h.step, h.value) for h in client.get_metric_history(run_id, "train/loss"))
    assert loss == [(s, pytest.approx(1.0 / (s + 1))) for s in range(5)]
    assert "rollout/raw_reward" not in metrics(run_id)
    # a second mirror (a rerun of the stage) adds nothing that is already there
    again = TensorBoardMirror(logdir, run_id, prefixes=["train/"])
    assert again.poll() == 0
    assert len(client.get_metric_history(run_id, "train/grad_norm")) == 5
    # nothing to read yet is not an error
    assert TensorBoardMirror(tmp_path / "missing", run_id).poll() == 0
