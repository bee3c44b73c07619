"""The `retool-pipeline` flow: download → convert → sft_data → sft → rl → eval → export.

Each stage runs through `dvc repro`, so a stage whose inputs did not change is skipped and dvc.lock
records what ran. The flow opens the MLflow parent run (each stage opens a child run under it), validates
params.yaml before anything runs, and publishes the evaluation as a Prefect table artifact.

Run it once with ``python -m flows.pipeline`` (Prefect starts a temporary server when no PREFECT_API_URL
is set), or deploy it with ``prefect deploy`` (prefect.yaml) and start runs with
``prefect deployment run 'retool-pipeline/tiny'``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from retool import tracking
from retool.config import PipelineConfig, load_config, set_dotted, validate
from retool.layout import STAGES, Layout
from tasks.stages import run_stage


def _git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def dvc_hashes(root: Path) -> dict[str, str]:
    """`dvc.<stage>.<out>` → md5 of every output recorded in dvc.lock (tags on the MLflow parent run)."""
    lock = root / "dvc.lock"
    if not lock.exists():
        return {}
    data = yaml.safe_load(lock.read_text()) or {}
    tags: dict[str, str] = {}
    for stage, body in (data.get("stages") or {}).items():
        for out in body.get("outs") or []:
            if out.get("md5"):
                tags[f"dvc.{stage}.{out['path']}"] = out["md5"]
    return tags


def apply_params(root: Path, profile: str | None, overrides: dict[str, Any] | None) -> PipelineConfig:
    """Validate the run's parameters and write them to params.yaml (as `dvc exp run --set-param` does)."""
    params_path = root / "params.yaml"
    cfg = load_config(params_path)
    changes = dict(overrides or {})
    if profile and profile != cfg.profile:
        changes["profile"] = profile
    if not changes:
        return cfg
    data = yaml.safe_load(params_path.read_text()) or {}
    for key, value in changes.items():
        set_dotted(data, key, value)
    cfg = validate(data, params_path)  # nothing is written unless the result is valid
    tmp = params_path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False, width=110))
    os.replace(tmp, params_path)
    return cfg


def _eval_rows(root: Path) -> list[dict[str, Any]]:
    path = Layout(root).metrics / "eval.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    rows = []
    for checkpoint, metrics in data.items():
        if isinstance(metrics, dict):
            rows.append(
                {
                    "checkpoint": checkpoint,
                    **{k: round(v, 4) for k, v in metrics.items() if isinstance(v, int | float)},
                }
            )
    return rows


@flow(name="retool-pipeline", log_prints=True)
def retool_pipeline(
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
    stages: list[str] | None = None,
    project_dir: str = ".",
    retries: int = 1,
) -> dict[str, Any]:
    """Run the pipeline's stages in order through DVC, under one MLflow parent run.

    Args:
        profile: "tiny" (CPU, local backend) or "qwen3-4b" (slime on Ray); None keeps params.yaml's.
        overrides: dotted params.yaml keys to change first, e.g. {"local.grpo.steps": 20}.
        stages: a subset of stages to run (default: all, in order).
        project_dir: the project root holding dvc.yaml and params.yaml.
        retries: retries per stage for transient failures (training resumes from its checkpoint).
    """
    logger = get_run_logger()
    root = Path(project_dir).resolve()
    cfg = apply_params(root, profile, overrides)
    wanted = [s for s in STAGES if stages is None or s in stages]
    unknown = sorted(set(stages or []) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; the stages are {list(STAGES)}")
    if cfg.tracking.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = cfg.tracking.tracking_uri
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    logger.info("profile %s (backend %s); stages %s", cfg.profile, cfg.backend, wanted)

    outcomes: list[dict[str, Any]] = []
    tags = {"retool.profile": cfg.profile, "retool.backend": cfg.backend, "git.commit": _git_commit(root)}
    with tracking.stage_run(
        "pipeline", experiment=cfg.tracking.experiment, params=cfg.model_dump(mode="json"), tags=tags
    ) as parent_id:
        env = {
            tracking.PARENT_ENV: parent_id,
            "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"],
            "MLFLOW_EXPERIMENT_NAME": cfg.tracking.experiment,
        }
        for stage in wanted:
            outcomes.append(run_stage.with_options(retries=retries)(stage, str(root), env))
        tracking.set_tags(dvc_hashes(root))
        rows = _eval_rows(root)
        for row in rows:
            tracking.log_metrics({f"{row['checkpoint']}/{k}": v for k, v in row.items() if k != "checkpoint"})
    if rows:
        create_table_artifact(key="retool-eval", table=rows, description="Evaluation of each checkpoint")
        header = "| checkpoint | " + " | ".join(k for k in rows[0] if k != "checkpoint") + " |"
        lines = [header, "|" + "---|" * len(rows[0])]
        for row in rows:
            lines.append("| " + " | ".join(str(v) for v in row.values()) + " |")
        create_markdown_artifact(key="retool-eval-summary", markdown="\n".join(lines))
    summary = {"profile": cfg.profile, "mlflow_parent_run": parent_id, "stages": outcomes, "eval": rows}
    logger.info("done: %s", json.dumps({"stages": [(o["stage"], o["ran"]) for o in outcomes]}))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the ReTool pipeline once (Prefect flow over DVC).")
    parser.add_argument("--profile", choices=["tiny", "qwen3-4b"], default=None)
    parser.add_argument("--stage", action="append", dest="stages", help="run only this stage (repeatable)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a params.yaml key (YAML value), e.g. --set local.grpo.steps=20",
    )
    parser.add_argument("--project-dir", default=".")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    result = retool_pipeline(
        profile=args.profile, overrides=overrides or None, stages=args.stages, project_dir=args.project_dir
    )
    print(json.dumps(result["eval"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
