"""Isolation tiers: which ones this machine offers, and the command that starts a worker inside each.

Strongest first: ``bwrap`` (bubblewrap: user/pid/mount/net/ipc/uts namespaces, an empty read-only root with
only the interpreter bound in), ``namespaces`` (the same namespaces made with unshare(2) by the worker
itself, host paths such as home and the project hidden under empty tmpfs, the rest read-only), ``process``
(a separate process with rlimits and, when started as root, an unprivileged uid).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

TIERS = ("bwrap", "namespaces", "process")
WORKER_SOURCE = (Path(__file__).with_name("_worker.py")).read_text()
# The environment a worker (and bwrap itself, whose environment is /proc/1/environ inside) starts with.
MIN_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MPLBACKEND": "Agg",
}


class IsolationUnavailable(RuntimeError):
    """An explicitly requested isolation tier cannot run on this machine."""


@dataclass
class Launch:
    """How to start one worker process."""

    argv: list[str]


def _is_root() -> bool:
    return os.geteuid() == 0


def interpreter_paths() -> list[str]:
    """Directories the worker's interpreter needs: the installation and the virtual environment."""
    paths = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}
    exe_dir = os.path.dirname(os.path.realpath(sys.executable))
    if not any(exe_dir == p or exe_dir.startswith(p + "/") for p in paths):
        paths.add(exe_dir)
    return sorted(p for p in paths if os.path.isdir(p))


def hidden_paths() -> list[str]:
    """Host paths the namespaces tier covers with an empty tmpfs (home, project, runtime sockets...)."""
    cands = [os.path.expanduser("~"), os.getcwd(), str(Path(__file__).resolve().parents[2])]
    cands += ["/root", "/home", "/work", "/mnt", "/media", "/srv", "/opt", "/run", "/var", "/tmp", "/dev/shm"]
    system = {"/", "/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc", "/proc", "/dev", "/sys"}
    out = []
    for c in cands:
        real = os.path.realpath(c) if c else ""
        # never cover the system itself (a service user's home or cwd may be "/")
        if (
            real
            and os.path.isdir(real)
            and real not in system
            and not real.startswith(("/usr/", "/proc/", "/sys/"))
        ):
            out.append(real)
    return out


def tmp_tops(paths: list[str]) -> dict[str, list[str]]:
    """Interpreter paths inside /tmp, by their first directory there (/tmp/ci for /tmp/ci/.venv).

    The calls' /tmp is a fresh writable tmpfs; such a path is bound into it under a read-only tmpfs at its
    top directory, which the calls can neither write into nor rename (a mount point), and the per-call
    wipe of /tmp leaves alone."""
    tops: dict[str, list[str]] = {}
    for p in paths:
        if p.startswith("/tmp/"):
            tops.setdefault("/tmp/" + p[len("/tmp/") :].split("/")[0], []).append(p)
    return tops


def worker_config(tier: str, cfg_dict: dict, *, call_uid: int | None, scratch_dir: str | None) -> str:
    d = dict(cfg_dict)
    d.update(tier=tier, call_uid=call_uid, uid_base=call_uid, uid_count=1, scratch_dir=scratch_dir)
    d.setdefault("keep", interpreter_paths())
    d.setdefault("hide", hidden_paths())
    d.setdefault("tmp_keep", tmp_tops(d["keep"]))
    return json.dumps(d)


def bwrap_argv(worker_argv: list[str], tmp_mb: int, staged: bool) -> tuple[list[str], list[list[str]]]:
    """bubblewrap command line: nothing of the host but /usr, the loader paths and the interpreter."""
    bwrap = shutil.which("bwrap") or "/usr/bin/bwrap"
    args = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--as-pid-1"]
    args += ["--new-session", "--hostname", "sandbox", "--clearenv"]
    for k, v in MIN_ENV.items():
        args += ["--setenv", k, v]
    args += ["--ro-bind", "/usr", "/usr"]
    for p in ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"):
        if os.path.islink(p):
            args += ["--symlink", os.readlink(p), p]
        elif os.path.isdir(p):
            args += ["--ro-bind", p, p]
    for p in ("/etc/ld.so.cache", "/etc/localtime", "/etc/alternatives"):
        args += ["--ro-bind-try", p, p]
    # the calls' writable /tmp comes first: an interpreter path inside it is bound on top
    args += ["--proc", "/proc", "--dev", "/dev", "--size", str(tmp_mb << 20), "--tmpfs", "/tmp"]
    stage: list[list[str]] = []
    binds: dict[str, str] = {}
    for p in interpreter_paths():
        if p == "/usr" or p.startswith("/usr/"):
            continue
        # staged: the launcher re-binds it under /tmp of a private mount namespace, reachable by the
        # sandbox uid even when its real parents are not (a mode-700 home)
        src = f"/tmp/retool-py{len(stage)}" if staged else p
        stage.append([p, src])
        binds[p] = src
    tops = tmp_tops(list(binds))
    in_tmp = {p for paths in tops.values() for p in paths}
    for p, src in binds.items():
        if p not in in_tmp:
            args += ["--ro-bind", src, p]
    for top, paths in tops.items():
        if top in paths:  # the interpreter is that directory: its own bind is the mount point
            args += ["--ro-bind", binds[top], top]
            continue
        args += ["--size", str(1 << 20), "--tmpfs", top]
        for p in paths:
            args += ["--ro-bind", binds[p], p]
        args += ["--remount-ro", top]
    args += ["--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/tmp", "--"]
    return args + worker_argv, stage


