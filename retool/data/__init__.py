"""Data: downloads (Hub, S3), ReTool-SFT conversion, RL/eval problem loaders, the tiny synthetic task."""

from retool.data.config import ConversionConfig, DataConfig, SourceConfig, SyntheticConfig
from retool.data.download import DownloadReport, SourceReport, download, download_source
from retool.data.manifest import MANIFEST_NAME, ChecksumMismatchError, DownloadError
from retool.data.problems import Problem, ProblemSchemaError, load_problems
from retool.data.sft import ConversionReport, RowError, convert_sft, read_converted
from retool.data.synthetic import SyntheticReport, write_synthetic_task

__all__ = [
    "MANIFEST_NAME",
    "ChecksumMismatchError",
    "ConversionConfig",
    "ConversionReport",
    "DataConfig",
    "DownloadError",
    "DownloadReport",
    "Problem",
    "ProblemSchemaError",
    "RowError",
    "SourceConfig",
    "SourceReport",
    "SyntheticConfig",
    "SyntheticReport",
    "convert_sft",
    "download",
    "download_source",
    "load_problems",
    "read_converted",
    "write_synthetic_task",
]
