"""ReTool-SFT rows -> validated training rows (the sft_data stage).

Input rows hold `messages`: [{"role": "system"|"user"|"assistant", "content": str}, ...]; assistant content
interleaves reasoning text, code as <code>```python ...```</code> and the code's output as
<interpreter>...</interpreter>. Output parquet (one row per example):
    messages      string  JSON of [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]
    source_index  int64   the row's position in the input (files in sorted order, counted from 0)
With tool_format on, every code block becomes a Tool Format call at the end of an assistant message,
`<tool_call>\\n{"name": "code_interpreter", "arguments": {"code": ...}}\\n</tool_call>`, and its output a
separate `tool` message; otherwise the assistant text is kept as it is (after the same validation).
A bad row is an error naming its index (on_error="raise") or skipped and counted (on_error="skip").
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from retool.data.config import ConversionConfig, DataConfig
from retool.data.manifest import publish, write_json_atomic

TOOL_NAME = "code_interpreter"
INPUT_ROLES = ("system", "user", "assistant")
OUTPUT_SCHEMA = pa.schema([("messages", pa.string()), ("source_index", pa.int64())])
_TAG = re.compile(r"</?(?:code|interpreter)>")
_FENCED = re.compile(r"^\s*```[A-Za-z0-9_+-]*[ \t]*\n(.*?)\n?[ \t]*```\s*$", re.DOTALL)
_MAX_EXAMPLES = 20


class RowError(ValueError):
    """A row that is not a valid ReTool-SFT example; `code` is a short category for counting."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Segment:
    kind: Literal["text", "code", "output"]
    text: str


@dataclass
class ConversionReport:
    input: str
    output: str
    tool_format: bool
    on_error: str
    rows_in: int = 0
    rows_out: int = 0
    rows_skipped: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    skipped_examples: list[dict[str, Any]] = field(default_factory=list)  # first few: index, reason
    messages_out: int = 0
    tool_calls: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        return {
            "sft_data/rows_in": float(self.rows_in),
            "sft_data/rows_out": float(self.rows_out),
            "sft_data/rows_skipped": float(self.rows_skipped),
            "sft_data/tool_calls_per_row": self.tool_calls / self.rows_out if self.rows_out else 0.0,
        }


def _strip_fences(raw: str) -> str:
    m = _FENCED.match(raw)
    code = m.group(1) if m else raw
    return code.strip("\n").rstrip()


def split_assistant(content: str) -> list[Segment]:
    """Split assistant content into text, code and output segments; every code block must be followed by
    its <interpreter> output (only whitespace between), and every output must follow a code block."""
    segments: list[Segment] = []
    pos = 0
    while True:
        m = _TAG.search(content, pos)
        if m is None:
            if content[pos:].strip():
                segments.append(Segment("text", content[pos:]))
            break
        tag = m.group(0)
        if m.start() > pos and content[pos : m.start()].strip():
            segments.append(Segment("text", content[pos : m.start()]))
        if tag.startswith("</"):
            raise RowError("stray_tag", f"closing tag {tag} at offset {m.start()} without its opening tag")
        name = tag[1:-1]
        close = _TAG.search(content, m.end())
        if close is None or close.group(0) != f"</{name}>":
            found = "end of text" if close is None else close.group(0)
            raise RowError("unclosed_tag", f"<{name}> at offset {m.start()} is not closed (found {found})")
        body = content[m.end() : close.start()]
        if name == "code":
            code = _strip_fences(body)
            if not code.strip():
                raise RowError("empty_code", f"empty <code> block at offset {m.start()}")
            if segments and segments[-1].kind == "code":
                raise RowError(
                    "code_without_output",
                    f"<code> at offset {m.start()} follows a code block that has no <interpreter> output",
                )
            segments.append(Segment("code", code))
        else:
            if not segments or segments[-1].kind != "code":
                raise RowError(
                    "output_without_code",
                    f"<interpreter> at offset {m.start()} does not follow a <code> block",
                )
            segments.append(Segment("output", body.strip()))
        pos = close.end()
    if segments and segments[-1].kind == "code":
        raise RowError("code_without_output", "the last <code> block has no <interpreter> output")
    if segments and segments[-1].kind == "output":
        raise RowError(
            "no_final_answer", "the assistant turn ends with an interpreter output and no final text"
        )
    return segments


