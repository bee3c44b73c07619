"""Expected remote files, local hashing and checksum verification, the completion manifest.

A downloaded directory counts as complete only when it holds MANIFEST_NAME, written last, just before
the directory is renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

MANIFEST_NAME = ".retool-download.json"
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A source could not be downloaded; nothing was promoted."""


class ChecksumMismatchError(DownloadError):
    """A downloaded file differs from the checksum or size the remote side lists for it."""


@dataclass(frozen=True)
class RemoteFile:
    """A file as the remote lists it: whichever checksums it publishes (at least the size)."""

    path: str  # relative, '/'-separated
    size: int
    sha256: str | None = None  # Hub LFS files
    git_sha1: str | None = None  # Hub non-LFS files (git blob id)
    md5: str | None = None  # S3 single-part ETag
    multipart_etag: str | None = None  # S3 multipart ETag "<md5 of part md5s>-<parts>"
    part_size: int | None = None  # needed to recompute a multipart ETag

    @property
    def check(self) -> str:
        """The strongest check this listing allows ("size" when the remote publishes no checksum)."""
        if self.sha256:
            return "sha256"
        if self.git_sha1:
            return "git_sha1"
        if self.md5:
            return "md5"
        if self.multipart_etag and self.part_size:
            return "multipart_etag"
        return "size"


@dataclass(frozen=True)
class LocalFile:
    path: str
    size: int
    sha256: str  # empty when checksums were not computed
    verified_by: str  # which remote check the file passed: sha256 | git_sha1 | md5 | multipart_etag | size


def hash_file(path: Path, remote: RemoteFile, bar: tqdm | None = None) -> tuple[str, list[str]]:
    """sha256 of the file, and the mismatches against `remote` (empty when everything listed agrees)."""
    size = path.stat().st_size
    problems: list[str] = []
    if size != remote.size:
        problems.append(f"size {size} != expected {remote.size}")
    sha256 = hashlib.sha256()
    git = hashlib.sha1(b"blob %d\0" % size) if remote.git_sha1 else None
    md5 = hashlib.md5() if remote.md5 else None
    part_md5s: list[bytes] = []
    part = hashlib.md5() if remote.multipart_etag and remote.part_size else None
    in_part = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            sha256.update(chunk)
            if git is not None:
                git.update(chunk)
            if md5 is not None:
                md5.update(chunk)
            if part is not None and remote.part_size:
                view = memoryview(chunk)
                while view:
                    take = min(len(view), remote.part_size - in_part)
                    part.update(view[:take])
                    in_part += take
                    view = view[take:]
                    if in_part == remote.part_size:
                        part_md5s.append(part.digest())
                        part, in_part = hashlib.md5(), 0
            if bar is not None:
                bar.update(len(chunk))
    digest = sha256.hexdigest()
    if remote.sha256 and digest != remote.sha256:
        problems.append(f"sha256 {digest} != expected {remote.sha256}")
    if git is not None and git.hexdigest() != remote.git_sha1:
        problems.append(f"git blob sha1 {git.hexdigest()} != expected {remote.git_sha1}")
    if md5 is not None and md5.hexdigest() != remote.md5:
        problems.append(f"md5 {md5.hexdigest()} != expected ETag {remote.md5}")
    if part is not None and remote.multipart_etag:
        if in_part:
            part_md5s.append(part.digest())
        etag = f"{hashlib.md5(b''.join(part_md5s)).hexdigest()}-{len(part_md5s)}"
        if etag != remote.multipart_etag:
            problems.append(f"multipart ETag {etag} != expected {remote.multipart_etag}")
    return digest, problems


def verify_files(
    root: Path, files: list[RemoteFile], *, checksums: bool = True, desc: str = "verify"
) -> tuple[list[LocalFile], dict[str, list[str]]]:
    """Check every listed file under root; returns the local records and {path: problems} of the bad ones."""
    records: list[LocalFile] = []
    bad: dict[str, list[str]] = {}
    total = sum(f.size for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not checksums or None) as bar:
        for rf in files:
            p = root / rf.path
            if not p.is_file():
                bad[rf.path] = ["missing"]
                continue
            if checksums:
                digest, problems = hash_file(p, rf, bar)
            else:
                size = p.stat().st_size
                digest, problems = "", ([] if size == rf.size else [f"size {size} != expected {rf.size}"])
            if problems:
                bad[rf.path] = problems
            records.append(LocalFile(rf.path, rf.size, digest, rf.check if checksums else "size"))
    return records, bad


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(tmp: str | Path, path: str | Path) -> None:
    """Give a finished temp file (mkstemp makes them 0600) normal permissions and rename it into place."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temp file beside `path`, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(directory: Path) -> dict[str, Any] | None:
    p = directory / MANIFEST_NAME
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def local_copy_intact(directory: Path, manifest: dict[str, Any], *, rehash: bool = False) -> bool:
    """Every file the manifest lists is present with its recorded size (and sha256 when rehash)."""
    for entry in manifest.get("files", []):
        p = directory / entry["path"]
        if not p.is_file() or p.stat().st_size != entry["size"]:
            return False
        if rehash:
            digest, _ = hash_file(p, RemoteFile(entry["path"], entry["size"]))
            if digest != entry.get("sha256"):
                return False
    return True


def files_as_dicts(records: list[LocalFile]) -> list[dict[str, Any]]:
    return [asdict(r) for r in records]
