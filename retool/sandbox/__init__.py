"""Isolated, fast Python execution for rollouts (see DESIGN.md, "Contracts")."""

from __future__ import annotations

from typing import Any

from retool.sandbox.config import SandboxConfig
from retool.sandbox.local import Sandbox, SandboxError
from retool.sandbox.result import ExecResult
from retool.sandbox.tiers import IsolationUnavailable, available_tiers

__all__ = [
    "ExecResult",
    "IsolationUnavailable",
    "RemoteSandbox",
    "RemoteSandboxError",
    "Sandbox",
    "SandboxConfig",
    "SandboxError",
    "available_tiers",
]


def __getattr__(name: str) -> Any:
    # The HTTP client (httpx) is only imported by whoever uses the remote sandbox.
    if name in ("RemoteSandbox", "RemoteSandboxError"):
        from retool.sandbox import remote

        return getattr(remote, name)
    raise AttributeError(f"module 'retool.sandbox' has no attribute {name!r}")
