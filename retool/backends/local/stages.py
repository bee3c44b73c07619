"""Entry points the pipeline calls for the local backend (DVC stages / Prefect tasks wrap these).

Every path is explicit. Outputs:
  build_base_model  -> out_dir: config.json, model.safetensors, generation_config.json, tokenizer files
  run_sft           -> out_dir: the SFT model (same layout) + train_metrics.json + sft_history.json,
                       out_dir/checkpoints/ (resume state; a rerun continues from the latest one)
  run_grpo          -> out_dir: the RL model + train_metrics.json + grpo_curve.csv + grpo_history.json,
                       out_dir/checkpoints/
  evaluate_checkpoint -> (metrics, episodes); writes nothing (the eval stage writes its metrics file)
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from retool.backends.local.config import LocalConfig
from retool.backends.local.engine import LocalEngine, trim_heap
from retool.backends.local.model import build_and_save, load_model, load_tokenizer, tool_spec
from retool.io import atomic_write_json

PathLike = str | os.PathLike[str]


def setup_torch(cfg: LocalConfig) -> None:
    """Thread count and seeds: one torch process at a time on the shared cores."""
    torch.set_num_threads(cfg.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    torch.manual_seed(cfg.seed)


def publish_model(model: Any, tokenizer: Any, out_dir: PathLike) -> Path:
    """Write the final model into ``out_dir`` file by file (each replace is atomic), keeping checkpoints/."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".publish-", dir=out))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        names = sorted(p.name for p in tmp.iterdir())
        for name in sorted(names, key=lambda n: n == "config.json"):  # config.json last: "model complete"
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_base_model(cfg: LocalConfig, corpus_paths: Sequence[PathLike], out_dir: PathLike) -> Path:
    """The tiny profile's base model: tokenizer (fixed prompt lines harvested from the corpus) and a
    freshly initialized Qwen3ForCausalLM, in the Hugging Face layout."""
    setup_torch(cfg)
    return build_and_save(cfg, list(corpus_paths), out_dir)


def run_sft(
    cfg: LocalConfig,
    sft_parquet: PathLike,
    base_dir: PathLike,
    out_dir: PathLike,
    *,
    checkpoint_dir: PathLike | None = None,
) -> dict[str, Any]:
    """SFT from ``base_dir`` on the sft_data parquet; resumes from ``checkpoint_dir`` (default
    ``out_dir/checkpoints``) when it holds a checkpoint."""
    from retool.backends.local.sft import encode_example, load_sft_parquet, train_sft

    setup_torch(cfg)
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(base_dir)
    model = load_model(base_dir, cfg)
    convs = load_sft_parquet(sft_parquet)
    if cfg.sft.max_examples:
        convs = convs[: cfg.sft.max_examples]
    tools = [tool_spec()] if cfg.sft.render_tools else None
    examples = [encode_example(tokenizer, m, cfg.sft.max_seq_len, tools) for m in convs]
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir is not None else Path(out_dir) / "checkpoints"
    result = train_sft(cfg, model, tokenizer, examples, ckpt_root)
    publish_model(model, tokenizer, out_dir)
    history = result.pop("history")
    n_tok = sum(len(e.input_ids) for e in examples)
    result.update(
        examples=len(examples),
        mean_tokens=n_tok / max(1, len(examples)),
        trained_token_frac=sum(sum(e.loss_mask) for e in examples) / max(1, n_tok),
        wall_s=time.perf_counter() - t0,
    )
    atomic_write_json(Path(out_dir) / "sft_history.json", history)
    atomic_write_json(Path(out_dir) / "train_metrics.json", result)
    return result


async def eval_with_engine(
    engine: LocalEngine,
    problems: Sequence[Any],
    *,
    rollout_cfg: Any,
    reward_cfg: Any,
    tools: Any,
    n_samples: int,
    temperature: float = 1.0,
    greedy: bool = True,
) -> tuple[dict[str, float], list[Any]]:
    """retool.evaluation's sampled + greedy evaluation, with as many episodes in flight as the engine batches."""
    from retool.evaluation import evaluate_sampled_and_greedy

    rollout_cfg = rollout_cfg.model_copy(
        update={"concurrency": max(rollout_cfg.concurrency, engine.max_batch_size)}
    )
    return await evaluate_sampled_and_greedy(
        engine,
        problems,
        rollout=rollout_cfg,
        reward=reward_cfg,
        tools=tools,
        n_samples=n_samples,
        temperature=temperature,
        greedy=greedy,
    )


def _load_problems(path: PathLike, limit: int | None = None) -> list[Any]:
    from retool.data.problems import load_problems

    problems = load_problems(Path(path))
    return problems[:limit] if limit else problems


