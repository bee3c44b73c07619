"""Fixtures for the rollout tests: a locally built tokenizer, the scripted SGLang-speaking server on
127.0.0.1 (stopped by pid at the end of the session), and the real sandbox behind the tool registry."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from rt_server import ServerHandle  # noqa: E402
from rt_tokenizer import PLAIN_TEMPLATE, build_tokenizer_dir, load_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer_dir(tmp_path_factory.mktemp("tok") / "tool-template")


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def plain_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """Same vocabulary, a chat template that ignores tools."""
    return load_tokenizer(
        build_tokenizer_dir(tmp_path_factory.mktemp("tok") / "plain", template=PLAIN_TEMPLATE)
    )


@pytest.fixture(scope="session")
def bare_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """Same vocabulary, no chat template at all."""
    return load_tokenizer(build_tokenizer_dir(tmp_path_factory.mktemp("tok") / "bare", template=None))


@pytest.fixture(scope="session")
def server(tokenizer_dir: Path):
    handle = ServerHandle(str(tokenizer_dir))
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="session")
def tools():
    tools_mod = pytest.importorskip(
        "retool.tools", reason="retool.tools (sandbox helper's part) not landed yet"
    )
    from retool.sandbox import Sandbox, SandboxConfig

    sandbox = Sandbox(SandboxConfig())
    try:
        yield tools_mod.ToolRegistry(sandbox)
    finally:
        sandbox.close()


@pytest.fixture
async def engine(server: ServerHandle, tokenizer):
    from retool.engines.sglang import SGLangEngine

    eng = SGLangEngine(server.url, tokenizer, max_retries=3, backoff_s=0.01, backoff_max_s=0.05)
    yield eng
    await eng.aclose()
