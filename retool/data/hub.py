"""Hugging Face Hub transfers through huggingface_hub (snapshot_download into a local directory).

The Hub's tree listing gives every file's size and checksum (sha256 for LFS files, the git blob sha1
otherwise); download.py verifies the local copy against it before promoting anything.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import filter_repo_objects

from retool.data.config import SourceConfig
from retool.data.manifest import RemoteFile

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def hub_endpoint(endpoint: str | None = None) -> str | None:
    """The endpoint to use: an explicit one, else HF_ENDPOINT read now (huggingface_hub reads it at import)."""
    return endpoint or os.environ.get("HF_ENDPOINT") or None


def resolve_revision(source: SourceConfig, *, endpoint: str | None = None, token: str | None = None) -> str:
    """The commit a branch or tag points to now (a commit hash resolves to itself without a request)."""
    if _COMMIT.fullmatch(source.revision):
        return source.revision
    api = HfApi(endpoint=hub_endpoint(endpoint), token=token)
    info = api.repo_info(source.repo_id, repo_type=source.repo_type, revision=source.revision)
    if not info.sha:
        raise RuntimeError(f"the Hub returned no commit for {source.repo_id}@{source.revision}")
    return info.sha


def list_files(
    source: SourceConfig, commit: str, *, endpoint: str | None = None, token: str | None = None
) -> list[RemoteFile]:
    """Files of the repository at `commit` that the source's patterns select, with their checksums."""
    api = HfApi(endpoint=hub_endpoint(endpoint), token=token)
    entries = {
        e.path: e
        for e in api.list_repo_tree(
            source.repo_id, repo_type=source.repo_type, revision=commit, recursive=True
        )
        if isinstance(e, RepoFile)
    }
    selected = filter_repo_objects(
        entries.keys(), allow_patterns=source.allow_patterns, ignore_patterns=source.ignore_patterns
    )
    files = []
    for path in sorted(selected):
        e = entries[path]
        if e.lfs is not None:
            files.append(RemoteFile(path=path, size=e.lfs.size, sha256=e.lfs.sha256))
        else:
            files.append(RemoteFile(path=path, size=e.size, git_sha1=e.blob_id))
    return files


def fetch(
    source: SourceConfig,
    commit: str,
    dest: Path,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    max_workers: int = 8,
) -> None:
    """Download the selected files at `commit` into `dest`.

    Files already complete in `dest` from an earlier, interrupted run are kept (huggingface_hub records
    per-file metadata under dest/.cache/huggingface); a connection dropped mid-file resumes with a
    Range request.
    """
    snapshot_download(
        source.repo_id,
        repo_type=source.repo_type,
        revision=commit,
        local_dir=dest,
        allow_patterns=source.allow_patterns,
        ignore_patterns=source.ignore_patterns,
        endpoint=hub_endpoint(endpoint),
        token=token,
        max_workers=max_workers,
    )
