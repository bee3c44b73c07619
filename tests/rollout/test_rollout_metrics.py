"""Metric names and values over hand-built episodes (the same names for every backend)."""

from __future__ import annotations

import math

import pytest

from retool.metrics import METRIC_NAMES, pass_at_k, prefixed, summarize
from retool.reward import Reward
from retool.rollout import Episode, ToolCallRecord


def rec(
    status: str,
    code: str = "a = 1\nprint(a)\n\n",
    duration: float = 0.01,
    pos: int = 0,
    error: str | None = None,
):
    return ToolCallRecord(
        "code_interpreter", {"code": code}, "tool_call", status, error, "", duration, 0, pos, 0
    )


def ep(
    group: str, correct: bool | None, calls=(), *, status="completed", pred="1", text="x" * 100, n_tokens=10
):
    reward = None if correct is None else Reward(1.0 if correct else -1.0, correct, pred)
    return Episode(
        prompt_ids=[1],
        response_ids=[0] * n_tokens,
        logprobs=[0.0] * n_tokens,
        loss_mask=[1] * n_tokens,
        response_text=text,
        tool_calls=list(calls),
        status=status,
        reward=reward,
        num_turns=1 + len(calls),
        label="1",
        stop_reason="answer",
        group=group,
    )


def test_pass_at_k_estimator() -> None:
    assert pass_at_k(4, 0, 2) == 0.0
    assert pass_at_k(4, 4, 2) == 1.0
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_summarize_names_and_values() -> None:
    episodes = [
        ep("a", True, [rec("ok", pos=25), rec("error", duration=0.03)]),
        ep("a", False, [rec("timeout", duration=1.0, pos=50)], pred="2"),
        ep("a", False, [], pred="2"),
        ep("b", False, [rec("invalid", code="", error="bad json")], status="truncated", pred=None),
        ep("b", None, [], status="aborted", n_tokens=0, text=""),
        ep("b", True, [rec("ok", pos=0)]),
    ]
    m = summarize(episodes)
    assert set(METRIC_NAMES) <= set(m)
    assert m["n_episodes"] == 6
    assert m["acc"] == pytest.approx(2 / 6)
    assert m["answer_rate"] == pytest.approx(4 / 6)
    assert m["tool_call_rate"] == pytest.approx(4 / 6)
    assert m["code_ratio"] == pytest.approx(3 / 6)  # the invalid call ran no code
    assert m["tool_calls_per_response"] == pytest.approx(5 / 6)
    assert m["code_pass_rate"] == pytest.approx(2 / 4)
    assert m["code_error_rate"] == pytest.approx(1 / 4) and m["code_timeout_rate"] == pytest.approx(1 / 4)
    assert m["parse_failure_rate"] == pytest.approx(1 / 5)
    assert m["code_lines_mean"] == pytest.approx(4 * 2 / 6)
    assert m["first_tool_call_pos"] == pytest.approx((0.25 + 0.5 + 0.0 + 0.0) / 4)
    assert m["tool_latency_p50"] == pytest.approx(0.02)
    assert m["truncated_rate"] == pytest.approx(1 / 6) and m["aborted_rate"] == pytest.approx(1 / 6)
    # groups of 3: pass@3 per prompt = any correct
    assert m["pass@3"] == 1.0 and m["pass@1"] == pytest.approx(2 / 6)
    assert m["avg@3"] == pytest.approx(2 / 6)
    # majority answer in group a is "2" (wrong); in b only one answered ("1", correct)
    assert m["maj@3"] == pytest.approx(0.5)
    assert prefixed({"acc": 1.0}, "eval/aime/") == {"eval/aime/acc": 1.0}


def test_empty_and_single_sample() -> None:
    assert summarize([])["n_episodes"] == 0
    m = summarize([ep("a", True)])
    assert m["acc"] == 1.0 and "pass@1" not in m
    assert summarize([ep("a", True)], k=1)["pass@1"] == 1.0
