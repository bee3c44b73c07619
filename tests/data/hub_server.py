"""A loopback HTTP server speaking the part of the Hugging Face Hub protocol that huggingface_hub's
snapshot_download uses, so the real download code runs in tests without the Hub.

Endpoints (as called by huggingface_hub 2.x):
- GET  /api/{models|datasets}/{repo}/revision/{rev}     repo info; "sha" is the resolved commit
- GET  /api/{models|datasets}/{repo}/tree/{rev}         recursive file listing (size, git oid, lfs sha256)
- HEAD/GET /{repo}/resolve/{rev}/{file}                  model files
- HEAD/GET /datasets/{repo}/resolve/{rev}/{file}         dataset files
Resolve responses carry X-Repo-Commit, ETag (X-Linked-Etag/X-Linked-Size for LFS files), Content-Length,
and honour `Range: bytes=N-`.

Faults, for the failure tests: `corrupt` (serve bytes that differ from the listed checksums, same length),
`drop_once` (close the connection half-way through the first full GET of a file), `fail` (answer 500 to
GETs of a file), `throttle` (serve a file slowly).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeRepo:
    repo_id: str
    repo_type: str  # "model" | "dataset"
    files: dict[str, bytes]
    lfs: set[str] = field(default_factory=set)  # paths stored as LFS objects (sha256 listed)
    revisions: dict[str, str] = field(default_factory=dict)  # branch/tag -> commit

    def __post_init__(self) -> None:
        if not self.revisions:
            self.revisions = {"main": hashlib.sha1(self.repo_id.encode()).hexdigest()}

    def commit_for(self, rev: str) -> str | None:
        if rev in self.revisions:
            return self.revisions[rev]
        return rev if rev in self.revisions.values() else None


class HubServer:
    """Serve FakeRepos on 127.0.0.1 in a background thread; use as a context manager."""

    def __init__(self, repos: list[FakeRepo]) -> None:
        self.repos = {(r.repo_type, r.repo_id): r for r in repos}
        self.corrupt: set[str] = set()
        self.drop_once: set[str] = set()
        self.fail: set[str] = set()
        self.throttle: set[str] = set()  # served in 64 KiB pieces, 50 ms apart
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self._dropped: set[str] = set()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def gets(self, filename: str) -> list[str | None]:
        """Range headers of the GETs that fetched `filename` (None for a full GET)."""
        with self._lock:
            return [rng for m, p, rng in self.requests if m == "GET" and p.endswith("/" + filename)]

    # -- request handling -------------------------------------------------------------------------------
    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                server._dispatch(self, "GET")

            def do_HEAD(self) -> None:
                server._dispatch(self, "HEAD")

        return Handler

    def _send_json(self, h: BaseHTTPRequestHandler, obj: object, status: int = 200) -> None:
        body = json.dumps(obj).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    def _not_found(self, h: BaseHTTPRequestHandler, code: str, msg: str) -> None:
        body = json.dumps({"error": msg}).encode()
        h.send_response(404)
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", msg)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    def _dispatch(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = unquote(urlsplit(h.path).path)
        with self._lock:
            self.requests.append((method, path, h.headers.get("Range")))
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) >= 6 and parts[1] in ("models", "datasets"):
            repo_type = parts[1][:-1]
            repo = self.repos.get((repo_type, f"{parts[2]}/{parts[3]}"))
            if repo is None:
                return self._not_found(h, "RepoNotFound", "Repository not found")
            commit = repo.commit_for(parts[5])
            if commit is None:
                return self._not_found(h, "RevisionNotFound", "Invalid rev id")
            if parts[4] == "revision":
                return self._send_json(
                    h,
                    {
                        "id": repo.repo_id,
                        "sha": commit,
                        "private": False,
                        "siblings": [{"rfilename": p} for p in sorted(repo.files)],
                    },
                )
            if parts[4] == "tree":
                return self._send_json(h, self._tree(repo))
        repo_type = "model"
        if parts[0] == "datasets":
            repo_type, parts = "dataset", parts[1:]
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = self.repos.get((repo_type, f"{parts[0]}/{parts[1]}"))
            if repo is None:
                return self._not_found(h, "RepoNotFound", "Repository not found")
            commit = repo.commit_for(parts[3])
            if commit is None:
                return self._not_found(h, "RevisionNotFound", "Invalid rev id")
            filename = "/".join(parts[4:])
            if filename not in repo.files:
                return self._not_found(h, "EntryNotFound", "Entry not found")
            return self._serve_file(h, method, repo, commit, filename)
        return self._not_found(h, "RepoNotFound", f"no route for {path}")

    def _tree(self, repo: FakeRepo) -> list[dict[str, object]]:
        entries: list[dict[str, object]] = []
        dirs: set[str] = set()
        for p, data in sorted(repo.files.items()):
            segs = p.split("/")
            for i in range(1, len(segs)):
                dirs.add("/".join(segs[:i]))
            entry: dict[str, object] = {"type": "file", "path": p, "size": len(data)}
            if p in repo.lfs:
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\nsize {len(data)}\n"
                entry["oid"] = git_blob_sha1(pointer.encode())
                entry["lfs"] = {
                    "oid": hashlib.sha256(data).hexdigest(),
                    "size": len(data),
                    "pointerSize": len(pointer),
                }
            else:
                entry["oid"] = git_blob_sha1(data)
            entries.append(entry)
        entries += [{"type": "directory", "path": d, "oid": "0" * 40, "size": 0} for d in sorted(dirs)]
        return entries

    def _serve_file(
        self, h: BaseHTTPRequestHandler, method: str, repo: FakeRepo, commit: str, filename: str
    ) -> None:
        data = repo.files[filename]
        if filename in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        if method == "GET" and filename in self.fail:
            body = b'{"error": "internal error"}'
            h.send_response(500)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return
        if filename in repo.lfs:
            etag = hashlib.sha256(repo.files[filename]).hexdigest()
        else:
            etag = git_blob_sha1(repo.files[filename])
        start = 0
        rng = h.headers.get("Range")
        if method == "GET" and rng and rng.startswith("bytes="):
            start = int(rng[len("bytes=") :].split("-")[0] or 0)
        body = data[start:]
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", commit)
        h.send_header("ETag", f'"{etag}"')
        if filename in repo.lfs:
            h.send_header("X-Linked-Etag", f'"{etag}"')
            h.send_header("X-Linked-Size", str(len(data)))
        h.send_header("Accept-Ranges", "bytes")
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if method == "HEAD":
            return
        drop = False
        with self._lock:
            if filename in self.drop_once and filename not in self._dropped and start == 0:
                self._dropped.add(filename)
                drop = True
        if drop:
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        if filename in self.throttle:
            for i in range(0, len(body), 1 << 16):
                h.wfile.write(body[i : i + (1 << 16)])
                h.wfile.flush()
                time.sleep(0.05)
            return
        h.wfile.write(body)
