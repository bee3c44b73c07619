"""SFT: masks on real tokenized examples, the loss falls, checkpoints resume where they stopped."""

from __future__ import annotations

import json

import pytest
import torch

from retool.backends.local.checkpoint import latest_checkpoint, load_trainer_state
from retool.backends.local.model import load_model, load_tokenizer, tool_spec
from retool.backends.local.sft import _batches, encode_example, load_sft_parquet, train_sft
from retool.backends.local.stages import run_sft
from retool.data.sft import convert_row
from retool.prompts import format_interpreter


def _trained_text(tok, ex) -> str:
    pieces = [tok.decode([t]) for t in ex.input_ids]
    return "".join(p if m else "\x00" * len(p) for p, m in zip(pieces, ex.loss_mask, strict=True))


def test_masks_exclude_observations_prompts_and_tool_turns(base_dir):
    tok = load_tokenizer(base_dir)
    # a ReTool-SFT row converted by the sft_data stage into the Tool Format (tool turn)
    raw = {
        "messages": [
            {"role": "system", "content": "Use python to compute. Put the answer in \\boxed{}."},
            {"role": "user", "content": "What is 123*456?"},
            {
                "role": "assistant",
                "content": "I use python.\n<code>```python\nprint(123*456)\n```</code>\n<interpreter>\n56088\n"
                "</interpreter>\nThe answer is \\boxed{56088}.",
            },
        ]
    }
    for tool_format in (True, False):
        messages, _ = convert_row(raw, tool_format=tool_format)
        ex = encode_example(tok, messages, 1024, [tool_spec()])
        trained = _trained_text(tok, ex)
        kept = trained.replace("\x00", "")
        assert "The answer is \\boxed{56088}.<|im_end|>" in kept
        assert "123*456" in kept  # the code the model writes
        assert "What is" not in kept and "Use python" not in kept and "A tool for executing code" not in kept
        assert "56088\n" not in kept.split("\\boxed")[0]  # the tool's output is never trained
        if tool_format:
            assert "<tool_call>" in kept and "<tool_response>" not in kept
            assert kept.count("<|im_start|>") == 0  # headers of turns are the template's, not the model's
        else:
            assert "<interpreter>" not in kept and "</interpreter>" not in kept
            # the masked span is exactly the observation the episode loop inserts
            full = tok.decode(ex.input_ids)
            obs = format_interpreter("56088")
            assert obs in full
            start = full.index(obs)
            masked = trained[start : start + len(obs)]
            assert set(masked) == {"\x00"}


def test_bad_rows_are_named(tmp_path, base_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"messages": ["not json"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="row 0"):
        load_sft_parquet(tmp_path / "bad.parquet")
    tok = load_tokenizer(base_dir)
    with pytest.raises(ValueError, match="no assistant"):
        encode_example(tok, [{"role": "user", "content": "x"}], 64)
    with pytest.raises(ValueError, match="message 0"):
        encode_example(tok, [{"role": "robot", "content": "x"}], 64)


def test_sft_loss_falls_and_resumes_from_the_last_checkpoint(tmp_path, cfg, base_dir, data_dir):
    out = tmp_path / "sft"
    result = run_sft(cfg, data_dir["sft"], base_dir, out)
    assert result["steps"] == cfg.sft.max_steps
    assert result["final_loss"] < 0.6 * result["first_loss"], result
    history = json.loads((out / "sft_history.json").read_text())
    assert len(history) == cfg.sft.max_steps and all(h["lr"] > 0 for h in history)
    # the published model reloads with the Auto classes and is not the base model
    model = load_model(out)
    base = load_model(base_dir)
    assert not torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)

    # a run killed after step 20 (checkpoint at 20) resumes at 20 and ends where an unbroken run ends
    tok = load_tokenizer(base_dir)
    examples = [
        encode_example(tok, m, cfg.sft.max_seq_len, [tool_spec()]) for m in load_sft_parquet(data_dir["sft"])
    ]
    root = tmp_path / "ckpt"
    first = train_sft(cfg, load_model(base_dir), tok, examples, root, stop_after=20)
    assert first["steps"] == 20
    ckpt = latest_checkpoint(root)
    assert ckpt is not None and ckpt.name == "step-000020"
    assert load_trainer_state(ckpt, restore_rng=False)["step"] == 20
    resumed_model = load_model(base_dir)
    second = train_sft(cfg, resumed_model, tok, examples, root)
    assert second["resumed_from"] == 20 and second["steps"] == cfg.sft.max_steps
    assert len(second["history"]) == cfg.sft.max_steps
    assert second["history"][-1]["loss"] == pytest.approx(result["final_loss"], rel=1e-3)
    for a, b in zip(resumed_model.parameters(), model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-4)


def test_batches_mix_problem_kinds_and_cover_every_example_once():
    """Regression: length-sorted batches held one problem kind each (the kinds differ in length), and
    the tiny model then never learned to copy operands. Batches must be uniform shuffles."""
    n, bs = 3000, 32
    kind = [i % 3 for i in range(n)]  # three kinds, interleaved like the synthetic task's
    for epoch in (0, 1):
        batches = _batches(n, bs, seed=0, epoch=epoch)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(n))
        assert all(len(b) == bs for b in batches[:-1])
        mixed = sum(len({kind[i] for i in b}) == 3 for b in batches)
        assert mixed / len(batches) > 0.95
    assert _batches(n, bs, 0, 0) != _batches(n, bs, 0, 1)  # a new order each epoch
    assert _batches(n, bs, 0, 0) == _batches(n, bs, 0, 0)  # deterministic for a resume
