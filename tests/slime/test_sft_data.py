"""The SFT parquet as slime reads it: pyarrow rows whose messages are lists of dicts."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retool.backends.slime.sft_data import prepare_sft_parquet
from retool.tools import CODE_INTERPRETER_SPEC


def write(path: Path, convs: list[list[dict]]) -> None:
    pq.write_table(
        pa.table({"messages": [json.dumps(c) for c in convs], "source_index": list(range(len(convs)))}), path
    )


def test_rows_become_message_lists_with_tools(tmp_path: Path) -> None:
    with_tool = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": '<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "print(2+2)"}}\n</tool_call>'},
        {"role": "tool", "content": "4"},
        {"role": "assistant", "content": "\\boxed{4}"},
    ]  # fmt: skip
    plain = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "\\boxed{2}"}]
    write(tmp_path / "in.parquet", [with_tool, plain])
    n = prepare_sft_parquet(tmp_path / "in.parquet", tmp_path / "out" / "sft.parquet")
    assert n == 2
    # read exactly the way slime's read_file does
    rows = [r for b in pq.ParquetFile(tmp_path / "out" / "sft.parquet").iter_batches() for r in b.to_pylist()]
    assert rows[0]["messages"] == with_tool and rows[1]["messages"] == plain
    assert json.loads(rows[0]["tools"]) == [CODE_INTERPRETER_SPEC] and rows[1]["tools"] is None
    assert [r["source_index"] for r in rows] == [0, 1]
    assert not list((tmp_path / "out").glob(".*"))


def test_bad_rows_are_named(tmp_path: Path) -> None:
    write(tmp_path / "a.parquet", [[{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]])
    with pytest.raises(ValueError, match="row 0: message 1"):
        prepare_sft_parquet(tmp_path / "a.parquet", tmp_path / "b.parquet")
    write(tmp_path / "c.parquet", [[{"role": "user", "content": "q"}]])
    with pytest.raises(ValueError, match="last message must be the assistant"):
        prepare_sft_parquet(tmp_path / "c.parquet", tmp_path / "d.parquet")
    assert not (tmp_path / "b.parquet").exists()
