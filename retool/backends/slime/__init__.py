"""slime backend: commands, Ray/local job runners, resume, metrics bridge into MLflow.

Importing this package does not import slime, Megatron or Ray; those load only when a job runs.
"""

from retool.backends.slime.checkpoints import Checkpoint, latest_checkpoint, resume_args
from retool.backends.slime.commands import STAGES, JobSpec, StageResources, build_job
from retool.backends.slime.config import SlimeConfig
from retool.backends.slime.plan import PlannedStage, format_plan, plan
from retool.backends.slime.runner import JobFailedError, JobResult, LocalRunner, RayJobRunner
from retool.backends.slime.sft_data import prepare_sft_parquet
from retool.backends.slime.stages import make_runner, run_stage, stage_job

__all__ = [
    "STAGES",
    "Checkpoint",
    "JobFailedError",
    "JobResult",
    "JobSpec",
    "LocalRunner",
    "PlannedStage",
    "RayJobRunner",
    "SlimeConfig",
    "StageResources",
    "build_job",
    "format_plan",
    "latest_checkpoint",
    "make_runner",
    "plan",
    "prepare_sft_parquet",
    "resume_args",
    "run_stage",
    "stage_job",
]
