"""The pipeline's stages: what `retool stage NAME` (and so each dvc.yaml stage) does.

Each stage reads params.yaml's validated config, dispatches to the backend of the profile (local CPU or
slime on Ray), writes its outputs atomically at the paths of retool.layout, and logs to an MLflow child
run of the pipeline run. No orchestration here: DVC decides what is stale, Prefect adds retries and logs.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from retool import tracking
from retool.config import PipelineConfig
from retool.io import atomic_dir, atomic_write_json, atomic_write_text
from retool.layout import STAGES, Layout

log = logging.getLogger("retool.stages")


# ------------------------------------------------------------------------------------------------ helpers
def _git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def _write_problems_jsonl(problems: list[Any], path: Path) -> int:
    lines = [
        json.dumps({"prompt": p.prompt, "label": p.label, "id": getattr(p, "id", None)}) for p in problems
    ]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return len(lines)


def _link_tree(src: Path, dst: Path) -> None:
    """Mirror ``src`` into ``dst`` with hard links (copies across filesystems); skips hidden entries."""
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target.unlink()
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def _data_files(directory: Path) -> list[Path]:
    return sorted(
        p
        for p in directory.rglob("*")
        if p.suffix in (".jsonl", ".json", ".parquet")
        and p.is_file()
        and not p.name.startswith(".")
        and p.name != "manifest.json"
    )


def _slime_paths(cfg: PipelineConfig, layout: Layout) -> Any:
    """The slime jobs read and write the project's own folders (a filesystem the cluster shares)."""
    root = layout.root.resolve()
    lay = Layout(root)
    ck = lay.checkpoints
    return cfg.slime.paths.model_copy(
        update={
            "hf_base": str(lay.base_model),
            "base_torch_dist": str(lay.base_torch_dist),
            "sft_data": str(lay.sft_parquet),
            "sft_save": str(ck / "sft"),
            "sft_hf": str(lay.sft_model),
            "rl_data": str(lay.train_jsonl),
            "rl_save": str(ck / "rl"),
            "rl_hf": str(lay.rl_model),
            "tensorboard_dir": str(root / "metrics" / "tensorboard"),
        }
    )


def _run_slime(name: str, cfg: PipelineConfig, layout: Layout) -> dict[str, Any]:
    from retool.backends.slime.stages import run_stage as run_slime_stage

    result = run_slime_stage(
        name, cfg.slime, _slime_paths(cfg, layout), log=lambda line: log.info("%s", line)
    )
    return {"status": str(result.status), "job_id": result.job_id, "duration_s": result.duration_s}


