"""Fixtures for the local backend tests: the smoke profile, a base model, a small SFT parquet.

The SFT rows come from the data helper's synthetic generator and conversion when they exist; until
then a minimal stand-in writes rows in the same (post-conversion, Tool Format) layout.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from retool.backends.local.config import LocalConfig, smoke_config

SYSTEM = "Use python to compute. Put the answer in \\boxed{}."


def standin_conversation(rng: random.Random) -> tuple[list[dict[str, str]], str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    question = f"What is {a} * {b}?"
    code = f"print({a} * {b})"
    call = json.dumps({"name": "code_interpreter", "arguments": {"code": code}})
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": question},
        {"role": "assistant", "content": f"<tool_call>\n{call}\n</tool_call>"},
        {"role": "tool", "content": str(a * b)},
        {"role": "assistant", "content": f"\\boxed{{{a * b}}}"},
    ]
    return messages, question, str(a * b)


def write_standin(out: Path, n_sft: int, n_prompts: int, seed: int = 0) -> dict[str, Path]:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    rows = [standin_conversation(rng)[0] for _ in range(n_sft)]
    table = pa.table({"messages": [json.dumps(m) for m in rows], "source_index": list(range(len(rows)))})
    pq.write_table(table, out / "sft.parquet")
    with (out / "train.jsonl").open("w") as fh:
        for _ in range(n_prompts):
            _, q, label = standin_conversation(rng)
            fh.write(json.dumps({"prompt": q, "label": label}) + "\n")
    return {"sft": out / "sft.parquet", "train": out / "train.jsonl"}


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture
def cfg() -> LocalConfig:
    return smoke_config()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_standin(tmp_path_factory.mktemp("data"), n_sft=64, n_prompts=16)


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory: pytest.TempPathFactory, data_dir: dict[str, Path]) -> Path:
    from retool.backends.local.stages import build_base_model

    return build_base_model(smoke_config(), [data_dir["sft"]], tmp_path_factory.mktemp("models") / "base")
