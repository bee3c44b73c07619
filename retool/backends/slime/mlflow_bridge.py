"""slime's custom rollout/eval log hooks, writing our shared metric names into MLflow.

slime calls these in its rollout manager (a Ray actor of the job) with its own ``Sample`` objects:
  --custom-rollout-log-function-path       log_rollout_data(rollout_id, args, samples, rollout_extra_metrics, rollout_time)
  --custom-eval-rollout-log-function-path  log_eval_rollout_data(rollout_id, args, data, extra_metrics)
A true return value makes slime skip its own logging; we return False so its TensorBoard/wandb
logging still happens. The MLflow run is the one named by ``MLFLOW_RUN_ID`` in the job's
environment (the stage's child run, passed through by the runner). Nothing here may take the
training job down: every failure is logged as a warning and swallowed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from retool.tracking import log_metrics

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# slime Sample -> the episode shape retool.metrics.summarize reads


@dataclass
class _Reward:
    score: float
    correct: bool
    pred: str | None = None


def _make_reward(score: float, correct: bool, pred: str | None) -> Any:
    try:
        from retool.reward import Reward

        return Reward(score=score, correct=correct, pred=pred)
    except Exception:  # noqa: BLE001 - the rollout helper's module may not exist in this process
        return _Reward(score, correct, pred)


_STATUS = {"completed": "completed", "truncated": "truncated", "aborted": "aborted", "failed": "aborted"}


@dataclass
class SampleEpisode:
    """A read-only view of a slime ``Sample`` with ``retool.rollout.Episode``'s field names.

    Fields the Sample does not carry are looked up in ``sample.metadata`` (where our generate hook
    stores the episode's details), so metrics computed from episodes work on samples too.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    loss_mask: list[int]
    response_text: str
    tool_calls: list[Any]
    status: str
    reward: Any
    num_turns: int
    label: str
    group: Any = None  # slime's group_index: the samples of one prompt (pass@k)
    prompt_text: str = ""
    model_text: str = ""
    group_index: int | None = None
    index: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        # only reached for attributes the dataclass does not define
        meta = self.__dict__.get("metadata") or {}
        if name in meta:
            return meta[name]
        raise AttributeError(name)


class _CallView:
    """Attribute access over a tool-call record that was stored as a plain dict."""

    def __init__(self, record: Mapping[str, Any]):
        self._r = dict(record)

    def __getattr__(self, name: str) -> Any:
        r = self.__dict__["_r"]
        if name in r:
            return r[name]
        if name == "code_lines":
            code = (r.get("arguments") or {}).get("code", "")
            return sum(1 for line in str(code).splitlines() if line.strip())
        defaults = {"status": "ok", "error": None, "duration_s": 0.0, "char_pos": 0}
        if name in defaults:
            return defaults[name]
        raise AttributeError(name)


def _reward_parts(sample: Any, reward_key: str | None) -> tuple[float, bool, str | None]:
    raw = getattr(sample, "reward", None)
    meta = getattr(sample, "metadata", None) or {}
    correct: Any = meta.get("correct")
    pred = meta.get("pred")
    if isinstance(raw, Mapping):
        key = reward_key or "score"
        score = float(raw.get(key, raw.get("score", 0.0)) or 0.0)
        if correct is None:
            correct = raw.get("correct", raw.get("acc"))
        if "pred" not in meta:
            pred = raw.get("pred") or None  # our reward_func writes "" for "no answer"
    elif raw is None:
        score = 0.0
    else:
        score = float(raw)
    if correct is None:
        correct = score > 0  # ReTool rewards: positive only for a correct final answer
    return score, bool(correct), None if pred is None else str(pred)


def sample_to_episode(sample: Any, reward_key: str | None = None) -> Any:
    """Adapt one slime Sample; an Episode object stored by our generate hook is used as it is."""
    meta = getattr(sample, "metadata", None) or {}
    stored = meta.get("episode")
    if stored is not None and hasattr(stored, "response_ids"):
        return stored
    tokens = list(getattr(sample, "tokens", None) or [])
    resp_len = int(getattr(sample, "response_length", 0) or 0)
    response_ids = tokens[len(tokens) - resp_len :] if resp_len else []
    prompt_ids = tokens[: len(tokens) - resp_len]
    status = getattr(sample, "status", "completed")
    status = str(getattr(status, "value", status)).lower()
    score, correct, pred = _reward_parts(sample, reward_key)
    calls = meta.get("tool_calls", [])
    if isinstance(calls, int):
        calls = [_CallView({}) for _ in range(calls)]
    else:  # records turned into dicts (e.g. a reloaded debug dump) still count
        calls = [_CallView(c) if isinstance(c, Mapping) else c for c in calls or []]
    group = getattr(sample, "group_index", None)
    return SampleEpisode(
        prompt_ids=prompt_ids,
        response_ids=response_ids,
        logprobs=list(getattr(sample, "rollout_log_probs", None) or []),
        loss_mask=list(getattr(sample, "loss_mask", None) or [1] * len(response_ids)),
        response_text=str(getattr(sample, "response", "") or ""),
        tool_calls=calls,
        status=_STATUS.get(status, "completed"),
        reward=_make_reward(score, correct, pred),
        num_turns=int(meta.get("num_turns", 1)),
        label=str(getattr(sample, "label", "") or ""),
        group=None if group is None else f"g{group}",
        prompt_text=str(getattr(sample, "prompt", "") or ""),
        model_text=str(meta.get("model_text", "") or ""),
        group_index=group,
        index=getattr(sample, "index", None),
        metadata=dict(meta),
    )


def _basic_summary(episodes: Sequence[Any]) -> dict[str, float]:
    """What we can always compute from Samples alone (used when retool.metrics is unavailable)."""
    n = len(episodes)
    if n == 0:
        return {}
    return {
        "reward_mean": sum(float(e.reward.score) for e in episodes) / n,
        "acc": sum(bool(e.reward.correct) for e in episodes) / n,
        "answer_rate": sum(e.reward.pred is not None for e in episodes) / n,
        "truncated_rate": sum(e.status == "truncated" for e in episodes) / n,
        "response_len_mean": sum(len(e.response_ids) for e in episodes) / n,
        "turns_mean": sum(int(e.num_turns) for e in episodes) / n,
        "tool_call_rate": sum(bool(e.tool_calls) for e in episodes) / n,
        "tool_calls_per_response": sum(len(e.tool_calls) for e in episodes) / n,
    }


def summarize_samples(
    samples: Iterable[Any], *, reward_key: str | None = None, k: int | None = None
) -> dict[str, float]:
    """Shared metric names (retool.metrics) over slime Samples."""
    episodes = [sample_to_episode(s, reward_key) for s in samples]
    if not episodes:
        return {}
    try:
        from retool.metrics import summarize
    except ImportError:
        return _basic_summary(episodes)
    try:
        out = summarize(episodes, k=k)
    except Exception as err:  # noqa: BLE001 - fall back rather than lose the step's metrics
        log.warning("retool.metrics.summarize failed on slime samples (%s); logging basic metrics", err)
        return _basic_summary(episodes)
    return {key: float(v) for key, v in out.items() if isinstance(v, int | float)}


# --------------------------------------------------------------------------------------------------
# MLflow


def log_to_run(run_id: str | None, metrics: Mapping[str, float], step: int) -> None:
    """Log to an explicit run (the mirror thread has no active run) or the active one; never raises."""
    log_metrics(metrics, step=step, run_id=run_id)


def _run_id() -> str | None:
    import os

    return os.environ.get("MLFLOW_RUN_ID") or None


def _step(args: Any, rollout_id: int) -> int:
    """The same x-axis slime uses for its own rollout logging."""
    if getattr(args, "wandb_always_use_train_step", False):
        return int(rollout_id * args.rollout_batch_size * args.n_samples_per_prompt // args.global_batch_size)
    return int(rollout_id)


def _prefixed(prefix: str, metrics: Mapping[str, float]) -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in metrics.items()}


def _numeric(extra: Mapping[str, Any] | None, default_prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in (extra or {}).items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        out[key if "/" in key else default_prefix + key] = float(value)
    return out


def rollout_metrics(
    rollout_id: int, args: Any, samples: Sequence[Any], extra: Mapping[str, Any] | None, rollout_time: float
) -> dict[str, float]:
    metrics = _prefixed("rollout/", summarize_samples(samples, reward_key=getattr(args, "reward_key", None)))
    metrics.update(_numeric(extra, "rollout/"))
    metrics["rollout/time_s"] = float(rollout_time)
    metrics["rollout/num_samples"] = float(len(samples))
    return metrics


def eval_metrics(args: Any, data: Mapping[str, Any], extra: Mapping[str, Any] | None) -> dict[str, float]:
    reward_key = getattr(args, "eval_reward_key", None) or getattr(args, "reward_key", None)
    k = getattr(args, "n_samples_per_eval_prompt", None)
    metrics: dict[str, float] = {}
    for name, entry in data.items():
        prefix = f"eval/{name}/"
        samples = entry.get("samples") if isinstance(entry, Mapping) else None
        if samples:
            metrics.update(_prefixed(prefix, summarize_samples(samples, reward_key=reward_key, k=k)))
        else:
            rewards = [
                float(r[reward_key or "score"] if isinstance(r, Mapping) else r)
                for r in entry.get("rewards", [])
            ]
            if rewards:
                metrics[prefix + "reward_mean"] = sum(rewards) / len(rewards)
            truncated = entry.get("truncated") or []
            if truncated:
                metrics[prefix + "truncated_rate"] = sum(bool(t) for t in truncated) / len(truncated)
    metrics.update(_numeric(extra, "eval/"))
    return metrics


def log_rollout_data(
    rollout_id: int, args: Any, samples: Any, rollout_extra_metrics: Any, rollout_time: float
) -> bool:
    """slime custom rollout log hook; returns False so slime's own logging runs as well."""
    try:
        log_to_run(
            _run_id(),
            rollout_metrics(rollout_id, args, samples, rollout_extra_metrics, rollout_time),
            _step(args, rollout_id),
        )
    except Exception as err:  # noqa: BLE001
        log.warning("retool rollout metrics failed at rollout %s: %s", rollout_id, err)
    return False


def log_eval_rollout_data(rollout_id: int, args: Any, data: Any, extra_metrics: Any) -> bool:
    """slime custom eval log hook; returns False so slime's own eval logging runs as well."""
    try:
        log_to_run(_run_id(), eval_metrics(args, data, extra_metrics), _step(args, rollout_id))
    except Exception as err:  # noqa: BLE001
        log.warning("retool eval metrics failed at rollout %s: %s", rollout_id, err)
    return False
