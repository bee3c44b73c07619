"""Tool registry: the `code_interpreter` tool of DESIGN.md's Tool Format, backed by any sandbox.

A model's bad call (unknown tool, arguments that are not a JSON object, no `code`) never raises: it comes
back as an observation that says what was wrong (status "invalid"), so one malformed call cannot kill a
rollout and the model gets a signal it can learn from.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Protocol

from retool.sandbox.result import ExecResult

log = logging.getLogger(__name__)

CODE_INTERPRETER_SPEC: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "code_interpreter",
        "description": "A tool for executing code.",
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "The code to execute."}},
            "required": ["code"],
        },
    },
}

_FENCE = re.compile(r"^\s*```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)\n?```\s*$", re.DOTALL | re.IGNORECASE)


class SandboxLike(Protocol):
    def run(self, code: str) -> ExecResult: ...


@dataclass
class ToolOutcome:
    """One tool call's result. status: "ok" | "error" | "timeout" | "memory" | "invalid"."""

    name: str
    observation: str
    status: str
    duration_s: float
    exec_result: ExecResult | None = None


def strip_code_fence(code: str) -> str:
    """Code wrapped whole in a Markdown fence (```python ... ```) loses the fence; other code is untouched."""
    m = _FENCE.match(code)
    return m.group(1) if m else code


class ToolRegistry:
    """Tools the model may call; today only `code_interpreter`, run by `sandbox` (local or remote)."""

    def __init__(self, sandbox: Any):
        if not (hasattr(sandbox, "arun") or hasattr(sandbox, "run")):
            raise TypeError(f"sandbox must have run() or arun(), got {type(sandbox).__name__}")
        self.sandbox = sandbox
        self._specs = [CODE_INTERPRETER_SPEC]

    def specs(self) -> list[dict[str, Any]]:
        """The JSON tool specs for the system prompt (one object per line inside <tools></tools>)."""
        return json.loads(json.dumps(self._specs))

    @property
    def names(self) -> list[str]:
        return [s["function"]["name"] for s in self._specs]

    def _invalid(self, name: str, message: str) -> ToolOutcome:
        return ToolOutcome(name=name, observation=f"Error: {message}", status="invalid", duration_s=0.0)

    def _check(
        self, name: Any, arguments: dict[str, Any] | str | None
    ) -> tuple[str | None, ToolOutcome | None]:
        """The code to run, or an "invalid" outcome explaining what is wrong with the call."""
        if name not in self.names:
            return None, self._invalid(
                str(name), f"unknown tool {name!r}. Available tools: {', '.join(self.names)}."
            )
        usage = 'call it as {"name": "code_interpreter", "arguments": {"code": "<python code>"}}'
        if arguments is None:
            return None, self._invalid(name, f'code_interpreter needs an argument "code"; {usage}.')
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as e:
                return None, self._invalid(
                    name, f"the arguments are not valid JSON ({e.msg} at position {e.pos}); {usage}."
                )
        if not isinstance(arguments, dict):
            return None, self._invalid(
                name, f"the arguments must be a JSON object, got {type(arguments).__name__}; {usage}."
            )
        extra = sorted(set(arguments) - {"code"})
        if extra:
            return None, self._invalid(
                name, f"unexpected argument(s) {', '.join(map(repr, extra))}; {usage}."
            )
        code = arguments.get("code")
        if not isinstance(code, str):
            what = "missing" if code is None else f"a {type(code).__name__}, not a string"
            return None, self._invalid(name, f'the argument "code" is {what}; {usage}.')
        code = strip_code_fence(code)
        if not code.strip():
            return None, self._invalid(name, 'the argument "code" is empty: write the Python code to run.')
        return code, None

    async def acall(self, name: str, arguments: dict[str, Any] | str | None) -> ToolOutcome:
        """Run one tool call. Never raises for the model's mistakes; sandbox failures become status "error"."""
        code, bad = self._check(name, arguments)
        if bad is not None:
            return bad
        assert code is not None
        t0 = time.monotonic()
        try:
            if hasattr(self.sandbox, "arun"):
                res: ExecResult = await self.sandbox.arun(code)
            else:
                res = await asyncio.to_thread(self.sandbox.run, code)
        except Exception as e:  # an infrastructure failure must not kill the rollout either
            log.warning("code_interpreter failed: %s", e)
            return ToolOutcome(
                name=name,
                observation=f"Error: the code interpreter is unavailable ({type(e).__name__}); try again.",
                status="error",
                duration_s=time.monotonic() - t0,
            )
        return ToolOutcome(
            name=name,
            observation=res.observation(),
            status=res.status,
            duration_s=time.monotonic() - t0,
            exec_result=res,
        )

    def call(self, name: str, arguments: dict[str, Any] | str | None) -> ToolOutcome:
        """Synchronous `acall` for code outside an event loop."""
        return asyncio.run(self.acall(name, arguments))
