"""The model store: where models live on disk and how names map to manifests.

Layout under ``NEXA_HOME`` (default: the user cache dir from platformdirs)::

    models/ORG/REPO/manifest.json        ORG/REPO: pulled without a tag, or imported
    models/ORG/REPO@Q8_0/manifest.json   ORG/REPO:Q8_0: a quant pulled by name
    partial/                             downloads in progress (resumable); never listed

A model folder appears (atomic rename) only after every file is complete and verified,
so a half-pulled model is never visible. Names are validated before they touch a path,
and every path is checked to stay inside the store.

**Names.** A model is ``NAME``, ``ORG/NAME`` or either with a tag, ``ORG/NAME:TAG`` (a
pulled quant: ``acme/Qwen-GGUF:Q8_0``). On disk the tag follows an ``@``, a character no
repo name may contain and, unlike ``:``, one every filesystem accepts. Several quants of
one repo are separate models side by side. ``get`` resolves a client's ``model`` string:

- ``ORG/REPO:TAG``: the model of that name; else the repo's model whose quant is TAG
  (the quant pulled without a tag, or a store made before tags, stays addressable by it).
- ``ORG/REPO``: the model pulled without a tag; else the repo's only model; else a 400
  (``StoreError``, code ``model_ambiguous``) naming every quant there is.

Stores made before tags hold only untagged folders, which is still the layout of a
model pulled without a tag: they keep working unchanged.

**Identical files are stored once, as hard links.** ``install`` links every file whose
sha256 and size match a file of a model already in the store (one mmproj shared by every
quant of a vision repo; the unchanged weights of a re-pulled repo), and ``nexa.hub``
links such files instead of downloading them. Hard links rather than a content-addressed
blob folder (Ollama's layout) because the kernel counts the references: removing a model
is deleting its folder, which can never break another model, with no blob reference
counts to keep right and no garbage collection racing a pull; backends keep opening
ordinary files in the model's own folder; and stores made before need no migration. On
a filesystem without hard links the file is copied (correct, only not shared). Sizes in
``nexa list`` are per model, so shared bytes count once per model there.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

import attrs

from nexa.errors import ModelNotFound, StoreError
from nexa.types import Manifest, ModelFile

MANIFEST_NAME = "manifest.json"
NAME_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
TAG_PART = r"[A-Za-z0-9_.-]{1,64}"
NAME_RE = re.compile(rf"^{NAME_PART}(?:/{NAME_PART})?(?::{TAG_PART})?$")
TAG_RE = re.compile(rf"^{TAG_PART}$")
AMBIGUOUS = "model_ambiguous"
"""``StoreError.code`` when a bare repo name stands for several quants."""


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
    """A model name that is safe to use as a relative path: ``NAME`` or ``ORG/NAME``,
    optionally with a ``:TAG``."""
    if not NAME_RE.match(name) or ".." in split_quant(name)[0]:
        raise StoreError(
            f"invalid model name {name!r}: use ORG/NAME (or ORG/NAME:TAG) with letters, digits, "
            "'.', '_' and '-'",
            param="model",
        )
    return name


def folder_of(name: str) -> str:
    """The folder of a (valid) model name, relative to ``models/``: the tag after an ``@``."""
    base, tag = split_quant(name)
    return base if tag is None else f"{base}@{tag}"


def _name_of(folder: str) -> str:
    return folder.replace("@", ":", 1)


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
        path = (self.models_dir / folder_of(name)).resolve()
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
        if not isinstance(manifest.name, str) or manifest.name != _name_of(folder):
            raise ValueError(f"its name {manifest.name!r} is not its folder's ({folder!r})")
        validate_name(manifest.name)
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

    def installed(self, name: str) -> Manifest | None:
        """The local model of exactly this name (no quant or case matching); None when it
        is missing or its manifest is damaged."""
        try:
            path = self.model_dir(name) / MANIFEST_NAME
            return self._read(path) if path.is_file() else None
        except Exception:
            return None

    def _exact(self, name: str) -> Manifest | None:
        """The local model whose folder is spelt exactly ``name``: the fast path of every
        request; a damaged manifest is an error that says what to do."""
        if not NAME_RE.match(name) or ".." in name:
            return None
        path = self.models_dir / folder_of(name) / MANIFEST_NAME
        if not path.is_file():
            return None
        try:
            return self._read(path)
        except Exception as exc:
            raise StoreError(
                f"the manifest of model {name!r} is damaged ({type(exc).__name__}); "
                f"pull it again or `nexa remove {name}`",
                param="model",
            ) from exc

    def family(self, repo: str) -> list[Manifest]:
        """Every model of one repo (``ORG/REPO`` and each ``ORG/REPO:TAG``), untagged first."""
        lowered = repo.lower()
        return [m for m in self.list() if split_quant(m.name)[0].lower() == lowered]

    def get(self, spec: str) -> Manifest:
        """The manifest for a client's ``model`` string (see the module docstring).

        ModelNotFound when nothing matches; StoreError (400, code ``model_ambiguous``) for
        a bare repo name that stands for several quants.
        """
        spec = spec.strip()
        exact = self._exact(spec)
        if exact is not None:
            return exact
        repo, tag = split_quant(spec)
        family = self.family(repo)
        if tag is None:
            untagged = [m for m in family if split_quant(m.name)[1] is None]
            if untagged:
                return untagged[0]
            if len(family) == 1:
                return family[0]
            if family:
                raise StoreError(
                    f"model {spec!r} names several quants: {_names(family)}; "
                    f"say which one, e.g. {family[0].name!r}",
                    param="model",
                    code=AMBIGUOUS,
                )
        else:
            wanted = spec.lower()
            for manifest in family:
                if manifest.name.lower() == wanted:
                    return manifest
            for manifest in family:
                if (manifest.quant or "").lower() == tag.lower():
                    return manifest
        have = f" (in the store: {_names(family)})" if family else ""
        raise ModelNotFound(
            f"model {spec!r} is not in the store{have}; pull it with `nexa pull {spec}` "
            "or see `nexa list`",
            param="model",
        )

    def file_index(self) -> dict[tuple[str, int], Path]:
        """(sha256, size) -> a file of a local model with those bytes, for sharing them.

        Trusts the store's own manifests (hashes were checked when each model was pulled
        or imported) and checks only that the file is still there at that size.
        """
        out: dict[tuple[str, int], Path] = {}
        for manifest in self._local():
            assert manifest.root is not None
            for f in manifest.files:
                if not f.sha256 or (f.sha256.lower(), f.size) in out:
                    continue
                path = manifest.root / f.path
                try:
                    st = path.lstat()
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and st.st_size == f.size:
                    out[(f.sha256.lower(), f.size)] = path
        return out

    # --- writing ---------------------------------------------------------------------

    def install(self, manifest: Manifest, staged: Path) -> Manifest:
        """Make a staged folder (files complete and verified) visible as a model, atomically.

        Files identical to ones already in the store become hard links to them. Installing
        ``ORG/REPO`` over an ``ORG/REPO`` of another quant keeps that one as
        ``ORG/REPO:QUANT`` (unless that name is taken): a pull never discards a quant.
        """
        target = self.model_dir(manifest.name)
        self._share_identical(manifest, staged)
        self._keep_other_quant(manifest, target)
        return self._place(manifest, staged, target)

    def _place(self, manifest: Manifest, staged: Path, target: Path) -> Manifest:
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

    def _share_identical(self, manifest: Manifest, staged: Path) -> None:
        index = self.file_index()
        for f in manifest.files:
            source = index.get(((f.sha256 or "").lower(), f.size))
            target = staged / f.path
            if source is None or not target.is_file():
                continue
            try:
                if os.path.samefile(source, target):
                    continue
                link = target.with_name(target.name + ".link")
                link.unlink(missing_ok=True)
                os.link(source, link, follow_symlinks=False)
                os.replace(link, target)
            except OSError:
                continue  # no hard links here (or too many): the copy stays

    def _keep_other_quant(self, manifest: Manifest, target: Path) -> None:
        if split_quant(manifest.name)[1] is not None:
            return
        current = self.installed(manifest.name)
        if current is None or not current.quant or not TAG_RE.match(current.quant):
            return
        if (manifest.quant or "").lower() == current.quant.lower():
            return  # the same quant again (a newer commit): an update, not another quant
        kept = f"{manifest.name}:{current.quant}"
        if self.model_dir(kept).exists():
            return
        assert current.root is not None
        staged = self.staging_dir(kept)
        try:
            for f in current.files:
                link_or_copy(current.root / f.path, staged / f.path)
            self._place(attrs.evolve(current, name=kept), staged, self.model_dir(kept))
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise

    def staging_dir(self, name: str) -> Path:
        """A fresh folder on the same filesystem as the store, for building a model."""
        validate_name(name)
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        path = self.partial_dir / ("staged-" + folder_of(name).replace("/", "--"))
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def remove(self, spec: str) -> Manifest | None:
        """Delete one model's folder; returns its manifest (None when that was damaged).

        Files it shares with other models are hard links: those models keep them.
        """
        spec = spec.strip()
        try:
            manifest = self.get(spec)
        except StoreError as exc:
            if exc.code == AMBIGUOUS:
                raise
            # A damaged manifest must not make its model impossible to remove: the
            # validated name alone says which folder to delete.
            target = self.model_dir(spec)
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


def link_or_copy(source: Path, target: Path) -> None:
    """``target`` as a hard link to ``source``, or a copy where links are impossible."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target)


def _names(manifests: Iterable[Manifest]) -> str:
    return ", ".join(f"{m.name} ({m.quant})" if m.quant and not m.name.endswith(f":{m.quant}") else m.name
                     for m in manifests)


def _safe_part(text: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip(".-_") or "model"
    return cleaned[:96]