def launch(
    tier: str, index: int, cfg_dict: dict, uid_base: int, scratch_dir: str | None, name: str = ""
) -> Launch:
    """Worker `index` (its calls run as uid_base+index when we are root); `name` keeps scratch paths apart."""
    root = _is_root()
    uid = uid_base + index if root else None
    tmp_mb = max(16, 2 * int(cfg_dict["limits"]["fsize"]) >> 20)
    cfg_dict = dict(cfg_dict, tmp_mb=tmp_mb)
    if tier == "bwrap":
        wcfg = worker_config("bwrap", cfg_dict, call_uid=None, scratch_dir=None)
        argv, stage = bwrap_argv([sys.executable, "-I", "-c", WORKER_SOURCE, wcfg], tmp_mb, staged=root)
        if not root:
            return Launch(argv)
        lcfg = json.dumps({"tier": "bwrap-launch", "stage": stage, "bwrap_uid": uid, "bwrap_argv": argv})
        return Launch([sys.executable, "-I", "-c", WORKER_SOURCE, lcfg])
    scratch = os.path.join(scratch_dir, f"w{index}{name}") if scratch_dir else None
    wcfg = worker_config(tier, cfg_dict, call_uid=uid, scratch_dir=scratch)
    return Launch([sys.executable, "-I", "-c", WORKER_SOURCE, wcfg])


_probe_lock = threading.Lock()
_probe_cache: dict[str, str | None] = {}


def probe(tier: str) -> str | None:
    """None if the tier works here, else the reason it does not (cached per process)."""
    with _probe_lock:
        if tier not in _probe_cache:
            _probe_cache[tier] = _probe(tier)
        return _probe_cache[tier]


def _probe(tier: str) -> str | None:
    if tier == "process":
        return None
    if tier == "bwrap" and not shutil.which("bwrap"):
        return "bubblewrap (bwrap) is not installed"
    limits: dict[str, float] = {"fsize": 1 << 20, "max_processes": 4, "memory_mb": 64, "cpu_time_s": 1}
    limits.update(wall_timeout_s=1.0, max_output_bytes=1024, nofile=64)
    cfg = {"preload": [], "warmup": False, "probe": True, "limits": limits}
    lnch = launch(tier, 0, cfg, 61000, None)
    try:
        proc = subprocess.run(
            lnch.argv,
            input=b"",
            capture_output=True,
            env=MIN_ENV,
            cwd="/",
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{tier} probe failed: {e}"
    out = proc.stdout
    if len(out) > 4:
        try:
            msg = json.loads(out[4 : 4 + int.from_bytes(out[:4], "big")])
        except ValueError:
            msg = {}
        if msg.get("ready"):
            return None
        if "fatal" in msg:
            return f"{tier} probe failed: {msg['fatal']}"
    err = proc.stderr.decode(errors="replace").strip()[-300:]
    return f"{tier} probe failed (exit {proc.returncode}): {err or 'no output'}"


def available_tiers() -> dict[str, str | None]:
    """Every tier with None (available) or the reason it is not."""
    return {t: probe(t) for t in TIERS}


def resolve(isolation: str) -> str:
    """The tier to use: the strongest available for "auto", else exactly the one asked for (or an error)."""
    if isolation == "auto":
        for t in TIERS:
            reason = probe(t)
            if reason is None:
                log.info("sandbox isolation: %s (strongest tier available here)", t)
                return t
            log.info("sandbox isolation: %s unavailable: %s", t, reason)
        raise IsolationUnavailable("no isolation tier available")  # pragma: no cover - process always is
    if isolation not in TIERS:
        raise IsolationUnavailable(
            f"unknown isolation tier {isolation!r}; expected one of auto, {', '.join(TIERS)}"
        )
    reason = probe(isolation)
    if reason is not None:
        raise IsolationUnavailable(f"isolation tier {isolation!r} was requested but is unavailable: {reason}")
    log.info("sandbox isolation: %s (requested)", isolation)
    return isolation
