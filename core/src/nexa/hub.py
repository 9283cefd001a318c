"""Pulling models from the Hugging Face Hub into the store: ``nexa pull ORG/REPO[:QUANT]``.

This module owns three things:

1. **Which files make the model**: ``nexa.repofiles.choose_files`` on the repo's listing
   (one GGUF quant and its mmproj, a diffusers pipeline's components, a transformers
   folder's configs and weights).
2. **Resumable, verified download.** huggingface_hub's own ``hf_hub_download`` neither
   resumes across processes nor checks sha256 (see the environment notes), so each file
   is fetched here from the repo's ``resolve`` URL (built by ``hf_hub_url`` at the commit
   the repo info named) through huggingface_hub's HTTP session (proxies, token, offline
   mode, user agent), with ``Range`` requests appending to
   ``partial/blobs/<algo>-<hash>.part``. A pull that is cut off, even by a killed process,
   goes on from the last byte on disk. Every file is checked against the Hub's hash (the
   LFS sha256, or the git blob sha1 of small files) while it streams; a mismatch deletes
   the file and raises ``StoreError``. A file some model in the store already has (same
   sha256 and size: the mmproj every quant of a vision repo shares) is hard-linked from
   there instead. Progress goes to a callback as ``nexa.progress.PullProgress`` events,
   and a ``CancelToken`` is checked between chunks.
3. **Atomic install.** Verified blobs are linked into a staging folder, the manifest is
   built by ``nexa.formats.describe_folder``, and ``ModelStore.install`` renames the folder
   into place: a model is visible complete or not at all. ``ORG/REPO:QUANT`` installs as
   its own model beside ``ORG/REPO`` and the repo's other quants.

File names from the Hub are untrusted: any unsafe name in a repo listing refuses the
whole pull (``nexa.repofiles.check_names``).

The endpoint is ``endpoint=``, else ``HF_ENDPOINT`` read at call time (huggingface_hub reads
it once at import), else huggingface.co. ``HF_TOKEN`` is honoured by huggingface_hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from nexa.backend import CancelToken
from nexa.errors import RepoNotFound, StoreError
from nexa.progress import ProgressCallback, PullTracker
from nexa.repofiles import (
    MMPROJ_PREFERENCE,
    QUANT_PREFERENCE,
    RemoteFile,
    check_names,
    choose_files,
    variant_label,
)
from nexa.store import ModelStore, folder_of, link_or_copy, split_quant, validate_name
from nexa.types import Manifest, ModelFile

__all__ = [
    "MMPROJ_PREFERENCE",
    "QUANT_PREFERENCE",
    "RemoteFile",
    "choose_files",
    "pull",
]

log = logging.getLogger(__name__)

RETRIES = 4
"""Attempts per file after a network error that made no progress (progress resets it)."""
RETRY_WAIT = 1.0
"""Seconds before the first retry; doubles each time."""

_CHUNK = 1 << 20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")


# --- downloading -------------------------------------------------------------------------


Expected = tuple[int | None, str, str]
"""(size, algo, hex digest) that a file's bytes must match; algo is sha256 or gitsha1."""


def _hasher(algo: str, size: int | None) -> Any:
    if algo == "sha256":
        return hashlib.sha256()
    digest = hashlib.sha1()
    digest.update(b"blob %d\0" % (size or 0))
    return digest


