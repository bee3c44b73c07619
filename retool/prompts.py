"""The Tool Format prompt and the observation turns, rendered one way for every backend.

``build_prompt`` is the one function that turns a question into prompt tokens. A tokenizer whose chat
template understands ``tools`` (Qwen3's does) renders it; otherwise our own ChatML rendering of the same
Tool Format is used. Tool results go back the way the template expects (its tool turn) for
``<tool_call>`` calls and as ``<interpreter>...</interpreter>`` text for ReTool-SFT ``<code>`` calls.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant that solves math problems step by step. You can run Python code with the "
    "code_interpreter tool to compute, check and explore; read its output before you continue. "
    "Put the final answer within \\boxed{}."
)

_TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_INSTRUCTION = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
_PROBE_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {"name": "retool_template_probe", "description": "probe", "parameters": {"type": "object"}},
}
_SENTINEL = "\u2063RETOOL_ASSISTANT_END\u2063"
_RESULT_SLOT = "\u2063RETOOL_RESULT_{}\u2063"


def default_tools() -> list[dict[str, Any]]:
    """The code interpreter's spec (owned by retool.tools)."""
    from retool.tools import CODE_INTERPRETER_SPEC

    return [CODE_INTERPRETER_SPEC]


@dataclass
class RenderedPrompt:
    """A prompt ready for the engine. ``chat_template`` is False when our own rendering was used."""

    text: str
    token_ids: list[int]
    chat_template: bool = True


def build_messages(question: str | list[dict[str, Any]], system_prompt: str | None) -> list[dict[str, Any]]:
    """Chat messages for a question (a string) or a conversation; a system prompt already present in
    the conversation is kept, otherwise ``system_prompt`` is prepended when given."""
    if isinstance(question, str):
        messages: list[dict[str, Any]] = [{"role": "user", "content": question}]
    elif isinstance(question, list) and all(isinstance(m, dict) and "role" in m for m in question):
        messages = [dict(m) for m in question]
    else:
        raise TypeError(
            f"question must be a string or a list of chat messages, got {type(question).__name__}"
        )
    if system_prompt and messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _tool_json(tool: dict[str, Any]) -> str:
    return json.dumps(tool, ensure_ascii=False)


def render_own_template(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, add_generation_prompt: bool = True
) -> str:
    """ChatML with the Tool Format in the system turn, for tokenizers without a tool-aware template.
    Consecutive tool messages share one user turn of ``<tool_response>`` blocks (as Qwen does)."""
    parts: list[str] = []
    rest = messages
    system = ""
    if messages and messages[0]["role"] == "system":
        system = str(messages[0]["content"])
        rest = messages[1:]
    if tools:
        head = (system + "\n\n" if system else "") + _TOOLS_PREAMBLE
        head += "".join("\n" + _tool_json(t) for t in tools) + _TOOLS_INSTRUCTION
        parts.append(f"<|im_start|>system\n{head}<|im_end|>\n")
    elif system:
        parts.append(f"<|im_start|>system\n{system}<|im_end|>\n")
    for i, message in enumerate(rest):
        role, content = message["role"], str(message.get("content") or "")
        if role == "tool":
            if i == 0 or rest[i - 1]["role"] != "tool":
                parts.append("<|im_start|>user")
            parts.append(f"\n<tool_response>\n{content}\n</tool_response>")
            if i == len(rest) - 1 or rest[i + 1]["role"] != "tool":
                parts.append("<|im_end|>\n")
        else:
            parts.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


class _TemplateInfo:
    """Per-tokenizer facts, computed once: does its template render tools, and the text pieces of a
    tool turn (so each observation costs a string join, not a Jinja render)."""

    def __init__(self, tokenizer: Any, tools: list[dict[str, Any]], kwargs: dict[str, Any]) -> None:
        self.supports_tools = False
        if getattr(tokenizer, "chat_template", None):
            try:
                probe = tokenizer.apply_chat_template(
                    [{"role": "user", "content": "x"}],
                    tools=tools or [_PROBE_TOOL],
                    tokenize=False,
                    add_generation_prompt=True,
                    **kwargs,
                )
                names = [t.get("function", {}).get("name", "") for t in (tools or [_PROBE_TOOL])]
                self.supports_tools = isinstance(probe, str) and all(n and n in probe for n in names)
            except Exception:
                self.supports_tools = False
        self._turns: dict[int, list[str]] = {}
        self._tokenizer_ref = weakref.ref(tokenizer)
        self._tools = tools
        self._kwargs = kwargs

    def tool_turn_pieces(self, n: int) -> list[str]:
        """The tool turn for n results as n+1 literal pieces around the result slots."""
        if n not in self._turns:
            slots = [_RESULT_SLOT.format(i) for i in range(n)]
            messages: list[dict[str, Any]] = [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": _SENTINEL},
                *({"role": "tool", "content": s} for s in slots),
            ]
            tokenizer = self._tokenizer_ref()
            text = None
            if self.supports_tools and tokenizer is not None:
                try:
                    text = tokenizer.apply_chat_template(
                        messages,
                        tools=self._tools or [_PROBE_TOOL],
                        tokenize=False,
                        add_generation_prompt=True,
                        **self._kwargs,
                    )
                except Exception:
                    text = None
                if text is not None and (_SENTINEL not in text or not all(s in text for s in slots)):
                    text = None
            if text is None:
                text = render_own_template(messages, None, add_generation_prompt=True)
            tail = text[text.rfind(_SENTINEL) + len(_SENTINEL) :]
            pieces: list[str] = []
            for slot in slots:
                before, tail = tail.split(slot, 1)
                pieces.append(before)
            pieces.append(tail)
            self._turns[n] = pieces
        return self._turns[n]


