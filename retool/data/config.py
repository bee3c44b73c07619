"""Configuration of the data part: remote sources, the synthetic task, the SFT conversion.

Defaults are the tiny CPU profile (synthetic data, no downloads); the real profile sets
`DataConfig.dataset = "remote"` and keeps the public sources below (or points them at an S3 mirror).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

RepoType = Literal["model", "dataset"]
Kind = Literal["product", "mod", "sum"]


def _all_kinds() -> list[Kind]:
    return ["product", "mod", "sum"]


class SourceConfig(BaseModel):
    """One Hub repository (a model or a dataset), pinned to a revision, optionally mirrored on S3.

    The S3 mirror holds the repository's files under the prefix with their repository paths
    (s3://bucket/prefix/config.json, s3://bucket/prefix/data/train.parquet, ...).
    """

    model_config = ConfigDict(extra="forbid")

    repo_id: str
    repo_type: RepoType = "dataset"
    revision: str = "main"  # branch, tag or 40-hex commit; pin a commit for reproducible runs
    allow_patterns: list[str] | None = None  # fnmatch patterns on repository paths; None = every file
    ignore_patterns: list[str] | None = None
    s3_uri: str | None = None  # s3://bucket/prefix of a mirror of the same files
    enabled: bool = True

    @field_validator("repo_id")
    @classmethod
    def _repo_id_shape(cls, v: str) -> str:
        if v.count("/") != 1 or not all(v.split("/")):
            raise ValueError(f"repo_id must look like 'owner/name', got {v!r}")
        return v

    @field_validator("s3_uri")
    @classmethod
    def _s3_shape(cls, v: str | None) -> str | None:
        if v is not None and (not v.startswith("s3://") or len(v) <= len("s3://")):
            raise ValueError(f"s3_uri must look like 's3://bucket/prefix', got {v!r}")
        return v


class SyntheticConfig(BaseModel):
    """The tiny arithmetic task: short, regular text a from-scratch model can learn on CPU in minutes.

    Trace mix (measured to leave RL room to improve): correct tool use, `mistake_share` code with a
    plausible mistake whose wrong output is boxed, `no_tool_share` answers without the tool (right only
    `no_tool_correct_share` of the time).
    """

    model_config = ConfigDict(extra="forbid")

    sft_size: int = Field(default=20_000, ge=1)
    train_size: int = Field(default=4_000, ge=1)  # RL prompts
    eval_size: int = Field(default=200, ge=1)  # held-out eval prompts
    kinds: list[Kind] = Field(default_factory=_all_kinds)
    mistake_share: float = Field(default=0.25, ge=0.0, le=1.0)
    no_tool_share: float = Field(default=0.05, ge=0.0, le=1.0)
    no_tool_correct_share: float = Field(default=0.5, ge=0.0, le=1.0)
    system_prompt: str = "Use python to compute. Put the answer in \\boxed{}."
    sft_format: Literal["jsonl", "parquet"] = "jsonl"

    @model_validator(mode="after")
    def _shares(self) -> SyntheticConfig:
        if self.mistake_share + self.no_tool_share > 1.0:
            raise ValueError("mistake_share + no_tool_share must be at most 1")
        if not self.kinds:
            raise ValueError("kinds must name at least one problem kind")
        return self


class ConversionConfig(BaseModel):
    """ReTool-SFT rows -> training rows (the sft_data stage)."""

    model_config = ConfigDict(extra="forbid")

    tool_format: bool = True  # rewrite <code>/<interpreter> into <tool_call> + tool turns
    on_error: Literal["raise", "skip"] = "raise"  # a bad row: stop naming its index, or skip and count it
    system_prompt: str | None = None  # when set, replaces (or supplies) every row's system message
    batch_size: int = Field(default=1024, ge=1)  # rows read and written per batch (memory stays flat)


def _default_sources() -> dict[str, SourceConfig]:
    return {
        "sft": SourceConfig(repo_id="JoeYing/ReTool-SFT", repo_type="dataset"),
        "base_model": SourceConfig(repo_id="Qwen/Qwen3-4B-Instruct-2507", repo_type="model"),
        "rl": SourceConfig(repo_id="zhuzilin/dapo-math-17k", repo_type="dataset"),
        "eval": SourceConfig(repo_id="zhuzilin/aime-2024", repo_type="dataset"),
        "sft_checkpoint": SourceConfig(
            repo_id="font-info/qwen3-4b-sft-SGLang-RL", repo_type="model", enabled=False
        ),
    }


class DataConfig(BaseModel):
    """Everything the download and sft_data stages need."""

    model_config = ConfigDict(extra="forbid")

    dataset: Literal["synthetic", "remote"] = "synthetic"  # tiny profile: synthetic; real: remote sources
    sources: dict[str, SourceConfig] = Field(default_factory=_default_sources)
    mirror: Literal["auto", "hub", "s3"] = "auto"  # auto: S3 when a source has s3_uri, else the Hub
    hub_endpoint: str | None = None  # None: HF_ENDPOINT from the environment, else huggingface.co
    s3_endpoint_url: str | None = None  # e.g. a MinIO or moto endpoint; None: AWS
    max_workers: int = Field(default=8, ge=1)  # concurrent file downloads
    verify_checksums: bool = True
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    conversion: ConversionConfig = Field(default_factory=ConversionConfig)

    def enabled_sources(self) -> dict[str, SourceConfig]:
        return {name: s for name, s in self.sources.items() if s.enabled}
