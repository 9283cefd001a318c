"""The pull's progress bars: ``nexa.progress.PullProgress`` events drawn with tqdm.

Two bars on stderr: the file being fetched, and the whole pull. Both show the speed and
ETA the events carry (``PullTracker``'s figures, the same for every consumer), not
tqdm's own estimate. A file that goes on from a cut-off pull says so and where it resumes; a file
the store already had says that. Drawn only when stderr is a terminal and ``--quiet``
is not given: piped or redirected, a pull prints its one result line and nothing else.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from nexa.cli.common import human
from nexa.progress import PullProgress


def wanted(*, quiet: bool, stream: TextIO | None = None) -> bool:
    stream = stream if stream is not None else sys.stderr
    return not quiet and stream.isatty()


def _short(path: str) -> str:
    return path if len(path) <= 40 else "…" + path[-39:]


def _rate(speed: float, eta: float | None) -> str:
    from tqdm import tqdm

    left = tqdm.format_interval(eta) if eta is not None else "?"
    return f"{tqdm.format_sizeof(speed, 'B/s')}, ETA {left}"


class PullBars:
    """A progress callback for ``nexa.hub.pull`` that draws bars; close it when done."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.total: Any = None
        self.file: Any = None

    def __enter__(self) -> PullBars:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _bar(self, desc: str, total: int | None, initial: int, position: int) -> Any:
        from tqdm import tqdm

        shape = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}" if total else "{desc}: {n_fmt}{postfix}"
        return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1000,
                    position=position, leave=position == 0, file=self.stream, bar_format=shape,
                    dynamic_ncols=True)

    def _note(self, text: str) -> None:
        from tqdm import tqdm

        tqdm.write(text, file=self.stream)

    @staticmethod
    def _show(bar: Any, done: int, speed: float, eta: float | None) -> None:
        bar.n = done
        bar.set_postfix_str(_rate(speed, eta), refresh=False)
        bar.refresh()

    def __call__(self, event: PullProgress) -> None:
        if event.stage == "start":
            self.total = self._bar(event.model, event.total, event.done, 0)
        elif event.stage == "file" and event.file is not None:
            self._close_file()
            size = event.file_total
            if size is not None and event.resumed_from >= size:
                self._note(f"{event.file}: already here ({human(size)})")
            else:
                if event.resumed_from:
                    of = f" of {human(size)}" if size is not None else ""
                    self._note(f"{event.file}: resuming at {human(event.resumed_from)}{of} "
                               f"(byte {event.resumed_from})")
                self.file = self._bar(_short(event.file), size, event.resumed_from, 1)
        elif event.stage in ("download", "file_done") and self.file is not None:
            self._show(self.file, event.file_done, event.file_speed, event.file_eta)
            if event.stage == "file_done":
                self._close_file()
        if self.total is not None and event.stage != "start":
            self._show(self.total, event.done, event.speed, event.eta)
        if event.stage == "done":
            self.close()

    def _close_file(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def close(self) -> None:
        self._close_file()
        if self.total is not None:
            self.total.close()
            self.total = None
