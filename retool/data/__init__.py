"""Data: downloads (Hub, S3), ReTool-SFT conversion, RL/eval problem loaders, the tiny synthetic task.

Names are imported on first use, so reading the config (``retool.data.config``) does not pull in boto3,
huggingface_hub or pyarrow.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConversionConfig": "config",
    "DataConfig": "config",
    "SourceConfig": "config",
    "SyntheticConfig": "config",
    "DownloadReport": "download",
    "SourceReport": "download",
    "download": "download",
    "download_source": "download",
    "MANIFEST_NAME": "manifest",
    "ChecksumMismatchError": "manifest",
    "DownloadError": "manifest",
    "Problem": "problems",
    "ProblemSchemaError": "problems",
    "load_problems": "problems",
    "ConversionReport": "sft",
    "RowError": "sft",
    "convert_sft": "sft",
    "read_converted": "sft",
    "SyntheticReport": "synthetic",
    "write_synthetic_task": "synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'retool.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"retool.data.{module}"), name)
