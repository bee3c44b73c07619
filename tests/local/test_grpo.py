"""GRPO through the real episode loop, the real sandbox and tool registry; advantages; resume."""

from __future__ import annotations

import asyncio
import csv
import json
import math

import pytest

from retool.backends.local.checkpoint import latest_checkpoint
from retool.backends.local.config import smoke_config
from retool.backends.local.engine import LocalEngine
from retool.backends.local.grpo import build_samples, group_advantages, grpo_update, train_grpo_async
from retool.backends.local.model import load_model, load_tokenizer
from retool.backends.local.stages import evaluate_checkpoint, run_grpo
from retool.data.problems import load_problems
from retool.reward import RewardConfig
from retool.rollout import RolloutConfig
from retool.sandbox import Sandbox, SandboxConfig
from retool.tools import ToolRegistry

ROLLOUT = RolloutConfig(
    max_turns=2, max_tool_calls=1, max_new_tokens=24, max_context_tokens=400, system_prompt="Use python."
)
SANDBOX = SandboxConfig(workers=1, preload=[], warmup=False)


def test_group_advantages():
    assert group_advantages([1.0, 1.0, 1.0], skip_uniform=True) is None
    assert group_advantages([1.0, 1.0], skip_uniform=False) == [0.0, 0.0]
    adv = group_advantages([1.0, -1.0, -1.0, 1.0], skip_uniform=True)
    assert adv is not None and sum(adv) == pytest.approx(0.0, abs=1e-6)
    assert adv[0] == pytest.approx(1.0, rel=1e-4) and adv[1] == pytest.approx(-1.0, rel=1e-4)


async def test_grpo_step_through_the_real_episode_loop(base_dir, data_dir):
    """One update on real episodes: observation tokens carry no loss, the loss is finite, weights move."""
    import torch

    cfg = smoke_config()
    tok = load_tokenizer(base_dir)
    model = load_model(base_dir, cfg).eval()
    problems = load_problems(data_dir["train"])[:2]
    from retool.backends.local.grpo import collect_groups

    engine = LocalEngine(model, tok, seed=0)
    with Sandbox(SANDBOX) as sandbox:
        # a scripted tool call in the prompt's place is not needed: the loop runs whatever the model writes
        groups = await collect_groups(engine, problems, 4, ROLLOUT, RewardConfig(), ToolRegistry(sandbox), 0)
    await engine.aclose()
    eps = [e for g in groups for e in g]
    assert len(eps) == 8
    for e in eps:
        assert len(e.response_ids) == len(e.logprobs) == len(e.loss_mask)
        assert e.reward is not None and math.isfinite(e.reward.score)
    # give the groups distinct rewards so none is skipped, then take a step
    for g in groups:
        for i, e in enumerate(g):
            e.reward.score = float(i % 2)
    samples, skipped = build_samples(groups, RewardConfig(), skip_uniform=True)
    assert skipped == 0 and samples
    ref = load_model(base_dir, cfg).eval()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stats = grpo_update(model, ref, opt, samples, cfg, ROLLOUT.temperature, tok.pad_token_id)
    for key in ("loss", "kl", "clip_frac", "grad_norm", "entropy"):
        assert math.isfinite(stats[key]), key
    # on-policy: the engine's logprobs are what the trainer recomputes, so nothing is clipped
    assert stats["clip_frac"] == 0.0 and stats["ratio_max"] < 1.01
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_observation_tokens_are_masked_in_training_samples(base_dir):
    """A sample built from an episode keeps its loss mask: tokens with mask 0 get no gradient."""
    import torch

    cfg = smoke_config()
    tok = load_tokenizer(base_dir)
    model = load_model(base_dir, cfg)
    from retool.backends.local.grpo import TrainSample

    prompt = tok.encode("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    resp = tok.encode("abc<interpreter>\n5\n</interpreter>\nxyz", add_special_tokens=False)
    n_obs = len(tok.encode("<interpreter>\n5\n</interpreter>\n", add_special_tokens=False))
    mask = [1] * 3 + [0] * n_obs + [1] * (len(resp) - 3 - n_obs)
    masked_only = [0 if m else 1 for m in mask]
    s_obs = TrainSample(prompt, resp, [0.0] * len(resp), masked_only, 1.0)
    # with only observation tokens "trained" the loss is built from them; with the true mask it is not
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    stats_obs = grpo_update(model, None, opt, [s_obs], cfg.model_copy(), 1.0, tok.pad_token_id)
    s_true = TrainSample(prompt, resp, [0.0] * len(resp), mask, 1.0)
    stats_true = grpo_update(model, None, opt, [s_true], cfg, 1.0, tok.pad_token_id)
    assert stats_obs["tokens"] == n_obs and stats_true["tokens"] == len(resp) - n_obs


def test_run_grpo_resumes_and_writes_curves(tmp_path, base_dir, data_dir):
    cfg = smoke_config()
    cfg = cfg.model_copy(update={"grpo": cfg.grpo.model_copy(update={"steps": 2, "kl_coef": 0.05})})
    out = tmp_path / "rl"
    tok = load_tokenizer(base_dir)
    model = load_model(base_dir, cfg).eval()
    problems = load_problems(data_dir["train"])

    async def first_step() -> dict:
        with Sandbox(SANDBOX) as sandbox:
            return await train_grpo_async(
                cfg, model, tok, problems, ROLLOUT, RewardConfig(), ToolRegistry(sandbox), out, stop_after=1
            )

    res = asyncio.run(first_step())
    assert res["steps"] == 1
    assert latest_checkpoint(out / "checkpoints").name == "step-000001"
    summary = run_grpo(cfg, ROLLOUT, RewardConfig(), SANDBOX, data_dir["train"], base_dir, out)
    assert summary["resumed_from"] == 1 and summary["steps"] == 2
    rows = list(csv.DictReader((out / "grpo_curve.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(r["reward_mean"] != "" and r["tool_call_rate"] != "" for r in rows)
    history = json.loads((out / "grpo_history.json").read_text())
    assert len(history) == 2 and "acc" in history[0]
    # the result reloads as a Hugging Face model and evaluates through the same loop
    metrics, episodes = evaluate_checkpoint(
        cfg, ROLLOUT, RewardConfig(), SANDBOX, out, data_dir["train"], 2, greedy=True, max_problems=3
    )
    assert len(episodes) == 6
    for key in ("acc", "tool_call_rate", "pass@2", "greedy_acc", "answer_rate"):
        assert key in metrics and math.isfinite(metrics[key]), key
