"""Megatron checkpoint directories: which iteration was saved last, so a rerun resumes from it.

Megatron writes ``<save>/iter_XXXXXXX/`` (seven digits) per save and, once a save is complete,
``<save>/latest_checkpointed_iteration.txt`` holding that iteration (or ``release`` for a converted
model, stored in ``<save>/release/``). A tracker naming a directory that is missing means an
interrupted or damaged save: that is reported, never silently treated as "start from zero".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TRACKER = "latest_checkpointed_iteration.txt"


class CheckpointError(RuntimeError):
    """A checkpoint directory whose tracker is unreadable or points at nothing."""


@dataclass(frozen=True)
class Checkpoint:
    root: Path
    iteration: int | None  # None for a "release" checkpoint (a conversion output)

    @property
    def path(self) -> Path:
        """The directory holding this iteration's shards (what convert_torch_dist_to_hf reads)."""
        return self.root / iteration_dir_name(self.iteration)


def iteration_dir_name(iteration: int | None) -> str:
    return "release" if iteration is None else f"iter_{iteration:07d}"


def latest_checkpoint(root: str | os.PathLike[str]) -> Checkpoint | None:
    """The last complete checkpoint under ``root``, or None when nothing was saved there yet."""
    root = Path(root)
    tracker = root / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if text == "release":
        ckpt = Checkpoint(root, None)
    else:
        try:
            iteration = int(text)
        except ValueError:
            raise CheckpointError(
                f"{tracker}: expected an iteration number or 'release', found {text!r}"
            ) from None
        if iteration < 0:
            raise CheckpointError(f"{tracker}: negative iteration {iteration}")
        ckpt = Checkpoint(root, iteration)
    if not ckpt.path.is_dir():
        raise CheckpointError(f"{tracker} names {ckpt.path.name}, but {ckpt.path} does not exist")
    return ckpt


def resume_args(save_dir: str | os.PathLike[str]) -> list[str]:
    """``--load <save_dir>`` when a previous attempt saved a checkpoint there, else nothing.

    Without ``--load`` slime starts from ``--ref-load`` at rollout 0; with it, slime restores the
    model, optimizer and rollout counter and continues after the saved iteration.
    """
    ckpt = latest_checkpoint(save_dir)
    return [] if ckpt is None else ["--load", str(save_dir)]