_INFO_LOCK = threading.Lock()
_INFO: dict[tuple[int, str, str], _TemplateInfo] = {}


def _template_info(
    tokenizer: Any, tools: list[dict[str, Any]] | None, kwargs: dict[str, Any] | None
) -> _TemplateInfo:
    tools = [_PROBE_TOOL] if tools is None else tools
    kwargs = kwargs or {}
    key = (id(tokenizer), json.dumps(tools, sort_keys=True), json.dumps(kwargs, sort_keys=True, default=str))
    with _INFO_LOCK:
        info = _INFO.get(key)
        if info is None or info._tokenizer_ref() is not tokenizer:
            info = _TemplateInfo(tokenizer, tools, kwargs)
            _INFO[key] = info
        return info


def supports_tools(tokenizer: Any, chat_template_kwargs: dict[str, Any] | None = None) -> bool:
    """Whether the tokenizer's own chat template renders the tool list."""
    return _template_info(tokenizer, None, chat_template_kwargs).supports_tools


def _backend(tokenizer: Any) -> Any:
    """The Rust tokenizer behind a fast transformers tokenizer, when using it directly gives the same
    result as the wrapper (no clean-up of spaces) -- several times cheaper per call."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    return backend


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special-token additions (what the episode loop appends)."""
    backend = _backend(tokenizer)
    if backend is not None:
        return list(backend.encode(text, add_special_tokens=False).ids)
    return list(tokenizer.encode(text, add_special_tokens=False))


def decode_ids(tokenizer: Any, ids: list[int]) -> str:
    """The text of ``ids`` with special tokens kept."""
    backend = _backend(tokenizer)
    if backend is not None:
        return str(backend.decode(list(ids), skip_special_tokens=False))
    return str(tokenizer.decode(list(ids), skip_special_tokens=False))


_PROMPT_CACHE_SIZE = 4096
_PROMPT_CACHE: OrderedDict[tuple[Any, ...], tuple[weakref.ref[Any], RenderedPrompt]] = OrderedDict()
_PROMPT_LOCK = threading.Lock()


def build_prompt(
    tokenizer: Any,
    question: str | list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None = None,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> RenderedPrompt:
    """Render a question (or a conversation) with the Tool Format and the generation prompt.

    ``tools=None`` means the code interpreter; ``tools=[]`` renders no tool section. The prompt is
    rendered exactly once: a prompt that is already templated must be passed as a RenderedPrompt to
    the episode loop instead of through here. Results are cached (n samples of one prompt render once)."""
    messages = build_messages(question, system_prompt)
    tool_list = default_tools() if tools is None else tools
    key = (
        id(tokenizer),
        json.dumps(messages, sort_keys=True, default=str),
        json.dumps(tool_list, sort_keys=True),
        json.dumps(chat_template_kwargs or {}, sort_keys=True, default=str),
    )
    with _PROMPT_LOCK:
        hit = _PROMPT_CACHE.get(key)
        if hit is not None and hit[0]() is tokenizer:
            _PROMPT_CACHE.move_to_end(key)
            cached = hit[1]
            return RenderedPrompt(cached.text, list(cached.token_ids), cached.chat_template)
    info = _template_info(tokenizer, tool_list, chat_template_kwargs)
    text: str | None = None
    if info.supports_tools or (not tool_list and getattr(tokenizer, "chat_template", None)):
        text = tokenizer.apply_chat_template(
            messages,
            tools=tool_list or None,
            tokenize=False,
            add_generation_prompt=True,
            **(chat_template_kwargs or {}),
        )
    if text is None:
        own = render_own_template(messages, tool_list, True)
        rendered = RenderedPrompt(own, encode_text(tokenizer, own), chat_template=False)
    else:
        rendered = RenderedPrompt(text, encode_text(tokenizer, text), chat_template=True)
    with _PROMPT_LOCK:
        _PROMPT_CACHE[key] = (
            weakref.ref(tokenizer),
            RenderedPrompt(rendered.text, list(rendered.token_ids), rendered.chat_template),
        )
        if len(_PROMPT_CACHE) > _PROMPT_CACHE_SIZE:
            _PROMPT_CACHE.popitem(last=False)
    return rendered


class ToolTurnRenderer:
    """Renders tool turns for one tokenizer/tool list; built once per episode so each observation is
    a string join (no template lookup)."""

    def __init__(
        self,
        tokenizer: Any,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self._info = _template_info(tokenizer, tools, chat_template_kwargs)

    def __call__(self, results: list[str]) -> str:
        if not results:
            raise ValueError("a tool turn needs at least one result")
        pieces = self._info.tool_turn_pieces(len(results))
        out = [pieces[0]]
        for result, piece in zip(results, pieces[1:], strict=True):
            out.append(result)
            out.append(piece)
        return "".join(out)


def render_tool_turn(
    tokenizer: Any,
    results: list[str],
    *,
    tools: list[dict[str, Any]] | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> str:
    """The text from the end of an assistant turn that closed with a ``</tool_call>`` up to the next
    assistant generation prompt, carrying the tool results (the chat template's tool turn)."""
    return ToolTurnRenderer(tokenizer, tools, chat_template_kwargs)(results)


def format_interpreter(output: str) -> str:
    """The ReTool-SFT observation for a ``<code>`` call."""
    return f"\n<interpreter>\n{output}\n</interpreter>\n"
