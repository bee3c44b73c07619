"""What the pipeline's convert / sft / rl / export tasks call: build the stage's job and run it.

``run_stage`` passes the MLflow run through the job environment (so the hooks log into it),
mirrors slime's TensorBoard curves into that run while the job runs, and says in the log whether
the job resumes from a checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from retool.backends.slime.checkpoints import latest_checkpoint
from retool.backends.slime.commands import JobSpec, build_job
from retool.backends.slime.config import PathsConfig, SlimeConfig
from retool.backends.slime.runner import JobResult, LocalRunner, LogFn, RayJobRunner, Runner
from retool.backends.slime.tensorboard_mirror import TensorBoardMirror


def make_runner(cfg: SlimeConfig, kind: str = "ray") -> Runner:
    """``ray``: submit to the cluster at cfg.cluster.ray_address / RAY_ADDRESS; ``local``: subprocess."""
    if kind == "ray":
        return RayJobRunner(cfg.cluster.ray_address)
    if kind == "local":
        return LocalRunner()
    raise ValueError(f"unknown runner kind {kind!r}: expected 'ray' or 'local'")


def _current_run_id() -> str | None:
    try:
        import mlflow

        run = mlflow.active_run()
        if run is not None:
            return str(run.info.run_id)
    except Exception:  # noqa: BLE001
        pass
    return os.environ.get("MLFLOW_RUN_ID") or None


def _tracking_env(run_id: str | None) -> dict[str, str]:
    env: dict[str, str] = {}
    if run_id:
        env["MLFLOW_RUN_ID"] = run_id
    try:
        import mlflow

        uri = str(mlflow.get_tracking_uri())
        if uri:
            env["MLFLOW_TRACKING_URI"] = uri
    except Exception:  # noqa: BLE001
        pass
    return env


def stage_job(
    name: str,
    cfg: SlimeConfig,
    paths: PathsConfig | None = None,
    *,
    run_id: str | None = None,
    environ: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> JobSpec:
    """The job ``run_stage`` submits, with the MLflow run id and tracking URI in its environment.

    ``extra_env`` adds job variables, e.g. ``retool.backends.slime.hooks.hooks_env(...)`` for the RL job.
    """
    return build_job(
        name,
        cfg,
        paths,
        environ=os.environ if environ is None else environ,
        extra_env={**_tracking_env(run_id), **(extra_env or {})},
    )


def run_stage(
    name: str,
    cfg: SlimeConfig,
    paths: PathsConfig | None = None,
    runner: Runner | None = None,
    log: LogFn = print,
    *,
    run_id: str | None = None,
    extra_env: Mapping[str, str] | None = None,
    check: bool = True,
) -> JobResult:
    """Run one slime stage to completion (or failure / stop) and return its result.

    ``run_id`` defaults to the active MLflow run (the stage's child run). With ``check`` a job that
    did not succeed raises ``JobFailedError`` carrying the result and the log tail.
    """
    run_id = run_id or _current_run_id()
    spec = stage_job(name, cfg, paths, run_id=run_id, extra_env=extra_env)
    runner = runner or make_runner(cfg)
    if spec.save_dir and name in ("sft", "rl") and cfg.cluster.shared_filesystem:
        ckpt = latest_checkpoint(spec.save_dir)
        log(
            f"[retool] {name}: resuming from {spec.save_dir} iteration {ckpt.iteration}"
            if ckpt
            else f"[retool] {name}: no checkpoint in {spec.save_dir}; starting from the reference model"
        )
    mirror = None
    if spec.tensorboard_dir and cfg.tracking.use_tensorboard:
        mirror = TensorBoardMirror(
            spec.tensorboard_dir,
            run_id,
            prefixes=cfg.tracking.mirror_prefixes,
            interval_s=cfg.tracking.mirror_interval_s,
        ).start()
    try:
        result = runner.run(spec, log)
    finally:
        if mirror is not None:
            n = mirror.stop()
            log(f"[retool] mirrored {n} TensorBoard values from {spec.tensorboard_dir} into MLflow")
    log(f"[retool] {name}: {result.status} in {result.duration_s:.1f}s (job {result.job_id})")
    if check:
        result.raise_for_status()
    return result
