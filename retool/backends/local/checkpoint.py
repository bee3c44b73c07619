"""Atomic training checkpoints and resume.

A checkpoint is a folder ``<root>/step-000123`` holding the model in the Hugging Face layout plus
``trainer_state.pt`` (optimizer, scheduler, RNG states, step, anything else the trainer keeps). It is
written under a temporary name and renamed into place, then ``<root>/latest`` (a one-line file) is
replaced atomically: a kill at any moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retool.io import atomic_dir, atomic_write_text

STATE_FILE = "trainer_state.pt"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: str | os.PathLike[str],
    step: int,
    model: Any,
    tokenizer: Any,
    trainer_state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write ``root/step-XXXXXX`` atomically, point ``root/latest`` at it, prune older ones."""
    root = Path(root)
    target = root / f"step-{step:06d}"
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save({**trainer_state, "step": step, "rng": rng_state()}, tmp / STATE_FILE)
    atomic_write_text(root / "latest", target.name + "\n")
    steps = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.startswith("."))
    for old in steps[:-keep_last] if keep_last > 0 else []:
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The checkpoint ``root/latest`` names, if it is complete; else the newest complete one."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.exists():
        cand = root / pointer.read_text().strip()
        if (cand / STATE_FILE).exists():
            return cand
    steps = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).exists())
    return steps[-1] if steps else None


def load_trainer_state(ckpt: str | os.PathLike[str], restore_rng: bool = True) -> dict[str, Any]:
    state: dict[str, Any] = torch.load(Path(ckpt) / STATE_FILE, map_location="cpu", weights_only=False)
    if restore_rng and "rng" in state:
        set_rng_state(state["rng"])
    return state
