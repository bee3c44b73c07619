"""Isolated, fast Python execution for rollouts (see DESIGN.md, "Contracts")."""

from retool.sandbox.config import SandboxConfig
from retool.sandbox.local import Sandbox, SandboxError
from retool.sandbox.remote import RemoteSandbox, RemoteSandboxError
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
