"""Acceptance benchmark of the local backend: the whole tiny pipeline on the CPU, timed and measured.

data (synthetic task + sft_data conversion) -> base model -> SFT -> eval(SFT) -> GRPO -> eval(RL),
through the same functions the DVC stages call. Acceptance (issue #5): at most 15 minutes and 4 GB
peak RSS on 2 cores; after SFT tool_call_rate >= 0.9 on the eval split; after RL sampled accuracy at
least 10 points above the SFT checkpoint with the same seed.

Run it alone (other torch work on the same cores slows both down many times):
    flock /tmp/retool-cpu.lock .venv/bin/python benchmarks/local_pipeline.py --seed 0
Writes benchmarks/results/local.json and benchmarks/results/local.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the tiny profile's episode budget: a tool call and an answer fit in ~80 tokens per turn
TINY_ROLLOUT = {"max_turns": 4, "max_tool_calls": 3, "max_new_tokens": 128, "max_context_tokens": 640}


def rss_mb() -> dict[str, float]:
    """Peak RSS of this process and of its largest waited-for child (ru_maxrss is in KiB on Linux)."""
    return {
        "self_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "children_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def current_tree_rss_mb() -> float:
    """RSS of this process plus its live descendants right now (sandbox workers, verify pool)."""
    total = 0
    pids = [os.getpid()]
    seen = set()
    while pids:
        pid = pids.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            with open(f"/proc/{pid}/task/{pid}/children") as fh:
                pids += [int(x) for x in fh.read().split()]
        except OSError:
            continue
    return total / 1024


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/retool-local-bench", help="scratch directory (wiped)")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument(
        "--params", default=str(ROOT / "params.yaml"), help="tiny profile params (defaults if absent)"
    )
    ap.add_argument("--threads", type=int, default=None, help="override local.threads")
    ap.add_argument("--grpo-steps", type=int, default=None)
    ap.add_argument("--sft-size", type=int, default=None)
    ap.add_argument("--eval-problems", type=int, default=None)
    ap.add_argument("--no-write", action="store_true", help="do not write the results files")
    args = ap.parse_args()

    import torch

    from retool.backends.local.stages import build_base_model, evaluate_checkpoint, run_grpo, run_sft
    from retool.config import PipelineConfig, load_config
    from retool.data.sft import convert_sft
    from retool.data.synthetic import write_synthetic_task

    cfg = load_config(args.params) if Path(args.params).exists() else PipelineConfig()
    local = cfg.local.model_copy(update={"seed": args.seed, "progress": False})
    if args.threads:
        local = local.model_copy(update={"threads": args.threads})
    if args.grpo_steps:
        local = local.model_copy(update={"grpo": local.grpo.model_copy(update={"steps": args.grpo_steps})})
    data = cfg.data
    if args.sft_size:
        data = data.model_copy(
            update={"synthetic": data.synthetic.model_copy(update={"sft_size": args.sft_size})}
        )
    # the prompt the episode loop renders must be the one SFT trained on: the synthetic task's
    rollout = cfg.rollout.model_copy(update={**TINY_ROLLOUT, "system_prompt": data.synthetic.system_prompt})
    reward, sandbox = cfg.reward, cfg.sandbox
    torch.set_num_threads(local.threads)

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    phases: dict[str, float] = {}
    loads: dict[str, list[float]] = {"start": load_avg()}
    tree_peak = 0.0
    t_all = time.perf_counter()

    def phase(name: str, t0: float) -> None:
        nonlocal tree_peak
        phases[name] = round(time.perf_counter() - t0, 2)
        loads[name] = load_avg()
        tree_peak = max(tree_peak, current_tree_rss_mb())
        print(f"[{name}] {phases[name]:.1f}s  load {loads[name]}  rss {rss_mb()}", flush=True)

    t0 = time.perf_counter()
    report = write_synthetic_task(data, work / "raw", seed=args.seed)
    sft_src = work / "raw_sft"
    sft_src.mkdir()
    for p in (work / "raw").glob("sft.*"):
        os.replace(p, sft_src / p.name)
    convert_sft(sft_src, work / "sft" / "train.parquet", data, report_path=work / "sft" / "report.json")
    train_jsonl, eval_jsonl = work / "raw" / "train.jsonl", work / "raw" / "eval.jsonl"
    phase("data", t0)

    t0 = time.perf_counter()
    build_base_model(local, sorted(sft_src.iterdir()), work / "models" / "base")
    phase("base_model", t0)

    t0 = time.perf_counter()
    sft = run_sft(local, work / "sft" / "train.parquet", work / "models" / "base", work / "models" / "sft")
    phase("sft", t0)
    print("sft", json.dumps({k: v for k, v in sft.items() if isinstance(v, int | float)}), flush=True)

    n_eval = local.eval.n_samples
    limit = args.eval_problems
    t0 = time.perf_counter()
    sft_metrics, _ = evaluate_checkpoint(
        local, rollout, reward, sandbox, work / "models" / "sft", eval_jsonl, n_eval, max_problems=limit
    )
    phase("eval_sft", t0)
    print("eval_sft", json.dumps({k: round(v, 3) for k, v in sft_metrics.items()}), flush=True)

    t0 = time.perf_counter()
    rl = run_grpo(
        local, rollout, reward, sandbox, train_jsonl, work / "models" / "sft", work / "models" / "rl"
    )
    phase("rl", t0)

    t0 = time.perf_counter()
    rl_metrics, _ = evaluate_checkpoint(
        local, rollout, reward, sandbox, work / "models" / "rl", eval_jsonl, n_eval, max_problems=limit
    )
    phase("eval_rl", t0)
    print("eval_rl", json.dumps({k: round(v, 3) for k, v in rl_metrics.items()}), flush=True)
    total = time.perf_counter() - t_all

    rss = rss_mb()
    peak = max(rss["self_peak_mb"], tree_peak)
    keys = [
        "acc",
        "greedy_acc",
        "tool_call_rate",
        "code_error_rate",
        "answer_rate",
        "reward_mean",
        f"pass@{n_eval}",
        "response_len_mean",
        "turns_mean",
        "truncated_rate",
    ]
    result: dict[str, Any] = {
        "command": "flock /tmp/retool-cpu.lock .venv/bin/python benchmarks/local_pipeline.py "
        + " ".join(sys.argv[1:]),
        "seed": args.seed,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": local.threads,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_avg": loads,
        },
        "phases_s": phases,
        "total_s": round(total, 1),
        "peak_rss_mb": {
            "main_process": round(rss["self_peak_mb"], 1),
            "largest_child": round(rss["children_peak_mb"], 1),
            "process_tree_sampled": round(tree_peak, 1),
        },
        "data": {
            "sft_rows": report.sft_rows,
            "train_prompts": report.train_rows,
            "eval_prompts": report.eval_rows,
        },
        "sft": {k: v for k, v in sft.items() if isinstance(v, int | float)},
        "rl": {
            "steps": rl["steps"],
            "wall_s": round(rl["wall_s"], 1),
            "last_step": {k: v for k, v in (rl.get("last") or {}).items() if isinstance(v, int | float)},
        },
        "eval_n_samples": n_eval,
        "eval_sft": {k: sft_metrics.get(k) for k in keys},
        "eval_rl": {k: rl_metrics.get(k) for k in keys},
        "rollout": TINY_ROLLOUT,
        "config": {"local": local.model_dump(mode="json")},
    }
    gain = (rl_metrics["acc"] - sft_metrics["acc"]) * 100
    result["acceptance"] = {
        "total_under_15_min": total <= 900,
        "peak_rss_under_4gb": peak <= 4096,
        "sft_tool_call_rate_ge_0.9": sft_metrics["tool_call_rate"] >= 0.9,
        "rl_acc_gain_points": round(gain, 1),
        "rl_gain_ge_10_points": gain >= 10,
    }
    print(json.dumps(result["acceptance"], indent=2))
    if not args.no_write:
        out = Path(args.results)
        out.mkdir(parents=True, exist_ok=True)
        from retool.io import atomic_write_json, atomic_write_text

        atomic_write_json(out / "local.json", result)
        atomic_write_text(out / "local.md", render_md(result))
    return 0 if all(v for k, v in result["acceptance"].items() if k != "rl_acc_gain_points") else 1


def render_md(r: dict[str, Any]) -> str:
    es, er = r["eval_sft"], r["eval_rl"]
    rows = "\n".join(f"| {k} | {fmt(es.get(k))} | {fmt(er.get(k))} |" for k in es)
    ph = " · ".join(f"{k} {v:.0f} s" for k, v in r["phases_s"].items())
    acc = r["acceptance"]
    return f"""## Local backend: the whole tiny pipeline on 2 CPU cores

