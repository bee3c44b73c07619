"""Answer scoring: math-verify equivalences, the reference's strict mode, shaping, time limits."""

from __future__ import annotations

import threading
import time

import pytest
from pydantic import ValidationError

from retool.reward import Reward, RewardConfig, fast_judge, score, shaped_reward, warmup


@pytest.fixture(scope="module", autouse=True)
def _pool() -> None:
    warmup()


@pytest.mark.parametrize(
    ("answer", "label"),
    [
        ("0.5", "\\frac{1}{2}"),  # decimal vs fraction
        ("\\dfrac{3}{4}", "0.75"),
        ("1/3", "\\frac{1}{3}"),
        ("007", "7"),  # leading zeros
        ("1,000", "1000"),  # thousands separator
        ("12 \\text{ cm}", "12"),  # units
        ("45^\\circ", "45"),
        ("\\text{The answer is } 5", "5"),  # text wrapper
        ("x = 5", "5"),
        ("\\$18.90", "18.9"),
        ("1,2,3", "\\{3,2,1\\}"),  # sets of answers, any order
        ("\\{-1, 2\\}", "2, -1"),
        ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}2"),
        ("2\\sqrt{2}", "\\sqrt{8}"),
        ("(1, 2)", "(1,2)"),
    ],
)
def test_equivalent_answers_are_correct(answer: str, label: str) -> None:
    reward = score(f"Therefore the answer is \\boxed{{{answer}}}.", label)
    assert reward.correct, (answer, label, reward)
    assert reward.score == 1.0 and reward.pred == answer


@pytest.mark.parametrize(
    ("answer", "label"),
    [("6", "7"), ("0.51", "\\frac{1}{2}"), ("1,2", "\\{1,2,3\\}"), ("\\sqrt{2}", "2"), ("(1,2)", "(2,1)")],
)
def test_different_answers_are_wrong(answer: str, label: str) -> None:
    reward = score(f"\\boxed{{{answer}}}", label)
    assert not reward.correct and reward.score < 0


def test_fast_path_agrees_and_declines() -> None:
    assert fast_judge("007", "7") is True
    assert fast_judge("12", "13") is False
    assert fast_judge("0.333333", "1/3") is None  # math-verify's rounding decides that one
    assert fast_judge("x", "5") is None


def test_answer_must_be_boxed_by_default() -> None:
    assert score("The answer is 12", "12") == Reward(-1.2, False, None)
    relaxed = score("The answer is 12", "12", config=RewardConfig(require_boxed=False))
    assert relaxed.correct


def test_shaping_matches_the_reference() -> None:
    cfg = RewardConfig()
    # reference: wrong -> min(-0.6, -1 + (calls - 2) * 0.05)
    for calls in range(0, 20):
        assert shaped_reward(False, True, calls, cfg) == pytest.approx(min(-0.6, -1 + (calls - 2) * 0.05))
        assert shaped_reward(False, False, calls, cfg) == pytest.approx(
            min(-0.6, -1 + (calls - 2) * 0.05) - 0.1
        )
        assert shaped_reward(True, True, calls, cfg) == 1.0
    assert score("\\boxed{3}", "4", num_tool_calls=10).score == pytest.approx(-0.6)
    assert score("\\boxed{3}", "4", num_tool_calls=4).score == pytest.approx(-0.9)
    assert score("no box", "4", num_tool_calls=4).score == pytest.approx(-1.0)


def test_dapo_strict_reproduces_the_reference_match() -> None:
    assert score("... \\boxed{12}", "12", mode="dapo_strict").correct
    # exact string equality: equivalent forms do not count
    assert not score("\\boxed{12.0}", "12", mode="dapo_strict").correct
    assert not score("\\boxed{ 12}", "12", mode="dapo_strict").correct
    # only the last 100 characters are searched
    late = "\\boxed{12}" + "x" * 100
    assert score(late, "12", mode="dapo_strict").pred is None
    # an unclosed last \boxed{ hides an earlier closed one, as in the reference
    assert score("\\boxed{12} \\boxed{1", "12", mode="dapo_strict").pred is None
    cfg = RewardConfig(mode="dapo_strict")
    assert score("\\boxed{5}", "5", config=cfg).correct
    assert score("\\boxed{5.0}", "5", config=cfg).score == pytest.approx(-1.1)


def test_config_rejects_unknown_keys_and_bad_caps() -> None:
    with pytest.raises(ValidationError, match="corect_reward"):
        RewardConfig.model_validate({"corect_reward": 1.0})
    with pytest.raises(ValidationError, match="wrong_reward_cap"):
        RewardConfig(wrong_reward_cap=1.0)
    with pytest.raises(ValueError, match="unknown reward mode"):
        score("\\boxed{1}", "1", mode="exact")


def test_scoring_works_off_the_main_thread() -> None:
    results: list[Reward] = []

    def work() -> None:
        results.append(score("\\boxed{\\frac{2}{4}}", "0.5"))
        results.append(score("\\boxed{2+2}", "4"))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and all(r.correct for r in results)


PATHOLOGICAL = "3^{3^{3^{3}}}"  # verify() tries to evaluate 3^7625597484987


@pytest.mark.parametrize("soft_limit", [1.0, None], ids=["math-verify-limit", "hard-kill-only"])
def test_pathological_input_is_cut_at_the_time_limit(soft_limit: float | None) -> None:
    cfg = RewardConfig(timeout_s=1.0, math_verify_timeout_s=soft_limit, workers=1, cache_size=0)
    warmup(cfg)
    box: list[tuple[Reward, float]] = []

    def work() -> None:  # from a worker thread, where math-verify's own alarm cannot work
        start = time.perf_counter()
        box.append((score(f"\\boxed{{{PATHOLOGICAL}}}", "5", config=cfg), time.perf_counter() - start))

    t = threading.Thread(target=work)
    t.start()
    t.join(timeout=30)
    reward, elapsed = box[0]
    assert not reward.correct
    assert elapsed < cfg.timeout_s + 0.5, elapsed
    if soft_limit is None:
        assert reward.timed_out  # the worker was killed and replaced
    # the killed worker is replaced and the pool works afterwards
    warmup(cfg)
    assert score("\\boxed{0.5}", "\\frac12", config=cfg).correct


def test_waiting_for_a_busy_pool_counts_against_the_limit() -> None:
    cfg = RewardConfig(timeout_s=1.0, math_verify_timeout_s=None, workers=1, cache_size=0)
    warmup(cfg)
    box: list[float] = []

    def slow() -> None:
        score(f"\\boxed{{{PATHOLOGICAL}}}", "5", config=cfg)

    def queued() -> None:
        start = time.perf_counter()
        score("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", config=cfg)
        box.append(time.perf_counter() - start)

    a = threading.Thread(target=slow)
    a.start()
    time.sleep(0.2)
    b = threading.Thread(target=queued)
    b.start()
    a.join(timeout=30)
    b.join(timeout=30)
    assert box and box[0] < cfg.timeout_s + 0.5
