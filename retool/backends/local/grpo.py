"""GRPO for the local model: rollouts through retool.rollout.run_episode, a PPO-clipped update.

One step: take ``prompts_per_step`` training problems, run ``n_samples`` episodes each through the
same episode loop as the GPU backend (local engine, real sandbox behind the tool registry), normalize
rewards within each group (groups whose samples all scored the same carry no signal and are skipped),
and take one optimizer step on the token-level PPO objective with separate low/high clip, plus an
optional low-variance KL to the frozen SFT model. Only tokens the model wrote (``Episode.loss_mask``)
carry loss; observation tokens never do. Log-probs are recomputed at the rollout temperature, the
distribution the engine sampled from, so the old/new ratio is exact on-policy.
"""

from __future__ import annotations

import asyncio
import copy
import csv
import io
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from retool.backends.local.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from retool.backends.local.config import LocalConfig
from retool.backends.local.engine import LocalEngine


@dataclass
class TrainSample:
    prompt_ids: list[int]
    response_ids: list[int]
    old_logprobs: list[float]
    loss_mask: list[int]
    advantage: float


def _log(metrics: dict[str, float], step: int | None) -> None:
    try:
        from retool.tracking import log_metrics

        log_metrics(metrics, step=step)
    except Exception:
        pass


def episode_reward(ep: Any, reward_cfg: Any) -> float:
    """The episode's scored reward; scores it here when the loop did not."""
    if getattr(ep, "reward", None) is None:
        from retool.reward import score

        ep.reward = score(ep.response_text, ep.label, config=reward_cfg)
    return float(ep.reward.score)


def group_advantages(rewards: Sequence[float], skip_uniform: bool, eps: float = 1e-6) -> list[float] | None:
    """(r - mean) / std within one prompt's group; None when all rewards are equal and skipping is on."""
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
    if std < eps:
        return None if skip_uniform else [0.0] * len(rewards)
    return [(r - mean) / (std + eps) for r in rewards]


def build_samples(
    groups: list[list[Any]], reward_cfg: Any, skip_uniform: bool
) -> tuple[list[TrainSample], int]:
    samples: list[TrainSample] = []
    skipped = 0
    for group in groups:
        advs = group_advantages([episode_reward(ep, reward_cfg) for ep in group], skip_uniform)
        if advs is None:
            skipped += 1
            continue
        for ep, adv in zip(group, advs, strict=True):
            if not ep.response_ids or not any(ep.loss_mask):
                continue
            samples.append(
                TrainSample(
                    list(ep.prompt_ids), list(ep.response_ids), list(ep.logprobs), list(ep.loss_mask), adv
                )
            )
    return samples, skipped


