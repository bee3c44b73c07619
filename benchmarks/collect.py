"""Assemble benchmarks/RESULTS.md from the sections each benchmark writes into benchmarks/results/."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["local", "sandbox", "rollout", "data", "gpu"]

HEADER = """# Benchmark results

Each section was written by the benchmark script named in it, which measures against a baseline in the
same run; the exact command and the machine's load are given with every table. Regenerate this file
with `python benchmarks/collect.py` after running a benchmark.
"""


def main() -> None:
    sections = sorted(
        (HERE / "results").glob("*.md"),
        key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else 99, p.stem),
    )
    body = [HEADER] + [p.read_text().strip() + "\n" for p in sections]
    (HERE / "RESULTS.md").write_text("\n".join(body))
    print(f"wrote {HERE / 'RESULTS.md'} from {len(sections)} section(s)")


if __name__ == "__main__":
    main()
