"""Resume picks the latest finished checkpoint; export converts it atomically and only once."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from retool.backends.slime import SlimeConfig, build_job, latest_checkpoint, resume_args
from retool.backends.slime.checkpoints import CheckpointError
from retool.backends.slime.config import PathsConfig
from retool.backends.slime.export import main as export_main


def save(root: Path, iteration: int | str, *, make_dir: bool = True) -> None:
    root.mkdir(parents=True, exist_ok=True)
    name = "release" if iteration == "release" else f"iter_{int(iteration):07d}"
    if make_dir:
        (root / name).mkdir(exist_ok=True)
        (root / name / "common.pt").write_text(f"weights of {name}")
    (root / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")


def test_latest_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "rl"
    assert latest_checkpoint(root) is None and resume_args(root) == []
    save(root, 19)
    save(root, 39)
    ckpt = latest_checkpoint(root)
    assert ckpt is not None and ckpt.iteration == 39 and ckpt.path == root / "iter_0000039"
    assert resume_args(root) == ["--load", str(root)]
    save(tmp_path / "conv", "release")
    rel = latest_checkpoint(tmp_path / "conv")
    assert rel is not None and rel.iteration is None and rel.path.name == "release"


def test_broken_tracker_is_an_error_not_a_restart(tmp_path: Path) -> None:
    save(tmp_path / "a", 59, make_dir=False)
    with pytest.raises(CheckpointError, match="iter_0000059"):
        latest_checkpoint(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "latest_checkpointed_iteration.txt").write_text("garbage")
    with pytest.raises(CheckpointError, match="garbage"):
        latest_checkpoint(tmp_path / "b")


def test_rerun_after_failure_resumes_with_load(tmp_path: Path) -> None:
    paths = PathsConfig(rl_save=str(tmp_path / "rl"), sft_save=str(tmp_path / "sft"))
    cfg = SlimeConfig()
    first = build_job("rl", cfg, paths, environ={}).argv
    assert "--load" not in first  # fresh start: slime begins at --ref-load
    save(tmp_path / "rl", 19)  # the first attempt saved iteration 19, then died
    second = build_job("rl", cfg, paths, environ={}).argv
    assert second[second.index("--load") + 1] == str(tmp_path / "rl")
    sft = build_job("sft", cfg, paths, environ={}).argv
    assert "--load" not in sft
    # without a shared filesystem, --load is always passed and slime resolves it on the node
    remote = SlimeConfig.model_validate({"cluster": {"shared_filesystem": False}})
    assert "--load" in build_job("sft", remote, paths, environ={}).argv


FAKE_CONVERTER = """
import argparse, os, sys
ap = argparse.ArgumentParser()
ap.add_argument("--input-dir"); ap.add_argument("--output-dir"); ap.add_argument("--origin-hf-dir")
ap.add_argument("--vocab-size"); ap.add_argument("--chunk-size")
a = ap.parse_args()
if os.environ.get("FAKE_FAIL"):
    os.makedirs(a.output_dir); open(os.path.join(a.output_dir, "half"), "w").close(); sys.exit(7)
os.makedirs(a.output_dir)
open(os.path.join(a.output_dir, "model.safetensors"), "w").write(open(os.path.join(a.input_dir, "common.pt")).read())
"""


def test_export_converts_latest_atomically_and_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tool = tmp_path / "convert_torch_dist_to_hf.py"
    tool.write_text(FAKE_CONVERTER)
    src, out = tmp_path / "sft", tmp_path / "sft_hf"
    args = ["--save-dir", str(src), "--output-dir", str(out), "--origin-hf-dir", "/base", "--tool", str(tool),
            "--python", sys.executable, "--vocab-size", "151936"]  # fmt: skip
    with pytest.raises(SystemExit, match="no finished checkpoint"):
        export_main(args)
    save(src, 9)
    assert export_main(args) == 0
    assert (out / "model.safetensors").read_text() == "weights of iter_0000009"
    stamp = (out / "retool_export.json").stat().st_mtime_ns
    assert export_main(args) == 0  # nothing new: untouched
    assert (out / "retool_export.json").stat().st_mtime_ns == stamp
    save(src, 19)
    monkeypatch.setenv("FAKE_FAIL", "1")
    assert export_main(args) == 7  # a failed conversion leaves the previous export intact
    assert (out / "model.safetensors").read_text() == "weights of iter_0000009"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    monkeypatch.delenv("FAKE_FAIL")
    assert export_main(args) == 0
    assert (out / "model.safetensors").read_text() == "weights of iter_0000019"
