"""The local backend on a CUDA GPU: the same tokenizer, SFT trainer, batched engine, episode loop, sandbox,
reward and GRPO as the CPU run, with the model and the engine on the GPU.

Two steps, so the GPU machine needs nothing it cannot install offline:
    python benchmarks/gpu_local.py prepare --out gpu/data     # here: synthetic task + SFT conversion
    python benchmarks/gpu_local.py run --data gpu/data --out OUT [--sft-epochs 3 --grpo-steps 20]
`run` avoids retool.data (boto3, pyarrow) and reads the prepared JSON instead. It writes gpu.json and a
Markdown section (gpu.md) with times, throughput and the metrics after SFT and after RL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class Problem:
    prompt: str
    label: str
    id: str | None = None


def prepare(out: Path, seed: int) -> None:
    from retool.config import PipelineConfig
    from retool.data.sft import convert_sft, read_converted
    from retool.data.synthetic import write_synthetic_task

    cfg = PipelineConfig()
    out.mkdir(parents=True, exist_ok=True)
    write_synthetic_task(cfg.data, out / "raw", seed=seed)
    convert_sft(out / "raw" / "sft.jsonl", out / "sft.parquet", cfg.data, progress=False)
    convs = [messages for _, messages in read_converted(out / "sft.parquet")]
    (out / "sft_messages.json").write_text(json.dumps(convs))
    (out / "sft.parquet").unlink()
    (out / "config.json").write_text(cfg.model_dump_json())
    print(f"prepared {len(convs)} SFT conversations in {out}")


def _problems(path: Path) -> list[Problem]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [Problem(r["prompt"], str(r["label"]), r.get("id")) for r in rows]


def _without_data_package_imports() -> None:
    """The GPU machine lacks boto3/pyarrow, which retool.data's __init__ imports; the config submodule
    needs neither, so register the package without running its __init__."""
    import types

    pkg = types.ModuleType("retool.data")
    pkg.__path__ = [str(ROOT / "retool" / "data")]
    sys.modules.setdefault("retool.data", pkg)


def run(data: Path, out: Path, sft_epochs: float, grpo_steps: int, eval_problems: int) -> dict[str, Any]:
    import torch

    _without_data_package_imports()

    from retool.backends.local.engine import LocalEngine
    from retool.backends.local.grpo import train_grpo_async
    from retool.backends.local.model import build_and_save, load_model, load_tokenizer, tool_spec
    from retool.backends.local.sft import encode_example, train_sft
    from retool.backends.local.stages import eval_with_engine
    from retool.config import PipelineConfig
    from retool.sandbox import Sandbox
    from retool.tools import ToolRegistry

    pipeline = PipelineConfig.model_validate_json((data / "config.json").read_text())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    local = pipeline.local.model_copy(update={"device": device, "progress": False})
    local.sft.epochs = sft_epochs
    local.grpo.steps = grpo_steps
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    timings: dict[str, float] = {}
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }

    t0 = time.perf_counter()
    build_and_save(local, [data / "raw" / "sft.jsonl"], work / "base")
    tok = load_tokenizer(work / "base")
    model = load_model(work / "base", local)
    convs = json.loads((data / "sft_messages.json").read_text())
    tools_spec = [tool_spec()] if local.sft.render_tools else None
    examples = [encode_example(tok, m, local.sft.max_seq_len, tools_spec) for m in convs]
    timings["prepare_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sft = train_sft(local, model, tok, examples, work / "ckpt_sft")
    timings["sft_s"] = time.perf_counter() - t0
    result["sft"] = {k: v for k, v in sft.items() if isinstance(v, int | float)}

    evalset = _problems(data / "raw" / "eval.jsonl")[:eval_problems]
    train = _problems(data / "raw" / "train.jsonl")

    async def evaluate(label: str) -> dict[str, float]:
        engine = LocalEngine(
            model.eval(),
            tok,
            max_batch_size=local.max_batch_size,
            batch_wait_ms=local.batch_wait_ms,
            seed=local.seed,
        )
        try:
            start = time.perf_counter()
            metrics, _ = await eval_with_engine(
                engine,
                evalset,
                rollout_cfg=pipeline.local.rollout,
                reward_cfg=pipeline.reward,
                tools=tools,
                n_samples=local.eval.n_samples,
                temperature=local.eval.temperature,
                greedy=True,
            )
            timings[f"eval_{label}_s"] = time.perf_counter() - start
            return metrics
        finally:
            await engine.aclose()

    with Sandbox(pipeline.sandbox) as sandbox:
        tools = ToolRegistry(sandbox)
        result["isolation"] = sandbox.isolation
        result["after_sft"] = asyncio.run(evaluate("sft"))
        (out / "partial.json").write_text(json.dumps({**result, "timings": timings}, indent=2))
        t0 = time.perf_counter()
        grpo = asyncio.run(
            train_grpo_async(
                local, model, tok, train, pipeline.local.rollout, pipeline.reward, tools, work / "rl"
            )
        )
        timings["grpo_s"] = time.perf_counter() - t0
        result["grpo_last"] = {
            k: v
            for k, v in (grpo["history"][-1] if grpo["history"] else {}).items()
            if isinstance(v, int | float)
        }
        result["after_rl"] = asyncio.run(evaluate("rl"))
    result["timings"] = timings
    result["settings"] = {
        "sft_epochs": sft_epochs,
        "grpo_steps": grpo_steps,
        "eval_problems": len(evalset),
        "eval_n_samples": local.eval.n_samples,
        "sft_examples": len(examples),
    }
    if device == "cuda":
        result["max_cuda_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    (out / "gpu.json").write_text(json.dumps(result, indent=2))
    (out / "gpu.md").write_text(_markdown(result))
    return result


def _markdown(r: dict[str, Any]) -> str:
    s, rl, t = r["after_sft"], r["after_rl"], r["timings"]
    return "\n".join(
        [
            "## Local backend on a GPU (same loop, engine and trainers as the CPU run)",
            "",
            f"`python benchmarks/gpu_local.py run --sft-epochs {r['settings']['sft_epochs']} --grpo-steps "
            f"{r['settings']['grpo_steps']}` on {r['device']} (torch {r['torch']}, Python {r['python']}, sandbox "
            f"isolation `{r['isolation']}`); data prepared on the CPU machine with `gpu_local.py prepare`.",
            "",
            "| phase | seconds |",
            "|---|---:|",
            *[f"| {k.removesuffix('_s')} | {v:.1f} |" for k, v in t.items()],
            "",
            f"SFT: {r['sft'].get('steps')} steps, {r['sft'].get('tokens_per_s', 0):.0f} tokens/s, loss "
            f"{r['sft'].get('first_loss', 0):.3f} → {r['sft'].get('final_loss', 0):.3f}.",
            "",
            "| eval (sampled, T=1) | acc | greedy acc | tool_call_rate | pass@k |",
            "|---|---:|---:|---:|---:|",
            *[
                f"| after {name} | {m.get('acc', 0):.3f} | {m.get('greedy_acc', 0):.3f} | "
                f"{m.get('tool_call_rate', 0):.3f} | "
                f"{max((v for k, v in m.items() if k.startswith('pass@')), default=0):.3f} |"
                for name, m in (("SFT", s), ("RL", rl))
            ],
            "",
        ]
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run")
    r.add_argument("--data", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--sft-epochs", type=float, default=3.0)
    r.add_argument("--grpo-steps", type=int, default=20)
    r.add_argument("--eval-problems", type=int, default=200)
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare(Path(args.out), args.seed)
    else:
        res = run(Path(args.data), Path(args.out), args.sft_epochs, args.grpo_steps, args.eval_problems)
        print(json.dumps({k: res[k] for k in ("timings", "settings")}, indent=2))
        print(_markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
