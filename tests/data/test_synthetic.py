"""The tiny synthetic task: determinism by seed, disjoint splits, traces that parse and are honest."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from retool.data import ConversionConfig, SyntheticConfig, convert_sft, load_problems, write_synthetic_task
from retool.data.sft import split_assistant
from retool.data.synthetic import run_print
from retool.prompts import format_interpreter

SMALL = SyntheticConfig(sft_size=400, train_size=120, eval_size=40)


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = write_synthetic_task(SMALL, tmp_path / "a", seed=3)
    write_synthetic_task(SMALL, tmp_path / "b", seed=3)
    write_synthetic_task(SMALL, tmp_path / "c", seed=4)
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert set(fa) == {"sft.jsonl", "train.jsonl", "eval.jsonl", "synthetic.json"}
    assert {k: v for k, v in fa.items() if k != "synthetic.json"} == {
        k: v for k, v in fb.items() if k != "synthetic.json"
    }
    assert fa["eval.jsonl"] != fc["eval.jsonl"]
    assert (a.sft_rows, a.train_rows, a.eval_rows) == (400, 120, 40)


def test_splits_are_disjoint(tmp_path: Path) -> None:
    write_synthetic_task(SMALL, tmp_path, seed=0)
    train = {p.prompt for p in load_problems(tmp_path / "train.jsonl")}
    evals = {p.prompt for p in load_problems(tmp_path / "eval.jsonl")}
    sft = [
        json.loads(line)["messages"][1]["content"]
        for line in (tmp_path / "sft.jsonl").read_text().splitlines()
    ]
    assert len(train) == 120 and len(evals) == 40 and len(set(sft)) == 400
    assert not (train & evals) and not (set(sft) & train) and not (set(sft) & evals)


def test_trace_mix_and_honest_interpreter_output(tmp_path: Path) -> None:
    cfg = SyntheticConfig(sft_size=400, train_size=10, eval_size=10, mistake_share=0.25, no_tool_share=0.05)
    report = write_synthetic_task(cfg, tmp_path, seed=1)
    assert report.traces == {"correct": 280, "mistake": 100, "no_tool": 20}
    rows = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    right = 0
    for row in rows:
        system, user, assistant = row["messages"]
        assert system == {"role": "system", "content": cfg.system_prompt}
        segs = split_assistant(assistant["content"])
        boxed = re.findall(r"\\boxed\{(-?\d+)\}", assistant["content"])
        assert len(boxed) == 1
        right += boxed[0] == row["label"]
        if row["trace"] == "no_tool":
            assert [s.kind for s in segs] == ["text"]
            continue
        code, output = segs[1].text, segs[2].text
        assert run_print(code).strip() == output == boxed[0]  # what Python prints, boxed as is
        assert format_interpreter(output) in assistant["content"]  # the observation the episode loop appends
        assert (output == row["label"]) == (row["trace"] == "correct")
        assert len(assistant["content"]) < 150  # short and regular for a tiny model
    assert right / len(rows) == report.sft_correct_share
    assert 0.70 <= report.sft_correct_share <= 0.75


def test_parquet_sft_converts(tmp_path: Path) -> None:
    cfg = SyntheticConfig(sft_size=50, train_size=5, eval_size=5, sft_format="parquet", kinds=["mod"])
    write_synthetic_task(cfg, tmp_path / "raw", seed=2)
    assert pq.read_table(tmp_path / "raw" / "sft.parquet").num_rows == 50
    report = convert_sft(
        tmp_path / "raw" / "sft.parquet", tmp_path / "sft.parquet", ConversionConfig(), progress=False
    )
    assert report.rows_out == 50 and report.rows_skipped == 0
    assert all("mod" in p.prompt for p in load_problems(tmp_path / "raw" / "eval.jsonl"))


def test_config_validation() -> None:
    with pytest.raises(ValidationError, match="mistake_share"):
        SyntheticConfig(mistake_share=0.9, no_tool_share=0.2)
    with pytest.raises(ValidationError, match="sft_sise"):
        SyntheticConfig(sft_sise=3)  # type: ignore[call-arg]
