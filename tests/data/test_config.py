"""DataConfig defaults (the tiny profile plus the real profile's sources) and strict validation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from retool.data import DataConfig, SourceConfig
from retool.data.download import choose_backend


def test_defaults() -> None:
    cfg = DataConfig()
    assert cfg.dataset == "synthetic"
    assert {n: (s.repo_id, s.repo_type, s.revision) for n, s in cfg.sources.items()} == {
        "sft": ("JoeYing/ReTool-SFT", "dataset", "main"),
        "base_model": ("Qwen/Qwen3-4B-Instruct-2507", "model", "main"),
        "rl": ("zhuzilin/dapo-math-17k", "dataset", "main"),
        "eval": ("zhuzilin/aime-2024", "dataset", "main"),
        "sft_checkpoint": ("font-info/qwen3-4b-sft-SGLang-RL", "model", "main"),
    }
    assert "sft_checkpoint" not in cfg.enabled_sources()
    assert cfg.conversion.tool_format and cfg.conversion.on_error == "raise"


def test_unknown_keys_and_bad_values_are_errors() -> None:
    with pytest.raises(ValidationError, match="s3_endpoint"):
        DataConfig.model_validate({"s3_endpoint": "http://x"})
    with pytest.raises(ValidationError, match="alow_patterns"):
        DataConfig.model_validate({"sources": {"sft": {"repo_id": "a/b", "alow_patterns": ["*"]}}})
    with pytest.raises(ValidationError, match="owner/name"):
        SourceConfig(repo_id="no-slash")
    with pytest.raises(ValidationError, match="s3://bucket"):
        SourceConfig(repo_id="a/b", s3_uri="bucket/prefix")
    with pytest.raises(ValidationError, match="on_error"):
        DataConfig.model_validate({"conversion": {"on_error": "ignore"}})


def test_backend_choice() -> None:
    plain, mirrored = SourceConfig(repo_id="a/b"), SourceConfig(repo_id="a/b", s3_uri="s3://bkt/a")
    assert choose_backend("x", plain, "auto") == "hub"
    assert choose_backend("x", mirrored, "auto") == "s3"
    assert choose_backend("x", mirrored, "hub") == "hub"
    with pytest.raises(ValueError, match="'x'.*no s3_uri"):
        choose_backend("x", plain, "s3")
