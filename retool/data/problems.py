"""RL and eval problems (DAPO-Math, AIME, the synthetic task) as Problem(prompt, label).

Two row layouts are accepted:
- flat:  {"prompt": "question text", "label": "answer", "id"?: ...}
- DAPO:  {"prompt": [{"role": "user", "content": "question text"}, ...],
          "reward_model": {"ground_truth": "answer", ...}, "extra_info"?: {"index": ...}}
Files: .jsonl (one row per line), .parquet, or a directory of them (sorted, hidden paths ignored).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq


@dataclass
class Problem:
    prompt: str
    label: str
    id: str | None = None


class ProblemSchemaError(ValueError):
    """A row that is neither layout; the message names the file and line (or parquet row)."""


def _label_text(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list) and len(value) == 1:  # some DAPO exports wrap the answer in a list
        return _label_text(value[0])
    return None


def problem_from_row(row: Any) -> Problem:
    """Build a Problem from one row of either layout; raises ValueError saying what is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"row is a {type(row).__name__}, not an object")
    if "prompt" not in row:
        raise ValueError(f"no 'prompt' field (fields: {sorted(row)})")
    prompt = row["prompt"]
    if isinstance(prompt, str) and prompt.strip().startswith("[{"):
        with contextlib.suppress(ValueError):  # parquet exports may store the message list as JSON text
            prompt = json.loads(prompt)
    if isinstance(prompt, list):
        users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if not users or not isinstance(users[-1], str):
            raise ValueError("'prompt' is a message list without a user message with string content")
        prompt = users[-1]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(
            f"'prompt' must be a non-empty string or a message list, got {type(prompt).__name__}"
        )
    if "label" in row and row["label"] is not None:
        label = _label_text(row["label"])
        where = "'label'"
    else:
        rm = row.get("reward_model")
        if not isinstance(rm, dict) or rm.get("ground_truth") is None:
            raise ValueError("no 'label' and no 'reward_model.ground_truth'")
        label = _label_text(rm["ground_truth"])
        where = "'reward_model.ground_truth'"
    if label is None or not label.strip():
        raise ValueError(f"{where} must be a non-empty string or number")
    pid = row.get("id")
    if pid is None and isinstance(row.get("extra_info"), dict):
        pid = row["extra_info"].get("index")
    return Problem(prompt=prompt, label=label.strip(), id=None if pid is None else str(pid))


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"problem file not found: {path}")
    files = sorted(
        f
        for f in path.rglob("*")
        if f.is_file()
        and f.suffix in (".jsonl", ".parquet")
        and not any(part.startswith(".") for part in f.relative_to(path).parts)
    )
    if not files:
        raise FileNotFoundError(f"no .jsonl or .parquet files under {path}")
    return files


def iter_problems(path: str | Path) -> Iterator[Problem]:
    """Stream problems; a bad row raises ProblemSchemaError naming file and line."""
    for f in _files(Path(path)):
        if f.suffix == ".parquet":
            pf = pq.ParquetFile(f)
            n = 0
            for batch in pf.iter_batches(batch_size=1024):
                for row in batch.to_pylist():
                    n += 1
                    try:
                        yield problem_from_row(row)
                    except ValueError as e:
                        raise ProblemSchemaError(f"{f}: row {n}: {e}") from None
            continue
        with f.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise ProblemSchemaError(f"{f}:{lineno}: not valid JSON: {e}") from None
                try:
                    yield problem_from_row(row)
                except ValueError as e:
                    raise ProblemSchemaError(f"{f}:{lineno}: {e}") from None


def load_problems(path: str | Path) -> list[Problem]:
    """All problems of a file or directory (either layout); raises on the first bad row or an empty set."""
    problems = list(iter_problems(path))
    if not problems:
        raise ProblemSchemaError(f"{path}: no problems")
    return problems
