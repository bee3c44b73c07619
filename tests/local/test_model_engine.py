"""Tiny model + tokenizer round trip, and the batched engine against unbatched generation."""

from __future__ import annotations

import asyncio
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from retool.backends.local.config import smoke_config
from retool.backends.local.engine import LocalEngine
from retool.backends.local.model import IM_END, build_model, build_tokenizer, tool_spec
from retool.engines.base import Engine, SamplingParams


def test_saved_model_reloads_with_auto_classes(base_dir):
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert {"config.json", "model.safetensors"} <= {p.name for p in base_dir.iterdir()}
    assert tok.eos_token == IM_END
    # the chat template renders the Tool Format, and the long fixed lines are single tokens
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}],
        tools=[tool_spec()],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert "<tools>\n" + json.dumps(tool_spec()) + "\n</tools>" in text
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.convert_tokens_to_ids(json.dumps(tool_spec())) in ids
    assert tok.decode(ids) == text
    for tag in (
        "<code>",
        "</code>",
        "<interpreter>",
        "</interpreter>",
        "<tool_call>",
        "</tool_call>",
        "\\boxed{",
    ):
        assert len(tok.encode(tag, add_special_tokens=False)) == 1, tag
    # any text round-trips (byte level), including non-ASCII tool output
    odd = "naïve ∑ 中文 \t\x00"
    assert tok.decode(tok.encode(odd, add_special_tokens=False)) == odd
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tok))


def _engine(seed: int = 0) -> LocalEngine:
    cfg = smoke_config()
    tok = build_tokenizer(cfg.model)
    torch.manual_seed(seed)
    model = build_model(cfg.model, tok, seed).eval()
    return LocalEngine(model, tok, seed=seed)


async def test_batched_generation_matches_unbatched_greedy():
    engine = _engine()
    assert isinstance(engine, Engine)
    tok = engine.tokenizer
    prompts = [tok.encode(f"question {i}: " + "x" * (3 * i), add_special_tokens=False) for i in range(6)]
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    singles = [await engine.generate(p, params) for p in prompts]
    before = engine.forwards
    batched = await asyncio.gather(*[engine.generate(p, params) for p in prompts])
    # one prefill + (max_new_tokens - 1) decode steps for all six, not six times that
    assert engine.forwards - before <= params.max_new_tokens + 1
    for s, b in zip(singles, batched, strict=True):
        assert s.token_ids == b.token_ids
        assert len(b.logprobs) == len(b.token_ids) == 12
        assert max(abs(x - y) for x, y in zip(s.logprobs, b.logprobs, strict=True)) < 1e-4
        assert b.finish_reason == "length"


async def test_sampled_logprobs_match_a_full_forward():
    engine = _engine(1)
    tok, model = engine.tokenizer, engine.model
    prompts = [tok.encode("abc " * (i + 1), add_special_tokens=False) for i in range(4)]
    temperature = 0.7
    gens = await asyncio.gather(
        *[engine.generate(p, SamplingParams(temperature=temperature, max_new_tokens=16)) for p in prompts]
    )
    for p, g in zip(prompts, gens, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([p + g.token_ids])).logits[0, len(p) - 1 : -1] / temperature
        lp = logits.log_softmax(-1).gather(-1, torch.tensor(g.token_ids)[:, None]).squeeze(-1)
        assert (lp - torch.tensor(g.logprobs)).abs().max().item() < 1e-4


async def test_stops_on_stop_strings_and_stop_tokens_and_includes_them():
    engine = _engine(2)
    tok = engine.tokenizer
    prompt = tok.encode("hi", add_special_tokens=False)
    # find what greedy decoding writes, then ask it to stop inside that text
    free = await engine.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=20))
    text = free.text
    assert len(text) >= 6
    stop = text[3:5]
    stopped = await engine.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=20, stop=[stop]))
    assert stopped.finish_reason == "stop"
    assert stopped.text.endswith(stop) or stop in stopped.text[-(len(stop) + 8) :]
    assert stop not in tok.decode(stopped.token_ids[:-1])
    assert stopped.token_ids == free.token_ids[: len(stopped.token_ids)]
    tid = free.token_ids[4]
    by_id = await engine.generate(
        prompt, SamplingParams(temperature=0.0, max_new_tokens=20, stop_token_ids=[tid])
    )
    assert by_id.finish_reason == "stop"
    assert by_id.token_ids[-1] == tid
    assert by_id.token_ids == free.token_ids[: len(by_id.token_ids)]
