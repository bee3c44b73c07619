"""slime's custom generate / reward hooks, driven with a stand-in carrying slime's Sample fields
(and its status enum values) against the scripted SGLang server on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
from argparse import Namespace
from typing import Any

import pytest

from retool.backends.slime import hooks
from retool.rollout import RolloutConfig
from tests.slime_sample import Sample

from .test_rollout_episodes import call, script


@pytest.fixture
async def slime_args(server, tokenizer_dir, tools, monkeypatch):
    monkeypatch.setenv(
        hooks.CONFIG_ENV,
        json.dumps(
            {"rollout": {"max_turns": 5, "max_tool_calls": 4}, "reward": {"tool_bonus_per_call": 0.1}}
        ),
    )
    hooks._State.reset()
    args = Namespace(
        hf_checkpoint=str(tokenizer_dir),
        sglang_router_ip="127.0.0.1",
        sglang_router_port=server.port,
        rollout_max_context_len=4096,
        eval_max_context_len=None,
        apply_chat_template=False,
        partial_rollout=False,
    )
    yield args
    state = hooks._State._instance
    if state is not None:
        await state.engine.aclose()
    hooks._State.reset()


def sampling_params(**kw: Any) -> dict[str, Any]:
    base = dict(
        temperature=1.0,
        top_p=1.0,
        top_k=-1,
        max_new_tokens=1024,
        stop=None,
        stop_token_ids=None,
        skip_special_tokens=False,
        no_stop_trim=True,
        spaces_between_special_tokens=False,
    )
    base.update(kw)
    return base


async def test_generate_and_reward_fill_a_sample(slime_args, server, tokenizer) -> None:
    tag = script(server, call("print(2 ** 10)"), "So \\boxed{1024}")
    sample = Sample(
        index=0, prompt=f"{tag} 2^10?", label="1024", loss_mask=[9], response="stale", response_length=3
    )
    out = await hooks.generate(slime_args, sample, sampling_params())
    assert out is sample and sample.status is Sample.Status.COMPLETED
    assert len(sample.loss_mask) == len(sample.rollout_log_probs) == sample.response_length
    assert tokenizer.decode(sample.tokens[-sample.response_length :]) == sample.response
    assert "<tool_response>\n1024\n</tool_response>" in sample.response
    assert 0 in sample.loss_mask and sample.loss_mask[0] == 1
    assert sample.metadata["tool_call_count"] == 1 and sample.metadata["stop_reason"] == "answer"
    reward = await hooks.reward_func(slime_args, sample)
    assert reward == {"score": 1.0, "acc": 1.0, "pred": "1024"}
    assert sample.metadata["correct"] is True


async def test_wrong_answer_shaping_uses_configured_bonus_and_group_rm(slime_args, server) -> None:
    tag = script(server, call("print(1)"), call("print(2)"), call("print(3)"), "\\boxed{7}")
    samples = [Sample(index=i, prompt=f"{tag} q", label="8") for i in range(2)]
    for s in samples:
        await hooks.generate(slime_args, s, sampling_params())
    assert [s.metadata["tool_call_count"] for s in samples] == [3, 3]
    rewards = await hooks.reward_func(slime_args, samples)  # --group-rm passes the whole group
    # wrong: min(-0.6, -1 + (3 - 2) * 0.1)
    assert [r["score"] for r in rewards] == [pytest.approx(-0.9)] * 2 and rewards[0]["acc"] == 0.0


async def test_budgets_come_from_slime_args(slime_args, server, tokenizer) -> None:
    words = " ".join(f"w{i}" for i in range(200))
    tag = script(server, words)
    sample = Sample(prompt=f"{tag} q", label="1")
    server.reset_stats()
    await hooks.generate(slime_args, sample, sampling_params(max_new_tokens=40))  # total response budget
    assert sample.status is Sample.Status.TRUNCATED and sample.response_length == 40
    slime_args.rollout_max_context_len = len(sample.tokens) - 40 + 25
    sample = Sample(prompt=f"{tag} q", label="1")
    await hooks.generate(slime_args, sample, sampling_params())
    assert len(sample.tokens) == slime_args.rollout_max_context_len


async def test_pretemplated_prompt_is_not_templated_twice(slime_args, server, tokenizer) -> None:
    from retool.prompts import build_prompt

    tag = script(server, "\\boxed{3}")
    rendered = build_prompt(tokenizer, f"{tag} q", tools=[]).text  # as slime's --apply-chat-template does
    slime_args.apply_chat_template = True
    sample = Sample(prompt=rendered, label="3")
    await hooks.generate(slime_args, sample, sampling_params())
    prompt_ids = sample.tokens[: len(sample.tokens) - sample.response_length]
    assert prompt_ids == tokenizer.encode(rendered, add_special_tokens=False)
    assert tokenizer.decode(prompt_ids).count("<|im_start|>system") == 1


async def test_engine_failure_marks_the_sample_aborted(slime_args, server) -> None:
    tag = script(server, {"text": "\\boxed{1}", "fail": 1000})
    hooks._State.get(slime_args).engine.max_retries = 0
    slime_args_cfg = RolloutConfig(engine_retries=0)
    hooks._State.get(slime_args).rollout = slime_args_cfg
    sample = Sample(prompt=f"{tag} q", label="1")
    await hooks.generate(slime_args, sample, sampling_params())
    assert sample.status is Sample.Status.ABORTED and "500" in sample.metadata["error"]


async def test_partial_rollout_is_refused(slime_args) -> None:
    slime_args.partial_rollout = True
    with pytest.raises(ValueError, match="partial-rollout"):
        await hooks.generate(slime_args, Sample(prompt="q"), sampling_params())


def test_config_env_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown section"):
        hooks.load_hooks_config('{"rollouts": {}}')
    with pytest.raises(ValueError, match="neither a JSON object nor an existing file"):
        hooks.load_hooks_config("/nonexistent/file.json")
    path = tmp_path / "hooks.yaml"
    path.write_text("rollout:\n  max_turns: 3\n")
    assert hooks.load_hooks_config(str(path)) == {"rollout": {"max_turns": 3}}
    env = hooks.hooks_env(RolloutConfig(max_turns=5))
    assert json.loads(env[hooks.CONFIG_ENV])["rollout"]["max_turns"] == 5


def test_imports_without_slime() -> None:
    code = (
        "import sys, retool, retool.backends.slime.hooks as h; "
        "assert callable(h.generate) and callable(h.reward_func); "
        "assert 'slime' not in sys.modules; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
