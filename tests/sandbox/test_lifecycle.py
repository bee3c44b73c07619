"""Lifecycle: nothing of a sandbox survives close() or its parent's death; tier choice and config errors."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from retool.sandbox import ExecResult, IsolationUnavailable, Sandbox, SandboxConfig, tiers
from tests.sandbox.conftest import alive, descendants, require_tier, small_config

ROOT = Path(__file__).resolve().parents[2]

BACKGROUND = """
import os, subprocess, time
subprocess.Popen(["sleep", "300"], start_new_session=True)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(300)
    os._exit(0)
print("spawned", flush=True)
"""


def _wait_gone(pids: set[int], timeout: float = 10.0) -> set[int]:
    end = time.monotonic() + timeout
    left = {p for p in pids if alive(p)}
    while left and time.monotonic() < end:
        time.sleep(0.05)
        left = {p for p in left if alive(p)}
    return left


@pytest.mark.parametrize("tier", tiers.TIERS)
def test_close_leaves_no_process_zombie_or_scratch(tier):
    require_tier(tier)
    before = descendants(os.getpid())
    sb = Sandbox(small_config(tier))
    scratch = sb._scratch
    r = sb.run(BACKGROUND)
    assert r.status == "ok" and "spawned" in r.stdout, r.observation()
    hanging = sb.run(BACKGROUND + "\ntime.sleep(0.2)")
    assert hanging.status == "ok"
    ours = descendants(os.getpid()) - before
    assert ours, "the sandbox started no processes?"
    sb.close()
    assert not _wait_gone(ours), "sandbox processes survived close()"
    assert not (descendants(os.getpid()) - before), "zombies or processes left under the parent"
    if scratch is not None:
        assert not os.path.exists(scratch), "scratch directory left behind"
    with pytest.raises(RuntimeError):
        sb.run("print(1)")


def test_close_releases_callers_waiting_for_a_worker():
    import threading

    sb = Sandbox(small_config("auto", workers=1))
    errors: list[BaseException] = []

    def call() -> None:
        try:
            sb.run("import time\ntime.sleep(1)")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    sb.close()
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads), "a caller stayed blocked after close()"
    assert errors and all(isinstance(e, RuntimeError) for e in errors)


@pytest.mark.parametrize("tier", tiers.TIERS)
def test_killing_the_parent_leaves_nothing(tier, tmp_path):
    require_tier(tier)
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, threading, time
        sys.path.insert(0, {str(ROOT)!r})
        from retool.sandbox import Sandbox, SandboxConfig
        sb = Sandbox(SandboxConfig(isolation={tier!r}, workers=2, wall_timeout_s=60))
        print("SCRATCH", sb._scratch, flush=True)
        print(sb.run({BACKGROUND!r}).stdout.strip(), flush=True)
        threading.Thread(target=sb.run, args=({BACKGROUND!r} + "\\ntime.sleep(60)",), daemon=True).start()
        time.sleep(1.0)
        print("READY", flush=True)
        time.sleep(300)
        """)
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert proc.stdout is not None
    scratch = proc.stdout.readline().split()[1]
    lines = [proc.stdout.readline().strip() for _ in range(2)]
    assert lines == ["spawned", "READY"], lines
    tree = descendants(proc.pid)
    assert len(tree) >= 4, f"expected workers and the calls' processes under the parent, got {tree}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = _wait_gone(tree)
    assert not left, f"processes survived their parent's death: {left}"
    if scratch != "None":
        end = time.monotonic() + 5
        while os.path.exists(scratch) and time.monotonic() < end:
            time.sleep(0.05)
        assert not os.path.exists(scratch), "scratch directory left behind"


def test_auto_picks_the_strongest_available_tier_and_says_so(caplog):
    avail = [t for t, why in tiers.available_tiers().items() if why is None]
    with caplog.at_level(logging.INFO, logger="retool.sandbox.tiers"):
        assert tiers.resolve("auto") == avail[0]
    assert f"sandbox isolation: {avail[0]}" in caplog.text


def test_requested_unavailable_tier_is_a_clear_error(monkeypatch):
    # Simulate a machine without bubblewrap: the probe result is what the tier choice reads.
    monkeypatch.setitem(tiers._probe_cache, "bwrap", "bubblewrap (bwrap) is not installed")
    with pytest.raises(IsolationUnavailable, match="'bwrap' was requested but is unavailable: bubblewrap"):
        Sandbox(SandboxConfig(isolation="bwrap"))
    assert tiers.resolve("auto") != "bwrap"


def test_config_rejects_unknown_and_bad_values():
    with pytest.raises(ValidationError, match="wall_timeout"):
        SandboxConfig(wall_timeout=3)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="isolation"):
        SandboxConfig(isolation="docker")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="workers"):
        SandboxConfig(workers=0)
    cfg = SandboxConfig()
    assert cfg.workers == 2 and {"math", "fractions", "itertools", "collections", "numpy", "sympy"} <= set(
        cfg.preload
    )


