"""Tool-call and answer extraction edge cases."""

from __future__ import annotations

import json

import pytest

from retool.parsing import extract_answer, parse_tool_calls, strip_code_fences


def _tc(code_json: str, name: str = "code_interpreter") -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {{"code": {code_json}}}}}\n</tool_call>'


def test_valid_tool_call() -> None:
    text = "I will compute.\n" + _tc(json.dumps("print(1 + 1)"))
    [call] = parse_tool_calls(text)
    assert (call.name, call.code, call.error, call.fmt, call.closed) == (
        "code_interpreter",
        "print(1 + 1)",
        None,
        "tool_call",
        True,
    )
    assert text[call.start : call.end].startswith("<tool_call>") and text[call.start : call.end].endswith(
        "</tool_call>"
    )


def test_raw_newlines_and_tabs_in_code_string() -> None:
    text = _tc("\"for i in range(3):\n\tprint(i)\nprint('done')\"")
    [call] = parse_tool_calls(text)
    assert call.error is None
    assert call.code == "for i in range(3):\n\tprint(i)\nprint('done')"


def test_unescaped_quotes_in_code_string() -> None:
    text = _tc('"s = "hello"\nprint(s + "!")"')
    [call] = parse_tool_calls(text)
    assert call.error is None
    assert call.code == 's = "hello"\nprint(s + "!")'


def test_backslashes_valid_and_invalid_escapes() -> None:
    # \\n is a JSON escape for a backslash-n inside the Python string literal; \d is not a JSON escape
    text = _tc(r'"import re\nprint(re.findall(\"\d+\", \"a12b3\"), \"x\\ny\")"')
    [call] = parse_tool_calls(text)
    assert call.error is None
    assert call.code == 'import re\nprint(re.findall("\\d+", "a12b3"), "x\\ny")'


def test_arguments_as_json_string_and_fenced_code_in_tool_call() -> None:
    args = json.dumps({"code": "```python\nprint(2)\n```"})
    text = f'<tool_call>{{"name": "code_interpreter", "arguments": {json.dumps(args)}}}</tool_call>'
    [call] = parse_tool_calls(text)
    assert call.error is None and call.code == "print(2)"


def test_several_calls_in_order() -> None:
    text = _tc(json.dumps("print(1)")) + "\nand\n" + _tc(json.dumps("print(2)")) + "<code>print(3)</code>"
    calls = parse_tool_calls(text)
    assert [c.code for c in calls] == ["print(1)", "print(2)", "print(3)"]
    assert [c.fmt for c in calls] == ["tool_call", "tool_call", "code"]
    assert calls[0].end <= calls[1].start < calls[1].end <= calls[2].start


def test_code_block_fences_are_stripped() -> None:
    text = "Let me check.\n<code>\n```python\nimport math\nprint(math.factorial(5))\n```\n</code>"
    [call] = parse_tool_calls(text)
    assert call.fmt == "code" and call.error is None
    assert call.code == "import math\nprint(math.factorial(5))"
    assert "```" not in call.code


def test_code_block_without_fences_and_with_unclosed_fence() -> None:
    assert parse_tool_calls("<code>print(7)</code>")[0].code == "print(7)"
    assert parse_tool_calls("<code>```py\nprint(8)\n</code>")[0].code == "print(8)"
    assert strip_code_fences("```\nx = 1\n```") == "x = 1"


def test_markdown_fallback_only_without_tagged_calls() -> None:
    text = "Compute:\n```python\nprint(3 * 3)\n```\nThen more.\n```output\n9\n```"
    [call] = parse_tool_calls(text)
    assert (call.fmt, call.code) == ("markdown", "print(3 * 3)")
    assert parse_tool_calls(text, markdown_fallback=False) == []
    tagged = text + "\n<code>print(1)</code>"
    assert [c.fmt for c in parse_tool_calls(tagged)] == ["code"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("", "empty"),
        ('{"name": "code_interpreter", "arguments": {"code": "print(1)"', "invalid JSON"),
        ('["code_interpreter"]', "not an object"),
        ('{"arguments": {"code": "print(1)"}}', '"name"'),
        ('{"name": "code_interpreter"}', '"arguments"'),
        ('{"name": "code_interpreter", "arguments": 5}', "must be a JSON object"),
    ],
)
def test_malformed_tool_call_reports_what_is_wrong(body: str, needle: str) -> None:
    [call] = parse_tool_calls(f"<tool_call>{body}</tool_call>")
    assert call.error is not None and needle in call.error
    assert call.closed


def test_unclosed_and_stray_tags() -> None:
    [call] = parse_tool_calls('text <tool_call>\n{"name": "code_interpreter", "arguments": {"code": "pri')
    assert not call.closed and "never closed" in (call.error or "")
    [stray] = parse_tool_calls("oops </code> here")
    assert stray.error is not None and "without a matching <code>" in stray.error
    [empty] = parse_tool_calls("<code>\n```python\n```\n</code>")
    assert empty.error is not None and "no code" in empty.error


def test_python_dict_literal_is_accepted() -> None:
    [call] = parse_tool_calls(
        "<tool_call>{'name': 'code_interpreter', 'arguments': {'code': 'print(5)'}}</tool_call>"
    )
    assert call.error is None and call.code == "print(5)"


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\{1, 2\\} \\cup \\{3\\}}", "\\{1, 2\\} \\cup \\{3\\}"),
        ("\\boxed{a^{b^{c}}} and a dangling \\boxed{unclosed", "a^{b^{c}}"),
        ("\\boxed { 7 }", "7"),
        ("\\fbox{9}", "9"),
        ("no answer here", None),
        ("\\boxed{", None),
    ],
)
def test_extract_answer(text: str, answer: str | None) -> None:
    assert extract_answer(text) == answer
