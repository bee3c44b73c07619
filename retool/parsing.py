"""Tool-call and final-answer extraction from model text.

Three call forms are accepted, in this order of precedence:
- ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (the Tool Format of the system prompt);
  models often write the code string with raw newlines, unescaped quotes or backslashes, so the JSON is
  read leniently before giving up;
- ``<code>```python ...```</code>`` (the ReTool-SFT form; the Markdown fences are removed before the code
  runs);
- a bare fenced ```python block, only when no tagged call is present (``markdown_fallback``).
A call that cannot be read becomes a ToolCall with ``error`` set, so the episode loop can tell the model
what was wrong instead of dropping the call silently.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

CallFormat = Literal["tool_call", "code", "markdown"]

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
CODE_OPEN, CODE_CLOSE = "<code>", "</code>"
#: Stop strings that end a generation right after a call closes.
CALL_STOP_STRINGS = [TOOL_CALL_CLOSE, CODE_CLOSE]
DEFAULT_TOOL_NAME = "code_interpreter"

_OPEN_RE = re.compile(r"<tool_call>|<code>|</tool_call>|</code>")
_FENCE_RE = re.compile(r"^\s*```[ \t]*([\w+.-]*)[ \t]*\n?(.*?)\n?[ \t]*```\s*$", re.DOTALL)
_FENCE_OPEN_RE = re.compile(r"^\s*```[ \t]*[\w+.-]*[ \t]*\n")
_MD_BLOCK_RE = re.compile(r"```[ \t]*(python3?|py)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_CODE_KEY_RE = re.compile(r'"code"\s*:\s*"')
_NAME_RE = re.compile(r'"name"\s*:\s*"([^"\\]*)"')
_VALID_ESCAPES = set('"\\/bfnrtu')


@dataclass
class ToolCall:
    """One tool call found in model text. ``start``/``end`` are character offsets of the whole call
    (tags included) in the parsed text; ``closed`` is False for a call cut off before its closing tag."""

    name: str
    arguments: dict[str, Any]
    error: str | None
    fmt: CallFormat
    start: int = 0
    end: int = 0
    closed: bool = True
    raw: str = field(default="", repr=False)

    @property
    def code(self) -> str | None:
        value = self.arguments.get("code")
        return value if isinstance(value, str) else None


def strip_code_fences(code: str) -> str:
    """Remove a surrounding Markdown fence (```python ... ```), or a lone opening fence."""
    match = _FENCE_RE.match(code)
    if match:
        return match.group(2).strip("\n")
    opened = _FENCE_OPEN_RE.match(code)
    if opened:
        return code[opened.end() :].rstrip().removesuffix("```").rstrip("\n")
    return code.strip("\n")


def _escape_json_string_body(body: str) -> str:
    """Make the inside of a JSON string literal valid: escape bare quotes, raw control characters
    and backslashes that do not start a JSON escape."""
    out: list[str] = []
    i, n = 0, len(body)
    while i < n:
        ch = body[i]
        if ch == "\\":
            nxt = body[i + 1] if i + 1 < n else ""
            if nxt in _VALID_ESCAPES and nxt:
                if nxt == "u" and not re.fullmatch(r"[0-9a-fA-F]{4}", body[i + 2 : i + 6]):
                    out.append("\\\\")
                    i += 1
                    continue
                out.append(ch + nxt)
                i += 2
                continue
            out.append("\\\\")
            i += 1
            continue
        if ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def _repair_code_call(body: str) -> dict[str, Any] | None:
    """Recover ``{"name": N, "arguments": {"code": "<anything>"}}`` whose code string is not valid
    JSON (unescaped quotes, stray backslashes): the code runs from the opening quote after "code": to
    the last quote before the closing braces."""
    key = _CODE_KEY_RE.search(body)
    if not key:
        return None
    tail = re.search(r'"\s*}\s*}\s*$', body) or re.search(r'"\s*}\s*$', body)
    if not tail or tail.start() < key.end():
        return None
    raw_code = body[key.end() : tail.start()]
    try:
        code = json.loads('"' + _escape_json_string_body(raw_code) + '"')
    except json.JSONDecodeError:
        return None
    name_match = _NAME_RE.search(body[: key.start()]) or _NAME_RE.search(body)
    name = name_match.group(1) if name_match else DEFAULT_TOOL_NAME
    return {"name": name, "arguments": {"code": code}}


def _load_call_json(body: str) -> tuple[dict[str, Any] | None, str | None]:
    text = body.strip()
    if not text:
        return None, "the <tool_call> block is empty"
    for attempt in (lambda: json.loads(text), lambda: json.loads(text, strict=False)):
        try:
            value = attempt()
        except (json.JSONDecodeError, ValueError):
            continue
        if isinstance(value, dict):
            return value, None
        return None, f"the <tool_call> block holds a JSON {type(value).__name__}, not an object"
    repaired = _repair_code_call(text)
    if repaired is not None:
        return repaired, None
    try:
        value = ast.literal_eval(text)
        if isinstance(value, dict):
            return value, None
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        pass
    try:
        json.loads(text, strict=False)
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON in <tool_call>: {exc.msg} at line {exc.lineno} column {exc.colno}"
    return None, "invalid JSON in <tool_call>"


def _tool_call_from_body(body: str, start: int, end: int, raw: str) -> ToolCall:
    data, error = _load_call_json(body)
    if data is None:
        return ToolCall("", {}, error, "tool_call", start, end, True, raw)
    name = data.get("name")
    if not isinstance(name, str) or not name:
        return ToolCall("", {}, 'the tool call has no "name" string', "tool_call", start, end, True, raw)
    args = data.get("arguments", data.get("parameters"))
    if isinstance(args, str):
        try:
            args = json.loads(args, strict=False)
        except json.JSONDecodeError:
            args = {"code": args} if name == DEFAULT_TOOL_NAME else None
    if args is None:
        return ToolCall(
            name, {}, 'the tool call has no "arguments" object', "tool_call", start, end, True, raw
        )
    if not isinstance(args, dict):
        return ToolCall(
            name,
            {},
            f'"arguments" must be a JSON object, got {type(args).__name__}',
            "tool_call",
            start,
            end,
            True,
            raw,
        )
    code = args.get("code")
    if isinstance(code, str):
        args = {**args, "code": strip_code_fences(code)}
    return ToolCall(name, args, None, "tool_call", start, end, True, raw)


def _code_call_from_body(body: str, start: int, end: int, raw: str) -> ToolCall:
    code = strip_code_fences(body)
    if not code.strip():
        return ToolCall(
            DEFAULT_TOOL_NAME, {"code": ""}, "the <code> block holds no code", "code", start, end, True, raw
        )
    return ToolCall(DEFAULT_TOOL_NAME, {"code": code}, None, "code", start, end, True, raw)


def parse_tool_calls(text: str, *, markdown_fallback: bool = True) -> list[ToolCall]:
    """All tool calls in ``text``, in order. Unclosed calls come back with ``closed=False`` and an
    error; a closing tag without its opening tag comes back as an error call too."""
    calls: list[ToolCall] = []
    pos = 0
    while True:
        match = _OPEN_RE.search(text, pos)
        if not match:
            break
        tag = match.group(0)
        if tag.startswith("</"):
            opener = TOOL_CALL_OPEN if tag == TOOL_CALL_CLOSE else CODE_OPEN
            fmt: CallFormat = "tool_call" if tag == TOOL_CALL_CLOSE else "code"
            calls.append(
                ToolCall(
                    DEFAULT_TOOL_NAME if fmt == "code" else "",
                    {},
                    f"found {tag} without a matching {opener}",
                    fmt,
                    match.start(),
                    match.end(),
                    True,
                    tag,
                )
            )
            pos = match.end()
            continue
        closer = TOOL_CALL_CLOSE if tag == TOOL_CALL_OPEN else CODE_CLOSE
        close_at = text.find(closer, match.end())
        if close_at < 0:
            fmt = "tool_call" if tag == TOOL_CALL_OPEN else "code"
            calls.append(
                ToolCall(
                    DEFAULT_TOOL_NAME if fmt == "code" else "",
                    {},
                    f"{tag} was opened but never closed with {closer}",
                    fmt,
                    match.start(),
                    len(text),
                    False,
                    text[match.start() :],
                )
            )
            break
        end = close_at + len(closer)
        body = text[match.end() : close_at]
        raw = text[match.start() : end]
        if tag == TOOL_CALL_OPEN:
            calls.append(_tool_call_from_body(body, match.start(), end, raw))
        else:
            calls.append(_code_call_from_body(body, match.start(), end, raw))
        pos = end
    if calls or not markdown_fallback:
        return calls
    for block in _MD_BLOCK_RE.finditer(text):
        code = block.group(2).strip("\n")
        if code.strip():
            calls.append(
                ToolCall(
                    DEFAULT_TOOL_NAME,
                    {"code": code},
                    None,
                    "markdown",
                    block.start(),
                    block.end(),
                    True,
                    block.group(0),
                )
            )
    return calls


def _boxed_spans(text: str) -> list[tuple[int, int, int]]:
    """(command start, content start, content end) of every closed \\boxed{...} / \\fbox{...}."""
    spans: list[tuple[int, int, int]] = []
    for match in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, match.end()
        while i < len(text) and depth:
            ch = text[i]
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            i += 1
        if depth == 0:
            spans.append((match.start(), match.end(), i - 1))
    return spans


def extract_answer(text: str) -> str | None:
    """The content of the last closed ``\\boxed{...}`` (nested braces allowed), stripped; None when
    there is none."""
    spans = _boxed_spans(text)
    if not spans:
        return None
    _, start, end = spans[-1]
    return text[start:end].strip()


def last_answer_position(text: str) -> int | None:
    """Character offset of the last closed ``\\boxed{`` in ``text`` (None when there is none)."""
    spans = _boxed_spans(text)
    return spans[-1][0] if spans else None