def test_observation_rendering():
    ok = ExecResult("ok", "42\n", "", False, 0, 0.01)
    assert ok.observation() == "42"
    assert "printed nothing" in ExecResult("ok", "", "", False, 0, 0.01).observation()
    err = ExecResult("error", "partial\n", "Traceback ...\nValueError: x\n", False, 1, 0.01)
    assert err.observation() == "partial\nTraceback ...\nValueError: x"
    to = ExecResult("timeout", "a\n", "", False, None, 2.0, timeout_s=2.0)
    assert to.observation() == "a\nTimeoutError: execution timed out after 2 s"
    mem = ExecResult("memory", "", "MemoryError\n", False, 86, 0.1, memory_mb=256)
    assert "memory limit of 256 MB" in mem.observation()
    tr = ExecResult("error", "x" * 10, "", True, None, 0.1, output_limit=10)
    assert tr.observation().endswith("[output truncated to 10 bytes; execution was stopped]")
    assert "failed with exit code 3" in ExecResult("error", "", "", False, 3, 0.0).observation()


def _thp_possible() -> bool:
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[never]" not in mode and tuple(map(int, os.uname().release.split(".")[:2])) >= (6, 1)


def _kernel_collapses_here() -> bool:
    """Can this process get a huge page by MADV_COLLAPSE right now (fragmented memory may refuse)?"""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    m = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m.write(b"x" * (8 << 20))
        base = ctypes.addressof(ctypes.c_char.from_buffer(m))
        lo = (base + (2 << 20) - 1) & ~((2 << 20) - 1)
        return libc.madvise(lo, 2 << 20, 25) == 0
    finally:
        m.close()


def _anon_huge_kb(pid: int) -> int:
    try:
        rows = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return 0
    return sum(int(r.split()[1]) for r in rows if r.startswith("AnonHugePages:"))


