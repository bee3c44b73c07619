"""Sandbox settings (the `sandbox:` section of params.yaml); defaults fit the tiny 2-core CPU profile."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Isolation = Literal["auto", "bwrap", "namespaces", "process"]

DEFAULT_PRELOAD = ["math", "fractions", "itertools", "collections", "functools", "decimal", "numpy", "sympy"]


class SandboxConfig(BaseModel):
    """Limits and pool shape of the code interpreter.

    Every limit is enforced by the operating system (rlimits, namespaces, a killed process tree),
    never by inspecting the code.
    """

    model_config = ConfigDict(extra="forbid")

    wall_timeout_s: float = Field(default=10.0, gt=0, le=3600, description="wall-clock limit of one call")
    cpu_time_s: int = Field(default=10, ge=1, le=3600, description="RLIMIT_CPU of one call")
    memory_mb: int = Field(
        default=512, ge=16, description="address space one call may add on top of the warm worker image"
    )
    max_output_bytes: int = Field(default=16384, ge=256, description="cap on each of stdout and stderr")
    max_processes: int = Field(default=16, ge=1, le=4096, description="processes one call may create")
    max_file_mb: int = Field(default=64, ge=1, description="RLIMIT_FSIZE: largest file one call may write")
    max_open_files: int = Field(default=256, ge=32, description="RLIMIT_NOFILE")
    workers: int = Field(default=2, ge=1, le=256, description="fork-server workers = calls run at once")
    preload: list[str] = Field(default_factory=lambda: list(DEFAULT_PRELOAD))
    warmup: bool = Field(
        default=True, description="run sympy/numpy once in each worker so forked calls are fast"
    )
    fast_path: bool = Field(
        default=True,
        description="per worker, also a stdlib-only fork server for code naming no non-stdlib preload module",
    )
    isolation: Isolation = "auto"
    uid_base: int = Field(
        default=61000,
        ge=1000,
        description="when started as root, worker i's code runs as uid/gid uid_base+i (RLIMIT_NPROC is not enforced for uid 0)",
    )
    scratch_root: str | None = Field(
        default=None,
        description="process tier only: where per-call scratch dirs are made (default: the temp dir)",
    )
    start_timeout_s: float = Field(
        default=120.0, gt=0, description="how long a worker may take to import and warm up"
    )
