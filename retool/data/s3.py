"""S3 transfers through boto3: s3://bucket/prefix to a local directory.

Large objects go through boto3's managed transfer (TransferConfig: ranged parts fetched concurrently).
Each object lands in `<path>.retool-part` and is renamed when complete, so after an interruption the
completed files are kept and only the unfinished ones are fetched again. ETags give the checksum: the
md5 for single-part objects, the md5 of part md5s for multipart ones (the part size is read from the
object's first part).
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from botocore.exceptions import FlexibleChecksumError
from huggingface_hub.utils import filter_repo_objects
from tqdm.auto import tqdm

from retool.data.manifest import ChecksumMismatchError, RemoteFile

log = logging.getLogger(__name__)

PART_SUFFIX = ".retool-part"
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNKSIZE = 16 * 1024 * 1024


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/some/prefix -> ("bucket", "some/prefix/") ; the prefix is empty or ends with '/'."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {uri!r}")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/" if prefix else "")


def make_client(endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client; credentials and region come from the usual AWS environment/config chain."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        config=BotoConfig(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=32),
    )


def list_files(
    uri: str,
    *,
    client: Any,
    allow_patterns: list[str] | None = None,
    ignore_patterns: list[str] | None = None,
) -> list[RemoteFile]:
    """Objects under the prefix that the patterns select, as RemoteFiles with their ETag checksums."""
    bucket, prefix = parse_s3_uri(uri)
    objects: dict[str, dict[str, Any]] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix) :]
            if rel and not rel.endswith("/"):
                objects[rel] = obj
    if not objects:
        raise FileNotFoundError(f"no objects under {uri}")
    files = []
    for rel in sorted(
        filter_repo_objects(objects.keys(), allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
    ):
        obj = objects[rel]
        etag = obj["ETag"].strip('"')
        if "-" in etag:
            part_size = 0
            try:
                head = client.head_object(Bucket=bucket, Key=prefix + rel, PartNumber=1)
                part_size = int(head.get("ContentLength") or 0)
            except Exception as e:  # some S3-compatible stores do not answer per-part HEADs
                log.warning("s3://%s/%s%s: no part size (%s)", bucket, prefix, rel, e)
            if part_size > 0:
                files.append(RemoteFile(rel, obj["Size"], multipart_etag=etag, part_size=part_size))
            else:
                log.warning(
                    "s3://%s/%s%s: multipart ETag not checkable; verifying its size only", bucket, prefix, rel
                )
                files.append(RemoteFile(rel, obj["Size"]))
        elif len(etag) == 32:
            files.append(RemoteFile(rel, obj["Size"], md5=etag))
        else:  # an ETag that is not an md5 (e.g. some SSE modes): size only
            files.append(RemoteFile(rel, obj["Size"]))
    return files


def fingerprint(files: list[RemoteFile]) -> str:
    """A stable id of the listed objects (paths, sizes, ETags): the S3 analogue of a commit."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.path}\0{f.size}\0{f.md5 or f.multipart_etag or ''}\n".encode())
    return h.hexdigest()


def fetch(
    uri: str,
    files: list[RemoteFile],
    dest: Path,
    *,
    client: Any,
    max_workers: int = 8,
    multipart_threshold: int = MULTIPART_THRESHOLD,
    multipart_chunksize: int = MULTIPART_CHUNKSIZE,
) -> None:
    """Download the listed objects into dest, skipping files already complete there."""
    bucket, prefix = parse_s3_uri(uri)
    for stale in dest.rglob(f"*{PART_SUFFIX}*"):  # leftovers of an interrupted run
        stale.unlink()
    todo = [f for f in files if not ((dest / f.path).is_file() and (dest / f.path).stat().st_size == f.size)]
    config = TransferConfig(
        multipart_threshold=multipart_threshold,
        multipart_chunksize=multipart_chunksize,
        max_concurrency=max(1, min(max_workers, 10)),
        use_threads=True,
    )
    with tqdm(total=sum(f.size for f in todo), unit="B", unit_scale=True, desc=f"s3 {uri}") as bar:

        def one(f: RemoteFile) -> None:
            target = dest / f.path
            target.parent.mkdir(parents=True, exist_ok=True)
            part = target.with_name(target.name + PART_SUFFIX)
            try:
                with part.open("wb") as fh:
                    client.download_fileobj(bucket, prefix + f.path, fh, Config=config, Callback=bar.update)
                    fh.flush()
                    os.fsync(fh.fileno())
            except FlexibleChecksumError as e:  # botocore checked the object's own checksum for us
                part.unlink(missing_ok=True)
                raise ChecksumMismatchError(f"{f.path}: {e}") from e
            os.replace(part, target)

        with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(todo) or 1))) as pool:
            for fut in [pool.submit(one, f) for f in todo]:
                fut.result()
