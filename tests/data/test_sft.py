"""ReTool-SFT conversion on hand-written rows: every segment kind, every row error, both error modes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retool.data import ConversionConfig, RowError, convert_sft, read_converted
from retool.data.sft import convert_row, split_assistant, tool_call_text

SYS = {"role": "system", "content": "You may run python."}
USER = {"role": "user", "content": "What is 2**10 + 3**5?"}
ASSISTANT = (
    "First the power of two.\n"
    "<code>\n```python\nprint(2**10)\n```\n</code>\n"
    "<interpreter>\n1024\n</interpreter>\n"
    "Now three.<code>```py\nx = 3**5\nprint(x)\n```</code><interpreter>243</interpreter>"
    "And a bare block: <code>print(1024 + 243)</code>\n<interpreter>1267\n</interpreter>\n"
    "So the answer is \\boxed{1267}."
)


def good_row() -> dict[str, Any]:
    return {"messages": [SYS, USER, {"role": "assistant", "content": ASSISTANT}]}


def test_segments_of_every_kind() -> None:
    segs = split_assistant(ASSISTANT)
    assert [s.kind for s in segs] == [
        "text",
        "code",
        "output",
        "text",
        "code",
        "output",
        "text",
        "code",
        "output",
        "text",
    ]
    codes = [s.text for s in segs if s.kind == "code"]
    assert codes == [
        "print(2**10)",
        "x = 3**5\nprint(x)",
        "print(1024 + 243)",
    ]  # fences of any language removed
    assert [s.text for s in segs if s.kind == "output"] == ["1024", "243", "1267"]


def test_tool_format_rewrite() -> None:
    messages, calls = convert_row(good_row(), tool_format=True)
    assert calls == 3
    assert [m["role"] for m in messages] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
        "tool",
        "assistant",
        "tool",
        "assistant",
    ]
    first = messages[2]["content"]
    assert first == "First the power of two.\n" + tool_call_text("print(2**10)")
    call = json.loads(first.split("<tool_call>\n")[1].split("\n</tool_call>")[0])
    assert call == {"name": "code_interpreter", "arguments": {"code": "print(2**10)"}}
    assert messages[3] == {"role": "tool", "content": "1024"}
    assert (
        json.loads(messages[4]["content"].split("\n", 2)[2].rsplit("\n", 1)[0])["arguments"]["code"]
        == "x = 3**5\nprint(x)"
    )
    assert messages[-1] == {"role": "assistant", "content": "So the answer is \\boxed{1267}."}
    assert "<code>" not in json.dumps(messages) and "<interpreter>" not in json.dumps(messages)


def test_keep_layout_and_system_override() -> None:
    messages, calls = convert_row(good_row(), tool_format=False, system_prompt="S")
    assert calls == 3
    assert messages == [{"role": "system", "content": "S"}, USER, {"role": "assistant", "content": ASSISTANT}]
    no_system, _ = convert_row(
        {"messages": [USER, {"role": "assistant", "content": "\\boxed{1}"}]}, system_prompt="S"
    )
    assert no_system[0] == {"role": "system", "content": "S"}


def test_multi_turn_and_json_string_messages() -> None:
    msgs = [
        USER,
        {"role": "assistant", "content": "\\boxed{1}"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": ASSISTANT},
    ]
    out, calls = convert_row({"messages": json.dumps(msgs)})
    assert calls == 3 and [m["role"] for m in out][:4] == ["user", "assistant", "user", "assistant"]


A = "assistant"
BAD_ROWS: list[tuple[str, Any]] = [
    ("missing_messages", {"conversation": []}),
    ("bad_messages", {"messages": []}),
    ("bad_messages", {"messages": {"role": "user"}}),
    ("bad_json", {"messages": "[{not json"}),
    ("bad_message", {"messages": ["hello"]}),
    ("unknown_role", {"messages": [USER, {"role": "robot", "content": "x"}]}),
    ("unknown_role", {"messages": [USER, {"role": "tool", "content": "x"}, {"role": A, "content": "y"}]}),
    ("bad_content", {"messages": [USER, {"role": A, "content": None}]}),
    ("misplaced_system", {"messages": [USER, SYS, {"role": A, "content": "x"}]}),
    (
        "tags_in_user",
        {"messages": [{"role": "user", "content": "<code>x</code>"}, {"role": A, "content": "x"}]},
    ),
    ("empty_assistant", {"messages": [USER, {"role": A, "content": "  \n"}]}),
    ("stray_tag", {"messages": [USER, {"role": A, "content": "x</code> \\boxed{1}"}]}),
    ("unclosed_tag", {"messages": [USER, {"role": A, "content": "<code>print(1)\n\\boxed{1}"}]}),
    ("unclosed_tag", {"messages": [USER, {"role": A, "content": "<code>print(1)</interpreter>"}]}),
    (
        "empty_code",
        {
            "messages": [
                USER,
                {"role": A, "content": "<code>```python\n```</code><interpreter></interpreter>ok"},
            ]
        },
    ),
    (
        "code_without_output",
        {
            "messages": [
                USER,
                {"role": A, "content": "<code>a=1</code><code>print(a)</code><interpreter>1</interpreter>ok"},
            ]
        },
    ),
    ("code_without_output", {"messages": [USER, {"role": A, "content": "ok <code>print(1)</code>"}]}),
    (
        "output_without_code",
        {"messages": [USER, {"role": A, "content": "<interpreter>1</interpreter> \\boxed{1}"}]},
    ),
    (
        "no_final_answer",
        {"messages": [USER, {"role": A, "content": "<code>print(1)</code><interpreter>1</interpreter>"}]},
    ),
    ("no_user", {"messages": [SYS, {"role": A, "content": "x"}]}),
    ("no_assistant", {"messages": [SYS, USER]}),
    ("assistant_first", {"messages": [{"role": A, "content": "x"}, USER, {"role": A, "content": "y"}]}),
    ("ends_without_assistant", {"messages": [USER, {"role": A, "content": "x"}, USER]}),
]


@pytest.mark.parametrize(("code", "row"), BAD_ROWS, ids=[f"{c}-{i}" for i, (c, _) in enumerate(BAD_ROWS)])
def test_each_row_error_has_its_code(code: str, row: Any) -> None:
    with pytest.raises(RowError) as err:
        convert_row(row)
    assert err.value.code == code


def _write_jsonl(path: Path, rows: list[Any], bad_line_at: int | None = None) -> None:
    lines = [json.dumps(r) for r in rows]
    if bad_line_at is not None:
        lines.insert(bad_line_at, "{this is not json")
    path.write_text("\n".join(lines) + "\n\n")


def test_raise_mode_names_the_row_and_writes_nothing(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    _write_jsonl(src, [good_row(), good_row(), {"messages": [USER, {"role": "robot", "content": "x"}]}])
    out = tmp_path / "out" / "sft.parquet"
    with pytest.raises(RowError, match=r"row 2 of .*in\.jsonl: message 1 has unknown role 'robot'"):
        convert_sft(src, out, ConversionConfig(on_error="raise"), progress=False)
    assert not out.exists() and list(out.parent.iterdir()) == []  # no temp file left either


def test_skip_mode_counts_every_skipped_row(tmp_path: Path) -> None:
    rows: list[Any] = [good_row()] + [r for _, r in BAD_ROWS] + [good_row()]
    src = tmp_path / "in.jsonl"
    _write_jsonl(src, rows, bad_line_at=1)  # a line that is not JSON at all becomes row 1
    out = tmp_path / "sft.parquet"
    report = convert_sft(src, out, ConversionConfig(on_error="skip", batch_size=4), progress=False)
    n_bad = len(BAD_ROWS) + 1
    assert (report.rows_in, report.rows_out, report.rows_skipped) == (len(rows) + 1, 2, n_bad)
    expected: dict[str, int] = {"bad_json": 1}
    for code, _ in BAD_ROWS:
        expected[code] = expected.get(code, 0) + 1
    assert report.skipped_by_reason == dict(sorted(expected.items()))
    assert report.skipped_examples[0]["index"] == 1 and report.skipped_examples[0]["reason"] == "bad_json"
    assert [i for i, _ in read_converted(out)] == [0, len(rows)]  # source_index points back at the input
    saved = json.loads(out.with_suffix(".report.json").read_text())
    assert saved["rows_skipped"] == n_bad and saved["tool_calls"] == 6


def test_parquet_directory_input_and_output_schema(tmp_path: Path) -> None:
    raw = tmp_path / "raw" / "data"
    raw.mkdir(parents=True)
    msg_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    for shard in range(2):
        table = pa.table({"messages": pa.array([good_row()["messages"]] * 3, msg_type), "id": [1, 2, 3]})
        pq.write_table(table, raw / f"train-{shard:05d}-of-00002.parquet")
    (tmp_path / "raw" / ".cache").mkdir()
    (tmp_path / "raw" / ".cache" / "junk.jsonl").write_text("not read\n")
    (tmp_path / "raw" / "dataset_info.json").write_text('{"features": {}}')  # metadata beside data files
    out = tmp_path / "sft.parquet"
    report = convert_sft(
        tmp_path / "raw", out, ConversionConfig(tool_format=True, batch_size=2), progress=False
    )
    assert (report.rows_in, report.rows_out, report.tool_calls) == (6, 6, 18)
    table = pq.read_table(out)
    assert table.schema.names == ["messages", "source_index"]
    assert (
        table.schema.field("messages").type == pa.string()
        and table.schema.field("source_index").type == pa.int64()
    )
    assert table.column("source_index").to_pylist() == list(range(6))
    assert json.loads(table.column("messages")[0].as_py())[3] == {"role": "tool", "content": "1024"}


def test_missing_messages_column_and_all_rows_bad(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match=r"x\.parquet: no 'messages' column"):
        convert_sft(tmp_path / "x.parquet", tmp_path / "o.parquet", progress=False)
    _write_jsonl(tmp_path / "bad.jsonl", [{"messages": []}])
    with pytest.raises(ValueError, match="no valid rows"):
        convert_sft(
            tmp_path / "bad.jsonl", tmp_path / "o.parquet", ConversionConfig(on_error="skip"), progress=False
        )
    assert not (tmp_path / "o.parquet").exists()


def test_json_array_input(tmp_path: Path) -> None:
    (tmp_path / "rows.json").write_text(json.dumps([good_row(), good_row()]))
    report = convert_sft(
        tmp_path / "rows.json", tmp_path / "o.parquet", ConversionConfig(tool_format=False), progress=False
    )
    assert report.rows_out == 2
    assert [m for _, m in read_converted(tmp_path / "o.parquet")][0][2]["content"] == ASSISTANT
