"""Job entrypoint: convert a run's latest torch_dist checkpoint to HF, atomically.

Runs on a cluster node (``python -m retool.backends.slime.export ...``) because only there is the
latest iteration known. slime's converter writes into a scratch directory beside the output; the
output directory is swapped in only after the converter succeeded, so a reader never sees half a
model. ``retool_export.json`` in the output records which checkpoint it came from, and a rerun with
nothing new to convert does nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from retool.backends.slime.checkpoints import latest_checkpoint

MARKER = "retool_export.json"


def _source_record(save_dir: Path) -> dict[str, object]:
    ckpt = latest_checkpoint(save_dir)
    if ckpt is None:
        raise SystemExit(
            f"export: no finished checkpoint in {save_dir} (latest_checkpointed_iteration.txt missing)"
        )
    return {"save_dir": str(save_dir), "iteration": ckpt.iteration, "input_dir": str(ckpt.path)}


def export(
    save_dir: Path,
    output_dir: Path,
    tool_argv: list[str],
    tool_extra: list[str],
) -> int:
    record = _source_record(save_dir)
    marker = output_dir / MARKER
    if marker.is_file():
        try:
            done = json.loads(marker.read_text())
        except ValueError:
            done = None
        if (
            done is not None
            and done.get("save_dir") == record["save_dir"]
            and done.get("iteration") == record["iteration"]
        ):
            print(
                f"export: {output_dir} already holds iteration {record['iteration']}; nothing to do",
                flush=True,
            )
            return 0
    scratch = output_dir.parent / f".{output_dir.name}.partial-{os.getpid()}"
    if scratch.exists():
        shutil.rmtree(scratch)
    cmd = [*tool_argv, "--input-dir", str(record["input_dir"]), "--output-dir", str(scratch), *tool_extra]
    print("export: " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd)
    if rc != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        print(f"export: converter exited with {rc}", file=sys.stderr, flush=True)
        return rc
    record["exported_at"] = time.time()
    tmp_marker = scratch / (MARKER + ".tmp")
    tmp_marker.write_text(json.dumps(record, indent=2))
    os.replace(tmp_marker, scratch / MARKER)
    old = output_dir.parent / f".{output_dir.name}.old-{os.getpid()}"
    if output_dir.exists():
        os.replace(output_dir, old)
    os.replace(scratch, output_dir)
    shutil.rmtree(old, ignore_errors=True)
    print(f"export: wrote {output_dir} from iteration {record['iteration']}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m retool.backends.slime.export", description=__doc__)
    ap.add_argument("--save-dir", required=True, type=Path, help="Megatron save directory (has the tracker)")
    ap.add_argument("--output-dir", required=True, type=Path, help="HF model directory to (re)place")
    ap.add_argument("--origin-hf-dir", required=True, help="HF model whose config/tokenizer files are copied")
    ap.add_argument("--tool", required=True, help="path of slime's tools/convert_torch_dist_to_hf.py")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--vocab-size", type=int, default=None, help="strip Megatron's vocabulary padding")
    ap.add_argument("--chunk-size", type=int, default=None)
    args = ap.parse_args(argv)
    extra = ["--origin-hf-dir", args.origin_hf_dir]
    if args.vocab_size is not None:
        extra += ["--vocab-size", str(args.vocab_size)]
    if args.chunk_size is not None:
        extra += ["--chunk-size", str(args.chunk_size)]
    return export(args.save_dir, args.output_dir, [args.python, args.tool], extra)


if __name__ == "__main__":
    raise SystemExit(main())