def tool_call_text(code: str) -> str:
    call = {"name": TOOL_NAME, "arguments": {"code": code}}
    return f"<tool_call>\n{json.dumps(call, ensure_ascii=False)}\n</tool_call>"


def _rewrite_assistant(segments: list[Segment]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    text = ""
    for seg in segments:
        if seg.kind == "text":
            text += seg.text
        elif seg.kind == "code":
            head = text.strip()
            out.append(
                {
                    "role": "assistant",
                    "content": f"{head}\n{tool_call_text(seg.text)}" if head else tool_call_text(seg.text),
                }
            )
            text = ""
        else:
            out.append({"role": "tool", "content": seg.text})
    if text.strip():
        out.append({"role": "assistant", "content": text.strip()})
    return out


def convert_row(
    row: Any, *, tool_format: bool = True, system_prompt: str | None = None
) -> tuple[list[dict[str, str]], int]:
    """Validate one input row and convert it; returns (messages, number of tool calls). Raises RowError."""
    if isinstance(row, dict):
        if "messages" not in row:
            raise RowError("missing_messages", f"no 'messages' field (fields: {sorted(row)})")
        messages = row["messages"]
    else:
        messages = row
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except ValueError as e:
            raise RowError("bad_json", f"'messages' is a string that is not JSON: {e}") from None
    if not isinstance(messages, list) or not messages:
        raise RowError("bad_messages", f"'messages' must be a non-empty list, got {type(messages).__name__}")
    out: list[dict[str, str]] = []
    calls = 0
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise RowError("bad_message", f"message {i} is a {type(msg).__name__}, not an object")
        role, content = msg.get("role"), msg.get("content")
        if role not in INPUT_ROLES:
            raise RowError(
                "unknown_role", f"message {i} has unknown role {role!r} (expected one of {INPUT_ROLES})"
            )
        if not isinstance(content, str):
            raise RowError(
                "bad_content", f"message {i} ({role}) content is {type(content).__name__}, not a string"
            )
        if role == "system":
            if i != 0:
                raise RowError(
                    "misplaced_system", f"system message at position {i}; only the first may be system"
                )
            if system_prompt is None:
                out.append({"role": "system", "content": content})
            continue
        if role == "user":
            if _TAG.search(content):
                raise RowError("tags_in_user", f"message {i} (user) contains <code>/<interpreter> tags")
            out.append({"role": "user", "content": content})
            continue
        if not content.strip():
            raise RowError("empty_assistant", f"message {i} (assistant) is empty")
        try:
            segments = split_assistant(content)
        except RowError as e:
            raise RowError(e.code, f"message {i} (assistant): {e}") from None
        calls += sum(s.kind == "code" for s in segments)
        if tool_format:
            out.extend(_rewrite_assistant(segments))
        else:
            out.append({"role": "assistant", "content": content})
    roles = [m["role"] for m in out]
    if "user" not in roles:
        raise RowError("no_user", "no user message")
    if "assistant" not in roles:
        raise RowError("no_assistant", "no assistant message")
    first = next(r for r in roles if r != "system")
    if first != "user":
        raise RowError("assistant_first", "the first non-system message is not from the user")
    if roles[-1] != "assistant":
        raise RowError("ends_without_assistant", f"the last message is {roles[-1]!r}, not the assistant's")
    if system_prompt is not None:
        out.insert(0, {"role": "system", "content": system_prompt})
    return out, calls


# -- streaming input ------------------------------------------------------------------------------------
_SUFFIXES = (".parquet", ".jsonl", ".json")


def input_files(path: str | Path) -> list[Path]:
    """A file, or the .parquet/.jsonl files under a directory (sorted; hidden paths ignored); .json files
    only when there are none of those."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"SFT input not found: {p}")
    files = sorted(
        f
        for f in p.rglob("*")
        if f.is_file()
        and f.suffix in _SUFFIXES
        and not any(part.startswith(".") for part in f.relative_to(p).parts)
    )
    if not files:
        raise FileNotFoundError(f"no .parquet/.jsonl/.json files under {p}")
    rows = [f for f in files if f.suffix != ".json"]
    return rows or files  # .json files in a repository with data files are metadata, not rows


def count_rows(files: list[Path]) -> int | None:
    """Row count when cheap to know (parquet metadata), for the progress bar."""
    if all(f.suffix == ".parquet" for f in files):
        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    return None


class _BadLine:
    def __init__(self, message: str) -> None:
        self.message = message


def iter_raw_rows(files: list[Path], batch_size: int = 1024) -> Iterator[Any]:
    """Yield rows one by one while holding at most one batch (parquet) or one line (jsonl) in memory."""
    for f in files:
        if f.suffix == ".parquet":
            pf = pq.ParquetFile(f)
            if "messages" not in pf.schema_arrow.names:
                raise ValueError(f"{f}: no 'messages' column (columns: {pf.schema_arrow.names})")
            for batch in pf.iter_batches(batch_size=batch_size, columns=["messages"]):
                for messages in batch.column(0).to_pylist():
                    yield {"messages": messages}
            continue
        with f.open(encoding="utf-8") as fh:
            first = fh.read(1)
            while first and first.isspace():
                first = fh.read(1)
            fh.seek(0)
            if first == "[":  # one JSON array: not streamable, read whole
                rows = json.load(fh)
                yield from rows
                continue
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except ValueError as e:
                    yield _BadLine(f"{f}:{lineno}: not valid JSON: {e}")


def convert_sft(
    in_path: str | Path,
    out_path: str | Path,
    cfg: ConversionConfig | DataConfig | None = None,
    *,
    report_path: str | Path | None = None,
    progress: bool = True,
) -> ConversionReport:
    """Convert ReTool-SFT rows at in_path (file or directory) to the training parquet at out_path.

    The parquet is written to a temp file beside out_path and renamed on success; the report JSON goes to
    report_path (default: out_path with suffix .report.json). Raises RowError naming the row index when
    on_error="raise", ValueError when no row survives.
    """
    if isinstance(cfg, DataConfig):
        cfg = cfg.conversion
    cfg = cfg or ConversionConfig()
    out = Path(out_path)
    report_file = Path(report_path) if report_path else out.with_suffix(".report.json")
    files = input_files(in_path)
    report = ConversionReport(
        input=str(in_path), output=str(out), tool_format=cfg.tool_format, on_error=cfg.on_error
    )
    reasons: Counter[str] = Counter()
    t0 = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with pq.ParquetWriter(tmp, OUTPUT_SCHEMA, compression="zstd") as writer:
            buf_msgs: list[str] = []
            buf_idx: list[int] = []

            def flush() -> None:
                if buf_msgs:
                    writer.write_batch(
                        pa.record_batch(
                            [pa.array(buf_msgs, pa.string()), pa.array(buf_idx, pa.int64())],
                            schema=OUTPUT_SCHEMA,
                        )
                    )
                    buf_msgs.clear()
                    buf_idx.clear()

            rows = iter_raw_rows(files, cfg.batch_size)
            for index, raw in enumerate(
                tqdm(rows, total=count_rows(files), unit="row", desc="sft_data", disable=not progress)
            ):
                report.rows_in += 1
                try:
                    if isinstance(raw, _BadLine):
                        raise RowError("bad_json", raw.message)
                    messages, calls = convert_row(
                        raw, tool_format=cfg.tool_format, system_prompt=cfg.system_prompt
                    )
                except RowError as e:
                    if cfg.on_error == "raise":
                        raise RowError(e.code, f"row {index} of {in_path}: {e}") from None
                    reasons[e.code] += 1
                    report.rows_skipped += 1
                    if len(report.skipped_examples) < _MAX_EXAMPLES:
                        report.skipped_examples.append({"index": index, "reason": e.code, "detail": str(e)})
                    continue
                buf_msgs.append(json.dumps(messages, ensure_ascii=False))
                buf_idx.append(index)
                report.rows_out += 1
                report.messages_out += len(messages)
                report.tool_calls += calls
                if len(buf_msgs) >= cfg.batch_size:
                    flush()
            flush()
        if report.rows_out == 0:
            raise ValueError(
                f"no valid rows in {in_path} ({report.rows_in} read, {report.rows_skipped} skipped: {dict(reasons)})"
            )
        publish(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    report.skipped_by_reason = dict(sorted(reasons.items()))
    report.seconds = round(time.monotonic() - t0, 3)
    write_json_atomic(report_file, report.to_dict())
    return report


def read_converted(path: str | Path) -> Iterator[tuple[int, list[dict[str, str]]]]:
    """Stream (source_index, messages) back from a converted parquet (for the SFT trainers)."""
    pf = pq.ParquetFile(path)
    for batch in pf.iter_batches(batch_size=1024, columns=["messages", "source_index"]):
        for msgs, idx in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True):
            yield idx, json.loads(msgs)
