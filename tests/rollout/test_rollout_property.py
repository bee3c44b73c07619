"""Property: whatever the turn structure and budgets, token ids, logprobs and loss mask stay aligned,
budgets hold, and the request never asks for more tokens than the budget leaves."""

from __future__ import annotations

import asyncio
import json
import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retool.engines.sglang import SGLangEngine
from retool.rollout import RolloutConfig, run_episode

TURNS = {
    "call": lambda k: (
        f'Try.\n<tool_call>\n{{"name": "code_interpreter", "arguments": {{"code": "print({k})"}}}}\n</tool_call>'
    ),
    "code": lambda k: f"<code>\n```python\nprint({k} * 2)\n```\n</code>",
    "bad": lambda k: (
        f'<tool_call>{{"name": "code_interpreter", "arguments": {{"code": "print({k})"</tool_call>'
    ),
    "markdown": lambda k: f"Compute\n```python\nprint({k})\n```\n",
    "text": lambda k: " ".join(f"step{i}" for i in range(k * 7)),
    "answer": lambda k: f"Done: \\boxed{{{k}}}",
    "two_calls": lambda k: (
        f'<tool_call>{{"name": "code_interpreter", "arguments": {{"code": "print({k})"}}}}</tool_call>'
        f'<tool_call>{{"name": "code_interpreter", "arguments": {{"code": "print({k + 1})"}}}}</tool_call> after'
    ),
}

turn_strategy = st.tuples(st.sampled_from(sorted(TURNS)), st.integers(min_value=1, max_value=12))


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    turns=st.lists(turn_strategy, min_size=1, max_size=6),
    extra_context=st.integers(min_value=1, max_value=400),
    max_new=st.integers(min_value=1, max_value=120),
    max_response=st.one_of(st.none(), st.integers(min_value=1, max_value=300)),
    max_turns=st.integers(min_value=1, max_value=6),
    max_calls=st.integers(min_value=0, max_value=4),
    stop_at_call=st.booleans(),
)
def test_alignment_and_budgets_hold(
    server, tools, tokenizer, turns, extra_context, max_new, max_response, max_turns, max_calls, stop_at_call
) -> None:
    name = f"p{uuid.uuid4().hex[:10]}"
    server.add_scripts({name: [TURNS[kind](k) for kind, k in turns]})
    question = f"[[{name}]] q"
    from retool.prompts import build_prompt

    prompt_len = len(build_prompt(tokenizer, question, tools=tools.specs()).token_ids)
    cfg = RolloutConfig(
        max_context_tokens=prompt_len + extra_context,
        max_new_tokens=max_new,
        max_response_tokens=max_response,
        max_turns=max_turns,
        max_tool_calls=max_calls,
        stop_at_tool_call=stop_at_call,
        engine_retries=0,
    )

    async def go():
        engine = SGLangEngine(server.url, tokenizer, max_retries=0)
        try:
            return await run_episode(engine, question, label="1", config=cfg, tools=tools)
        finally:
            await engine.aclose()

    server.reset_stats()
    ep = asyncio.run(go())
    asked = server.stats()["max_new_tokens"]

    assert ep.status != "aborted", ep.error
    assert len(ep.response_ids) == len(ep.logprobs) == len(ep.loss_mask)
    assert all((m == 1) == (lp != 0.0) for m, lp in zip(ep.loss_mask, ep.logprobs, strict=True))
    assert len(ep.prompt_ids) + len(ep.response_ids) <= cfg.max_context_tokens
    if max_response is not None:
        assert len(ep.response_ids) <= max_response
    assert len(ep.tool_calls) <= max_calls
    assert ep.num_turns <= max_turns and len(asked) == ep.num_turns
    assert all(0 < a <= max_new for a in asked)
    # each request fit the budget left at the time it was made
    used = 0
    for turn, a in zip(ep.turns, asked, strict=True):
        left = cfg.max_context_tokens - prompt_len - used
        if max_response is not None:
            left = min(left, max_response - used)
        assert a == min(max_new, left)
        assert turn.gen_tokens <= a
        used += turn.gen_tokens + turn.obs_tokens
    assert used == len(ep.response_ids)
    assert ep.response_text == tokenizer.decode(ep.response_ids)
    if ep.status == "completed":
        assert ep.stop_reason in ("answer", "end_of_turn")
    json.dumps(ep.sample_row())  # the samples table row is plain data