def test_warm_image_sits_in_huge_pages_and_stays_correct_across_recollapses():
    if not _thp_possible():
        pytest.skip("transparent huge pages are off here, or the kernel predates MADV_COLLAPSE (6.1)")
    code = "import numpy as np\nprint(int(np.arange({n}).sum()))"
    with Sandbox(small_config("auto", workers=1)) as sb:
        heavy = sb._slots[0].heavy
        if heavy.huge_mb == 0 and not _kernel_collapses_here():
            pytest.skip("the kernel refuses MADV_COLLAPSE here right now (memory too fragmented?)")
        assert heavy.huge_mb > 0, "the numpy+sympy image was not collapsed into huge pages"
        for n in range(300):  # more calls than the worker's re-collapse period (256)
            r = sb.run(code.format(n=n))
            assert r.status == "ok" and r.stdout.strip() == str(n * (n - 1) // 2), r.observation()
        assert max(_anon_huge_kb(p) for p in descendants(heavy.proc.pid)) > 0


# ---------------------------------------------------------------- the event-loop path (arun)


async def test_cancelled_arun_frees_its_worker_and_the_next_call_runs():
    with Sandbox(small_config("auto", workers=1)) as sb:
        light = sb._slots[0].light
        assert light is not None
        worker_pid = light.proc.pid
        slow = asyncio.create_task(sb.arun("import time\ntime.sleep(0.6)\nprint('slow')"))
        await asyncio.sleep(0.2)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        t0 = time.monotonic()
        r = await sb.arun("print('next')")
        assert r.status == "ok" and r.stdout == "next\n", r.observation()
        # the one worker was busy until the cancelled call really ended, and was not restarted for it
        assert 0.2 < time.monotonic() - t0 < 3.0
        assert sb._slots[0].light is light and light.proc.pid == worker_pid
        assert sb.run("print(2)").stdout == "2\n"


def test_a_call_in_flight_when_its_event_loop_ends_still_frees_the_worker():
    with Sandbox(small_config("auto", workers=1)) as sb:

        async def abandon() -> None:
            asyncio.create_task(sb.arun("import time\ntime.sleep(0.4)\nprint('x')"))
            await asyncio.sleep(0.1)  # asyncio.run now cancels the task and closes the loop

        asyncio.run(abandon())
        r = sb.run("print('after')")
        assert r.status == "ok" and r.stdout == "after\n", r.observation()


async def test_threads_and_coroutines_share_the_workers_in_turn():
    with Sandbox(small_config("auto", workers=1)) as sb:
        loop = asyncio.get_running_loop()
        sync = [loop.run_in_executor(None, sb.run, f"print({i})") for i in range(6)]
        coro = [sb.arun(f"print({i + 100})") for i in range(6)]
        outs = await asyncio.gather(*sync, *coro)
    assert [r.stdout for r in outs] == [f"{i}\n" for i in range(6)] + [f"{i + 100}\n" for i in range(6)]


async def test_arun_survives_a_worker_that_dies_mid_call():
    with Sandbox(small_config("auto", workers=1)) as sb:
        w = sb._slots[0].light or sb._slots[0].heavy
        task = asyncio.create_task(sb.arun("import time\ntime.sleep(2)\nprint('never')"))
        await asyncio.sleep(0.3)
        os.killpg(w.proc.pid, signal.SIGKILL)  # the worker (not the call) dies
        r = await asyncio.wait_for(task, 30)
        assert r.status == "error" and "crashed" in r.stderr
        again = await sb.arun("print('fresh')")
        assert again.status == "ok" and again.stdout == "fresh\n", again.observation()


async def test_close_wakes_coroutines_waiting_for_a_worker():
    sb = Sandbox(small_config("auto", workers=1))
    busy = asyncio.create_task(sb.arun("import time\ntime.sleep(1)"))
    await asyncio.sleep(0.2)
    waiting = [asyncio.create_task(sb.arun("print(1)")) for _ in range(3)]
    await asyncio.sleep(0.1)
    sb.close()
    results = await asyncio.wait_for(asyncio.gather(busy, *waiting, return_exceptions=True), 10)
    assert all(isinstance(r, RuntimeError) for r in results[1:]), results


async def test_requests_larger_than_a_pipe_buffer_go_through_both_paths():
    code = "s = '" + "x" * 300_000 + "'\nprint(len(s))"  # several times the 64 KB pipe buffer
    with Sandbox(small_config("auto", workers=1)) as sb:
        a, b = await asyncio.gather(
            sb.arun(code), asyncio.get_running_loop().run_in_executor(None, sb.run, code)
        )
    assert a.stdout == b.stdout == "300000\n", (a.observation(), b.observation())


@pytest.fixture(params=["nested", "top"])
def venv_in_tmp(request, tmp_path):
    """A virtual environment somewhere below /tmp, or directly in it."""
    import shutil
    import uuid

    if request.param == "nested":
        assert str(tmp_path).startswith("/tmp/"), "pytest's temporary directory is expected under /tmp"
        venv = tmp_path / "venv"
    else:
        venv = Path("/tmp") / f"retool-test-venv-{uuid.uuid4().hex[:8]}"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    yield venv
    if request.param == "top":
        shutil.rmtree(venv, ignore_errors=True)


@pytest.mark.parametrize("tier", ["bwrap", "namespaces"])
def test_an_interpreter_inside_tmp_is_bound_read_only_and_survives_every_call(tier, venv_in_tmp, tmp_path):
    """A checkout or virtual environment under /tmp (CI clones there): the calls' fresh /tmp still shows
    the interpreter, read-only, under a mount no call can write into, rename or have wiped."""
    import json
    import sysconfig

    require_tier(tier)
    venv = venv_in_tmp
    site = next(venv.glob("lib/python3*/site-packages"))
    (site / "venvmod.py").write_text("VALUE = 42\n")
    top = "/tmp/" + str(venv)[len("/tmp/") :].split("/")[0]
    script = tmp_path / "drive.py"
    script.write_text(
        textwrap.dedent(f"""
        import json, sys, time
        from concurrent.futures import ThreadPoolExecutor
        sys.path[:0] = [{str(ROOT)!r}, {sysconfig.get_paths()["purelib"]!r}]  # for this host-side process
        from retool.sandbox import Sandbox, SandboxConfig
        out = {{}}
        cfg = SandboxConfig(isolation={tier!r}, workers=2, preload=["math"], wall_timeout_s=5.0)
        with Sandbox(cfg) as sb:
            run = lambda code: sb.run(code)
            out["isolation"] = sb.isolation
            out["prefix"] = run("import sys; print(sys.prefix)").stdout.strip()
            out["venvmod"] = run("import venvmod; print(venvmod.VALUE)").stdout.strip()
            t0 = time.monotonic()
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(run, ["import time; time.sleep(0.5)"] * 2))
            out["parallel_s"] = time.monotonic() - t0
            attacks = [
                "open(sys.prefix + '/x', 'w')",
                "open({top!r} + '/x', 'w')",
                "os.rename({top!r}, '/tmp/moved')",
                "os.rmdir({str(venv)!r})",
            ]
            out["attacks"] = [run("import os, sys\\n" + a).status for a in attacks]
            out["leak"] = run("open('/tmp/leak', 'w').write('x')").status
            probe = "import os, venvmod\\nprint(venvmod.VALUE, os.path.exists('/tmp/leak'), sorted(os.listdir('/tmp')))"
            out["after"] = [run(probe).stdout.strip() for _ in range(4)]
        print(json.dumps(out))
        """)
    )
    proc = subprocess.run(
        [str(venv / "bin" / "python"), str(script)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["isolation"] == tier and out["prefix"] == str(venv) and out["venvmod"] == "42"
    assert out["parallel_s"] < 0.95, f"two 0.5 s calls on two workers took {out['parallel_s']:.2f} s"
    assert out["attacks"] == ["error"] * 4, out["attacks"]
    top_name = top[len("/tmp/") :]
    assert out["after"] == [f"42 False {sorted([top_name, 'work'])!r}"] * 4, out["after"]
