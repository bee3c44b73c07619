"""The real profile's download stage against a loopback server speaking the Hub's URL scheme: datasets
normalized into data/raw, the base model into models/base, and a missing dataset named by its source."""

from __future__ import annotations

import json

import pytest

from retool.config import PipelineConfig
from retool.layout import Layout
from retool.stages import stage_download

from ..data.hub_server import FakeRepo, HubServer

SFT_ROW = {
    "messages": [
        {"role": "user", "content": "What is 2+3?"},
        {
            "role": "assistant",
            "content": "Compute.<code>```python\nprint(2+3)\n```</code>"
            "<interpreter>5</interpreter>So \\boxed{5}.",
        },
    ]
}
DAPO_ROW = {"prompt": [{"role": "user", "content": "Find 7*6."}], "reward_model": {"ground_truth": "42"}}


def _repos(with_eval: bool = True) -> list[FakeRepo]:
    repos = [
        FakeRepo(
            "JoeYing/ReTool-SFT", "dataset", {"data/train.jsonl": (json.dumps(SFT_ROW) + "\n").encode()}
        ),
        FakeRepo(
            "zhuzilin/dapo-math-17k",
            "dataset",
            {"dapo-math-17k.jsonl": (json.dumps(DAPO_ROW) + "\n").encode()},
        ),
        FakeRepo("Qwen/Qwen3-4B-Instruct-2507", "model", {"config.json": b'{"model_type": "qwen3"}'}),
    ]
    if with_eval:
        aime = json.dumps({"prompt": "AIME problem", "label": "204"}) + "\n"
        repos.append(FakeRepo("zhuzilin/aime-2024", "dataset", {"aime-2024.jsonl": aime.encode()}))
    return repos


def test_remote_download_stage_normalizes_data_and_fetches_the_base_model(tmp_path):
    with HubServer(_repos()) as hub:
        cfg = PipelineConfig.model_validate({"profile": "qwen3-4b", "data": {"hub_endpoint": hub.url}})
        out = stage_download(cfg, Layout(tmp_path))
        # DVC clears a stage's outputs before rerunning it: the download cache makes the rerun fetch nothing.
        import shutil

        shutil.rmtree(tmp_path / "data")
        shutil.rmtree(tmp_path / "models")
        hub.requests.clear()
        stage_download(cfg, Layout(tmp_path))
        assert not [p for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p]
    lay = Layout(tmp_path)
    assert [json.loads(x) for x in lay.train_jsonl.read_text().splitlines()] == [
        {"prompt": "Find 7*6.", "label": "42", "id": None}
    ]
    assert json.loads(lay.eval_jsonl.read_text())["label"] == "204"
    assert (lay.base_model / "config.json").read_bytes() == b'{"model_type": "qwen3"}'
    assert [p.name for p in lay.raw_sft.iterdir()] == ["train.jsonl"]
    assert out["data/train_prompts"] == 1 and out["source"] == "remote"


def test_a_missing_dataset_names_its_source(tmp_path):
    with HubServer(_repos(with_eval=False)) as hub:
        cfg = PipelineConfig.model_validate({"profile": "qwen3-4b", "data": {"hub_endpoint": hub.url}})
        with pytest.raises(Exception, match="zhuzilin/aime-2024"):
            stage_download(cfg, Layout(tmp_path))
    assert not Layout(tmp_path).train_jsonl.exists()
