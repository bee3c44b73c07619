"""`retool sandbox serve` and RemoteSandbox for real on loopback: results, auth, size cap, overload."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from retool.sandbox import RemoteSandbox, RemoteSandboxError
from retool.sandbox.server import cli_main
from retool.tools import ToolRegistry

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-token-0f3a"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(*extra: str, token: str | None = TOKEN) -> tuple[subprocess.Popen[str], str]:
    port = _free_port()
    args = ["--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--wall-timeout", "5", *extra]
    env = dict(os.environ)
    env.pop("RETOOL_SANDBOX_TOKEN", None)
    if token:
        env["RETOOL_SANDBOX_TOKEN"] = token
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from retool.sandbox.server import cli_main; sys.exit(cli_main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "serving on http://127.0.0.1" in line, line
    return proc, f"http://127.0.0.1:{port}"


def _stop(proc: subprocess.Popen[str]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def server():
    proc, url = _start("--max-queue", "0", "--max-request-bytes", "65536")
    yield url
    _stop(proc)
    assert proc.returncode == 0


def test_remote_results_match_the_local_api(server):
    with RemoteSandbox(server, token=TOKEN, retries=20) as rs:
        assert rs.isolation.startswith("remote:") and rs.workers == 1
        ok = rs.run("import sympy as sp\nprint(sp.factor(sp.Symbol('x')**2 - 1))")
        assert (ok.status, ok.stdout, ok.exit_code) == ("ok", "(x - 1)*(x + 1)\n", 0)
        err = rs.run("raise ValueError('bad')")
        assert err.status == "error" and "ValueError: bad" in err.observation()
        to = rs.run("while True: pass", timeout_s=1)
        assert to.status == "timeout" and to.observation().endswith("timed out after 1 s")
        reg = ToolRegistry(rs)
        out = reg.call("code_interpreter", {"code": "print(2 ** 10)"})
        assert out.status == "ok" and out.observation == "1024"


async def test_remote_arun_concurrent(server):
    rs = RemoteSandbox(server, token=TOKEN, retries=50)
    try:
        res = await asyncio.gather(*(rs.arun(f"print({i} + 1)") for i in range(6)))
        assert [r.stdout for r in res] == [f"{i + 1}\n" for i in range(6)]
    finally:
        rs.close()


def test_sandboxfusion_response_shape(server):
    r = httpx.post(
        f"{server}/run_code",
        json={"code": "print('hi')", "language": "python", "run_timeout": 3},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "Success"
    assert body["run_result"]["status"] == "Finished"
    assert body["run_result"]["stdout"] == "hi\n" and body["run_result"]["return_code"] == 0
    assert isinstance(body["run_result"]["execution_time"], float)
    bad = httpx.post(
        f"{server}/run_code",
        json={"code": "x", "language": "cpp"},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert bad.status_code == 400 and "python only" in bad.json()["message"]
    assert httpx.get(f"{server}/v1/ping").text == "pong"


def test_auth_is_required(server):
    assert httpx.post(f"{server}/run_code", json={"code": "print(1)"}).status_code == 401
    wrong = httpx.post(
        f"{server}/run_code", json={"code": "print(1)"}, headers={"Authorization": "Bearer nope"}
    )
    assert wrong.status_code == 401
    with pytest.raises(RemoteSandboxError, match="401"):
        RemoteSandbox(server, token="nope")


def test_request_size_is_capped(server):
    big = "x = 1\n" * 20000  # 120 kB > 64 kB cap
    r = httpx.post(f"{server}/run_code", json={"code": big}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 413


def test_overload_is_answered_not_queued(server):
    import threading

    auth = {"Authorization": f"Bearer {TOKEN}"}
    first: list[int] = []
    t = threading.Thread(
        target=lambda: first.append(
            httpx.post(
                f"{server}/run_code", json={"code": "import time; time.sleep(2)"}, headers=auth, timeout=30
            ).status_code
        )
    )
    t.start()
    end = time.monotonic() + 10
    while httpx.get(f"{server}/info", headers=auth).json()["in_flight"] < 1 and time.monotonic() < end:
        time.sleep(0.02)
    busy = httpx.post(f"{server}/run_code", json={"code": "print(1)"}, headers=auth, timeout=30)
    t.join()
    assert busy.status_code == 429 and busy.headers.get("Retry-After"), busy.text
    assert first == [200]

    # requests arriving together: admission is decided before any await, so the excess is refused
    async def burst() -> list[int]:
        async with httpx.AsyncClient(headers=auth, timeout=30) as c:
            rs = await asyncio.gather(
                *(
                    c.post(f"{server}/run_code", json={"code": "import time; time.sleep(0.5)"})
                    for _ in range(4)
                )
            )
            return [r.status_code for r in rs]

    codes = asyncio.run(burst())
    assert codes.count(200) >= 1 and codes.count(429) >= 1, codes
    # the client retries busy answers with backoff instead of failing
    with RemoteSandbox(server, token=TOKEN, retries=30) as rs:
        results: list[str] = []
        threads = [
            threading.Thread(target=lambda: results.append(rs.run("print(7)").stdout)) for _ in range(3)
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert results == ["7\n"] * 3


def test_non_loopback_without_token_is_refused(capsys):
    env_tok = os.environ.pop("RETOOL_SANDBOX_TOKEN", None)
    try:
        assert cli_main(["--host", "0.0.0.0", "--port", "0"]) == 2
    finally:
        if env_tok is not None:
            os.environ["RETOOL_SANDBOX_TOKEN"] = env_tok
    assert "without a bearer token" in capsys.readouterr().err


def test_unreachable_server_is_a_clear_error():
    with pytest.raises(RemoteSandboxError, match="cannot reach"):
        RemoteSandbox(f"http://127.0.0.1:{_free_port()}")


def test_server_stops_cleanly_with_nothing_left():
    proc, url = _start(token=None)
    from tests.sandbox.conftest import alive, descendants

    with RemoteSandbox(url) as rs:
        assert rs.run("print(3)").stdout == "3\n"
    tree = descendants(proc.pid)
    _stop(proc)
    assert proc.returncode == 0
    end = time.monotonic() + 10
    while any(alive(p) for p in tree) and time.monotonic() < end:
        time.sleep(0.05)
    assert not any(alive(p) for p in tree)
