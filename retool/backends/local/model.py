"""The tiny Qwen3-architecture model and its byte-level tokenizer, saved in the Hugging Face layout.

The tokenizer is byte-level with no merges (every byte is a token, so any text round-trips and
``encode(a + b) == encode(a) + encode(b)`` away from added tokens) plus added tokens for the chat
markers, the Tool Format's tags and the long fixed strings of the tool prompt: this keeps sequences
short on the CPU without a learned vocabulary. The saved folder loads with ``AutoTokenizer`` /
``AutoModelForCausalLM`` exactly like Qwen3-4B.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from retool.backends.local.config import LocalConfig, LocalModelConfig

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|endoftext|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END]
TAG_TOKENS = [
    "<code>",
    "</code>",
    "<interpreter>",
    "</interpreter>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<tools>",
    "</tools>",
    "<think>",
    "</think>",
    "\\boxed{",
]

TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_FOOTER = (
    "</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)

# role headers after <|im_start|>, one token each (non-special, so decoding keeps them)
ROLE_TOKENS = ["system\n", "user\n", "assistant\n"]

# Qwen-style ChatML with tools: the system turn lists the tools, assistant tool calls render as
# <tool_call> JSON, consecutive tool results share one user turn of <tool_response> blocks.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages and messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- " + json.dumps(TOOLS_HEADER) + " }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n' + " + json.dumps(TOOLS_FOOTER) + " + '<|im_end|>\\n' }}"
    "{%- elif messages and messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first %}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') }}"
    "{%- if message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{%- for tc in message['tool_calls'] %}"
    "{%- set f = tc['function'] if tc.get('function') else tc %}"
    "{%- if (message['content'] or '') or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + f['name'] + '\", \"arguments\": ' }}"
    "{%- if f['arguments'] is string %}{{- f['arguments'] }}{%- else %}{{- f['arguments'] | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def tool_spec() -> dict[str, Any]:
    """The code_interpreter spec (retool.tools is its one source of truth)."""
    from retool.tools import CODE_INTERPRETER_SPEC

    return dict(CODE_INTERPRETER_SPEC)


def fixed_prompt_tokens() -> list[str]:
    """The long fixed strings of the tool prompt, each made a single token."""
    lines = [ln for ln in (TOOLS_HEADER + "\n" + TOOLS_FOOTER).split("\n") if len(ln) > 8]
    try:
        from retool.prompts import DEFAULT_SYSTEM_PROMPT

        lines.append(DEFAULT_SYSTEM_PROMPT)
    except Exception:
        pass
    return [json.dumps(tool_spec(), ensure_ascii=False), *lines]


def harvest_lines(texts: Iterable[str], min_count: int, min_chars: int) -> list[str]:
    """Lines that recur at least ``min_count`` times (fixed prompt text), longest first."""
    if min_count <= 0:
        return []
    counts: Counter[str] = Counter()
    for text in texts:
        for line in set(text.split("\n")):
            if len(line) >= min_chars:
                counts[line] += 1
    return sorted((ln for ln, c in counts.items() if c >= min_count), key=lambda s: (-len(s), s))


def _corpus_prompts(paths: Sequence[str | os.PathLike[str]], limit: int = 20000) -> list[str]:
    """Message texts of the corpus (jsonl/parquet of messages, or prompt jsonl) for harvesting."""
    out: list[str] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"tokenizer corpus file not found: {path}")
        rows: list[dict[str, Any]] = []
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()[:limit]
        else:
            with path.open(encoding="utf-8") as fh:
                for i, line in enumerate(fh):
                    if i >= limit:
                        break
                    if line.strip():
                        rows.append(json.loads(line))
        for row in rows:
            msgs = row.get("messages")
            if isinstance(msgs, str):
                msgs = json.loads(msgs)
            if msgs:
                out.extend(m.get("content") or "" for m in msgs)
            elif "prompt" in row:
                p = row["prompt"]
                out.append(p if isinstance(p, str) else json.dumps(p))
    return out


def build_tokenizer(cfg: LocalModelConfig, corpus_texts: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """Byte alphabet + chat specials + Tool Format tags + fixed prompt strings as added tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=IM_END,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
        model_max_length=cfg.max_position_embeddings,
    )
    tok.add_special_tokens({"additional_special_tokens": [IM_START]})
    extra: list[str] = []
    for s in [
        *TAG_TOKENS,
        *ROLE_TOKENS,
        *fixed_prompt_tokens(),
        *cfg.extra_tokens,
        *harvest_lines(corpus_texts, cfg.harvest_min_count, cfg.harvest_min_chars),
    ]:
        if s and s not in extra and s not in SPECIAL_TOKENS:
            extra.append(s)
    tok.add_tokens([AddedToken(s, normalized=False, special=False) for s in extra])
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def build_model(cfg: LocalModelConfig, tokenizer: PreTrainedTokenizerFast, seed: int) -> Qwen3ForCausalLM:
    """A freshly initialized Qwen3ForCausalLM sized by ``cfg`` (fp32)."""
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=int(tokenizer.convert_tokens_to_ids(IM_START)),  # type: ignore[arg-type]
        eos_token_id=int(tokenizer.convert_tokens_to_ids(IM_END)),  # type: ignore[arg-type]
        pad_token_id=int(tokenizer.convert_tokens_to_ids(PAD)),  # type: ignore[arg-type]
        use_cache=True,
    )
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id
    )
    return model


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; naming ``cuda`` without one is an error, not a silent CPU run."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("local.device is 'cuda' but torch sees no CUDA device")
    return torch.device(device)


def save_pretrained_atomic(model: Any, tokenizer: Any, out_dir: str | os.PathLike[str]) -> Path:
    """Write model + tokenizer to a temp sibling folder, then swap it into place."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old.{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"
    return tok


def load_model(path: str | os.PathLike[str], cfg: LocalConfig | None = None) -> Any:
    """Load a saved checkpoint onto the configured device in the configured dtype."""
    cfg = cfg or LocalConfig()
    if not (Path(path) / "config.json").exists():
        raise FileNotFoundError(f"no Hugging Face model at {path} (config.json missing)")
    dtype = torch.float32 if cfg.dtype == "float32" else torch.bfloat16
    model: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(resolve_device(cfg.device))


def build_and_save(
    cfg: LocalConfig, corpus_paths: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str]
) -> Path:
    """Tokenizer (harvesting fixed lines from the corpus) + fresh model, saved in HF layout."""
    texts = _corpus_prompts(corpus_paths) if corpus_paths else []
    tok = build_tokenizer(cfg.model, texts)
    model = build_model(cfg.model, tok, cfg.seed)
    return save_pretrained_atomic(model, tok, out_dir)