class _Downloader:
    """Fetches files of one repo commit into ``partial/blobs``, verified, cancellable."""

    def __init__(self, store: ModelStore, repo: str, commit: str, endpoint: str,
                 cancel: CancelToken | None = None):
        from huggingface_hub.utils import build_hf_headers, get_session

        self.repo = repo
        self.commit = commit
        self.endpoint = endpoint
        self.cancel = cancel
        self.blobs = store.partial_dir / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.session = get_session()
        # identity: byte offsets for Range must be offsets in the file, not a gzip stream.
        self.headers = build_hf_headers(headers={"Accept-Encoding": "identity"})

    def check_cancelled(self) -> None:
        if self.cancel is not None:
            self.cancel.raise_if_cancelled()

    def url(self, path: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo, path, revision=self.commit, endpoint=self.endpoint)

    def expect(self, f: RemoteFile) -> Expected:
        """What the file's bytes must match: from the listing, else the file's headers."""
        size, algo, digest = f.size, None, None
        if f.sha256:
            algo, digest = "sha256", f.sha256.lower()
        elif f.git_sha1:
            algo, digest = "gitsha1", f.git_sha1.lower()
        if digest is None or size is None:
            from huggingface_hub import get_hf_file_metadata

            meta = _hub_call(
                lambda: get_hf_file_metadata(self.url(f.path), endpoint=self.endpoint),
                self.repo, self.endpoint,
            )
            size = size if size is not None else meta.size
            etag = (meta.etag or "").lower()
            if digest is None and _HEX64.match(etag):
                algo, digest = "sha256", etag
            elif digest is None and _HEX40.match(etag):
                algo, digest = "gitsha1", etag
        if algo is None or digest is None:
            raise StoreError(f"the hub gave no checksum for {f.path}; refusing an unverifiable file")
        # The digest becomes a file name below: only well-formed hex gets that far.
        if not (_HEX64 if algo == "sha256" else _HEX40).match(digest):
            raise StoreError(f"the hub gave a malformed checksum for {f.path}: {digest[:80]!r}")
        return size, algo, digest

    def _paths(self, expected: Expected) -> tuple[Path, Path]:
        _size, algo, digest = expected
        final = self.blobs / f"{algo}-{digest}"
        return final, final.with_name(final.name + ".part")

    def on_disk(self, expected: Expected) -> int:
        """Bytes of the file already in ``partial/blobs`` (complete, or left by a cut run)."""
        size = expected[0]
        final, part = self._paths(expected)
        if final.is_file() and (size is None or final.stat().st_size == size):
            return final.stat().st_size
        return part.stat().st_size if part.is_file() else 0

    def fetch(self, f: RemoteFile, expected: Expected | None = None,
              tracker: PullTracker | None = None, *, have: Path | None = None) -> Path:
        """The verified blob for ``f`` (downloaded or resumed as needed).

        ``have``: a file of a model in the store with the same bytes; the blob becomes a
        hard link to it (a download only if it vanished meanwhile, say removed).
        """
        from filelock import FileLock

        expected = expected or self.expect(f)
        size, algo, digest = expected
        final, part = self._paths(expected)
        tracker = tracker or PullTracker("", ())
        # Another pull (another model sharing the blob) may be fetching it: wait for it.
        with FileLock(str(final) + ".lock"):
            if have is not None and not final.is_file():
                with contextlib.suppress(FileNotFoundError):
                    link_or_copy(have, final)
            if final.is_file() and (size is None or final.stat().st_size == size):
                tracker.complete(f.path, reused=True)
                return final
            actual = self._download(f, part, size, algo, tracker)
            if actual != digest:
                part.unlink(missing_ok=True)
                kind = "sha256" if algo == "sha256" else "git blob sha1"
                raise StoreError(
                    f"{f.path} from {self.repo} failed verification: expected {kind} {digest}, "
                    f"got {actual}; the file was deleted and nothing was installed"
                )
            os.replace(part, final)
        tracker.complete(f.path)
        return final

    def _download(self, f: RemoteFile, part: Path, size: int | None, algo: str,
                  tracker: PullTracker) -> str:
        import httpx2
        from huggingface_hub import constants
        from huggingface_hub.errors import HfHubHTTPError
        from huggingface_hub.utils import hf_raise_for_status

        hasher = _hasher(algo, size)
        offset = part.stat().st_size if part.is_file() else 0
        if size is not None and offset > size:
            part.unlink()
            offset = 0
        if offset:
            # Resuming: the bytes already on disk are part of the hash.
            with part.open("rb") as fh:
                while block := fh.read(_CHUNK):
                    hasher.update(block)
            log.info("resuming %s at byte %d of %s", f.path, offset, size)
        tracker.begin(f.path, offset)
        url = self.url(f.path)
        failures = 0
        with part.open("ab") as out:
            while size is None or offset < size:
                headers = dict(self.headers)
                if offset:
                    headers["Range"] = f"bytes={offset}-"
                before = offset
                try:
                    with self.session.stream(
                        "GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT
                    ) as response:
                        hf_raise_for_status(response)
                        if offset and response.status_code == 200:
                            # The server ignored Range and sends the whole file: start over.
                            out.truncate(0)
                            hasher = _hasher(algo, size)
                            offset = before = 0
                            tracker.advance(f.path, 0)
                        elif response.status_code == 206:
                            start = _content_range_start(response.headers.get("Content-Range"))
                            if start != offset:
                                raise StoreError(
                                    f"the hub answered a request for {f.path} from byte {offset} "
                                    f"with bytes from {start}"
                                )
                        for chunk in response.iter_bytes():
                            # Between chunks: a cancelled pull stops here, its bytes kept
                            # in the .part file for the next run to resume from.
                            self.check_cancelled()
                            if size is not None and offset + len(chunk) > size:
                                raise StoreError(
                                    f"the hub sent more than the {size} bytes of {f.path}"
                                )
                            out.write(chunk)
                            # Flushed per chunk so a killed process leaves every byte it got.
                            out.flush()
                            hasher.update(chunk)
                            offset += len(chunk)
                            tracker.advance(f.path, offset)
                    if size is None:
                        size = offset
                    elif offset < size:
                        raise httpx2.RemoteProtocolError("connection closed early")
                except (httpx2.TransportError, HfHubHTTPError) as exc:
                    status = getattr(getattr(exc, "response", None), "status_code", None)
                    transient = status is None or status == 429 or status >= 500
                    failures = 0 if offset > before else failures + 1
                    if not transient or failures > RETRIES:
                        raise StoreError(
                            f"download of {f.path} from {self.repo} stopped at byte {offset} of "
                            f"{size if size is not None else '?'} ({_describe(exc)}); "
                            "run the same pull again to resume"
                        ) from exc
                    log.warning("download of %s interrupted (%s); retrying", f.path, _describe(exc))
                    time.sleep(RETRY_WAIT * (2 ** max(0, failures - 1)) if failures else 0)
        return hasher.hexdigest()


