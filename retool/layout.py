"""Where every stage reads and writes, relative to the project root (dvc.yaml lists the same paths).

One place for these names keeps dvc.yaml, the stage code, the Prefect flow and the README in agreement;
a test checks dvc.yaml against this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path = Path(".")

    # download
    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def raw_sft(self) -> Path:
        """ReTool-SFT style rows (synthetic traces or the downloaded dataset)."""
        return self.raw / "sft"

    @property
    def train_jsonl(self) -> Path:
        """RL prompts, normalized to {"prompt", "label"} rows."""
        return self.raw / "train.jsonl"

    @property
    def eval_jsonl(self) -> Path:
        """Held-out evaluation prompts, normalized to {"prompt", "label"} rows."""
        return self.raw / "eval.jsonl"

    @property
    def base_model(self) -> Path:
        return self.root / "models" / "base"

    # convert
    @property
    def base_torch_dist(self) -> Path:
        return self.root / "models" / "base_torch_dist"

    # sft_data
    @property
    def sft_dir(self) -> Path:
        return self.root / "data" / "sft"

    @property
    def sft_parquet(self) -> Path:
        return self.sft_dir / "train.parquet"

    # sft / rl
    @property
    def sft_model(self) -> Path:
        return self.root / "models" / "sft"

    @property
    def rl_model(self) -> Path:
        return self.root / "models" / "rl"

    @property
    def checkpoints(self) -> Path:
        """Resumable training state (dvc `persist: true`, never cached)."""
        return self.root / "checkpoints"

    # metrics, plots, export
    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def export(self) -> Path:
        return self.root / "export"

    def model(self, name: str) -> Path:
        return {"base": self.base_model, "sft": self.sft_model, "rl": self.rl_model}[name]


STAGES: tuple[str, ...] = ("download", "convert", "sft_data", "sft", "rl", "eval", "export")
