"""The outcome of one sandboxed call and the text the model sees for it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Status = Literal["ok", "error", "timeout", "memory"]


@dataclass
class ExecResult:
    """What one call did. `stdout`/`stderr` are each capped at the config's max_output_bytes."""

    status: Status
    stdout: str
    stderr: str
    truncated: bool
    exit_code: int | None
    duration_s: float
    timeout_s: float | None = None  # the wall limit that applied (for the "timed out" note)
    memory_mb: int | None = None  # the memory limit that applied (for the "memory" note)
    output_limit: int | None = None  # the output cap that applied (for the "truncated" note)

    def observation(self) -> str:
        """Render the result for the model: output, then a short error or a note on limits hit."""
        parts: list[str] = []
        out = self.stdout.rstrip("\n")
        err = self.stderr.rstrip("\n")
        if out:
            parts.append(out)
        if self.status == "timeout":
            if err:
                parts.append(err)
            limit = f"{self.timeout_s:g} s" if self.timeout_s is not None else "the time limit"
            parts.append(f"TimeoutError: execution timed out after {limit}")
        elif self.status == "memory":
            if err:
                parts.append(err)
            limit = f" of {self.memory_mb} MB" if self.memory_mb is not None else ""
            parts.append(f"MemoryError: the code exceeded the memory limit{limit}")
        elif err:
            parts.append(err)
        if self.truncated:
            cap = f" to {self.output_limit} bytes" if self.output_limit else ""
            parts.append(f"[output truncated{cap}; execution was stopped]")
        if not parts:
            if self.status == "ok":
                return "[the code ran without error and printed nothing; use print() to show a value]"
            code = f" with exit code {self.exit_code}" if self.exit_code is not None else ""
            return f"[the code failed{code} and printed nothing]"
        return "\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
