"""The Tool Format prompt: chat template when it renders tools, our own rendering otherwise."""

from __future__ import annotations

import json

from retool.prompts import (
    DEFAULT_SYSTEM_PROMPT,
    build_prompt,
    format_interpreter,
    render_own_template,
    render_tool_turn,
    supports_tools,
)

SPEC = {
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
# DESIGN.md's Tool Format, verbatim
SPEC_LINE = (
    '{"type": "function", "function": {"name": "code_interpreter", "description": "A tool for executing code.", '
    '"parameters": {"type": "object", "properties": {"code": {"type": "string", "description": "The code to '
    'execute."}}, "required": ["code"]}}}'
)
INSTRUCTION = (
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)


def test_tool_format_through_the_chat_template(tokenizer) -> None:
    assert supports_tools(tokenizer)
    rendered = build_prompt(tokenizer, "What is 2+2?", tools=[SPEC], system_prompt="Be brief.")
    text = rendered.text
    assert rendered.chat_template
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert f"<tools>\n{SPEC_LINE}\n</tools>" in text
    assert INSTRUCTION in text
    # the newline after the role header is kept (the reference's template strips it)
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n" in text
    assert text.endswith("<|im_start|>assistant\n") and text.count("<|im_start|>assistant") == 1
    assert rendered.token_ids == tokenizer.encode(text, add_special_tokens=False)
    assert json.loads(SPEC_LINE) == SPEC


def test_own_rendering_matches_a_tool_aware_template(tokenizer, plain_tokenizer, bare_tokenizer) -> None:
    reference = build_prompt(tokenizer, "Q?", tools=[SPEC], system_prompt="S")
    for tok in (plain_tokenizer, bare_tokenizer):
        assert not supports_tools(tok)
        own = build_prompt(tok, "Q?", tools=[SPEC], system_prompt="S")
        assert not own.chat_template
        assert own.text == reference.text


def test_system_prompt_is_a_parameter(tokenizer) -> None:
    default = build_prompt(tokenizer, "Q", tools=[SPEC])
    assert DEFAULT_SYSTEM_PROMPT in default.text
    none = build_prompt(tokenizer, "Q", tools=[SPEC], system_prompt=None)
    assert none.text.startswith("<|im_start|>system\n# Tools")
    conversation = [{"role": "system", "content": "Mine"}, {"role": "user", "content": "Q"}]
    kept = build_prompt(tokenizer, conversation, tools=[SPEC], system_prompt="ignored")
    assert "Mine\n\n# Tools" in kept.text and "ignored" not in kept.text
    no_tools = build_prompt(tokenizer, "Q", tools=[], system_prompt="S")
    assert "# Tools" not in no_tools.text and no_tools.text.startswith("<|im_start|>system\nS<|im_end|>")


def test_tool_turn_follows_the_template(tokenizer, bare_tokenizer) -> None:
    turn = render_tool_turn(tokenizer, ["4", "Error: x"], tools=[SPEC])
    assert turn == (
        "<|im_end|>\n<|im_start|>user\n<tool_response>\n4\n</tool_response>\n<tool_response>\nError: x\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_tool_turn(bare_tokenizer, ["4", "Error: x"], tools=[SPEC]) == turn
    # results are inserted literally (no template escaping of braces or tags)
    assert "{{x}} <b>" in render_tool_turn(tokenizer, ["{{x}} <b>"], tools=[SPEC])
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "A"},
        {"role": "tool", "content": "4"},
    ]
    assert render_own_template(messages, None).endswith(
        "A<|im_end|>\n<|im_start|>user\n<tool_response>\n4\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )


def test_interpreter_observation() -> None:
    assert format_interpreter("45") == "\n<interpreter>\n45\n</interpreter>\n"
