"""The S3 path (boto3, managed multipart transfer) against moto's standalone S3 server on loopback."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig

from retool.data import (
    MANIFEST_NAME,
    ChecksumMismatchError,
    DataConfig,
    DownloadError,
    SourceConfig,
    download,
    download_source,
)
from retool.data.s3 import list_files, make_client, parse_s3_uri

from .conftest import FaultProxy

MiB = 1024 * 1024
BIG = os.urandom(12 * MiB)  # uploaded in 5 MiB parts: a multipart ETag
SMALL = {"config.json": b'{"model_type": "qwen3"}', "sub/tokenizer.json": b'{"v": 1}'}
pytestmark = pytest.mark.usefixtures("aws_env")


def _bucket(moto_url: str, name: str) -> str:
    s3 = boto3.client("s3", endpoint_url=moto_url)
    s3.create_bucket(Bucket=name)
    for key, data in SMALL.items():
        s3.put_object(Bucket=name, Key=f"mirror/qwen/{key}", Body=data)
    s3.upload_fileobj(
        __import__("io").BytesIO(BIG),
        name,
        "mirror/qwen/model.safetensors",
        Config=TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB),
    )
    s3.put_object(Bucket=name, Key="mirror/other/x.txt", Body=b"not ours")
    return f"s3://{name}/mirror/qwen"


def _source(uri: str, **kw: object) -> dict[str, SourceConfig]:
    return {
        "base_model": SourceConfig(repo_id="Qwen/Qwen3-4B-Instruct-2507", repo_type="model", s3_uri=uri, **kw)
    }  # type: ignore[arg-type]


def test_parse_s3_uri() -> None:
    assert parse_s3_uri("s3://b/a/b/") == ("b", "a/b/")
    assert parse_s3_uri("s3://b") == ("b", "")
    with pytest.raises(ValueError, match="not an s3"):
        parse_s3_uri("https://b/x")


def test_mirror_download_verifies_md5_and_multipart_etags(moto_url: str, tmp_path: Path) -> None:
    uri = _bucket(moto_url, "mirror-one")
    listed = {f.path: f for f in list_files(uri, client=make_client(moto_url))}
    assert listed["model.safetensors"].multipart_etag and listed["model.safetensors"].part_size == 5 * MiB
    assert listed["config.json"].md5 == hashlib.md5(SMALL["config.json"]).hexdigest()
    cfg = DataConfig(sources=_source(uri), s3_endpoint_url=moto_url)
    report = download(cfg, tmp_path, s3_multipart_threshold=4 * MiB, s3_multipart_chunksize=4 * MiB)
    out = tmp_path / "base_model"
    assert (out / "model.safetensors").read_bytes() == BIG
    assert {p: (out / p).read_bytes() for p in SMALL} == SMALL
    assert not (out / "x.txt").exists()  # outside the prefix
    assert report.sources[0].backend == "s3" and report.sources[0].files == 3
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["complete"] and manifest["spec"]["s3_uri"] == uri
    checks = {f["path"]: f["verified_by"] for f in manifest["files"]}
    assert checks == {
        "config.json": "md5",
        "model.safetensors": "multipart_etag",
        "sub/tokenizer.json": "md5",
    }
    assert not list(tmp_path.glob(".*.partial"))


def test_skip_then_refetch_when_the_mirror_changes(moto_url: str, tmp_path: Path) -> None:
    uri = _bucket(moto_url, "mirror-two")
    download(_source(uri, allow_patterns=["*.json"]), tmp_path, s3_endpoint_url=moto_url)
    assert not (tmp_path / "base_model/model.safetensors").exists()
    again = download(_source(uri, allow_patterns=["*.json"]), tmp_path, s3_endpoint_url=moto_url)
    assert again.sources[0].status == "skipped"
    boto3.client("s3", endpoint_url=moto_url).put_object(
        Bucket="mirror-two", Key="mirror/qwen/config.json", Body=b'{"changed": true}'
    )
    third = download(_source(uri, allow_patterns=["*.json"]), tmp_path, s3_endpoint_url=moto_url)
    assert third.sources[0].status == "downloaded"
    assert (tmp_path / "base_model/config.json").read_bytes() == b'{"changed": true}'


def test_interrupted_mirror_download_resumes_keeping_finished_files(
    moto_url: str, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    uri = _bucket(moto_url, "mirror-three")
    fault_proxy.deny.add("model.safetensors")  # the connection to the big object fails
    with pytest.raises(DownloadError, match="base_model"):
        download(_source(uri), tmp_path, s3_endpoint_url=fault_proxy.url, max_workers=1)
    assert not (tmp_path / "base_model").exists()
    partial = tmp_path / ".base_model.partial"
    finished = partial / "config.json"
    assert finished.read_bytes() == SMALL["config.json"]
    inode = finished.stat().st_ino
    fault_proxy.deny.clear()
    report = download(_source(uri), tmp_path, s3_endpoint_url=fault_proxy.url, max_workers=1)
    assert report.sources[0].status == "downloaded"
    out = tmp_path / "base_model"
    assert (out / "config.json").stat().st_ino == inode  # kept, not fetched again
    assert (out / "model.safetensors").read_bytes() == BIG
    assert not list(out.rglob("*.retool-part*"))


@pytest.mark.parametrize("key", ["config.json", "model.safetensors"])
def test_corrupted_transfer_is_a_checksum_error(
    moto_url: str, fault_proxy: FaultProxy, tmp_path: Path, key: str
) -> None:
    uri = _bucket(moto_url, f"mirror-bad-{key.split('.')[0]}")
    fault_proxy.corrupt.add(key)
    with pytest.raises(ChecksumMismatchError, match=key.replace(".", r"\.")):
        download(_source(uri), tmp_path, s3_endpoint_url=fault_proxy.url, s3_multipart_threshold=4 * MiB)
    assert not (tmp_path / "base_model").exists()
    assert not (tmp_path / ".base_model.partial" / key).exists()


def test_unreachable_mirror_keeps_a_complete_local_copy(moto_url: str, tmp_path: Path) -> None:
    uri = _bucket(moto_url, "mirror-offline")
    download(_source(uri, allow_patterns=["*.json"]), tmp_path, s3_endpoint_url=moto_url)
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    client = boto3.client("s3", endpoint_url=dead, config=BotoConfig(retries={"max_attempts": 1}))
    src = _source(uri, allow_patterns=["*.json"])["base_model"]
    assert download_source("base_model", src, tmp_path, s3_client=client).status == "kept_offline"
    with pytest.raises(DownloadError, match="mirror-offline"):
        download_source("other", src, tmp_path, s3_client=client)


def test_mirror_s3_without_uri_and_missing_prefix(moto_url: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no s3_uri"):
        download({"m": SourceConfig(repo_id="a/b")}, tmp_path, mirror="s3")
    boto3.client("s3", endpoint_url=moto_url).create_bucket(Bucket="empty-bucket")
    with pytest.raises(DownloadError, match="no objects under s3://empty-bucket/nothing"):
        download(_source("s3://empty-bucket/nothing"), tmp_path, s3_endpoint_url=moto_url)
