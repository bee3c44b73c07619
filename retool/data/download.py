"""Download sources (Hub or S3) into out_dir/<name>, idempotently and atomically.

Layout written for each source `name`:
    out_dir/<name>/...                  the repository's selected files, with their repository paths
    out_dir/<name>/.retool-download.json  manifest (source, resolved commit or S3 fingerprint, files with
                                        size and sha256), written last
Work happens in out_dir/.<name>.partial and is renamed to out_dir/<name> only after every file matched
its published checksum; a failed or interrupted run leaves only the .partial directory (which the next
run resumes from), never an incomplete out_dir/<name>. A source whose local copy already matches (same
spec, same resolved commit or S3 listing, files present) is skipped.
"""

from __future__ import annotations

import fcntl
import logging
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx2
from botocore.exceptions import ConnectionError as BotoConnectionError

from retool.data import hub, s3
from retool.data.config import DataConfig, SourceConfig
from retool.data.manifest import (
    MANIFEST_NAME,
    ChecksumMismatchError,
    DownloadError,
    files_as_dicts,
    local_copy_intact,
    read_manifest,
    verify_files,
    write_json_atomic,
)

log = logging.getLogger(__name__)

Backend = Literal["hub", "s3"]


@dataclass
class SourceReport:
    name: str
    backend: Backend
    status: Literal["downloaded", "skipped", "kept_offline"]
    path: str
    repo_id: str
    revision: str  # as requested
    resolved: str  # Hub commit, or S3 listing fingerprint
    files: int
    bytes: int
    seconds: float


@dataclass
class DownloadReport:
    out_dir: str
    sources: list[SourceReport] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": self.out_dir, "sources": [asdict(s) for s in self.sources]}

    def metrics(self) -> dict[str, float]:
        return {
            "download/files": float(sum(s.files for s in self.sources)),
            "download/bytes": float(sum(s.bytes for s in self.sources)),
            "download/seconds": float(sum(s.seconds for s in self.sources)),
            "download/skipped": float(sum(s.status != "downloaded" for s in self.sources)),
        }

    def write_json(self, path: str | Path) -> None:
        write_json_atomic(Path(path), self.to_dict())


def choose_backend(name: str, source: SourceConfig, mirror: Literal["auto", "hub", "s3"]) -> Backend:
    if mirror == "s3" or (mirror == "auto" and source.s3_uri):
        if not source.s3_uri:
            raise ValueError(f"source {name!r}: mirror is 's3' but the source has no s3_uri")
        return "s3"
    return "hub"


