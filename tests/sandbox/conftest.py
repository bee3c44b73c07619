"""Fixtures for the sandbox suite: one warm Sandbox per isolation tier, skipped (with the reason) where the
machine lacks that tier. A secret lives in this process's environment before any sandbox starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from retool.sandbox import Sandbox, SandboxConfig
from retool.sandbox.tiers import TIERS, probe

SECRET = "retool-test-secret-5b0c2f7e"
os.environ["RETOOL_SANDBOX_TEST_SECRET"] = SECRET


def small_config(tier: str, **kw: object) -> SandboxConfig:
    base = dict(
        isolation=tier,
        workers=2,
        wall_timeout_s=3.0,
        cpu_time_s=2,
        memory_mb=256,
        max_output_bytes=4096,
        max_processes=8,
    )
    base.update(kw)
    return SandboxConfig(**base)  # type: ignore[arg-type]


def require_tier(tier: str) -> None:
    reason = probe(tier)
    if reason is not None:
        pytest.skip(f"isolation tier {tier!r} is not available on this machine: {reason}")


@pytest.fixture(scope="module", params=TIERS)
def tier(request: pytest.FixtureRequest) -> str:
    require_tier(request.param)
    return request.param


@pytest.fixture(scope="module")
def sandbox(tier: str):
    with Sandbox(small_config(tier)) as sb:
        assert sb.isolation == tier
        yield sb


@pytest.fixture(scope="module")
def secret_holder():
    """A long-lived process whose *initial* environment (what /proc/<pid>/environ shows) holds the secret."""
    env = dict(os.environ, RETOOL_SANDBOX_TEST_SECRET=SECRET)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env=env)
    yield proc
    proc.kill()
    proc.wait()


def descendants(pid: int) -> set[int]:
    """Every live descendant of pid, from /proc/<pid>/task/*/children."""
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            for k in kids:
                if k not in out:
                    out.add(k)
                    todo.append(k)
    return out


def alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