def _response_logprobs(
    model: Any, batch: list[TrainSample], temperature: float, pad_id: int, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs of each response under ``model`` at ``temperature``: [B, R] (+ mask, entropy)."""
    device = next(model.parameters()).device
    seqs = [s.prompt_ids + s.response_ids for s in batch]
    width = max(len(s) for s in seqs)
    rlen = max(len(s.response_ids) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(batch), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq)
        att[i, : len(seq)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=att.to(device)).logits.float()
    # gather the logits that predict each response token: position p-1 predicts token p
    index = torch.zeros((len(batch), rlen), dtype=torch.long)
    targets = torch.zeros((len(batch), rlen), dtype=torch.long)
    valid = torch.zeros((len(batch), rlen), dtype=torch.bool)
    for i, s in enumerate(batch):
        n, p = len(s.response_ids), len(s.prompt_ids)
        index[i, :n] = torch.arange(p - 1, p - 1 + n)
        targets[i, :n] = torch.tensor(s.response_ids)
        valid[i, :n] = True
    index, targets, valid = index.to(device), targets.to(device), valid.to(device)
    sel = logits.gather(1, index[:, :, None].expand(-1, -1, logits.shape[-1])) / max(temperature, 1e-6)
    logp_all = torch.log_softmax(sel, dim=-1)
    logp = logp_all.gather(-1, targets[:, :, None]).squeeze(-1)
    ent = None
    if with_entropy:
        with torch.no_grad():
            ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, valid, ent


def grpo_update(
    model: Any,
    ref_model: Any | None,
    optimizer: torch.optim.Optimizer,
    samples: list[TrainSample],
    cfg: LocalConfig,
    temperature: float,
    pad_id: int,
) -> dict[str, float]:
    """One optimizer step of the token-level clipped objective over ``samples``; returns train/ metrics."""
    g = cfg.grpo
    total_tokens = sum(sum(s.loss_mask) for s in samples)
    if total_tokens == 0:
        return {}
    stats = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "entropy": 0.0, "ratio_max": 0.0}
    model.train()
    optimizer.zero_grad(set_to_none=True)
    order = sorted(
        range(len(samples)), key=lambda i: len(samples[i].prompt_ids) + len(samples[i].response_ids)
    )
    for start in range(0, len(order), g.micro_batch_size):
        batch = [samples[i] for i in order[start : start + g.micro_batch_size]]
        device = next(model.parameters()).device
        logp, valid, ent = _response_logprobs(model, batch, temperature, pad_id, with_entropy=True)
        rlen = logp.shape[1]
        old = torch.zeros_like(logp)
        mask = torch.zeros_like(logp)
        adv = torch.tensor([s.advantage for s in batch], device=device)[:, None]
        for i, s in enumerate(batch):
            n = len(s.response_ids)
            old[i, :n] = torch.tensor(s.old_logprobs, device=device)
            mask[i, :n] = torch.tensor(s.loss_mask, dtype=torch.float32, device=device)
        mask = mask * valid
        ratio = torch.exp(logp - old)
        unclipped = ratio * adv
        clipped = torch.clamp(ratio, 1 - g.clip_low, 1 + g.clip_high) * adv
        pg = -torch.minimum(unclipped, clipped)
        per_token = pg
        kl = torch.zeros_like(logp)
        if ref_model is not None and g.kl_coef > 0:
            with torch.no_grad():
                ref_lp, _, _ = _response_logprobs(ref_model, batch, temperature, pad_id, with_entropy=False)
            log_ratio = (ref_lp - logp).clamp(-20, 20)
            kl = (torch.exp(log_ratio) - log_ratio - 1).clamp(-10, 10)  # low_var_kl (k3)
            per_token = per_token + g.kl_coef * kl
        if g.entropy_coef > 0 and ent is not None:
            per_token = per_token - g.entropy_coef * ent
        loss = (per_token * mask).sum() / total_tokens
        loss.backward()
        with torch.no_grad():
            stats["loss"] += float(loss)
            stats["pg_loss"] += float((pg * mask).sum()) / total_tokens
            stats["kl"] += float((kl * mask).sum()) / total_tokens
            is_clipped = ((ratio < 1 - g.clip_low) & (adv < 0)) | ((ratio > 1 + g.clip_high) & (adv > 0))
            stats["clip_frac"] += float((is_clipped.float() * mask).sum()) / total_tokens
            if ent is not None:
                stats["entropy"] += float((ent * mask).sum()) / total_tokens
            stats["ratio_max"] = max(stats["ratio_max"], float((ratio * mask).max()))
        del rlen
    stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), g.grad_clip))
    optimizer.step()
    model.eval()
    stats["tokens"] = float(total_tokens)
    return stats


def _problem_order(n: int, seed: int, step: int, per_step: int) -> list[int]:
    """The problems of ``step``: a seeded permutation per pass over the training set."""
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(k, n)
        perm = list(range(n))
        random.Random(seed * 1000003 + epoch).shuffle(perm)
        out.append(perm[i])
    return out


async def collect_groups(
    engine: LocalEngine,
    problems: Sequence[Any],
    n: int,
    rollout_cfg: Any,
    reward_cfg: Any,
    tools: Any,
    step: int,
) -> list[list[Any]]:
    """``n`` episodes per problem, all in flight at once (the engine batches them)."""
    from retool.rollout import run_episode

    tasks = [
        [
            run_episode(
                engine,
                p.prompt,
                label=p.label,
                config=rollout_cfg,
                tools=tools,
                reward=reward_cfg,
                group=f"{step}-{i}",
            )
            for _ in range(n)
        ]
        for i, p in enumerate(problems)
    ]
    flat = await asyncio.gather(*[t for group in tasks for t in group])
    return [list(flat[i * n : (i + 1) * n]) for i in range(len(problems))]


CURVE_FIELDS = [
    "step",
    "reward_mean",
    "acc",
    "tool_call_rate",
    "code_error_rate",
    "response_len_mean",
    "loss",
    "kl",
    "clip_frac",
    "entropy",
    "grad_norm",
    "groups_skipped",
    "rollout_s",
    "train_s",
]


def write_curve(history: list[dict[str, float]], out_dir: Path) -> None:
    """Per-step reward / tool-call rate for DVC plots (CSV) plus the full records (JSON)."""
    from retool.io import atomic_write_json, atomic_write_text

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CURVE_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for rec in history:
        writer.writerow({k: rec.get(k, "") for k in CURVE_FIELDS})
    atomic_write_text(out_dir / "grpo_curve.csv", buf.getvalue())
    atomic_write_json(out_dir / "grpo_history.json", history)


async def train_grpo_async(
    cfg: LocalConfig,
    model: Any,
    tokenizer: Any,
    train_problems: Sequence[Any],
    rollout_cfg: Any,
    reward_cfg: Any,
    tools: Any,
    out_dir: str | os.PathLike[str],
    *,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    eval_fn: Any = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """The GRPO loop. ``eval_fn(engine, step) -> dict`` runs every ``eval_every`` steps when given."""
    from tqdm.auto import tqdm

    from retool.metrics import summarize

    g = cfg.grpo
    if not train_problems:
        raise ValueError("no training problems for GRPO")
    out = Path(out_dir)
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir is not None else out / "checkpoints"
    ref_model = None
    if g.kl_coef > 0:
        ref_model = copy.deepcopy(model).eval()
        for p in ref_model.parameters():
            p.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=g.lr, weight_decay=g.weight_decay, betas=(0.9, 0.99))
    step, history = 0, []
    ckpt = latest_checkpoint(ckpt_root)
    if ckpt is not None:
        from safetensors.torch import load_file

        state = load_trainer_state(ckpt)
        device = next(model.parameters()).device
        model.load_state_dict(load_file(str(ckpt / "model.safetensors"), device=str(device)), strict=False)
        model.tie_weights()
        optimizer.load_state_dict(state["optimizer"])
        step, history = int(state["step"]), list(state.get("history", []))
    resumed_from = step
    engine = LocalEngine(
        model,
        tokenizer,
        max_batch_size=cfg.max_batch_size,
        batch_wait_ms=cfg.batch_wait_ms,
        seed=cfg.seed + step,
    )
    pad_id = int(tokenizer.pad_token_id)
    temperature = float(getattr(rollout_cfg, "temperature", 1.0))
    bar = tqdm(total=g.steps, initial=step, desc="grpo", disable=not cfg.progress, dynamic_ncols=True)
    evals: list[dict[str, Any]] = []
    try:
        while step < g.steps:
            for pg in optimizer.param_groups:
                pg["lr"] = g.lr * min(1.0, (step + 1) / g.warmup_steps) if g.warmup_steps else g.lr
            model.eval()
            t0 = time.perf_counter()
            idx = _problem_order(len(train_problems), cfg.seed, step, g.prompts_per_step)
            problems = [train_problems[i] for i in idx]
            groups = await collect_groups(engine, problems, g.n_samples, rollout_cfg, reward_cfg, tools, step)
            t1 = time.perf_counter()
            samples, skipped = build_samples(groups, reward_cfg, g.skip_uniform_groups)
            stats = (
                grpo_update(model, ref_model, optimizer, samples, cfg, temperature, pad_id) if samples else {}
            )
            t2 = time.perf_counter()
            step += 1
            episodes = [ep for grp in groups for ep in grp]
            summary = summarize(episodes)
            rec: dict[str, Any] = {"step": step, **summary, **stats}
            rec.update(groups_skipped=skipped, samples=len(samples), rollout_s=t1 - t0, train_s=t2 - t1)
            history.append(rec)
            metrics = {f"rollout/{k}": float(v) for k, v in summary.items()}
            metrics.update({f"train/{k}": float(v) for k, v in stats.items()})
            metrics.update(
                {
                    "train/groups_skipped": float(skipped),
                    "train/lr": optimizer.param_groups[0]["lr"],
                    "perf/rollout_s": t1 - t0,
                    "perf/train_s": t2 - t1,
                }
            )
            _log(metrics, step)
            if not cfg.progress:
                print(
                    f"grpo step {step}: reward {summary.get('reward_mean', 0):.3f} acc {summary.get('acc', 0):.3f} "
                    f"tool {summary.get('tool_call_rate', 0):.2f} kl {stats.get('kl', 0):.4f} "
                    f"skipped {skipped} rollout {t1 - t0:.1f}s train {t2 - t1:.1f}s",
                    flush=True,
                )
            bar.update(1)
            bar.set_postfix(
                reward=f"{summary.get('reward_mean', float('nan')):.3f}",
                acc=f"{summary.get('acc', float('nan')):.3f}",
                tool=f"{summary.get('tool_call_rate', float('nan')):.2f}",
            )
            if eval_fn is not None and g.eval_every and step % g.eval_every == 0 and step < g.steps:
                res = await eval_fn(engine, step)
                evals.append({"step": step, **res})
            if step % g.checkpoint_every == 0 or step == g.steps:
                save_checkpoint(
                    ckpt_root,
                    step,
                    model,
                    tokenizer,
                    {"optimizer": optimizer.state_dict(), "history": history},
                )
                write_curve(history, out)
            if stop_after is not None and step >= stop_after:
                break
    finally:
        bar.close()
        await engine.aclose()
    return {"steps": step, "resumed_from": resumed_from, "history": history, "evals": evals}
