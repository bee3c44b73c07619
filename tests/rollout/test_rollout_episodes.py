"""Full episodes: a scripted model behind a real HTTP server speaking SGLang's /generate on
127.0.0.1, the SGLang engine, real sandbox calls through the tool registry."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest

from retool.evaluation import evaluate
from retool.metrics import summarize
from retool.prompts import build_prompt
from retool.reward import RewardConfig
from retool.rollout import Episode, RolloutConfig, run_episode, run_episodes

from .rt_server import logprob


def call(code: str, name: str = "code_interpreter") -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {{"code": {json.dumps(code)}}}}}\n</tool_call>'


def script(server, *turns) -> str:
    """Register a script; returns the tag to put in the question."""
    name = f"s{uuid.uuid4().hex[:10]}"
    server.add_scripts({name: list(turns)})
    return f"[[{name}]]"


def check_aligned(ep: Episode, cfg: RolloutConfig | None = None) -> None:
    assert len(ep.response_ids) == len(ep.logprobs) == len(ep.loss_mask)
    assert set(ep.loss_mask) <= {0, 1}
    for lp, m in zip(ep.logprobs, ep.loss_mask, strict=True):
        assert (m == 1) == (lp != 0.0)  # the scripted model's logprobs are never 0
    if cfg is not None:
        assert len(ep.prompt_ids) + len(ep.response_ids) <= cfg.max_context_tokens


def segments(ep: Episode) -> list[tuple[int, list[int]]]:
    out: list[tuple[int, list[int]]] = []
    for tok, m in zip(ep.response_ids, ep.loss_mask, strict=True):
        if out and out[-1][0] == m:
            out[-1][1].append(tok)
        else:
            out.append((m, [tok]))
    return out


async def test_tool_call_episode(engine, tools, tokenizer, server) -> None:
    first = "Let me compute.\n" + call("print(17 * 23)")
    tag = script(server, first, "The product is 391, so the answer is \\boxed{391}.")
    cfg = RolloutConfig()
    ep = await run_episode(engine, f"{tag} What is 17*23?", label="391", config=cfg, tools=tools)
    check_aligned(ep, cfg)
    assert (ep.status, ep.stop_reason, ep.num_turns) == ("completed", "answer", 2)
    assert ep.reward is not None and ep.reward.correct and ep.reward.score == 1.0
    [rec] = ep.tool_calls
    assert (rec.status, rec.fmt, rec.code) == ("ok", "tool_call", "print(17 * 23)")
    assert rec.observation.strip() == "391"
    # prompt: rendered once, with the tool spec from the registry
    assert ep.prompt_ids == build_prompt(tokenizer, f"{tag} What is 17*23?", tools=tools.specs()).token_ids
    # model tokens are exactly what the model sampled (its logprobs too); the observation is the template's tool turn
    (m0, gen0), (m1, obs), (m2, gen1) = segments(ep)
    assert (m0, m1, m2) == (1, 0, 1)
    assert gen0 == tokenizer.encode(first, add_special_tokens=False)
    assert ep.logprobs[: len(gen0)] == [logprob(t, i) for i, t in enumerate(gen0)]
    assert tokenizer.decode(obs) == (
        "<|im_end|>\n<|im_start|>user\n<tool_response>\n391\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.decode(gen1).endswith("\\boxed{391}.<|im_end|>")
    assert ep.response_text == tokenizer.decode(ep.response_ids)
    assert "<tool_response>" not in ep.model_text


async def test_code_format_episode_strips_fences(engine, tools, server) -> None:
    code_turn = "Check:\n<code>\n```python\ns = 'he said \"hi\"'\nprint(len(s))\n```\n</code>"
    tag = script(server, code_turn + "\n<interpreter>\ninvented\n</interpreter>", "\\boxed{12}")
    ep = await run_episode(engine, f"{tag} len?", label="12", config=RolloutConfig(), tools=tools)
    check_aligned(ep)
    [rec] = ep.tool_calls
    assert (rec.fmt, rec.status, rec.observation.strip()) == ("code", "ok", "12")
    assert "invented" not in ep.response_text  # the stop string ended the turn at </code>
    assert "</code>\n<interpreter>\n12\n</interpreter>\n\\boxed{12}" in ep.response_text
    assert ep.reward is not None and ep.reward.correct


async def test_text_after_a_closed_call_is_dropped(engine, tools, server, tokenizer) -> None:
    # without stop strings the model runs on and invents an output and an answer: both are trimmed
    turn = call("print(6 * 7)") + "\n<tool_response>\n999\n</tool_response>\nSo \\boxed{999}"
    tag = script(server, turn, "It printed 42: \\boxed{42}")
    cfg = RolloutConfig(stop_at_tool_call=False)
    ep = await run_episode(engine, f"{tag} 6*7?", label="42", config=cfg, tools=tools)
    check_aligned(ep, cfg)
    assert "999" not in ep.response_text and "999" not in ep.model_text
    first_model = segments(ep)[0][1]
    assert tokenizer.decode(first_model).endswith("</tool_call>")
    assert ep.reward is not None and ep.reward.correct and ep.num_turns == 2


async def test_several_calls_in_one_turn_run_in_order(engine, tools, server) -> None:
    turn = call("print('first')") + "\n" + call("print('second')")
    tag = script(server, turn, "\\boxed{2}")
    ep = await run_episode(
        engine, f"{tag} q", label="2", config=RolloutConfig(stop_at_tool_call=False), tools=tools
    )
    assert [c.observation.strip() for c in ep.tool_calls] == ["first", "second"]
    assert (
        "<tool_response>\nfirst\n</tool_response>\n<tool_response>\nsecond\n</tool_response>"
        in ep.response_text
    )


async def test_malformed_call_is_explained_to_the_model(engine, tools, server) -> None:
    bad = '<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "print(1)"\n</tool_call>'
    tag = script(server, bad, call("print(1/0)"), call("print(2)", name="calculator"), "\\boxed{1}")
    ep = await run_episode(engine, f"{tag} q", label="1", config=RolloutConfig(), tools=tools)
    check_aligned(ep)
    statuses = [c.status for c in ep.tool_calls]
    assert statuses == ["invalid", "error", "invalid"]
    assert (
        "could not be read" in ep.tool_calls[0].observation and "invalid JSON" in ep.tool_calls[0].observation
    )
    assert "ZeroDivisionError" in ep.tool_calls[1].observation
    assert "calculator" in ep.tool_calls[2].observation
    metrics = summarize([ep])
    assert metrics["parse_failure_rate"] == pytest.approx(1 / 3)
    assert metrics["code_error_rate"] == 1.0 and metrics["code_pass_rate"] == 0.0
    assert ep.status == "completed" and ep.reward is not None and ep.reward.correct


async def test_max_tool_calls_and_max_turns(engine, tools, server) -> None:
    tag = script(server, call("print(1)"))  # calls forever
    cfg = RolloutConfig(max_tool_calls=2)
    ep = await run_episode(engine, f"{tag} q", label="1", config=cfg, tools=tools)
    assert (ep.status, ep.stop_reason, len(ep.tool_calls)) == ("truncated", "max_tool_calls", 2)
    assert ep.reward is not None and ep.reward.pred is None
    assert ep.reward.score == pytest.approx(RewardConfig().wrong_reward - 0.1)  # 2 calls: no bonus, no answer
    cfg = RolloutConfig(max_turns=3, max_tool_calls=10)
    ep = await run_episode(engine, f"{tag} q", label="1", config=cfg, tools=tools)
    assert (ep.status, ep.stop_reason, ep.num_turns, len(ep.tool_calls)) == ("truncated", "max_turns", 3, 3)
    check_aligned(ep, cfg)


async def test_context_budget_clamps_turns_and_trims_observations(engine, tools, server, tokenizer) -> None:
    words = " ".join(f"w{i}" for i in range(300))
    tag = script(server, words)
    prompt_len = len(build_prompt(tokenizer, f"{tag} q", tools=tools.specs()).token_ids)
    cfg = RolloutConfig(max_context_tokens=prompt_len + 50, max_new_tokens=200)
    server.reset_stats()
    ep = await run_episode(engine, f"{tag} q", label="1", config=cfg, tools=tools)
    assert server.stats()["max_new_tokens"] == [50]  # clamped to the remaining budget
    assert (ep.status, ep.stop_reason) == ("truncated", "context")
    assert len(ep.prompt_ids) + len(ep.response_ids) == cfg.max_context_tokens
    check_aligned(ep, cfg)

    # an observation that would overflow is cut to the budget and ends the episode
    tag = script(server, call("print('x' * 3000)"), "\\boxed{1}")
    cfg = RolloutConfig(max_context_tokens=prompt_len + 120, max_new_tokens=100)
    server.reset_stats()
    ep = await run_episode(engine, f"{tag} q", label="1", config=cfg, tools=tools)
    assert (ep.status, ep.stop_reason) == ("truncated", "context")
    assert len(ep.prompt_ids) + len(ep.response_ids) == cfg.max_context_tokens
    assert ep.loss_mask[-1] == 0
    check_aligned(ep, cfg)

    # the response budget (slime's rollout_max_response_len) binds too
    tag = script(server, words)
    cfg = RolloutConfig(max_context_tokens=100_000, max_response_tokens=30, max_new_tokens=200)
    server.reset_stats()
    ep = await run_episode(engine, f"{tag} q", label="1", config=cfg, tools=tools)
    assert server.stats()["max_new_tokens"] == [30] and len(ep.response_ids) == 30


async def test_engine_errors_are_retried_then_abort_only_that_episode(engine, tools, server) -> None:
    flaky = script(server, {"text": "\\boxed{5}", "fail": 2})
    broken = script(server, {"text": "\\boxed{5}", "fail": 1000})
    fine = script(server, call("print(5)"), "\\boxed{5}")
    cfg = RolloutConfig(engine_retries=1, engine_backoff_s=0.01, engine_backoff_max_s=0.02)
    episodes = await run_episodes(
        engine, [f"{flaky} q", f"{broken} q", f"{fine} q"], labels=["5"] * 3, config=cfg, tools=tools
    )
    statuses = [(e.status, e.stop_reason) for e in episodes]
    assert statuses == [("completed", "answer"), ("aborted", "engine_error"), ("completed", "answer")]
    assert episodes[1].error is not None and "500" in episodes[1].error
    assert episodes[1].reward is None
    assert summarize(episodes)["aborted_rate"] == pytest.approx(1 / 3)


async def test_engine_abort_ends_the_episode(engine, tools, server) -> None:
    tag = script(server, call("print(1)"), {"abort": True})
    ep = await run_episode(engine, f"{tag} q", label="1", config=RolloutConfig(), tools=tools)
    assert (ep.status, ep.stop_reason, ep.num_turns) == ("aborted", "abort", 2)
    check_aligned(ep)


async def test_tool_calls_overlap_with_other_episodes_generation(engine, tools, server) -> None:
    tag = script(server, {"text": call("print(1)"), "delay_s": 0.25}, {"text": "\\boxed{1}", "delay_s": 0.25})
    n = 8
    start = time.perf_counter()
    episodes = await run_episodes(
        engine, [f"{tag} q"] * n, labels=["1"] * n, config=RolloutConfig(), tools=tools
    )
    wall = time.perf_counter() - start
    assert all(e.status == "completed" and e.reward and e.reward.correct for e in episodes)
    serial = sum(e.gen_time_s + e.tool_time_s for e in episodes)
    assert serial > n * 0.5
    assert wall < serial / 3, (wall, serial)


async def test_episode_with_a_tokenizer_without_tool_template(server, tools, bare_tokenizer) -> None:
    from retool.engines.sglang import SGLangEngine

    eng = SGLangEngine(server.url, bare_tokenizer)
    try:
        tag = script(server, call("print(3)"), "\\boxed{3}")
        ep = await run_episode(eng, f"{tag} q", label="3", config=RolloutConfig(), tools=tools)
    finally:
        await eng.aclose()
    assert ep.prompt_text.startswith("<|im_start|>system\n") and "<tools>" in ep.prompt_text
    assert "<tool_response>\n3\n</tool_response>" in ep.response_text
    assert ep.reward is not None and ep.reward.correct


async def test_evaluate_samples_n_per_problem(engine, tools, server) -> None:
    from dataclasses import dataclass

    @dataclass
    class P:
        prompt: str
        label: str
        id: str | None = None

    good = script(server, call("print(2 + 2)"), "\\boxed{4}")
    bad = script(server, "I think it is \\boxed{7}")
    problems = [P(f"{good} 2+2?", "4", "a"), P(f"{bad} 3+3?", "6", "b")]
    result = await evaluate(
        engine, problems, rollout=RolloutConfig(), reward=RewardConfig(), n_samples=3, tools=tools
    )
    m = result.metrics
    assert len(result.episodes) == 6 and m["n_prompts"] == 2
    assert (
        m["acc"] == pytest.approx(0.5)
        and m["pass@3"] == pytest.approx(0.5)
        and m["avg@3"] == pytest.approx(0.5)
    )
    assert m["tool_call_rate"] == pytest.approx(0.5) and m["code_pass_rate"] == 1.0
    rows = result.samples_table()
    assert rows[0]["tool_calls"][0]["code"] == "print(2 + 2)" and rows[0]["correct"] is True
    assert rows[3]["pred"] == "7" and rows[3]["reward"] == pytest.approx(-1.1)
    with pytest.raises(TypeError, match="problem 0"):
        await evaluate(engine, [object()], n_samples=1, tools=tools)  # type: ignore[list-item]


def test_rollout_config_rejects_unknown_keys() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="max_turn"):
        RolloutConfig.model_validate({"max_turn": 3})


def test_run_episodes_checks_lengths() -> None:
    with pytest.raises(ValueError, match="2 prompts, 1 labels"):
        asyncio.run(run_episodes(None, ["a", "b"], labels=["1"]))  # type: ignore[arg-type]


async def test_markdown_block_runs_only_without_a_following_answer(engine, tools, server) -> None:
    tag = script(server, "Let me check\n```python\nprint(6 * 7)\n```\n", "\\boxed{42}")
    ep = await run_episode(engine, f"{tag} q", label="42", config=RolloutConfig(), tools=tools)
    [rec] = ep.tool_calls
    assert (rec.fmt, rec.observation.strip()) == ("markdown", "42")
    assert "<interpreter>\n42\n</interpreter>" in ep.response_text and ep.reward and ep.reward.correct
    # a code block that is followed by the answer is solution text, not a call
    tag = script(server, "Worked out:\n```python\nprint(6 * 7)\n```\nso \\boxed{42}")
    ep = await run_episode(engine, f"{tag} q", label="42", config=RolloutConfig(), tools=tools)
    assert ep.tool_calls == [] and ep.stop_reason == "answer" and ep.reward and ep.reward.correct