Command: `{r["command"]}` (seed {r["seed"]}, {r["machine"]["torch_threads"]} torch threads,
torch {r["machine"]["torch"]}, {r["machine"]["cpus"]} CPUs; load averages per phase: {r["machine"]["load_avg"]})

- Total {r["total_s"]:.0f} s (limit 900 s): {ph}
- Peak RSS {r["peak_rss_mb"]["main_process"]:.0f} MB main process, {r["peak_rss_mb"]["process_tree_sampled"]:.0f} MB
  process tree sampled at phase ends (limit 4096 MB)
- SFT: {r["sft"].get("steps")} steps on {r["data"]["sft_rows"]} traces, loss {r["sft"].get("first_loss", 0):.2f} ->
  {r["sft"].get("final_loss", 0):.3f}, {r["sft"].get("tokens_per_s", 0):.0f} tokens/s
- GRPO: {r["rl"]["steps"]} steps in {r["rl"]["wall_s"]:.0f} s

Eval split ({r["data"]["eval_prompts"]} problems, {r["eval_n_samples"]} samples each at temperature 1; greedy beside it):

| metric | after SFT | after RL |
|---|---|---|
{rows}

Acceptance: total <= 15 min {ok(acc["total_under_15_min"])}, peak RSS <= 4 GB {ok(acc["peak_rss_under_4gb"])},
SFT tool_call_rate >= 0.9 {ok(acc["sft_tool_call_rate_ge_0.9"])}, RL gain {acc["rl_acc_gain_points"]:+.1f} points
(>= 10 {ok(acc["rl_gain_ge_10_points"])}).
"""


def fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def ok(b: bool) -> str:
    return "PASS" if b else "FAIL"


if __name__ == "__main__":
    raise SystemExit(main())