def _content_range_start(header: str | None) -> int | None:
    match = re.match(r"^\s*bytes\s+(\d+)-\d+/(?:\d+|\*)\s*$", header or "")
    return int(match.group(1)) if match else None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


# --- the pull ----------------------------------------------------------------------------


def _resolve_endpoint(endpoint: str | None) -> str:
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _hub_call(fn: Any, repo: str, endpoint: str) -> Any:
    """Run a huggingface_hub call, turning its errors into StoreError with a next step."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return fn()
    except GatedRepoError as exc:
        raise StoreError(
            f"{repo} is gated: accept its terms on the hub, then set HF_TOKEN", param="model"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise RepoNotFound(
            f"no model repo {repo!r} on {endpoint} (if it is private or gated, set HF_TOKEN)",
            param="model",
        ) from exc
    except (RevisionNotFoundError, RemoteEntryNotFoundError) as exc:
        raise StoreError(f"{repo}: {_describe(exc)}", param="model") from exc
    except HFValidationError as exc:
        # Names the store allows but the Hub does not ("a-", "x--y"): the client's mistake.
        raise StoreError(f"{repo!r} is not a valid Hub repo id: {exc}", param="model") from exc
    except OfflineModeIsEnabled as exc:
        raise StoreError("HF_HUB_OFFLINE is set: pulling from the hub is disabled") from exc
    except HfHubHTTPError as exc:
        raise StoreError(f"the hub at {endpoint} answered an error for {repo}: {_describe(exc)}") from exc
    except (httpx2.HTTPError, OSError) as exc:
        raise StoreError(f"cannot reach the hub at {endpoint}: {_describe(exc)}") from exc


def _parse_spec(spec: str) -> tuple[str, str | None]:
    text = spec.strip()
    for prefix in ("https://", "http://"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    for host in ("hf.co/", "huggingface.co/"):
        if text.startswith(host):
            text = text[len(host) :]
    repo, quant = split_quant(text)
    if quant is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", quant):
        raise StoreError(f"invalid quant {quant!r} in {spec!r}", param="model")
    return validate_name(repo.strip("/")), quant


@contextlib.contextmanager
def _pull_lock(store: ModelStore, name: str) -> Iterator[None]:
    from filelock import FileLock, Timeout

    locks = store.partial_dir / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(locks / (folder_of(name).replace("/", "--") + ".lock")))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise StoreError(f"another pull of {name} is running; wait for it to finish") from None
    try:
        yield
    finally:
        lock.release()


def _link_or_move(blob: Path, target: Path) -> None:
    # A hard link keeps the verified blob until install succeeds, so a failure after this
    # point (say, an unreadable GGUF header) costs no re-download.
    try:
        os.link(blob, target)
    except OSError:
        os.replace(blob, target)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _up_to_date(
    store: ModelStore, name: str, source: str, chosen: Sequence[RemoteFile], label: str | None
) -> Manifest | None:
    """The installed model ``name`` when it already holds exactly these files of this commit."""
    manifest = store.installed(name)
    if manifest is None or manifest.source != source or manifest.quant != label or manifest.root is None:
        return None
    have = {f.path: f.size for f in manifest.files}
    if have != {f.path: f.size for f in chosen}:
        return None
    # Sizes only: re-hashing gigabytes on every pull would make "already there" slow.
    if not all((manifest.root / p).is_file() and (manifest.root / p).stat().st_size == n
               for p, n in have.items()):
        return None
    return manifest


def pull(
    store: ModelStore,
    spec: str,
    *,
    endpoint: str | None = None,
    on_progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> Manifest:
    """Download ``ORG/REPO[:QUANT]`` from the Hub into ``store``; return its manifest.

    The model is named as pulled: ``ORG/REPO`` without a tag, ``ORG/REPO:QUANT`` (the
    quant's canonical label) with one, so several quants live side by side. A tagged pull
    of the quant that the untagged model already holds at this commit returns that model.
    Files the store already has (same sha256) are linked, not downloaded.

    ``on_progress`` receives ``nexa.progress.PullProgress`` events. ``cancel`` is checked
    between chunks and files; a cancelled pull raises ``nexa.errors.Cancelled``, installs
    nothing, and leaves its partial files for the next pull to resume.

    Raises ``StoreError`` (with what to do next) for unknown repos, missing quants, network
    failures (run again to resume), and files that fail verification (deleted; nothing
    installed).
    """
    from huggingface_hub import HfApi

    repo, quant = _parse_spec(spec)
    endpoint = _resolve_endpoint(endpoint)
    api = HfApi(endpoint=endpoint)
    info = _hub_call(lambda: api.model_info(repo, files_metadata=True), repo, endpoint)
    commit = info.sha or "main"
    if not re.fullmatch(r"[0-9a-f]{40}|main", commit):
        raise StoreError(f"the hub gave a malformed commit id for {repo}: {commit[:80]!r}")
    listing = [
        RemoteFile(
            path=s.rfilename,
            size=s.size,
            sha256=s.lfs.sha256 if s.lfs else None,
            git_sha1=None if s.lfs else s.blob_id,
        )
        for s in info.siblings or []
    ]
    check_names(listing, repo)
    repo_name = repo
    if isinstance(info.id, str) and info.id.lower() == repo.lower():
        repo_name = validate_name(info.id)  # the hub's own spelling of the name
    name = repo_name if quant is None else validate_name(f"{repo_name}:{variant_label(quant)}")

    with _pull_lock(store, name):
        downloader = _Downloader(store, repo, commit, endpoint, cancel)
        model_index = None
        is_gguf = any(f.path.lower().endswith(".gguf") for f in listing)
        index_file = next((f for f in listing if f.path == "model_index.json"), None)
        if index_file is not None and not is_gguf:
            blob = downloader.fetch(index_file)
            try:
                model_index = json.loads(blob.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise StoreError(f"{repo}'s model_index.json is not valid JSON") from exc
            if not isinstance(model_index, dict):
                raise StoreError(f"{repo}'s model_index.json is not a JSON object")
        chosen, label = choose_files(listing, quant, repo=repo, model_index=model_index)
        source = f"hf:{repo}@{commit}"
        current = _up_to_date(store, name, source, chosen, label)
        if current is None and name != repo_name:
            current = _up_to_date(store, repo_name, source, chosen, label)
        if current is not None:
            log.info("%s is up to date (%s)", current.name, commit[:12])
            tracker = PullTracker(current.name, [(f.path, f.size) for f in current.files], on_progress)
            tracker.finish()
            return current

        plans = [(f, downloader.expect(f)) for f in chosen]
        # Files a model in the store already has are linked from there, never fetched.
        shared = store.file_index()
        reuse = {f.path: shared[(exp[2], exp[0])] for f, exp in plans
                 if exp[1] == "sha256" and (exp[2], exp[0]) in shared}
        on_disk = {f.path: (exp[0] or 0) if f.path in reuse else downloader.on_disk(exp) for f, exp in plans}
        needed = sum((exp[0] or 0) - on_disk[f.path] for f, exp in plans)
        free = shutil.disk_usage(store.partial_dir).free
        if needed > free:
            raise StoreError(
                f"{repo} needs {needed / 1e9:.1f} GB more disk space; {free / 1e9:.1f} GB free "
                f"under {store.home}"
            )
        log.info("pulling %s@%s as %s: %d files", repo, commit[:12], name, len(chosen))
        tracker = PullTracker(name, [(f.path, exp[0]) for f, exp in plans], on_progress)
        tracker.start(on_disk)
        blobs: list[tuple[RemoteFile, Expected, Path]] = []
        try:
            for f, exp in plans:
                downloader.check_cancelled()
                blobs.append((f, exp, downloader.fetch(f, exp, tracker, have=reuse.get(f.path))))
        except OSError as exc:  # disk full, permissions: not the hub's fault
            raise StoreError(f"cannot write the download under {store.partial_dir}: {exc}") from exc
        downloader.check_cancelled()

        staged = store.staging_dir(name)
        try:
            root = staged.resolve()
            files = []
            placed: dict[Path, Path] = {}
            for f, (_size, algo, digest), blob in blobs:
                target = staged / f.path
                if not target.resolve().is_relative_to(root):
                    raise StoreError(f"file name {f.path!r} escapes the model folder")
                target.parent.mkdir(parents=True, exist_ok=True)
                if blob.exists():
                    _link_or_move(blob, target)
                else:  # identical bytes under two names, and the blob was moved already
                    shutil.copyfile(placed[blob], target)
                placed.setdefault(blob, target)
                sha = digest if algo == "sha256" else _sha256(target)
                files.append(ModelFile(f.path, target.stat().st_size, sha))
            from nexa.formats import describe_folder

            manifest = describe_folder(name, staged, files, source=source, quant=label)
            downloader.check_cancelled()
            installed = store.install(manifest, staged)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        # Lock files stay: deleting one that another pull waits on would split the lock.
        for _, _, blob in blobs:
            blob.unlink(missing_ok=True)
        tracker.finish()
        return installed