def _history_csv(history: list[dict[str, Any]], path: Path, fields: list[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for rec in history:
        writer.writerow({k: rec.get(k, "") for k in fields})
    atomic_write_text(path, buf.getvalue())


# ------------------------------------------------------------------------------------------------- stages
def stage_download(cfg: PipelineConfig, layout: Layout) -> dict[str, Any]:
    """Datasets into data/raw (normalized RL/eval prompts, ReTool-SFT rows) and the base model."""
    from retool.data.problems import load_problems

    if cfg.backend == "local" and cfg.data.dataset == "synthetic":
        from retool.backends.local.stages import build_base_model
        from retool.data.synthetic import write_synthetic_task

        with atomic_dir(layout.raw) as raw:
            report = write_synthetic_task(cfg.data, raw / "synthetic", seed=cfg.seed)
            (raw / "sft").mkdir()
            for path in (raw / "synthetic").glob("sft.*"):
                os.replace(path, raw / "sft" / path.name)
            os.replace(raw / "synthetic" / "train.jsonl", raw / "train.jsonl")
            os.replace(raw / "synthetic" / "eval.jsonl", raw / "eval.jsonl")
            corpus = sorted((raw / "sft").iterdir())
            with atomic_dir(layout.base_model) as base:
                build_base_model(cfg.local, corpus, base)
        out = {
            "source": "synthetic",
            "report": report.to_dict() if hasattr(report, "to_dict") else str(report),
        }
    else:
        from retool.data.download import download

        sources = cfg.data.enabled_sources()
        datasets = {k: v for k, v in sources.items() if v.repo_type == "dataset"}
        missing = [k for k in ("sft", "rl", "eval") if k not in datasets]
        if missing:
            raise ValueError(f"data.sources: the real profile needs enabled dataset sources {missing}")
        if "base_model" not in sources:
            raise ValueError("data.sources.base_model: the real profile needs a base model source")
        # Downloads land in a persistent cache outside DVC's outputs (DVC clears outputs before a rerun),
        # so a failed or repeated stage resumes or skips instead of fetching gigabytes again.
        cache = layout.root / ".retool" / "downloads"
        dl = download(cfg.data.model_copy(update={"sources": datasets}), cache / "datasets")
        models = download(
            cfg.data.model_copy(update={"sources": {"base": sources["base_model"]}}), cache / "models"
        )
        _link_tree(cache / "datasets", layout.raw / "sources")
        _link_tree(cache / "models" / "base", layout.base_model)
        src = layout.raw / "sources"
        (layout.raw / "sft").mkdir(parents=True, exist_ok=True)
        for path in _data_files(src / "sft"):
            target = layout.raw_sft / path.name
            if not target.exists():
                os.link(path, target)
        for name, target in (("rl", layout.train_jsonl), ("eval", layout.eval_jsonl)):
            # jsonl or parquet, our layout or the original DAPO one; errors name the file and line
            problems = load_problems(src / name)
            if not problems:
                raise FileNotFoundError(
                    f"data.sources.{name} ({sources[name].repo_id}): no prompts found in {src / name}"
                )
            _write_problems_jsonl(problems, target)
        out = {"source": "remote", "datasets": dl.to_dict(), "models": models.to_dict()}
    counts = {
        "data/train_prompts": sum(1 for _ in layout.train_jsonl.open()),
        "data/eval_prompts": sum(1 for _ in layout.eval_jsonl.open()),
    }
    tracking.log_metrics(counts)
    return {**out, **counts}


def stage_convert(cfg: PipelineConfig, layout: Layout) -> dict[str, Any]:
    """HF → Megatron torch_dist for slime; the local backend trains the HF checkpoint as it is."""
    if cfg.backend == "slime":
        return _run_slime("convert", cfg, layout)
    with atomic_dir(layout.base_torch_dist) as out:
        atomic_write_json(
            out / "PASSTHROUGH.json",
            {
                "backend": "local",
                "reason": "the local backend trains the Hugging Face checkpoint directly",
                "source": str(layout.base_model),
            },
        )
    return {"passthrough": True}


def stage_sft_data(cfg: PipelineConfig, layout: Layout) -> dict[str, Any]:
    """ReTool-SFT rows → validated chat messages (parquet), with a report of what was kept or skipped."""
    from retool.data.sft import convert_sft

    layout.metrics.mkdir(parents=True, exist_ok=True)
    with atomic_dir(layout.sft_dir) as out:
        report = convert_sft(
            layout.raw_sft,
            out / layout.sft_parquet.name,
            cfg.data,
            report_path=out / "report.json",
            progress=True,
        )
    data = report.to_dict() if hasattr(report, "to_dict") else json.loads(json.dumps(report, default=str))
    summary = {k: v for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    atomic_write_json(layout.metrics / "sft_data.json", summary)
    tracking.log_metrics({f"sft_data/{k}": v for k, v in summary.items()})
    return data


def stage_sft(cfg: PipelineConfig, layout: Layout) -> dict[str, Any]:
    """Supervised fine-tuning: local SFT on the CPU, or slime's train_async.py (then back to HF)."""
    layout.metrics.mkdir(parents=True, exist_ok=True)
    if cfg.backend == "slime":
        result = _run_slime("sft", cfg, layout)
        result.update(export=_run_slime("sft_hf", cfg, layout))
        atomic_write_json(layout.metrics / "sft.json", {"duration_s": result["duration_s"]})
        _history_csv([], layout.metrics / "sft_curve.csv", ["step", "loss"])
        return result
    from retool.backends.local.stages import run_sft

    with atomic_dir(layout.sft_model) as out:
        result = run_sft(
            cfg.local, layout.sft_parquet, layout.base_model, out, checkpoint_dir=layout.checkpoints / "sft"
        )
        history = (
            json.loads((out / "sft_history.json").read_text()) if (out / "sft_history.json").exists() else []
        )
    _history_csv(history, layout.metrics / "sft_curve.csv", ["step", "loss", "lr", "tokens_per_s"])
    scalars = {k: v for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    atomic_write_json(layout.metrics / "sft.json", scalars)
    return scalars


def stage_rl(cfg: PipelineConfig, layout: Layout) -> dict[str, Any]:
    """GRPO with the code interpreter: local GRPO on the CPU, or slime's train.py with our hooks."""
    layout.metrics.mkdir(parents=True, exist_ok=True)
    if cfg.backend == "slime":
        result = _run_slime("rl", cfg, layout)
        result.update(export=_run_slime("rl_hf", cfg, layout))
        atomic_write_json(layout.metrics / "rl.json", {"duration_s": result["duration_s"]})
        _history_csv([], layout.metrics / "rl_curve.csv", ["step", "reward_mean", "acc", "tool_call_rate"])
        return result
    from retool.backends.local.stages import run_grpo

    with atomic_dir(layout.rl_model) as out:
        summary = run_grpo(
            cfg.local,
            cfg.rollout,
            cfg.reward,
            cfg.sandbox,
            layout.train_jsonl,
            layout.sft_model,
            out,
            layout.eval_jsonl,
            checkpoint_dir=layout.checkpoints / "rl",
        )
        history = (
            json.loads((out / "grpo_history.json").read_text())
            if (out / "grpo_history.json").exists()
            else []
        )
    _history_csv(
        history,
        layout.metrics / "rl_curve.csv",
        ["step", "reward_mean", "acc", "tool_call_rate", "response_len_mean", "loss", "kl"],
    )
    last = summary.get("last") or {}
    scalars = {k: v for k, v in last.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    scalars.update(steps=summary.get("steps", 0), wall_s=summary.get("wall_s", 0.0))
    atomic_write_json(layout.metrics / "rl.json", scalars)
    return scalars


def _episode_row(checkpoint: str, ep: Any) -> dict[str, Any]:
    from retool.backends.slime.evaluate import episode_row

    return {"checkpoint": checkpoint, **(ep if isinstance(ep, dict) else episode_row(ep))}


def stage_eval(cfg: PipelineConfig, layout: Layout) -> dict[str, Any]:
    """Evaluate base, SFT and RL checkpoints with the tool on the eval split; rows sit side by side."""
    if cfg.backend == "slime":
        from retool.backends.slime.evaluate import evaluate_checkpoints

        results = evaluate_checkpoints(cfg, layout)
    else:
        from retool.backends.local.stages import evaluate_checkpoint

        results = {}
        for name in cfg.evaluation.checkpoints:
            metrics, episodes = evaluate_checkpoint(
                cfg.local,
                cfg.rollout,
                cfg.reward,
                cfg.sandbox,
                layout.model(name),
                layout.eval_jsonl,
                cfg.eval.n_samples,
                greedy=cfg.eval.greedy,
                max_problems=cfg.eval.max_problems,
            )
            results[name] = (metrics, episodes)
    dataset = cfg.evaluation.dataset_name
    table: dict[str, dict[str, float]] = {}
    samples: list[dict[str, Any]] = []
    for ckpt, (metrics, episodes) in results.items():
        label = str(ckpt)
        table[label] = {k: float(v) for k, v in metrics.items()}
        rows = [_episode_row(label, ep) for ep in episodes[: cfg.evaluation.samples_logged]]
        samples.extend(rows)
        # One run per checkpoint, same metric labels: the MLflow compare view puts them side by side.
        with tracking.stage_run(
            f"eval:{label}",
            experiment=cfg.tracking.experiment,
            tags={"retool.stage": "eval", "retool.checkpoint": label},
        ):
            tracking.log_metrics({f"eval/{dataset}/{k}": v for k, v in table[label].items()})
            tracking.log_table(rows, f"eval_samples_{label}.json")
    layout.metrics.mkdir(parents=True, exist_ok=True)
    atomic_write_json(layout.metrics / "eval.json", table)
    atomic_write_text(layout.metrics / "eval_samples.jsonl", "".join(json.dumps(r) + "\n" for r in samples))
    return table


def stage_export(cfg: PipelineConfig, layout: Layout) -> dict[str, Any]:
    """The final model in the Hugging Face layout with a model card carrying its evaluation."""
    evals = json.loads((layout.metrics / "eval.json").read_text())
    with atomic_dir(layout.export) as out:
        shutil.copytree(
            layout.rl_model, out / "model", ignore=shutil.ignore_patterns("checkpoints", ".*", "*.tmp*")
        )
        lines = [
            "# ReTool model",
            "",
            f"Profile `{cfg.profile}` (backend `{cfg.backend}`), seed {cfg.seed}.",
            "",
            "| checkpoint | acc | pass@k | tool_call_rate |",
            "|---|---|---|---|",
        ]
        for name, m in evals.items():
            passk = next((v for k, v in m.items() if k.startswith("pass@")), float("nan"))
            lines.append(
                f"| {name} | {m.get('acc', float('nan')):.3f} | {passk:.3f} | "
                f"{m.get('tool_call_rate', float('nan')):.3f} |"
            )
        atomic_write_text(out / "MODEL_CARD.md", "\n".join(lines) + "\n")
        atomic_write_json(out / "eval.json", evals)
    return {"exported": str(layout.export / "model")}


STAGE_FUNCS: dict[str, Callable[[PipelineConfig, Layout], dict[str, Any]]] = {
    "download": stage_download,
    "convert": stage_convert,
    "sft_data": stage_sft_data,
    "sft": stage_sft,
    "rl": stage_rl,
    "eval": stage_eval,
    "export": stage_export,
}
assert tuple(STAGE_FUNCS) == STAGES


def run_stage(name: str, cfg: PipelineConfig, root: str | Path = ".") -> dict[str, Any]:
    """Run one stage inside its MLflow child run; returns the stage's summary (also logged)."""
    if name not in STAGE_FUNCS:
        raise ValueError(f"unknown stage {name!r}; the stages are {list(STAGES)}")
    layout = Layout(Path(root))
    if cfg.tracking.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = cfg.tracking.tracking_uri
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path(root).resolve() / 'mlflow.db'}")
    tags = {
        "retool.stage": name,
        "retool.profile": cfg.profile,
        "retool.backend": cfg.backend,
        "git.commit": _git_commit(Path(root)),
    }
    start = time.monotonic()
    with tracking.stage_run(
        name, experiment=cfg.tracking.experiment, params=cfg.model_dump(mode="json"), tags=tags
    ):
        log.info("stage %s: profile %s, backend %s", name, cfg.profile, cfg.backend)
        summary = STAGE_FUNCS[name](cfg, layout)
        tracking.log_metrics({f"stage/{name}_s": time.monotonic() - start})
    log.info("stage %s done in %.1f s", name, time.monotonic() - start)
    return summary


def format_plan(cfg: PipelineConfig) -> str:
    """Every stage's exact command for the profile, without running anything."""
    if cfg.backend == "slime":
        from retool.backends.slime.plan import format_plan as slime_format
        from retool.backends.slime.plan import plan as slime_plan

        header = [
            f"# profile {cfg.profile}: slime on Ray; each DVC stage runs `retool stage NAME`, which submits:"
        ]
        return (
            "\n".join(header)
            + "\n"
            + slime_format(slime_plan(cfg.slime, _slime_paths(cfg, Layout(Path(".")))))
        )
    lines = [f"# profile {cfg.profile}: local backend on {cfg.local.device}; each stage runs in-process:"]
    for name in STAGES:
        lines.append(
            f"{name:>9}: retool stage {name}   ({(STAGE_FUNCS[name].__doc__ or '').splitlines()[0]})"
        )
    return "\n".join(lines)
