"""A loopback Hugging Face Hub for tests: real HTTP on 127.0.0.1, no network.

It speaks the part of the Hub HTTP API that huggingface_hub 2.4 (and ``nexa.hub``) use:

- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``: repo info with
  ``sha`` and ``siblings``; with ``?blobs=true`` (``files_metadata=True``) each sibling
  carries ``size``, ``blobId`` and, for LFS files, ``lfs`` {sha256, size, pointerSize}.
- ``GET /api/models/{repo}/tree/{rev}[/{path}]`` (``list_repo_tree``), ``recursive`` and
  ``expand`` accepted, no pagination.
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: ``ETag`` (git blob sha1, or sha256 for
  LFS files, quoted), ``X-Repo-Commit``, ``X-Linked-Etag``/``X-Linked-Size`` for LFS
  files, ``Content-Length``, ``Accept-Ranges`` and ``Range`` -> 206. As on the real Hub,
  LFS files answer with a 302 to a "CDN" on another origin (``localhost`` instead of
  ``127.0.0.1``) unless ``lfs_redirect=False``.
- Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``,
  ``EntryNotFound``) so huggingface_hub raises its own typed errors.

Repos are built from a dict ``{repo_id: {path: bytes}}``. Knobs for tests (all keyed by
``(repo_id, path)``): ``corrupt`` (serve wrong bytes under the right hash), ``drop_at``
(the connection dies when the file offset reaches N, on every request, until cleared),
``drop_once_at`` (the same, for one request only: a blip), ``stall_at`` (send up to offset
N, set ``stalled``, then hang until ``release()``, which lets every stall go on from then:
for killing a client mid-download), ``fail_status`` (answer that HTTP status), ``chunk_delay``
(seconds before each 64 KiB chunk: a slow link, so progress can be watched). Counters: ``requests``,
``bytes_served`` and ``range_starts`` per file, to prove what a client fetched.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = ["HubServer", "git_blob_sha1", "tiny_gguf_bytes"]

# Suffixes the Hub's default .gitattributes sends to LFS; any file of 10 MiB or more is
# LFS too (the Hub refuses bigger plain git blobs).
LFS_SUFFIXES = (
    ".gguf", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx",
    ".npz", ".npy", ".model", ".ot", ".tflite", ".pkl", ".zip", ".tar", ".gz",
)
LFS_MIN_SIZE = 10 * 1024 * 1024
CHUNK = 64 * 1024


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file's bytes (what the Hub reports for non-LFS files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def tiny_gguf_bytes(
    *,
    architecture: str = "llama",
    context_length: int = 2048,
    chat_template: str | None = "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    pad_bytes: int = 64,
    name: str | None = None,
) -> bytes:
    """A small valid GGUF (metadata + one float32 tensor of about ``pad_bytes``)."""
    import tempfile

    import gguf
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.gguf"
        writer = gguf.GGUFWriter(str(path), architecture)
        if name:
            writer.add_name(name)
        writer.add_context_length(context_length)
        if chat_template is not None:
            writer.add_chat_template(chat_template)
        count = max(1, pad_bytes // 4)
        # Deterministic, non-constant content so a one-byte corruption changes the hash.
        writer.add_tensor("pad", (np.arange(count, dtype=np.float32) % 251))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


class _File:
    __slots__ = ("data", "sha256", "blob_id", "lfs", "pointer")

    def __init__(self, path: str, data: bytes):
        self.data = data
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.lfs = path.lower().endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE
        if self.lfs:
            self.pointer = (
                "version https://git-lfs.github.com/spec/v1\n"
                f"oid sha256:{self.sha256}\nsize {len(data)}\n"
            ).encode()
            self.blob_id = git_blob_sha1(self.pointer)
        else:
            self.pointer = b""
            self.blob_id = git_blob_sha1(data)


class HubServer:
    """A Hub on 127.0.0.1 with a random port, serving from a background thread.

    Use as a context manager (or ``start()``/``stop()``); ``url`` is what ``HF_ENDPOINT``
    (or ``endpoint=``) should be set to.
    """

    def __init__(
        self,
        repos: Mapping[str, Mapping[str, bytes]],
        *,
        lfs_redirect: bool = True,
        cdn_host: str = "localhost",
        sibling_metadata: bool = True,
    ):
        self.repos: dict[str, dict[str, _File]] = {}
        self.commits: dict[str, str] = {}
        for repo_id, files in repos.items():
            self.add_repo(repo_id, files)
        self.lfs_redirect = lfs_redirect
        self.sibling_metadata = sibling_metadata
        """False: repo info never carries sizes or hashes (clients must HEAD each file)."""
        self.cdn_host = cdn_host
        self.corrupt: set[tuple[str, str]] = set()
        self.drop_at: dict[tuple[str, str], int] = {}
        self.drop_once_at: dict[tuple[str, str], int] = {}
        self.stall_at: dict[tuple[str, str], int] = {}
        self.fail_status: dict[tuple[str, str], int] = {}
        self.chunk_delay: dict[tuple[str, str], float] = {}
        self.stalled = threading.Event()
        self._release = threading.Event()
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, str, str]] = Counter()
        """(method, repo_id, what) -> count. ``what``: ``api`` (repo info), ``api-tree``, a
        file path (its ``resolve`` URL), or ``cdn:PATH`` (the redirected LFS download)."""
        self.bytes_served: Counter[tuple[str, str]] = Counter()
        self.range_starts: defaultdict[tuple[str, str], list[int]] = defaultdict(list)
        self.auth_headers: list[tuple[str, str | None]] = []
        """(request path, Authorization header or None), in arrival order."""
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- setup -----------------------------------------------------------------------

    def add_repo(self, repo_id: str, files: Mapping[str, bytes]) -> None:
        self.repos[repo_id] = {path: _File(path, data) for path, data in files.items()}
        digest = hashlib.sha1(repo_id.encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + self.repos[repo_id][path].blob_id.encode())
        self.commits[repo_id] = digest.hexdigest()

    def sha256(self, repo_id: str, path: str) -> str:
        return self.repos[repo_id][path].sha256

    def release(self) -> None:
        """Let a stalled response go on (it then closes the connection)."""
        self._release.set()

    def reset_counters(self) -> None:
        with self._lock:
            self.requests.clear()
            self.bytes_served.clear()
            self.range_starts.clear()
            self.auth_headers.clear()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HubServer:
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="nexa-hubserver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- responses -------------------------------------------------------------------

    def _count(self, method: str, repo_id: str, what: str) -> None:
        with self._lock:
            self.requests[(method, repo_id, what)] += 1

    def repo_info(self, repo_id: str, *, blobs: bool) -> dict[str, Any]:
        siblings = []
        for path, f in self.repos[repo_id].items():
            entry: dict[str, Any] = {"rfilename": path}
            if blobs:
                entry["size"] = len(f.data)
                entry["blobId"] = f.blob_id
                if f.lfs:
                    entry["lfs"] = {
                        "sha256": f.sha256,
                        "size": len(f.data),
                        "pointerSize": len(f.pointer),
                    }
            siblings.append(entry)
        return {
            "_id": self.commits[repo_id][:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0] if "/" in repo_id else None,
            "sha": self.commits[repo_id],
            "lastModified": "2026-11-01T00:00:00.000Z",
            "private": False,
            "disabled": False,
            "gated": False,
            "tags": [],
            "downloads": 0,
            "likes": 0,
            "siblings": siblings,
        }

    def tree(self, repo_id: str, prefix: str, *, recursive: bool) -> list[dict[str, Any]]:
        prefix = prefix.strip("/")
        out: list[dict[str, Any]] = []
        folders: set[str] = set()
        for path, f in sorted(self.repos[repo_id].items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix) + 1 :] if prefix else path
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                folder = "/".join(([prefix] if prefix else []) + parts[:depth])
                if folder not in folders and (recursive or depth == 1):
                    folders.add(folder)
                    out.append({"type": "directory", "oid": git_blob_sha1(folder.encode()),
                                "size": 0, "path": folder})
            if len(parts) > 1 and not recursive:
                continue
            entry: dict[str, Any] = {"type": "file", "oid": f.blob_id, "size": len(f.data),
                                     "path": path}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": len(f.data),
                                "pointerSize": len(f.pointer)}
            out.append(entry)
        return out


def _repo_and_rest(path: str, marker: str) -> tuple[str, str] | None:
    head, sep, tail = path.partition(marker)
    if not sep:
        return None
    return head.strip("/"), tail


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"
    server_version = "nexa-hubserver/1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        pass  # quiet: tests read the counters instead

    # --- plumbing --------------------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", headers: Mapping[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _error(self, status: int, code: str | None, message: str,
               headers: Mapping[str, str] | None = None) -> None:
        extra = dict(headers or {})
        if code:
            extra["X-Error-Code"] = code
        extra["X-Error-Message"] = message
        self._send(status, json.dumps({"error": message}).encode(), extra)

    def _json(self, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        self._send(200, json.dumps(payload).encode(), headers)

    # --- routing ---------------------------------------------------------------------

    def do_HEAD(self) -> None:  # noqa: N802 - stdlib naming
        self._route()

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._route()

    def _route(self) -> None:
        hub = self.hub
        with hub._lock:
            hub.auth_headers.append((self.path, self.headers.get("Authorization")))
        split = urlsplit(self.path)
        path = unquote(split.path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        try:
            if path.startswith("/api/models/"):
                self._api(path[len("/api/models/") :], query)
            elif path.startswith("/cdn/"):
                self._cdn(path[len("/cdn/") :])
            elif "/resolve/" in path:
                self._resolve(path)
            else:
                self._error(404, None, f"no route for {path}")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _known_repo(self, repo_id: str) -> bool:
        if repo_id in self.hub.repos:
            return True
        self._error(401, "RepoNotFound", "Repository not found")
        return False

    def _known_revision(self, repo_id: str, rev: str) -> bool:
        if rev in ("main", self.hub.commits[repo_id]):
            return True
        self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return False

    def _api(self, rest: str, query: dict[str, str]) -> None:
        hub = self.hub
        tree = _repo_and_rest(rest, "/tree/")
        if tree is not None:
            repo_id, tail = tree
            if not self._known_repo(repo_id):
                return
            rev, _, prefix = tail.partition("/")
            if not self._known_revision(repo_id, rev):
                return
            hub._count(self.command, repo_id, "api-tree")
            recursive = query.get("recursive", "").lower() in ("1", "true")
            self._json(hub.tree(repo_id, prefix, recursive=recursive))
            return
        revision = _repo_and_rest(rest, "/revision/")
        if revision is not None:
            repo_id, rev = revision
        else:
            repo_id, rev = rest.strip("/"), "main"
        if not self._known_repo(repo_id) or not self._known_revision(repo_id, rev):
            return
        hub._count(self.command, repo_id, "api")
        blobs = hub.sibling_metadata and query.get("blobs", "").lower() in ("1", "true")
        self._json(hub.repo_info(repo_id, blobs=blobs))

    def _resolve(self, path: str) -> None:
        hub = self.hub
        parts = _repo_and_rest(path, "/resolve/")
        assert parts is not None
        repo_id, tail = parts
        if not self._known_repo(repo_id):
            return
        rev, _, filename = tail.partition("/")
        if not self._known_revision(repo_id, rev):
            return
        commit = hub.commits[repo_id]
        f = hub.repos[repo_id].get(filename)
        if f is None:
            self._error(404, "EntryNotFound", f"{filename} does not exist on {rev}",
                        {"X-Repo-Commit": commit})
            return
        hub._count(self.command, repo_id, filename)
        headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if f.lfs:
            headers.update({
                "ETag": f'"{f.sha256}"',
                "X-Linked-Etag": f'"{f.sha256}"',
                "X-Linked-Size": str(len(f.data)),
            })
            if hub.lfs_redirect:
                location = (
                    f"http://{hub.cdn_host}:{hub.port}/cdn/{quote(repo_id)}/{f.sha256}/"
                    f"{quote(filename)}"
                )
                headers["Location"] = location
                self._send(302, b"", headers, content_type="text/plain")
                return
        else:
            headers["ETag"] = f'"{f.blob_id}"'
        self._body(repo_id, filename, f, headers)

    def _cdn(self, rest: str) -> None:
        # /cdn/{repo}/{sha256}/{filename}: the repo id may itself contain one slash.
        segments = rest.split("/")
        for cut in (2, 1):
            repo_id = "/".join(segments[:cut])
            if repo_id in self.hub.repos and len(segments) > cut + 1:
                sha, filename = segments[cut], "/".join(segments[cut + 1 :])
                f = self.hub.repos[repo_id].get(filename)
                if f is not None and f.sha256 == sha:
                    self.hub._count(self.command, repo_id, "cdn:" + filename)
                    self._body(repo_id, filename, f, {"Accept-Ranges": "bytes",
                                                      "ETag": f'"{f.sha256}"'})
                    return
        self._error(404, None, "no such object")

    def _body(self, repo_id: str, filename: str, f: _File, headers: dict[str, str]) -> None:
        hub = self.hub
        key = (repo_id, filename)
        status = hub.fail_status.get(key)
        if status is not None:
            self._error(status, None, f"injected failure {status}")
            return
        data = f.data
        if key in hub.corrupt:
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
        total = len(data)
        start, end = 0, total - 1
        status = 200
        range_header = self.headers.get("Range")
        if range_header:
            parsed = _parse_range(range_header, total)
            if parsed is None:
                self._send(416, b"", {"Content-Range": f"bytes */{total}"}, "text/plain")
                return
            start, end = parsed
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
        if self.command == "HEAD":
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(end - start + 1))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            return
        with hub._lock:
            hub.range_starts[key].append(start)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        with hub._lock:
            once = hub.drop_once_at.get(key)
            if once is not None and start <= once <= end:
                del hub.drop_once_at[key]
            else:
                once = None
        drop_at = hub.drop_at.get(key)
        stall_at = hub.stall_at.get(key)
        delay = hub.chunk_delay.get(key, 0.0)
        offset = start
        while offset <= end:
            if delay:
                time.sleep(delay)
            limit = end + 1
            for cut in (drop_at, once, stall_at):
                if cut is not None and offset <= cut < limit:
                    limit = cut
            chunk = data[offset : min(limit, offset + CHUNK)]
            if chunk:
                self.wfile.write(chunk)
                with hub._lock:
                    hub.bytes_served[key] += len(chunk)
                offset += len(chunk)
            if offset == limit and limit <= end:
                self.wfile.flush()
                if stall_at is not None and offset == stall_at:
                    hub.stalled.set()
                    hub._release.wait(timeout=60)
                # Cut the connection mid-body: the client sees fewer bytes than
                # Content-Length, as when a network link dies.
                self.close_connection = True
                return


def _parse_range(header: str, total: int) -> tuple[int, int] | None:
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            length = int(last)
            start, end = max(0, total - length), total - 1
        else:
            start = int(first)
            end = int(last) if last else total - 1
    except ValueError:
        return None
    end = min(end, total - 1)
    if start >= total or start > end:
        return None
    return start, end
