"""The tiny synthetic task: arithmetic where the tool really helps, in short regular text.

Files written by write_synthetic_task into out_dir:
    sft.jsonl | sft.parquet  SFT traces in the ReTool-SFT layout: {"messages": [system, user, assistant],
                             "label", "kind", "trace"}; the assistant turn is a reasoning line, a
                             <code>```python\\nprint(...)\\n```</code> call, its <interpreter> output and
                             \\boxed{answer}
    train.jsonl              RL prompts {"prompt", "label", "id", "kind"}
    eval.jsonl               held-out eval prompts, same fields
    synthetic.json           the SyntheticReport (written last)
The three splits share no question. Traces: correct tool use; a `mistake_share` with a plausible code
mistake whose (wrong) output is boxed; a `no_tool_share` answered by hand, right only sometimes. The
interpreter text is what Python prints for the code, computed by running the (generated, trusted) code.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from retool.data.config import DataConfig, SyntheticConfig
from retool.data.manifest import publish, write_json_atomic

REPORT_NAME = "synthetic.json"


@dataclass(frozen=True)
class _Item:
    kind: str
    question: str
    code: str
    wrong_code: str
    answer: int


@dataclass
class SyntheticReport:
    out_dir: str
    seed: int
    files: dict[str, str]
    sft_rows: int
    train_rows: int
    eval_rows: int
    traces: dict[str, int] = field(default_factory=dict)  # correct / mistake / no_tool
    sft_correct_share: float = 0.0  # share of SFT traces whose boxed answer is right
    kinds: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_print(code: str) -> str:
    """What the code prints, as Python itself prints it (the code is ours and trusted)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, "<synthetic>", "exec"), {"__builtins__": __builtins__})
    return buf.getvalue()


def _swap_last_digits(n: int) -> int:
    s = str(n)
    swapped = int(s[:-2] + s[-1] + s[-2])
    return swapped if swapped != n else n + 1


def _make_item(kind: str, rng: random.Random) -> _Item:
    if kind == "product":
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        return _Item(
            kind, f"What is {a}*{b}?", f"print({a}*{b})", f"print({a}*{_swap_last_digits(b)})", a * b
        )
    if kind == "mod":
        a, m = rng.randint(10_000, 99_999), rng.randint(11, 99)
        return _Item(kind, f"What is {a} mod {m}?", f"print({a} % {m})", f"print({a} // {m})", a % m)
    if kind == "sum":
        lo = rng.randint(1, 99)
        hi = rng.randint(lo + 20, 999)
        return _Item(
            kind,
            f"What is {lo}+...+{hi}?",
            f"print(sum(range({lo}, {hi}+1)))",
            f"print(sum(range({lo}, {hi})))",
            sum(range(lo, hi + 1)),
        )
    raise ValueError(f"unknown synthetic kind {kind!r}")


def _unique_items(cfg: SyntheticConfig, rng: random.Random, n: int) -> list[_Item]:
    seen: set[str] = set()
    items: list[_Item] = []
    attempts = 0
    while len(items) < n:
        attempts += 1
        if attempts > 20 * n + 1000:
            raise ValueError(f"could not draw {n} distinct problems of kinds {cfg.kinds}")
        item = _make_item(rng.choice(cfg.kinds), rng)
        if item.question in seen:
            continue
        seen.add(item.question)
        items.append(item)
    return items


def _wrong_guess(answer: int, rng: random.Random) -> int:
    scale = 10 ** rng.randint(0, max(0, len(str(abs(answer))) - 2))
    delta = rng.choice([-1, 1]) * rng.randint(1, 9) * scale
    return answer + delta


def _code_block(code: str, output: str) -> str:
    """A call and its observation exactly as the episode loop appends one for a <code> call
    (retool.prompts.format_interpreter), so SFT text and RL rollouts agree byte for byte."""
    return f"<code>```python\n{code}\n```</code>\n<interpreter>\n{output.rstrip(chr(10))}\n</interpreter>\n"


def _trace(item: _Item, style: str, cfg: SyntheticConfig, rng: random.Random) -> tuple[str, bool]:
    """(assistant content, whether its boxed answer is right)."""
    if style == "no_tool":
        right = rng.random() < cfg.no_tool_correct_share
        guess = item.answer if right else _wrong_guess(item.answer, rng)
        return f"I compute it by hand.\nThe answer is \\boxed{{{guess}}}.", guess == item.answer
    code = item.code if style == "correct" else item.wrong_code
    out = run_print(code)
    value = out.strip()
    return f"I use python.\n{_code_block(code, out)}The answer is \\boxed{{{value}}}.", value == str(
        item.answer
    )


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_synthetic_task(
    cfg: SyntheticConfig | DataConfig | None, out_dir: str | Path, seed: int = 0
) -> SyntheticReport:
    """Write the tiny task's SFT traces, RL prompts and eval prompts into out_dir (same seed, same bytes)."""
    if isinstance(cfg, DataConfig):
        cfg = cfg.synthetic
    cfg = cfg or SyntheticConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_NAME).unlink(missing_ok=True)  # the report marks a complete set: drop it until rewritten
    rng = random.Random(seed)
    items = _unique_items(cfg, rng, cfg.eval_size + cfg.train_size + cfg.sft_size)
    eval_items = items[: cfg.eval_size]
    train_items = items[cfg.eval_size : cfg.eval_size + cfg.train_size]
    sft_items = items[cfg.eval_size + cfg.train_size :]

    n_mistake = round(cfg.sft_size * cfg.mistake_share)
    n_no_tool = round(cfg.sft_size * cfg.no_tool_share)
    styles = ["mistake"] * n_mistake + ["no_tool"] * n_no_tool
    styles += ["correct"] * (cfg.sft_size - len(styles))
    rng.shuffle(styles)

    sft_rows: list[dict[str, Any]] = []
    right = 0
    for item, style in zip(sft_items, styles, strict=True):
        content, ok = _trace(item, style, cfg, rng)
        right += ok
        messages = [
            {"role": "system", "content": cfg.system_prompt},
            {"role": "user", "content": item.question},
            {"role": "assistant", "content": content},
        ]
        sft_rows.append({"messages": messages, "label": str(item.answer), "kind": item.kind, "trace": style})

    def prompts(split: str, chosen: list[_Item]) -> list[dict[str, Any]]:
        return [
            {"prompt": it.question, "label": str(it.answer), "id": f"synthetic-{split}-{i}", "kind": it.kind}
            for i, it in enumerate(chosen)
        ]

    sft_name = "sft.parquet" if cfg.sft_format == "parquet" else "sft.jsonl"
    for stale in ("sft.parquet", "sft.jsonl"):
        if stale != sft_name:
            (out / stale).unlink(missing_ok=True)
    if cfg.sft_format == "parquet":
        _write_parquet(out / sft_name, sft_rows)
    else:
        _write_jsonl(out / sft_name, sft_rows)
    _write_jsonl(out / "train.jsonl", prompts("train", train_items))
    _write_jsonl(out / "eval.jsonl", prompts("eval", eval_items))

    report = SyntheticReport(
        out_dir=str(out),
        seed=seed,
        files={
            "sft": str(out / sft_name),
            "train": str(out / "train.jsonl"),
            "eval": str(out / "eval.jsonl"),
        },
        sft_rows=len(sft_rows),
        train_rows=len(train_items),
        eval_rows=len(eval_items),
        traces=dict(sorted(Counter(styles).items())),
        sft_correct_share=round(right / len(sft_rows), 4),
        kinds=dict(sorted(Counter(it.kind for it in items).items())),
    )
    write_json_atomic(out / REPORT_NAME, report.to_dict())
    return report
