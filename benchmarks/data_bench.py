"""Memory-flat streaming check for the ReTool-SFT conversion.

Writes ReTool-SFT-like inputs of two sizes (parquet with row groups of 10k rows, and jsonl), converts
each in a fresh process with retool.data.convert_sft, and records the process's peak RSS and rows/s.
Baseline, same inputs, same run: a load-everything conversion (read the whole table, convert every row
in memory, write once). Flat means: peak RSS of convert_sft barely moves when the input grows 8x.

    flock /tmp/retool-cpu.lock .venv/bin/python benchmarks/data_bench.py [--small 20000] [--large 160000]

Figures go to benchmarks/results/data.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "data.md"

_STREAMING = """
import json, resource, sys, time
from retool.data import ConversionConfig, convert_sft
t = time.perf_counter()
r = convert_sft(sys.argv[1], sys.argv[2], ConversionConfig(batch_size=1024), progress=False)
print(json.dumps({"rows": r.rows_out, "seconds": time.perf_counter() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

_LOAD_ALL = """
import json, resource, sys, time
import pyarrow as pa, pyarrow.parquet as pq
from retool.data.sft import convert_row
t = time.perf_counter()
src = sys.argv[1]
if src.endswith(".parquet"):
    rows = pq.read_table(src).to_pylist()
else:
    rows = [json.loads(line) for line in open(src)]
out = [json.dumps(convert_row(r)[0]) for r in rows]
pq.write_table(pa.table({"messages": out, "source_index": list(range(len(out)))}), sys.argv[2])
print(json.dumps({"rows": len(out), "seconds": time.perf_counter() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _row(rng: random.Random) -> dict[str, object]:
    """A ReTool-SFT-shaped row of about 2 KB: reasoning, three code/interpreter rounds, a boxed answer."""
    words = ["we", "compute", "the", "value", "of", "sum", "then", "check", "it", "again", "so", "next"]
    parts = []
    for _ in range(3):
        parts.append(" ".join(rng.choice(words) for _ in range(60)))
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        parts.append(
            f"\n<code>\n```python\nx = {a} * {b}\nprint(x)\n```\n</code>\n<interpreter>\n{a * b}\n</interpreter>\n"
        )
    parts.append(" ".join(rng.choice(words) for _ in range(40)) + " \\boxed{42}")
    return {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant that can run python."},
            {"role": "user", "content": "Problem: " + " ".join(rng.choice(words) for _ in range(30))},
            {"role": "assistant", "content": "".join(parts)},
        ]
    }


def _write_inputs(n: int, folder: Path) -> tuple[Path, Path]:
    rng = random.Random(n)
    pq_path, jl_path = folder / f"in-{n}.parquet", folder / f"in-{n}.jsonl"
    msg_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    schema = pa.schema([("messages", msg_type)])
    with pq.ParquetWriter(pq_path, schema) as writer, jl_path.open("w") as jl:
        for start in range(0, n, 10_000):
            rows = [_row(rng) for _ in range(min(10_000, n - start))]
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
            for r in rows:
                jl.write(json.dumps(r) + "\n")
    return pq_path, jl_path


def _run(script: str, src: Path, dst: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", script, str(src), str(dst)],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=20_000)
    ap.add_argument("--large", type=int, default=160_000)
    args = ap.parse_args()
    lines = []
    with tempfile.TemporaryDirectory(prefix="data-bench-") as tmp:
        folder = Path(tmp)
        results: dict[tuple[str, str, int], dict[str, float]] = {}
        sizes: dict[tuple[str, int], float] = {}
        for n in (args.small, args.large):
            pq_path, jl_path = _write_inputs(n, folder)
            for fmt, path in (("parquet", pq_path), ("jsonl", jl_path)):
                sizes[(fmt, n)] = path.stat().st_size / 2**20
                for name, script in (
                    ("convert_sft (streaming)", _STREAMING),
                    ("load-all baseline", _LOAD_ALL),
                ):
                    r = _run(script, path, folder / "out.parquet")
                    results[(name, fmt, n)] = r
                    print(
                        f"{name:26s} {fmt:8s} {n:>8d} rows  {r['peak_rss_mb']:8.0f} MB  {r['rows'] / r['seconds']:8.0f} rows/s",
                        flush=True,
                    )
        lines.append("# Data benchmark: ReTool-SFT conversion memory\n")
        lines.append(
            f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()}, "
            f"Python {platform.python_version()}, CPU only (2 shared cores). Command: "
            f"`flock /tmp/retool-cpu.lock .venv/bin/python benchmarks/data_bench.py --small {args.small} --large {args.large}`.\n"
        )
        lines.append(
            "Rows of about 2 KB (three code/interpreter rounds each), Tool Format rewrite on. Peak RSS is the "
            "whole converting process (Python + pyarrow + imports) from `getrusage`. Baseline in the same run: "
            "read everything, convert in memory, write once.\n"
        )
        lines.append("| converter | input | rows | input MB | peak RSS MB | rows/s |")
        lines.append("|---|---|---:|---:|---:|---:|")
        for (name, fmt, n), r in results.items():
            lines.append(
                f"| {name} | {fmt} | {n} | {sizes[(fmt, n)]:.0f} | {r['peak_rss_mb']:.0f} | {r['rows'] / r['seconds']:.0f} |"
            )
        lines.append("")
        for fmt in ("parquet", "jsonl"):
            s = results[("convert_sft (streaming)", fmt, args.small)]["peak_rss_mb"]
            large = results[("convert_sft (streaming)", fmt, args.large)]["peak_rss_mb"]
            bs = results[("load-all baseline", fmt, args.small)]["peak_rss_mb"]
            bl = results[("load-all baseline", fmt, args.large)]["peak_rss_mb"]
            lines.append(
                f"- {fmt}: input x{args.large // args.small}: streaming peak {s:.0f} -> {large:.0f} MB "
                f"({large - s:+.0f} MB); load-all baseline {bs:.0f} -> {bl:.0f} MB ({bl - bs:+.0f} MB)."
            )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
