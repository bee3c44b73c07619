"""The schema of params.yaml, validated before any stage runs.

Every section is owned by the part of the library that uses it (the sandbox, the rollout loop, the
reward, the data sources, each backend); this module composes them and adds the pipeline-wide settings.
``profile`` is the one switch between the tiny CPU run (``tiny``: local backend, synthetic task) and the
real one (``qwen3-4b``: slime backend on a Ray cluster, Hub or S3 data).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from retool.backends.local.config import LocalConfig, LocalEvalConfig
from retool.backends.slime.config import SlimeConfig
from retool.data.config import DataConfig, SyntheticConfig
from retool.reward import RewardConfig
from retool.rollout import RolloutConfig
from retool.sandbox import SandboxConfig

Checkpoint = Literal["base", "sft", "rl"]
CHECKPOINTS: tuple[Checkpoint, ...] = ("base", "sft", "rl")


class ConfigError(ValueError):
    """params.yaml is malformed; the message names the file and the offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EvalConfig(_Strict):
    """How the GPU profile evaluates checkpoints (one SGLang server per checkpoint, our episode loop)."""

    n_samples: int = Field(16, ge=1, description="samples per prompt (sampled acc, pass@k, avg@k)")
    temperature: float = Field(1.0, ge=0.0, description="sampling temperature of the sampled metrics")
    greedy: bool = Field(False, description="also report greedy-decoding accuracy (greedy_acc)")
    max_problems: int | None = Field(None, ge=1, description="evaluate only the first N problems")
    gpus: int = Field(1, ge=1, description="GPUs (SGLang tensor parallel size) per evaluation job")


class EvaluationConfig(_Strict):
    """What the eval stage reports, whichever backend samples (`local.eval` / `slime.eval` say how)."""

    checkpoints: list[Checkpoint] = Field(default_factory=lambda: list(CHECKPOINTS))
    dataset_name: str = Field("eval", description="name under eval/<dataset>/… in MLflow")
    samples_logged: int = Field(
        64, ge=0, description="episodes per checkpoint kept in the eval samples table"
    )


def _tiny_rollout() -> RolloutConfig:
    # A tool call and an answer fit in ~80 tokens per turn; the system prompt is the one the synthetic
    # SFT traces carry, so RL and evaluation prompt the model exactly as it was fine-tuned.
    return RolloutConfig(
        max_turns=4,
        max_tool_calls=3,
        max_new_tokens=128,
        max_context_tokens=640,
        system_prompt=SyntheticConfig().system_prompt,
    )


class LocalProfile(LocalConfig):
    """The tiny CPU profile: the local backend's knobs plus its rollout budget."""

    rollout: RolloutConfig = Field(default_factory=_tiny_rollout)


class SlimeProfile(SlimeConfig):
    """The GPU profile: slime's knobs plus the rollout budget our hooks use inside slime."""

    rollout: RolloutConfig = Field(
        default_factory=lambda: RolloutConfig(
            max_turns=16, max_tool_calls=16, max_context_tokens=16384, max_new_tokens=8192
        )
    )
    eval: EvalConfig = Field(default_factory=EvalConfig)


class TrackingConfig(_Strict):
    experiment: str = Field("retool", description="MLflow experiment name")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; None keeps MLFLOW_TRACKING_URI or sqlite:///mlflow.db"
    )


class PipelineConfig(_Strict):
    profile: Literal["tiny", "qwen3-4b"] = "tiny"
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    local: LocalProfile = Field(default_factory=LocalProfile)
    slime: SlimeProfile = Field(default_factory=SlimeProfile)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _prompts_match(self) -> PipelineConfig:
        synthetic = self.profile == "tiny" and self.data.dataset == "synthetic"
        if synthetic and self.local.rollout.system_prompt != self.data.synthetic.system_prompt:
            raise ValueError(
                "local.rollout.system_prompt must equal data.synthetic.system_prompt: the tiny model is "
                "fine-tuned on traces with that system prompt, and RL/eval must prompt it the same way"
            )
        return self

    @property
    def backend(self) -> Literal["local", "slime"]:
        return "local" if self.profile == "tiny" else "slime"

    @property
    def rollout(self) -> RolloutConfig:
        return self.local.rollout if self.backend == "local" else self.slime.rollout

    @property
    def eval(self) -> LocalEvalConfig | EvalConfig:
        """How the active backend samples its evaluation (n_samples, temperature, greedy, max_problems)."""
        return self.local.eval if self.backend == "local" else self.slime.eval


def _format_error(path: Path | str, err: ValidationError) -> str:
    lines = [f"{path}: {err.error_count()} invalid setting(s)"]
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<root>"
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown key (misspelt, or not a setting of this section)"
        got = item.get("input")
        shown = "" if item["type"] in ("missing", "extra_forbidden") else f" (got {got!r})"
        lines.append(f"  {key}: {msg}{shown}")
    return "\n".join(lines)


def validate(data: dict[str, Any], source: Path | str = "params.yaml") -> PipelineConfig:
    """Validate a params mapping; a ConfigError names the file and every bad key."""
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(source, err)) from None


def load_config(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read, override (dotted keys, as ``dvc exp run --set-param``) and validate params.yaml."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: not found (run from the project root, or pass --params)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return validate(data, path)


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested mapping, creating sections as needed."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def default_params() -> dict[str, Any]:
    """Every knob with its default (the source of the shipped params.yaml)."""
    return PipelineConfig().model_dump(mode="json")


def dump_params(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, width=110)
