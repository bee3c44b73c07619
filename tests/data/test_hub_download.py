"""The real Hub download path (huggingface_hub snapshot_download) against a loopback server speaking the
Hub's URL scheme: selection by patterns, pinned revisions, idempotence, resume, checksum mismatch."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from retool.data import MANIFEST_NAME, ChecksumMismatchError, DownloadError, SourceConfig, download

from .hub_server import FakeRepo, HubServer

PARQUET = os.urandom(200_000)
WEIGHTS = os.urandom(150_000)


def _repos() -> list[FakeRepo]:
    return [
        FakeRepo(
            "JoeYing/ReTool-SFT",
            "dataset",
            {
                "data/train-00000-of-00001.parquet": PARQUET,
                "README.md": b"# ReTool-SFT\n",
                "images/big.png": b"\x89PNG" + b"\0" * 100,
            },
            lfs={"data/train-00000-of-00001.parquet"},
        ),
        FakeRepo(
            "Qwen/Qwen3-4B-Instruct-2507",
            "model",
            {"config.json": b'{"model_type": "qwen3"}', "model.safetensors": WEIGHTS},
            lfs={"model.safetensors"},
        ),
    ]


SOURCES = {
    "sft": SourceConfig(
        repo_id="JoeYing/ReTool-SFT", repo_type="dataset", allow_patterns=["*.parquet", "*.md"]
    ),
    "base_model": SourceConfig(repo_id="Qwen/Qwen3-4B-Instruct-2507", repo_type="model"),
}


def _resolve_gets(server: HubServer) -> list[str]:
    return [p for m, p, _ in server.requests if m == "GET" and "/resolve/" in p]


def test_downloads_dataset_and_model_through_hf_endpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with HubServer(_repos()) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)  # read at call time, not at import
        report = download(SOURCES, tmp_path)
    sft, model = tmp_path / "sft", tmp_path / "base_model"
    assert (sft / "data/train-00000-of-00001.parquet").read_bytes() == PARQUET
    assert (sft / "README.md").read_bytes() == b"# ReTool-SFT\n"
    assert not (sft / "images").exists()  # not selected by allow_patterns
    assert (model / "model.safetensors").read_bytes() == WEIGHTS
    assert not (sft / ".cache").exists() and not (tmp_path / ".sft.partial").exists()
    manifest = json.loads((sft / MANIFEST_NAME).read_text())
    assert manifest["complete"] and manifest["checksums_verified"]
    assert manifest["resolved"] == _repos()[0].revisions["main"]
    by_path = {f["path"]: f for f in manifest["files"]}
    assert by_path["data/train-00000-of-00001.parquet"]["sha256"] == hashlib.sha256(PARQUET).hexdigest()
    assert by_path["data/train-00000-of-00001.parquet"]["verified_by"] == "sha256"  # LFS
    assert by_path["README.md"]["verified_by"] == "git_sha1"  # plain git blob
    assert [s.status for s in report.sources] == ["downloaded", "downloaded"]
    assert report.sources[1].bytes == len(WEIGHTS) + len(b'{"model_type": "qwen3"}')
    assert report.metrics()["download/files"] == 4.0
    # model files come from /{repo}/resolve, dataset files from /datasets/{repo}/resolve
    paths = [p for _, p, _ in server.requests]
    assert any(p.startswith("/datasets/JoeYing/ReTool-SFT/resolve/") for p in paths)
    assert any(p.startswith("/Qwen/Qwen3-4B-Instruct-2507/resolve/") for p in paths)


def test_skips_matching_copy_and_follows_a_moved_branch(tmp_path: Path) -> None:
    repos = _repos()
    with HubServer(repos) as server:
        download(SOURCES, tmp_path, hub_endpoint=server.url)
        server.requests.clear()
        again = download(SOURCES, tmp_path, hub_endpoint=server.url)
        assert [s.status for s in again.sources] == ["skipped", "skipped"]
        assert _resolve_gets(server) == []  # only the branch was resolved, no file fetched
        # the branch moves to a new commit with new content: fetched again and swapped in
        repos[1].files["config.json"] = b'{"model_type": "qwen3", "v": 2}'
        repos[1].revisions["main"] = "1" * 40
        third = download(SOURCES, tmp_path, hub_endpoint=server.url)
    assert [s.status for s in third.sources] == ["skipped", "downloaded"]
    assert third.sources[1].resolved == "1" * 40
    assert (tmp_path / "base_model/config.json").read_bytes() == b'{"model_type": "qwen3", "v": 2}'
    assert not (tmp_path / ".base_model.old").exists()


def test_pinned_commit_skips_without_any_request(tmp_path: Path) -> None:
    repos = _repos()
    commit = repos[1].revisions["main"]
    pinned = {"m": SourceConfig(repo_id="Qwen/Qwen3-4B-Instruct-2507", repo_type="model", revision=commit)}
    with HubServer(repos) as server:
        first = download(pinned, tmp_path, hub_endpoint=server.url)
        assert first.sources[0].resolved == commit
        assert not any("/revision/" in p for _, p, _ in server.requests)  # a commit needs no resolving
        server.requests.clear()
        assert download(pinned, tmp_path, hub_endpoint=server.url).sources[0].status == "skipped"
        assert server.requests == []


def test_dropped_connection_resumes_with_a_range_request(tmp_path: Path) -> None:
    big = os.urandom(24 * 1024 * 1024)  # > huggingface_hub's 10 MiB write chunk, so bytes reach disk first
    repo = FakeRepo("org/big", "model", {"shard.safetensors": big}, lfs={"shard.safetensors"})
    with HubServer([repo]) as server:
        server.drop_once.add("shard.safetensors")
        download({"m": SourceConfig(repo_id="org/big", repo_type="model")}, tmp_path, hub_endpoint=server.url)
        ranges = server.gets("shard.safetensors")
    assert ranges[0] is None and len(ranges) == 2
    assert ranges[1] is not None and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"
    assert (
        hashlib.sha256((tmp_path / "m/shard.safetensors").read_bytes()).digest()
        == hashlib.sha256(big).digest()
    )


def test_interrupted_download_promotes_nothing_and_resumes(tmp_path: Path) -> None:
    files = {"a.bin": os.urandom(50_000), "b.bin": os.urandom(50_000)}
    repo = FakeRepo("org/two", "dataset", dict(files), lfs={"a.bin"})
    source = {"d": SourceConfig(repo_id="org/two")}
    with HubServer([repo]) as server:
        server.fail.add("b.bin")  # the server dies on the second file
        with pytest.raises(DownloadError, match=r"source 'd'.*org/two"):
            download(source, tmp_path, hub_endpoint=server.url, max_workers=1)
        assert not (tmp_path / "d").exists()
        partial = tmp_path / ".d.partial"
        assert (partial / "a.bin").read_bytes() == files["a.bin"]
        assert not json.loads((partial / MANIFEST_NAME).read_text())["complete"]
        server.fail.clear()
        report = download(source, tmp_path, hub_endpoint=server.url, max_workers=1)
        assert len(server.gets("a.bin")) == 1  # kept from the interrupted run, not fetched again
    assert report.sources[0].status == "downloaded"
    assert {p: (tmp_path / "d" / p).read_bytes() for p in files} == files
    assert not partial.exists()


def test_killed_download_leaves_only_the_partial_directory(tmp_path: Path) -> None:
    """SIGKILL mid-transfer (no cleanup runs): no out_dir/<name> appears; the next run resumes."""
    files = {"a.bin": os.urandom(20_000), "b.bin": os.urandom(4 * 1024 * 1024)}
    repo = FakeRepo("org/slow", "model", dict(files), lfs={"b.bin"})
    script = (
        "import sys; from retool.data import SourceConfig, download; "
        "download({'m': SourceConfig(repo_id='org/slow', repo_type='model')}, sys.argv[1], "
        "hub_endpoint=sys.argv[2], max_workers=1)"
    )
    with HubServer([repo]) as server:
        server.throttle.add("b.bin")  # about 3 s to serve
        proc = subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path), server.url], stderr=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 60
            while not server.gets("b.bin"):
                assert proc.poll() is None and time.monotonic() < deadline, "download never reached b.bin"
                time.sleep(0.05)
            time.sleep(0.3)
        finally:
            proc.kill()
            proc.wait()
        assert not (tmp_path / "m").exists()
        partial = tmp_path / ".m.partial"
        assert (partial / "a.bin").read_bytes() == files["a.bin"] and not (partial / "b.bin").exists()
        server.throttle.clear()
        report = download(
            {"m": SourceConfig(repo_id="org/slow", repo_type="model")}, tmp_path, hub_endpoint=server.url
        )
        assert len(server.gets("a.bin")) == 1
    assert report.sources[0].status == "downloaded"
    assert {p: (tmp_path / "m" / p).read_bytes() for p in files} == files


def test_checksum_mismatch_is_an_error_and_nothing_is_promoted(tmp_path: Path) -> None:
    repos = _repos()
    with HubServer(repos) as server:
        server.corrupt.update({"model.safetensors", "config.json"})  # an LFS file (sha256) and a git blob
        with pytest.raises(ChecksumMismatchError) as err:
            download({"base_model": SOURCES["base_model"]}, tmp_path, hub_endpoint=server.url)
        msg = str(err.value)
        assert "model.safetensors: sha256" in msg and "config.json: git blob sha1" in msg
        assert not (tmp_path / "base_model").exists()
        assert not (tmp_path / ".base_model.partial/model.safetensors").exists()  # bad file dropped
        server.corrupt.clear()
        report = download({"base_model": SOURCES["base_model"]}, tmp_path, hub_endpoint=server.url)
    assert report.sources[0].status == "downloaded"
    assert (tmp_path / "base_model/model.safetensors").read_bytes() == WEIGHTS


def test_missing_repo_and_revision_are_clear_errors(tmp_path: Path) -> None:
    with HubServer(_repos()) as server:
        with pytest.raises(DownloadError, match="nobody/nothing"):
            download({"x": SourceConfig(repo_id="nobody/nothing")}, tmp_path, hub_endpoint=server.url)
        with pytest.raises(DownloadError, match="v9"):
            download(
                {"x": SourceConfig(repo_id="JoeYing/ReTool-SFT", revision="v9")},
                tmp_path,
                hub_endpoint=server.url,
            )
    assert not (tmp_path / "x").exists()


def test_unreachable_hub_keeps_a_complete_local_copy(tmp_path: Path) -> None:
    with HubServer(_repos()) as server:
        download({"base_model": SOURCES["base_model"]}, tmp_path, hub_endpoint=server.url)
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    report = download({"base_model": SOURCES["base_model"]}, tmp_path, hub_endpoint=dead)
    assert report.sources[0].status == "kept_offline"
    with pytest.raises(DownloadError):  # nothing local to fall back on
        download({"sft": SOURCES["sft"]}, tmp_path, hub_endpoint=dead)
