"""RL/eval loaders on both DAPO layouts; schema errors name file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retool.data import Problem, ProblemSchemaError, load_problems

DAPO_PROMPT = "Solve the following math problem step by step.\n\nWhat is 1+1?"


def _jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_flat_layout(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "aime-2024.jsonl",
        [{"prompt": "Find x.", "label": "204"}, {"prompt": "Find y.", "label": 7, "id": 9}],
    )
    assert load_problems(path) == [Problem("Find x.", "204"), Problem("Find y.", "7", id="9")]


def test_original_dapo_layout(tmp_path: Path) -> None:
    row = {
        "data_source": "math_dapo",
        "prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": DAPO_PROMPT}],
        "ability": "MATH",
        "reward_model": {"ground_truth": "2", "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": "a1b2"},
    }
    path = _jsonl(tmp_path / "dapo.jsonl", [row])
    assert load_problems(path) == [Problem(DAPO_PROMPT, "2", id="a1b2")]


def test_dapo_layout_in_parquet_directory(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    msgs = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    table = pa.table(
        {
            "prompt": pa.array(
                [[{"role": "user", "content": "q1"}], [{"role": "user", "content": "q2"}]], msgs
            ),
            "reward_model": [{"ground_truth": "1", "style": "rule"}, {"ground_truth": "2", "style": "rule"}],
        }
    )
    pq.write_table(table, tmp_path / "data" / "train.parquet")
    _jsonl(tmp_path / "data" / "more.jsonl", [{"prompt": "q3", "label": "3"}])
    assert [(p.prompt, p.label) for p in load_problems(tmp_path)] == [("q3", "3"), ("q1", "1"), ("q2", "2")]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"question": "x", "label": "1"}, "no 'prompt' field"),
        ({"prompt": "x"}, "no 'label' and no 'reward_model.ground_truth'"),
        ({"prompt": "", "label": "1"}, "'prompt' must be a non-empty string"),
        ({"prompt": [{"role": "system", "content": "s"}], "label": "1"}, "without a user message"),
        ({"prompt": "x", "label": {"a": 1}}, "'label' must be a non-empty string or number"),
        ({"prompt": "x", "reward_model": {"style": "rule"}}, "no 'label' and no 'reward_model.ground_truth'"),
        ([1, 2], "row is a list"),
    ],
)
def test_schema_errors_name_file_and_line(tmp_path: Path, row: object, message: str) -> None:
    path = _jsonl(tmp_path / "rl.jsonl", [{"prompt": "ok", "label": "1"}, row])
    with pytest.raises(ProblemSchemaError) as err:
        load_problems(path)
    assert f"{path}:2: " in str(err.value) and message in str(err.value)


def test_bad_json_empty_and_missing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok", "label": "1"}\n\n{oops\n')
    with pytest.raises(ProblemSchemaError, match=r"bad\.jsonl:3: not valid JSON"):
        load_problems(bad)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ProblemSchemaError, match="no problems"):
        load_problems(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError):
        load_problems(tmp_path / "absent.jsonl")