def _spec(source: SourceConfig, backend: Backend) -> dict[str, Any]:
    """The part of a source that decides which files a download holds."""
    return {
        "backend": backend,
        "repo_id": source.repo_id,
        "repo_type": source.repo_type,
        "revision": source.revision if backend == "hub" else None,
        "s3_uri": source.s3_uri if backend == "s3" else None,
        "allow_patterns": source.allow_patterns,
        "ignore_patterns": source.ignore_patterns,
    }


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialize downloads of one source across processes (two stages or users racing on one out_dir)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _promote(partial: Path, final: Path) -> None:
    """Swap the finished partial directory into place (a previous copy is removed afterwards)."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    partial.rename(final)
    if old.exists():
        shutil.rmtree(old)


def download_source(
    name: str,
    source: SourceConfig,
    out_dir: str | Path,
    *,
    mirror: Literal["auto", "hub", "s3"] = "auto",
    hub_endpoint: str | None = None,
    s3_endpoint_url: str | None = None,
    token: str | None = None,
    max_workers: int = 8,
    verify_checksums: bool = True,
    rehash_existing: bool = False,
    force: bool = False,
    s3_client: Any = None,
    s3_multipart_threshold: int = s3.MULTIPART_THRESHOLD,
    s3_multipart_chunksize: int = s3.MULTIPART_CHUNKSIZE,
) -> SourceReport:
    """Download one source into out_dir/<name> (see the module docstring for the layout and guarantees)."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"invalid source name {name!r}")
    out = Path(out_dir)
    final, partial = out / name, out / f".{name}.partial"
    backend = choose_backend(name, source, mirror)
    spec = _spec(source, backend)
    where = source.s3_uri if backend == "s3" else f"{source.repo_id}@{source.revision}"
    t0 = time.monotonic()

    def report(
        status: Literal["downloaded", "skipped", "kept_offline"], resolved: str, files: list[dict[str, Any]]
    ) -> SourceReport:
        return SourceReport(
            name=name,
            backend=backend,
            status=status,
            path=str(final),
            repo_id=source.repo_id,
            revision=source.revision,
            resolved=resolved,
            files=len(files),
            bytes=sum(int(f["size"]) for f in files),
            seconds=round(time.monotonic() - t0, 3),
        )

    with _locked(out / f".{name}.lock"):
        manifest = None if force else read_manifest(final)
        same_spec = manifest is not None and manifest.get("spec") == spec
        client = None
        try:
            # 1. What does the remote hold now?
            if backend == "hub":
                try:
                    resolved = hub.resolve_revision(source, endpoint=hub_endpoint, token=token)
                except (httpx2.ConnectError, httpx2.TimeoutException) as e:
                    if manifest is not None and same_spec and local_copy_intact(final, manifest):
                        log.warning("source %r: Hub unreachable (%s); keeping the local copy", name, e)
                        return report("kept_offline", manifest["resolved"], manifest["files"])
                    raise
            else:
                client = s3_client or s3.make_client(s3_endpoint_url)
                assert source.s3_uri is not None
                try:
                    remote_files = s3.list_files(
                        source.s3_uri,
                        client=client,
                        allow_patterns=source.allow_patterns,
                        ignore_patterns=source.ignore_patterns,
                    )
                except BotoConnectionError as e:
                    if manifest is not None and same_spec and local_copy_intact(final, manifest):
                        log.warning("source %r: S3 unreachable (%s); keeping the local copy", name, e)
                        return report("kept_offline", manifest["resolved"], manifest["files"])
                    raise
                resolved = s3.fingerprint(remote_files)

            # 2. Already here?
            if (
                manifest is not None
                and same_spec
                and manifest.get("resolved") == resolved
                and local_copy_intact(final, manifest, rehash=rehash_existing)
            ):
                log.info("source %r: local copy matches %s (%s); skipping", name, where, resolved[:12])
                return report("skipped", resolved, manifest["files"])

            # 3. Fetch into the partial directory (resuming whatever an earlier run completed there).
            previous = read_manifest(partial) if partial.exists() else None
            if previous is not None and (
                previous.get("spec") != spec or previous.get("resolved") != resolved
            ):
                shutil.rmtree(partial)  # left by a run for another revision: start over
            partial.mkdir(parents=True, exist_ok=True)
            write_json_atomic(
                partial / MANIFEST_NAME, {"spec": spec, "resolved": resolved, "complete": False}
            )
            if backend == "hub":
                remote_files = hub.list_files(source, resolved, endpoint=hub_endpoint, token=token)
                if not remote_files:
                    raise DownloadError(f"source {name!r}: no files of {where} match the patterns")
                hub.fetch(
                    source, resolved, partial, endpoint=hub_endpoint, token=token, max_workers=max_workers
                )
            else:
                assert source.s3_uri is not None
                s3.fetch(
                    source.s3_uri,
                    remote_files,
                    partial,
                    client=client,
                    max_workers=max_workers,
                    multipart_threshold=s3_multipart_threshold,
                    multipart_chunksize=s3_multipart_chunksize,
                )
        except ChecksumMismatchError as e:
            raise ChecksumMismatchError(f"source {name!r} ({backend}: {where}): nothing promoted: {e}") from e
        except DownloadError:
            raise
        except Exception as e:
            raise DownloadError(
                f"source {name!r} ({backend}: {where}) failed: {type(e).__name__}: {e}"
            ) from e

        # 4. Verify, then promote.
        records, bad = verify_files(partial, remote_files, checksums=verify_checksums, desc=f"verify {name}")
        if bad:
            for path in bad:  # drop the bad files so the next run fetches them again
                (partial / path).unlink(missing_ok=True)
            details = "; ".join(f"{p}: {', '.join(v)}" for p, v in sorted(bad.items()))
            raise ChecksumMismatchError(
                f"source {name!r} ({backend}: {where}): {len(bad)} file(s) failed verification, nothing "
                f"promoted: {details}"
            )
        shutil.rmtree(partial / ".cache", ignore_errors=True)  # huggingface_hub's per-file bookkeeping
        files = files_as_dicts(records)
        write_json_atomic(
            partial / MANIFEST_NAME,
            {
                "spec": spec,
                "resolved": resolved,
                "complete": True,
                "checksums_verified": verify_checksums,
                "files": files,
                "completed_at": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )
        _promote(partial, final)
        log.info("source %r: %d files from %s promoted to %s", name, len(files), where, final)
        return report("downloaded", resolved, files)


def download(
    sources: Mapping[str, SourceConfig] | DataConfig,
    out_dir: str | Path,
    *,
    mirror: Literal["auto", "hub", "s3"] | None = None,
    hub_endpoint: str | None = None,
    s3_endpoint_url: str | None = None,
    token: str | None = None,
    max_workers: int | None = None,
    verify_checksums: bool | None = None,
    rehash_existing: bool = False,
    force: bool = False,
    s3_multipart_threshold: int = s3.MULTIPART_THRESHOLD,
    s3_multipart_chunksize: int = s3.MULTIPART_CHUNKSIZE,
) -> DownloadReport:
    """Download every enabled source into out_dir/<name>; keyword arguments left None come from the
    DataConfig when one is passed, else from the defaults."""
    if isinstance(sources, DataConfig):
        cfg = sources
        selected = cfg.enabled_sources()
        mirror = mirror or cfg.mirror
        hub_endpoint = hub_endpoint or cfg.hub_endpoint
        s3_endpoint_url = s3_endpoint_url or cfg.s3_endpoint_url
        max_workers = max_workers or cfg.max_workers
        verify_checksums = cfg.verify_checksums if verify_checksums is None else verify_checksums
    else:
        selected = {n: s for n, s in sources.items() if s.enabled}
    report = DownloadReport(out_dir=str(out_dir))
    for name, source in selected.items():
        report.sources.append(
            download_source(
                name,
                source,
                out_dir,
                mirror=mirror or "auto",
                hub_endpoint=hub_endpoint,
                s3_endpoint_url=s3_endpoint_url,
                token=token,
                max_workers=max_workers or 8,
                verify_checksums=True if verify_checksums is None else verify_checksums,
                rehash_existing=rehash_existing,
                force=force,
                s3_multipart_threshold=s3_multipart_threshold,
                s3_multipart_chunksize=s3_multipart_chunksize,
            )
        )
    return report
