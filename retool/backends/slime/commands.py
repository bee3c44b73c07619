"""Build each stage's job (argv, runtime environment, resources) from ``SlimeConfig``.

Stages, in pipeline order:
  convert  HF base model -> Megatron torch_dist (slime tools/convert_hf_to_torch_dist.py)
  sft      slime train_async.py with the SFT rollout and sft_loss
  sft_hf   latest SFT checkpoint -> HF (for the RL job's SGLang engines, evaluation and export)
  rl       slime train.py, GRPO, with our generate / reward / log hooks
  rl_hf    latest RL checkpoint -> HF (evaluation and export)

Nothing here runs anything; runners execute the resulting ``JobSpec``.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from retool.backends.slime.checkpoints import resume_args
from retool.backends.slime.config import PathsConfig, Resources, SlimeConfig

STAGES: tuple[str, ...] = ("convert", "sft", "sft_hf", "rl", "rl_hf")

# Environment variables a job inherits from the submitting process so the hooks log into the right run.
PASSTHROUGH_ENV: tuple[str, ...] = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_RUN_ID",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_S3_ENDPOINT_URL",
)


@dataclass(frozen=True)
class StageResources:
    """What a stage asks the cluster for.

    ``entrypoint_gpus``/``entrypoint_cpus`` reserve resources for the entrypoint process itself (the
    conversion runs its model there); ``nodes`` x ``gpus_per_node`` are the GPUs slime places its
    training actors and SGLang engines on through its own placement groups.
    """

    entrypoint_gpus: float = 0
    entrypoint_cpus: float = 1
    nodes: int = 0
    gpus_per_node: int = 0
    colocate: bool = False

    @property
    def total_gpus(self) -> int:
        return max(int(self.entrypoint_gpus), self.nodes * self.gpus_per_node)

    def as_dict(self) -> dict[str, Any]:
        return {
            "entrypoint_num_gpus": self.entrypoint_gpus,
            "entrypoint_num_cpus": self.entrypoint_cpus,
            "nodes": self.nodes,
            "gpus_per_node": self.gpus_per_node,
            "colocate": self.colocate,
            "total_gpus": self.total_gpus,
        }


@dataclass(frozen=True)
class JobSpec:
    """One stage as a job: the exact argv, its Ray runtime environment and its resource request."""

    name: str
    argv: list[str]
    runtime_env: dict[str, Any]
    resources: StageResources
    save_dir: str | None = None  # checkpoint directory the stage writes (resume, export)
    tensorboard_dir: str | None = None  # where slime writes TensorBoard events for this stage
    description: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def entrypoint(self) -> str:
        """The shell command Ray runs (argv quoted for a POSIX shell)."""
        return shlex.join(self.argv)

    @property
    def env_vars(self) -> dict[str, str]:
        return dict(self.runtime_env.get("env_vars", {}))


# --------------------------------------------------------------------------------------------------
# argument groups -> flags


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    return str(value)


def group_args(group: BaseModel, *, skip: tuple[str, ...] = ()) -> list[str]:
    """Flags of one argument group, in field order (see config.py's module docstring for the rules)."""
    out: list[str] = []
    for name in type(group).model_fields:
        if name in skip:
            continue
        value = getattr(group, name)
        flag = "--" + name.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            out.append(flag)
        elif isinstance(value, dict):
            if value:
                out.append(flag)
                for key, item in value.items():
                    out += [str(key), _format_value(item)]
        elif isinstance(value, list | tuple):
            if value:
                out.append(flag)
                out += [_format_value(v) for v in value]
        else:
            out += [flag, _format_value(value)]
    return out


def _actor_args(res: Resources) -> list[str]:
    out = ["--actor-num-nodes", str(res.nodes), "--actor-num-gpus-per-node", str(res.gpus_per_node)]
    if res.colocate:
        out.append("--colocate")
    return out


def _tensorboard_args(cfg: SlimeConfig, stage: str) -> list[str]:
    if not cfg.tracking.use_tensorboard:
        return []
    return ["--use-tensorboard", "--tb-project-name", "retool", "--tb-experiment-name", stage]


def _load_args(cfg: SlimeConfig, save_dir: str) -> list[str]:
    # With a shared filesystem we look for a finished save here; otherwise we always pass --load and
    # slime, on the node that sees the files, falls back to --ref-load when nothing was saved yet.
    if cfg.cluster.shared_filesystem:
        return resume_args(save_dir)
    return ["--load", save_dir]


# --------------------------------------------------------------------------------------------------
# runtime environment


def package_root() -> Path:
    """The directory of our ``retool`` package (shipped to jobs as a Ray py_module)."""
    import retool

    return Path(retool.__file__).resolve().parent


def runtime_env(
    cfg: SlimeConfig,
    stage_env: Mapping[str, str] | None = None,
    *,
    extra_env: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Ray runtime_env: env vars (slime and Megatron on PYTHONPATH, MLflow run passthrough) + our package."""
    environ = os.environ if environ is None else environ
    env: dict[str, str] = {"PYTHONPATH": os.pathsep.join([cfg.cluster.megatron_dir, cfg.cluster.slime_dir])}
    env.update(cfg.cluster.env_vars)
    env["NCCL_NVLS_ENABLE"] = "1" if cfg.cluster.nccl_nvls_enable else "0"
    env.update(stage_env or {})
    for key in PASSTHROUGH_ENV:
        if environ.get(key):
            env[key] = environ[key]
    env.update(extra_env or {})
    out: dict[str, Any] = {"env_vars": env}
    if cfg.cluster.ship_package:
        out["py_modules"] = [str(package_root())]
    if cfg.cluster.pip:
        out["pip"] = list(cfg.cluster.pip)
    return out


# --------------------------------------------------------------------------------------------------
# stages


def _paths(cfg: SlimeConfig, paths: PathsConfig | None) -> PathsConfig:
    return cfg.paths if paths is None else paths


def convert_job(cfg: SlimeConfig, paths: PathsConfig | None = None, **env_kw: Any) -> JobSpec:
    p = _paths(cfg, paths)
    argv = [
        cfg.cluster.python,
        f"{cfg.cluster.slime_dir}/tools/convert_hf_to_torch_dist.py",
        *group_args(cfg.model),
        "--hf-checkpoint",
        p.hf_base,
        "--save",
        p.base_torch_dist,
    ]
    return JobSpec(
        name="convert",
        argv=argv,
        runtime_env=runtime_env(cfg, **env_kw),
        resources=StageResources(entrypoint_gpus=cfg.convert.gpus),
        save_dir=p.base_torch_dist,
        description="HF base model -> Megatron torch_dist",
    )


def sft_job(cfg: SlimeConfig, paths: PathsConfig | None = None, **env_kw: Any) -> JobSpec:
    p = _paths(cfg, paths)
    s = cfg.sft
    tb_dir = f"{p.tensorboard_dir}/sft"
    sft_args = group_args(s.args)
    # --prompt-data sits beside the rollout function, as in the reference's SFT_ARGS
    sft_args[2:2] = ["--prompt-data", p.sft_data]
    argv = [
        cfg.cluster.python,
        f"{cfg.cluster.slime_dir}/train_async.py",
        *_actor_args(s.resources),
        *group_args(cfg.model),
        "--hf-checkpoint",
        p.hf_base,
        "--ref-load",
        p.base_torch_dist,
        *_load_args(cfg, p.sft_save),
        "--save",
        p.sft_save,
        "--save-interval",
        str(s.save_interval),
        *sft_args,
        *group_args(s.optimizer),
        *_tensorboard_args(cfg, "sft"),
        *group_args(s.perf),
        *group_args(cfg.misc),
    ]
    stage_env = {**s.env_vars, "TENSORBOARD_DIR": tb_dir}
    return JobSpec(
        name="sft",
        argv=argv,
        runtime_env=runtime_env(cfg, stage_env, **env_kw),
        resources=StageResources(nodes=s.resources.nodes, gpus_per_node=s.resources.gpus_per_node),
        save_dir=p.sft_save,
        tensorboard_dir=tb_dir,
        description="SFT on ReTool-SFT (train_async.py, sft_loss)",
    )


def rl_job(cfg: SlimeConfig, paths: PathsConfig | None = None, **env_kw: Any) -> JobSpec:
    p = _paths(cfg, paths)
    r = cfg.rl
    tb_dir = f"{p.tensorboard_dir}/rl"
    argv = [
        cfg.cluster.python,
        f"{cfg.cluster.slime_dir}/train.py",
        *_actor_args(r.resources),
        *group_args(cfg.model),
        # the SFT result: HF weights for SGLang and the tokenizer, torch_dist for Megatron
        "--hf-checkpoint",
        p.sft_hf,
        "--ref-load",
        p.sft_save,
        *_load_args(cfg, p.rl_save),
        "--save",
        p.rl_save,
        "--save-interval",
        str(r.save_interval),
        "--prompt-data",
        p.rl_data,
        *group_args(r.rollout),
        *group_args(r.optimizer),
        *group_args(r.grpo),
        *_tensorboard_args(cfg, "rl"),
        *group_args(r.perf),
        *group_args(r.eval),
        *group_args(r.sglang),
        *group_args(cfg.misc),
        *group_args(r.custom),
    ]
    stage_env = {**r.env_vars, "TENSORBOARD_DIR": tb_dir}
    return JobSpec(
        name="rl",
        argv=argv,
        runtime_env=runtime_env(cfg, stage_env, **env_kw),
        resources=StageResources(
            nodes=r.resources.nodes, gpus_per_node=r.resources.gpus_per_node, colocate=r.resources.colocate
        ),
        save_dir=p.rl_save,
        tensorboard_dir=tb_dir,
        description="GRPO with the code interpreter (train.py, our generate/reward/log hooks)",
    )


def export_job(cfg: SlimeConfig, stage: str, paths: PathsConfig | None = None, **env_kw: Any) -> JobSpec:
    """torch_dist -> HF of the latest checkpoint; the iteration is resolved on the node at run time."""
    p = _paths(cfg, paths)
    if stage == "sft_hf":
        src, dst, origin = p.sft_save, p.sft_hf, p.hf_base
    elif stage == "rl_hf":
        src, dst, origin = p.rl_save, p.rl_hf, p.sft_hf
    else:
        raise ValueError(f"unknown export stage {stage!r}: expected 'sft_hf' or 'rl_hf'")
    argv = [
        cfg.cluster.python,
        "-m",
        "retool.backends.slime.export",
        "--save-dir",
        src,
        "--output-dir",
        dst,
        "--origin-hf-dir",
        origin,
        "--tool",
        f"{cfg.cluster.slime_dir}/tools/convert_torch_dist_to_hf.py",
        "--python",
        cfg.cluster.python,
        "--vocab-size",
        str(cfg.model.vocab_size),
        "--chunk-size",
        str(cfg.export.chunk_size),
    ]
    return JobSpec(
        name=stage,
        argv=argv,
        runtime_env=runtime_env(cfg, **env_kw),
        resources=StageResources(entrypoint_gpus=cfg.export.gpus),
        save_dir=src,
        description=f"latest checkpoint of {src} -> HF at {dst} (atomic replace)",
    )


def build_job(name: str, cfg: SlimeConfig, paths: PathsConfig | None = None, **env_kw: Any) -> JobSpec:
    """The job of stage ``name`` (one of ``STAGES``)."""
    if name == "convert":
        return convert_job(cfg, paths, **env_kw)
    if name == "sft":
        return sft_job(cfg, paths, **env_kw)
    if name == "rl":
        return rl_job(cfg, paths, **env_kw)
    if name in ("sft_hf", "rl_hf"):
        return export_job(cfg, name, paths, **env_kw)
    raise ValueError(f"unknown slime stage {name!r}: expected one of {', '.join(STAGES)}")