def evaluate_checkpoint(
    cfg: LocalConfig,
    rollout_cfg: Any,
    reward_cfg: Any,
    sandbox_cfg: Any,
    ckpt_dir: PathLike,
    eval_jsonl: PathLike,
    n_samples: int | None = None,
    *,
    greedy: bool | None = None,
    max_problems: int | None = None,
) -> tuple[dict[str, float], list[Any]]:
    """Evaluate a saved model on the eval split: sampled acc at cfg.eval.temperature, pass@k, tool-call
    rate and behaviour metrics, plus greedy_acc; returns (metrics, episodes)."""
    from retool.sandbox import Sandbox
    from retool.tools import ToolRegistry

    setup_torch(cfg)
    ev = cfg.eval
    problems = _load_problems(eval_jsonl, max_problems or ev.max_problems)
    tokenizer = load_tokenizer(ckpt_dir)
    model = load_model(ckpt_dir, cfg).eval()
    t0 = time.perf_counter()

    async def go() -> tuple[dict[str, float], list[Any]]:
        engine = LocalEngine(
            model,
            tokenizer,
            max_batch_size=cfg.max_batch_size,
            batch_wait_ms=cfg.batch_wait_ms,
            seed=cfg.seed,
        )
        try:
            with Sandbox(sandbox_cfg) as sandbox:
                return await eval_with_engine(
                    engine,
                    problems,
                    rollout_cfg=rollout_cfg,
                    reward_cfg=reward_cfg,
                    tools=ToolRegistry(sandbox),
                    n_samples=n_samples or ev.n_samples,
                    temperature=ev.temperature,
                    greedy=ev.greedy if greedy is None else greedy,
                )
        finally:
            await engine.aclose()

    metrics, episodes = asyncio.run(go())
    metrics["eval_s"] = time.perf_counter() - t0
    model = None  # release the weights before the next phase
    gc.collect()
    trim_heap()
    return metrics, episodes


def run_grpo(
    cfg: LocalConfig,
    rollout_cfg: Any,
    reward_cfg: Any,
    sandbox_cfg: Any,
    train_jsonl: PathLike,
    sft_dir: PathLike,
    out_dir: PathLike,
    eval_jsonl: PathLike | None = None,
    *,
    checkpoint_dir: PathLike | None = None,
) -> dict[str, Any]:
    """GRPO from the SFT model; resumes from ``checkpoint_dir`` (default ``out_dir/checkpoints``). With ``eval_jsonl`` and
    ``cfg.grpo.eval_every`` > 0 it evaluates periodically (eval/… metrics at that step)."""
    from retool.backends.local.grpo import train_grpo_async, write_curve
    from retool.sandbox import Sandbox
    from retool.tools import ToolRegistry

    setup_torch(cfg)
    t0 = time.perf_counter()
    train = _load_problems(train_jsonl)
    evalset = _load_problems(eval_jsonl, cfg.eval.max_problems) if eval_jsonl else []
    tokenizer = load_tokenizer(sft_dir)
    model = load_model(sft_dir, cfg).eval()
    out = Path(out_dir)

    async def go() -> dict[str, Any]:
        with Sandbox(sandbox_cfg) as sandbox:
            tools = ToolRegistry(sandbox)

            async def periodic_eval(engine: LocalEngine, step: int) -> dict[str, float]:
                metrics, _ = await eval_with_engine(
                    engine,
                    evalset,
                    rollout_cfg=rollout_cfg,
                    reward_cfg=reward_cfg,
                    tools=tools,
                    n_samples=cfg.grpo.eval_n_samples,
                    temperature=cfg.eval.temperature,
                    greedy=cfg.eval.greedy,
                )
                from retool.backends.local.sft import _log

                _log({f"eval/periodic/{k}": v for k, v in metrics.items()}, step)
                return metrics

            return await train_grpo_async(
                cfg,
                model,
                tokenizer,
                train,
                rollout_cfg,
                reward_cfg,
                tools,
                out,
                checkpoint_dir=checkpoint_dir,
                eval_fn=periodic_eval if evalset else None,
            )

    result = asyncio.run(go())
    publish_model(model, tokenizer, out)
    model = None  # release the weights before the next phase
    gc.collect()
    trim_heap()
    write_curve(result["history"], out)
    summary = {
        "steps": result["steps"],
        "resumed_from": result["resumed_from"],
        "wall_s": time.perf_counter() - t0,
        "evals": result["evals"],
        "last": result["history"][-1] if result["history"] else {},
    }
    atomic_write_json(out / "train_metrics.json", summary)
    return summary
