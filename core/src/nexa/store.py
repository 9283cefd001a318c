"""The model store: where models live on disk and how names map to manifests.

Layout under ``NEXA_HOME`` (default: the user cache dir from platformdirs)::

    models/ORG/REPO/manifest.json   one folder per model, files beside the manifest
    partial/                        downloads in progress (resumable); never listed
    hub-cache/                      huggingface_hub's own cache of blobs

A model folder appears (atomic rename) only after every file is complete and verified,
so a half-pulled model is never visible. Names are validated before they touch a path,
and every path is checked to stay inside the store.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

import attrs

from nexa.errors import ModelNotFound, StoreError
from nexa.types import Manifest, ModelFile, Task

MANIFEST_NAME = "manifest.json"
NAME_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
NAME_RE = re.compile(rf"^{NAME_PART}(?:/{NAME_PART})?$")


def default_home() -> Path:
    env = os.environ.get("NEXA_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("nexa", appauthor=False))


def split_quant(spec: str) -> tuple[str, str | None]:
    """``ORG/REPO:Q4_K_M`` -> (``ORG/REPO``, ``Q4_K_M``)."""
    name, sep, quant = spec.partition(":")
    return name, (quant or None) if sep else None


def validate_name(name: str) -> str:
    """A model name that is safe to use as a relative path: ``NAME`` or ``ORG/NAME``."""
    if not NAME_RE.match(name) or ".." in name:
        raise StoreError(
            f"invalid model name {name!r}: use ORG/NAME with letters, digits, '.', '_' and '-'",
            param="model",
        )
    return name


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@attrs.define(eq=False)
class ModelStore:
    """Pulled and imported models on disk, plus ready models that packages carry."""

    home: Path = attrs.field(factory=default_home, converter=Path)
    packaged: list[Manifest] = attrs.field(factory=list)
    """Ready models registered by plugins (``register_models``); read-only."""
    _parsed: dict[Path, tuple[tuple[int, int, int], Manifest]] = attrs.field(factory=dict, init=False, repr=False)
    """Manifests already read, by path, with the file's (inode, size, mtime) then: every
    request resolves its model here, and one ``stat`` is cheaper than reading and
    checking the JSON again. A re-pull or edit changes the stamp."""

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def partial_dir(self) -> Path:
        return self.home / "partial"

    def model_dir(self, name: str) -> Path:
        validate_name(name)
        path = (self.models_dir / name).resolve()
        root = self.models_dir.resolve()
        if not path.is_relative_to(root) or path == root:
            raise StoreError(f"model name {name!r} escapes the store", param="model")
        return path

    # --- reading ---------------------------------------------------------------------

    def _read(self, path: Path) -> Manifest:
        """One local manifest, checked so that a hand-edited one can't misdirect anything.

        Its name must be its folder's (``remove`` deletes by name), and its files must be
        plain relative paths inside the folder (backends open ``root / path``).
        """
        st = path.stat()
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._parsed.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        manifest = self._check(path, Manifest.from_file(path))
        self._parsed[path] = (stamp, manifest)
        return manifest

    def _check(self, path: Path, manifest: Manifest) -> Manifest:
        folder = path.parent.relative_to(self.models_dir).as_posix()
        if not isinstance(manifest.name, str) or manifest.name != folder:
            raise ValueError(f"its name {manifest.name!r} is not its folder's ({folder!r})")
        if not isinstance(manifest.format, str):
            raise ValueError("format must be a string")
        length = manifest.context_length
        if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length <= 0):
            raise ValueError("context_length must be a positive integer")
        for f in manifest.files:
            parts = PurePosixPath(f.path).parts if isinstance(f.path, str) else ()
            if (not parts or f.path.startswith(("/", "\\")) or "\\" in f.path or ".." in parts
                    or ":" in parts[0] or any(ord(c) < 32 for c in f.path)):
                raise ValueError(f"file {f.path!r} is not a plain path inside the model folder")
            if isinstance(f.size, bool) or not isinstance(f.size, int) or f.size < 0:
                raise ValueError(f"file {f.path!r} has no valid size")
        return manifest

    def _local(self) -> Iterator[Manifest]:
        if not self.models_dir.is_dir():
            return
        for path in sorted(self.models_dir.glob(f"*/{MANIFEST_NAME}")) + sorted(
            self.models_dir.glob(f"*/*/{MANIFEST_NAME}")
        ):
            try:
                yield self._read(path)
            except Exception:
                # A hand-edited or damaged manifest hides that model only; `nexa list`
                # and the server keep working for the rest.
                continue

    def list(self) -> list[Manifest]:
        """Every usable model: local ones first, then packaged ones not shadowed by them."""
        local = list(self._local())
        names = {m.name.lower() for m in local}
        return local + [m for m in self.packaged if m.name.lower() not in names]

    def broken(self) -> list[tuple[str, str]]:
        """(folder, reason) for model folders whose manifest can't be read."""
        out = []
        if self.models_dir.is_dir():
            for path in sorted(self.models_dir.glob(f"**/{MANIFEST_NAME}")):
                try:
                    self._read(path)
                except Exception as exc:
                    out.append((str(path.parent.relative_to(self.models_dir)), str(exc)[:200]))
        return out

    def get(self, spec: str) -> Manifest:
        """The manifest for a client's ``model`` string; ModelNotFound if none."""
        name, quant = split_quant(spec.strip())
        if NAME_RE.match(name) and ".." not in name:
            path = self.models_dir / name / MANIFEST_NAME
            if path.is_file():
                try:
                    manifest = self._read(path)
                except Exception as exc:
                    raise StoreError(
                        f"the manifest of model {name!r} is damaged ({type(exc).__name__}); "
                        f"pull it again or `nexa remove {name}`",
                        param="model",
                    ) from exc
                if quant is None or (manifest.quant or "").lower() == quant.lower():
                    return manifest
        lowered = name.lower()
        for manifest in self.list():
            if manifest.name.lower() == lowered and (
                quant is None or (manifest.quant or "").lower() == quant.lower()
            ):
                return manifest
        raise ModelNotFound(
            f"model {spec!r} is not in the store; pull it with `nexa pull {name}` "
            "or see `nexa list`",
            param="model",
        )

    # --- writing ---------------------------------------------------------------------

    def install(self, manifest: Manifest, staged: Path) -> Manifest:
        """Make a staged folder (files complete and verified) visible as a model, atomically."""
        target = self.model_dir(manifest.name)
        final = attrs.evolve(manifest, root=target)
        (staged / MANIFEST_NAME).write_text(final.to_json(), encoding="utf-8")
        target.parent.mkdir(parents=True, exist_ok=True)
        old = None
        if target.exists():
            old = target.with_name(target.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(staged, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return Manifest.from_file(target / MANIFEST_NAME)

    def staging_dir(self, name: str) -> Path:
        """A fresh folder on the same filesystem as the store, for building a model."""
        validate_name(name)
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        path = self.partial_dir / ("staged-" + name.replace("/", "--"))
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def remove(self, spec: str) -> Manifest | None:
        """Delete a model's folder; returns its manifest (None when that was damaged)."""
        name, _ = split_quant(spec)
        try:
            manifest = self.get(name)
        except StoreError:
            # A damaged manifest must not make its model impossible to remove: the
            # validated name alone says which folder to delete.
            target = self.model_dir(name)
            if not (target / MANIFEST_NAME).is_file():
                raise
            shutil.rmtree(target)
            self._drop_empty_org(target)
            return None
        if manifest.source.startswith("package:"):
            raise StoreError(
                f"model {manifest.name!r} comes with the package {manifest.source[8:]}; "
                "uninstall that package to remove it"
            )
        target = self.model_dir(manifest.name)
        shutil.rmtree(target)
        self._drop_empty_org(target)
        return manifest

    def _drop_empty_org(self, target: Path) -> None:
        org = target.parent
        if org != self.models_dir.resolve() and org.is_dir() and not any(org.iterdir()):
            org.rmdir()

    def clean(self) -> int:
        """Delete partial downloads and the hub cache; return bytes freed."""
        freed = 0
        for folder in (self.partial_dir, self.home / "hub-cache"):
            if folder.is_dir():
                freed += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
                shutil.rmtree(folder, ignore_errors=True)
        if self.models_dir.is_dir():
            for old in self.models_dir.glob("**/*.old"):
                shutil.rmtree(old, ignore_errors=True)
        return freed

    def import_path(self, source: Path, name: str | None = None) -> Manifest:
        """Copy a local model file or folder into the store (``nexa pull PATH``)."""
        from nexa.formats import describe_folder

        source = Path(source).expanduser().resolve()
        if not source.exists():
            raise StoreError(f"no such file or folder: {source.name}")
        base = source.stem if source.is_file() else source.name
        name = validate_name(name or f"local/{_safe_part(base)}")
        staged = self.staging_dir(name)
        try:
            if source.is_file():
                shutil.copy2(source, staged / source.name)
            else:
                for item in source.iterdir():
                    if item.name == MANIFEST_NAME:
                        continue
                    if item.is_dir():
                        shutil.copytree(item, staged / item.name, symlinks=False)
                    else:
                        shutil.copy2(item, staged / item.name)
            files = [
                ModelFile(str(p.relative_to(staged).as_posix()), p.stat().st_size, sha256_file(p))
                for p in sorted(staged.rglob("*"))
                if p.is_file()
            ]
            manifest = describe_folder(name, staged, files, source=f"local:{source.name}")
            return self.install(manifest, staged)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise


def _safe_part(text: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip(".-_") or "model"
    return cleaned[:96]


def tasks_of(manifests: Iterable[Manifest], task: Task) -> list[Manifest]:
    return [m for m in manifests if task in m.tasks]
