"""Progress of a pull: one event type for every consumer, and the arithmetic behind it.

``nexa.hub.pull`` reports through a callback that receives ``PullProgress`` values: the
CLI draws them as tqdm bars (``nexa.cli.progress``); ``to_dict`` is the same event as
plain JSON, for a consumer outside Python (no HTTP pull endpoint sends them yet). ``PullTracker`` is the
pull's side: it knows the files, turns byte offsets into events with speed and ETA, and
sends at most ``INTERVAL`` seconds apart while bytes flow (every ``file``, ``file_done``,
``start`` and ``done`` event is always sent).

Stages, in order: ``start`` (once, the file list known), then per file ``file`` (its
download begins; ``resumed_from`` is what an earlier, cut-off run left on disk, or the
whole file when it was already complete or is shared with a model in the store),
``download`` (bytes arrived), ``file_done`` (the file is complete and verified), and
finally ``done`` (the model is installed, or was already up to date).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs

INTERVAL = 0.1
"""Seconds between ``download`` events while bytes flow."""

STAGES = ("start", "file", "download", "file_done", "done")


@attrs.frozen
class PullProgress:
    """Where a pull stands. Byte counts are of files on disk, so a resumed pull starts
    from what an earlier run left rather than from zero."""

    stage: str
    """One of ``STAGES``."""
    model: str
    """The name the model gets in the store (``ORG/REPO`` or ``ORG/REPO:QUANT``)."""
    file: str | None = None
    """Path in the repo of the file this event is about; None for ``start`` and ``done``."""
    file_done: int = 0
    """Bytes of that file on disk."""
    file_total: int | None = None
    """Size of that file (None when the hub did not say)."""
    resumed_from: int = 0
    """Bytes of that file already on disk when this run began it (a cut pull's offset)."""
    file_speed: float = 0.0
    """Bytes per second of that file's download in this run."""
    file_eta: float | None = None
    """Seconds until that file is complete at ``file_speed`` (None while unknown)."""
    done: int = 0
    """Bytes of the whole pull on disk."""
    total: int | None = None
    """Bytes of the whole pull (None when a size is unknown)."""
    speed: float = 0.0
    """Bytes per second of the whole pull in this run."""
    eta: float | None = None
    """Seconds until the whole pull is downloaded at ``speed`` (None while unknown)."""
    files_done: int = 0
    """Files complete and verified."""
    files_total: int = 0
    """Files the model has."""

    def to_dict(self) -> dict[str, Any]:
        """The event as JSON-ready data (the keys are the field names)."""
        return attrs.asdict(self)


ProgressCallback = Callable[[PullProgress], None]


def _eta(remaining: int | None, speed: float) -> float | None:
    if remaining is None or speed <= 0:
        return 0.0 if remaining == 0 else None
    return remaining / speed


@attrs.define(eq=False)
class _FileState:
    size: int | None
    on_disk: int = 0
    resumed_from: int = 0
    fetched: int = 0
    started: float = 0.0
    done: bool = False


@attrs.define(eq=False)
class PullTracker:
    """Turns a pull's file offsets into ``PullProgress`` events for ``callback``."""

    model: str
    files: Sequence[tuple[str, int | None]]
    """(path, size) of every file of the pull, in download order."""
    callback: ProgressCallback | None = None
    clock: Callable[[], float] = time.monotonic
    _state: dict[str, _FileState] = attrs.field(init=False)
    _started: float | None = attrs.field(init=False, default=None)
    _last_sent: float = attrs.field(init=False, default=float("-inf"))

    def __attrs_post_init__(self) -> None:
        self._state = {path: _FileState(size) for path, size in self.files}

    @property
    def total(self) -> int | None:
        sizes = [s.size for s in self._state.values()]
        return None if any(size is None for size in sizes) else sum(s or 0 for s in sizes)

    def start(self, on_disk: dict[str, int]) -> None:
        """The pull begins; ``on_disk`` is what earlier runs left of each file."""
        for path, have in on_disk.items():
            if path in self._state:
                self._state[path].on_disk = have
        self._send("start", None)

    def begin(self, path: str, offset: int) -> None:
        """``path`` begins downloading at byte ``offset`` (what is already on disk)."""
        state = self._state.get(path)
        if state is None:
            return
        now = self.clock()
        if self._started is None:
            self._started = now
        state.on_disk = state.resumed_from = offset
        state.fetched = 0
        state.started = now
        self._send("file", path)

    def advance(self, path: str, offset: int) -> None:
        """``path`` now has ``offset`` bytes on disk."""
        state = self._state.get(path)
        if state is None:
            return
        state.fetched += max(0, offset - state.on_disk)
        state.on_disk = offset
        if self.clock() - self._last_sent >= INTERVAL:
            self._send("download", path)

    def complete(self, path: str, *, reused: bool = False) -> None:
        """``path`` is complete and verified; ``reused``: nothing had to be fetched."""
        state = self._state.get(path)
        if state is None:
            return
        if state.size is not None:
            state.on_disk = state.size
        if reused:
            state.started = self.clock()
            state.resumed_from = state.on_disk
            state.fetched = 0
            self._send("file", path)
        state.done = True
        self._send("file_done", path)

    def finish(self) -> None:
        """The model is installed (or already was)."""
        for state in self._state.values():
            state.done = True
            if state.size is not None:
                state.on_disk = state.size
        self._send("done", None)

    def _send(self, stage: str, path: str | None) -> None:
        if self.callback is None:
            return
        now = self.clock()
        self._last_sent = now
        states = self._state.values()
        done = sum(s.on_disk for s in states)
        fetched = sum(s.fetched for s in states)
        total = self.total
        elapsed = now - self._started if self._started is not None else 0.0
        speed = fetched / elapsed if elapsed > 0 else 0.0
        event = PullProgress(
            stage=stage,
            model=self.model,
            done=done,
            total=total,
            speed=speed,
            eta=_eta(None if total is None else total - done, speed),
            files_done=sum(1 for s in states if s.done),
            files_total=len(self._state),
        )
        if path is not None:
            state = self._state[path]
            have = state.on_disk
            file_elapsed = now - state.started
            file_speed = state.fetched / file_elapsed if file_elapsed > 0 else 0.0
            event = attrs.evolve(
                event,
                file=path,
                file_done=have,
                file_total=state.size,
                resumed_from=state.resumed_from,
                file_speed=file_speed,
                file_eta=_eta(None if state.size is None else state.size - have, file_speed),
            )
        self.callback(event)
