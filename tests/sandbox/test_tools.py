"""retool.tools against a real sandbox: exact spec, results, and bad calls answered, never raised."""

from __future__ import annotations

import json

import pytest

from retool.sandbox import Sandbox
from retool.tools import CODE_INTERPRETER_SPEC, ToolRegistry, strip_code_fence
from tests.sandbox.conftest import small_config

DESIGN_SPEC = (
    '{"type": "function", "function": {"name": "code_interpreter", "description": "A tool for executing code.", '
    '"parameters": {"type": "object", "properties": {"code": {"type": "string", "description": "The code to '
    'execute."}}, "required": ["code"]}}}'
)


@pytest.fixture(scope="module")
def registry():
    with Sandbox(small_config("auto", workers=1)) as sb:
        yield ToolRegistry(sb)


def test_spec_is_exactly_the_design_one(registry):
    assert json.dumps(CODE_INTERPRETER_SPEC) == DESIGN_SPEC
    assert registry.specs() == [json.loads(DESIGN_SPEC)]
    registry.specs()[0]["function"]["name"] = "changed"  # callers get a copy
    assert registry.specs()[0]["function"]["name"] == "code_interpreter"


async def test_call_runs_code(registry):
    out = await registry.acall("code_interpreter", {"code": "import sympy as sp\nprint(sp.factorial(5))"})
    assert (out.status, out.observation, out.name) == ("ok", "120", "code_interpreter")
    assert out.exec_result is not None and out.exec_result.exit_code == 0
    out = await registry.acall("code_interpreter", json.dumps({"code": "print(1/0)"}))
    assert out.status == "error" and "ZeroDivisionError" in out.observation


async def test_markdown_fence_is_stripped(registry):
    out = await registry.acall("code_interpreter", {"code": "```python\nprint('fenced')\n```"})
    assert out.status == "ok" and out.observation == "fenced"
    assert strip_code_fence("x = '```'\nprint(x)") == "x = '```'\nprint(x)"


@pytest.mark.parametrize(
    ("name", "args", "needle"),
    [
        ("python", {"code": "print(1)"}, "unknown tool 'python'. Available tools: code_interpreter"),
        (None, {"code": "print(1)"}, "unknown tool None"),
        ("code_interpreter", None, 'needs an argument "code"'),
        ("code_interpreter", '{"code": "print(1)"', "not valid JSON"),
        ("code_interpreter", "[1, 2]", "must be a JSON object, got list"),
        ("code_interpreter", {}, '"code" is missing'),
        ("code_interpreter", {"code": 5}, '"code" is a int, not a string'),
        ("code_interpreter", {"code": "   "}, '"code" is empty'),
        ("code_interpreter", {"code": "print(1)", "lang": "py"}, "unexpected argument(s) 'lang'"),
    ],
)
async def test_bad_calls_become_invalid_observations(registry, name, args, needle):
    out = await registry.acall(name, args)
    assert out.status == "invalid"
    assert out.observation.startswith("Error: ") and needle in out.observation, out.observation
    assert out.exec_result is None


def test_sync_call_and_sandbox_failure_is_an_observation():
    class Broken:
        def run(self, code: str):
            raise ConnectionError("down")

    reg = ToolRegistry(Broken())
    out = reg.call("code_interpreter", {"code": "print(1)"})
    assert out.status == "error" and "unavailable" in out.observation
    with pytest.raises(TypeError):
        ToolRegistry(object())
