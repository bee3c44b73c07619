"""One set of metric names for every backend (slime on GPU, local on CPU, evaluation).

``summarize(episodes)`` returns plain floats; callers add the prefix (``rollout/``, ``eval/<dataset>/``,
``train/``). Besides the DESIGN.md names it reports the ReTool paper's behaviour curves (share of responses
with code, code lines per response, share of executions without error, where in the response the first
call comes), tool latency percentiles, the parse-failure rate and, with several samples per prompt,
pass@k / avg@k / maj@k.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

#: Names every backend reports (eval adds pass@k, avg@k, maj@k with k substituted).
METRIC_NAMES = (
    "n_episodes",
    "reward_mean",
    "reward_std",
    "acc",
    "answer_rate",
    "tool_call_rate",
    "tool_calls_per_response",
    "code_ratio",
    "code_lines_mean",
    "code_pass_rate",
    "code_error_rate",
    "code_timeout_rate",
    "code_memory_rate",
    "parse_failure_rate",
    "first_tool_call_pos",
    "tool_latency_p50",
    "tool_latency_p95",
    "tool_latency_p99",
    "truncated_rate",
    "aborted_rate",
    "response_len_mean",
    "response_len_max",
    "model_tokens_mean",
    "turns_mean",
)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _group_key(ep: Any) -> Any:
    group = getattr(ep, "group", None)
    if group is not None:
        return group
    return (tuple(getattr(ep, "prompt_ids", ()) or ()), getattr(ep, "prompt_text", ""))


def summarize(episodes: Iterable[Any], *, k: int | None = None) -> dict[str, float]:
    """Metrics over finished episodes (retool.rollout.Episode or anything with the same fields).

    Group-level metrics (pass@k, avg@k, maj@k) are added when episodes share a group (``Episode.group``,
    else the same prompt): ``k`` defaults to the smallest group size and pass@1 is always reported."""
    eps = list(episodes)
    out: dict[str, float] = {name: 0.0 for name in METRIC_NAMES}
    out["n_episodes"] = float(len(eps))
    if not eps:
        return out
    n = len(eps)
    scored = [e for e in eps if e.reward is not None]
    rewards = [float(e.reward.score) for e in scored]
    out["reward_mean"] = _mean(rewards)
    if len(rewards) > 1:
        mu = out["reward_mean"]
        out["reward_std"] = math.sqrt(sum((r - mu) ** 2 for r in rewards) / (len(rewards) - 1))
    out["acc"] = sum(1 for e in scored if e.reward.correct) / n
    out["answer_rate"] = sum(1 for e in scored if e.reward.pred is not None) / n

    calls = [c for e in eps for c in e.tool_calls]
    executed = [c for c in calls if c.status != "invalid"]
    with_call = [e for e in eps if e.tool_calls]
    with_code = [e for e in eps if any(c.status != "invalid" for c in e.tool_calls)]
    out["tool_call_rate"] = len(with_call) / n
    out["tool_calls_per_response"] = len(calls) / n
    out["code_ratio"] = len(with_code) / n
    out["code_lines_mean"] = sum(c.code_lines for c in executed) / n
    if executed:
        status = Counter(c.status for c in executed)
        out["code_pass_rate"] = status["ok"] / len(executed)
        out["code_error_rate"] = status["error"] / len(executed)
        out["code_timeout_rate"] = status["timeout"] / len(executed)
        out["code_memory_rate"] = status["memory"] / len(executed)
        latencies = [c.duration_s for c in executed]
        out["tool_latency_p50"] = _percentile(latencies, 0.50)
        out["tool_latency_p95"] = _percentile(latencies, 0.95)
        out["tool_latency_p99"] = _percentile(latencies, 0.99)
    if calls:
        out["parse_failure_rate"] = sum(1 for c in calls if c.error is not None) / len(calls)
    positions = [
        e.tool_calls[0].char_pos / max(len(e.response_text), 1) for e in with_call if e.response_text
    ]
    out["first_tool_call_pos"] = _mean(positions)
    out["truncated_rate"] = sum(1 for e in eps if e.status == "truncated") / n
    out["aborted_rate"] = sum(1 for e in eps if e.status == "aborted") / n
    lengths = [len(e.response_ids) for e in eps]
    out["response_len_mean"] = _mean(lengths)
    out["response_len_max"] = float(max(lengths))
    out["model_tokens_mean"] = _mean([sum(e.loss_mask) for e in eps])
    out["turns_mean"] = _mean([e.num_turns for e in eps])

    groups: dict[Any, list[Any]] = defaultdict(list)
    for e in eps:
        groups[_group_key(e)].append(e)
    sizes = [len(g) for g in groups.values()]
    if max(sizes) > 1 or k is not None:
        kk = k if k is not None else min(sizes)
        usable = [g for g in groups.values() if len(g) >= kk]
        if usable and kk >= 1:
            correct = [[bool(e.reward and e.reward.correct) for e in g] for g in usable]
            out["pass@1"] = _mean([pass_at_k(len(c), sum(c), 1) for c in correct])
            out[f"pass@{kk}"] = _mean([pass_at_k(len(c), sum(c), kk) for c in correct])
            out[f"avg@{kk}"] = _mean([sum(c[:kk]) / kk for c in correct])
            out[f"maj@{kk}"] = _mean([_majority_correct(g[:kk]) for g in usable])
            out["n_prompts"] = float(len(usable))
    return out


def _majority_correct(group: Sequence[Any]) -> float:
    """1.0 when the most common answer of the group is a correct one (ties: the first seen)."""
    answers = [
        (e.reward.pred, e.reward.correct) for e in group if e.reward is not None and e.reward.pred is not None
    ]
    if not answers:
        return 0.0
    counts = Counter(pred for pred, _ in answers)
    top = max(counts.values())
    for pred, correct in answers:
        if counts[pred] == top:
            return 1.0 if correct else 0.0
    return 0.0


def prefixed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """``{"acc": 1}`` -> ``{"eval/aime/acc": 1}`` for prefix ``eval/aime``."""
    prefix = prefix.rstrip("/")
    return {f"{prefix}/{name}": value for name, value in metrics.items()}
