"""Turn the sft_data stage's parquet into the layout slime's SFT rollout reads.

The sft_data stage stores each conversation as a JSON string (column ``messages``). slime reads
parquet rows with pyarrow and hands a *string* prompt to its loss-mask generator, which needs a list
of ``{"role", "content"}`` messages: every row would fail. This writes the same rows with
``messages`` as a list of structs and, for conversations with tool turns, a ``tools`` column (JSON,
slime's default ``--tool-key``) holding the code-interpreter spec, so the chat template renders the
tool turns the way the RL rollouts will see them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

_ROLES = {"system", "user", "assistant", "tool"}


def _tool_specs() -> list[dict[str, Any]]:
    from retool.tools import CODE_INTERPRETER_SPEC

    return [CODE_INTERPRETER_SPEC]


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    raw = json.loads(value) if isinstance(value, str) else value
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of messages")
    out = []
    for j, msg in enumerate(raw):
        if (
            not isinstance(msg, dict)
            or msg.get("role") not in _ROLES
            or not isinstance(msg.get("content"), str)
        ):
            raise ValueError(
                f"{where}: message {j} must be {{'role': one of {sorted(_ROLES)}, 'content': str}}"
            )
        out.append({"role": msg["role"], "content": msg["content"]})
    if out[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's (it is what SFT trains on)")
    return out


def prepare_sft_parquet(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> int:
    """Write ``dst`` (atomically) from ``src``; returns the number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src, dst = Path(src), Path(dst)
    table = pq.read_table(src)
    if "messages" not in table.column_names:
        raise ValueError(f"{src}: no 'messages' column (found {table.column_names})")
    rows = table.to_pylist()
    specs = json.dumps(_tool_specs())
    messages, tools = [], []
    for i, row in enumerate(rows):
        msgs = _messages(row["messages"], f"{src} row {i}")
        messages.append(msgs)
        tools.append(specs if any(m["role"] == "tool" for m in msgs) else None)
    msg_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    columns = {"messages": pa.array(messages, type=msg_type), "tools": pa.array(tools, type=pa.string())}
    for name in table.column_names:
        if name not in columns:
            columns[name] = table.column(name)
    out = pa.table(columns)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    pq.write_table(out, tmp)
    os.replace(tmp, dst)
    return out.num_rows
