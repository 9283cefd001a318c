"""Pull progress: the events ``nexa.hub.pull`` sends, cancelling a pull, and the bars
``nexa pull`` draws from those events under a pseudo-terminal (and does not draw when
piped). Real pulls against the loopback Hub throughout."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import threading

import pytest

from nexa.backend import CancelToken
from nexa.errors import Cancelled, StoreError
from nexa.hub import pull
from nexa.progress import STAGES, PullProgress, PullTracker
from nexa.store import ModelStore
from nexa.testing import wait_until
from nexa.testing.hubserver import HubServer, tiny_gguf_bytes

REPO = "acme/Progress-GGUF"
WEIGHTS = "Progress-Q4_K_M.gguf"
MMPROJ = "mmproj-Progress-F16.gguf"


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    return {
        WEIGHTS: tiny_gguf_bytes(pad_bytes=1_500_000, name="progress"),
        "Progress-Q8_0.gguf": tiny_gguf_bytes(pad_bytes=2_000_000, name="progress"),
        MMPROJ: tiny_gguf_bytes(architecture="clip", chat_template=None, pad_bytes=200_000),
    }


@pytest.fixture
def hub(files, env):
    with HubServer({REPO: files}) as server:
        env.setenv("HF_ENDPOINT", server.url)
        yield server


def part_files(store: ModelStore):
    return [p for p in (store.partial_dir / "blobs").glob("*.part")]


# --- events ----------------------------------------------------------------------------


def test_a_pull_reports_start_files_and_done_in_order(hub, store, files):
    events: list[PullProgress] = []
    manifest = pull(store, REPO, on_progress=events.append)

    assert {e.stage for e in events} <= set(STAGES)
    assert events[0].stage == "start" and events[-1].stage == "done"
    total = len(files[WEIGHTS]) + len(files[MMPROJ])
    assert events[0].total == total and events[0].done == 0 and events[0].files_total == 2
    for path in (WEIGHTS, MMPROJ):
        mine = [e for e in events if e.file == path]
        assert [mine[0].stage, mine[-1].stage] == ["file", "file_done"]
        assert mine[0].resumed_from == 0 and mine[-1].file_done == mine[-1].file_total == len(files[path])
        assert all(e.model == REPO for e in mine)
    done = events[-1]
    assert (done.done, done.total, done.files_done, done.eta) == (total, total, 2, 0.0)
    assert done.speed > 0
    # Bytes on disk only grow during a pull, and every event is plain JSON.
    assert [e.done for e in events] == sorted(e.done for e in events)
    assert json.loads(json.dumps([e.to_dict() for e in events]))[-1]["done"] == total
    assert manifest.name == REPO


def test_events_show_where_a_cut_pull_resumes_and_what_the_store_had(hub, store, files):
    cut = 654_321
    hub.drop_at[(REPO, WEIGHTS)] = cut
    with pytest.raises(StoreError, match="run the same pull again"):
        pull(store, REPO)
    hub.drop_at.clear()

    events: list[PullProgress] = []
    pull(store, REPO, on_progress=events.append)
    start = events[0]
    assert start.stage == "start" and start.done >= cut  # the projector may be complete too
    began = next(e for e in events if e.stage == "file" and e.file == WEIGHTS)
    assert began.resumed_from == cut and began.file_done == cut

    # A second quant: the shared projector is reported as already there, not fetched.
    events.clear()
    pull(store, f"{REPO}:Q8_0", on_progress=events.append)
    shared = [e for e in events if e.file == MMPROJ]
    assert [e.stage for e in shared] == ["file", "file_done"]
    assert shared[0].resumed_from == len(files[MMPROJ]) and shared[0].file_speed == 0
    assert events[0].done == len(files[MMPROJ]) and events[-1].model == f"{REPO}:Q8_0"


def test_tracker_figures_speed_and_eta_from_the_clock():
    now = [100.0]
    events: list[PullProgress] = []
    tracker = PullTracker("m", [("a", 1000), ("b", None)], events.append, clock=lambda: now[0])
    tracker.start({"a": 200})
    tracker.begin("a", 200)
    now[0] += 2
    tracker.advance("a", 600)  # 400 bytes in 2 s
    event = events[-1]
    assert (event.stage, event.file_done, event.resumed_from) == ("download", 600, 200)
    assert event.file_speed == 200 and event.file_eta == 2.0
    assert event.total is None and event.eta is None  # "b" has no known size
    now[0] += 0.01
    tracker.advance("a", 700)  # within INTERVAL of the last event: not sent
    assert events[-1] is event


# --- cancelling ------------------------------------------------------------------------


def test_cancel_between_chunks_leaves_nothing_visible_and_resumes_later(hub, store, files):
    stall = 700_001
    hub.stall_at[(REPO, WEIGHTS)] = stall
    token = CancelToken()
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            pull(store, REPO, cancel=token)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    try:
        assert hub.stalled.wait(60), "the pull never reached the stall point"
        wait_until(lambda: any(p.stat().st_size == stall for p in part_files(store)),
                   "the pull has written the bytes it received")
        token.cancel()
    finally:
        hub.stall_at.clear()
        hub.release()  # the next chunk arrives and meets the cancelled token
        worker.join(60)
    assert len(outcome) == 1 and isinstance(outcome[0], Cancelled), outcome
    assert store.list() == []
    assert not any(store.partial_dir.glob("staged-*"))
    (part,) = part_files(store)
    assert part.stat().st_size == stall  # kept for the next pull

    hub.reset_counters()
    manifest = pull(store, REPO)
    assert hub.range_starts[(REPO, WEIGHTS)] == [stall]
    assert manifest.file_path("weights").read_bytes() == files[WEIGHTS]


# --- the bars of `nexa pull` -------------------------------------------------------------


def _nexa_pull(home, hub_url: str, *args: str, tty: bool) -> tuple[int, str, str]:
    env = {**os.environ, "NEXA_HOME": str(home), "HF_ENDPOINT": hub_url, "COLUMNS": "120"}
    cmd = [sys.executable, "-m", "nexa.cli", "pull", *args]
    if not tty:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        return done.returncode, done.stdout, done.stderr
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(cmd, env=env, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 120)
            if not ready:
                break
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        proc.wait(60)
    return proc.returncode, b"".join(chunks).decode("utf-8", "replace"), ""


def test_bars_under_a_terminal_show_files_total_speed_eta_and_the_resume_point(hub, home, files):
    cut = 543_210
    hub.drop_at[(REPO, WEIGHTS)] = cut
    with pytest.raises(StoreError):
        pull(ModelStore(home), REPO)
    hub.drop_at.clear()

    status, out, _ = _nexa_pull(home, hub.url, REPO, tty=True)
    assert status == 0, out
    screen = out.replace("\r", "\n")
    assert f"{WEIGHTS}: resuming at 543.2 KB of 1.5 MB (byte {cut})" in screen
    # The file bars and the total bar, finished, each with speed and ETA from the events.
    assert re.search(rf"{re.escape(WEIGHTS)}: 100%\|.*\| 1\.50M/1\.50M, [\d.]+[kM]?B/s, ETA 00:00", screen)
    assert re.search(rf"{re.escape(MMPROJ)}: 100%\|", screen) or f"{MMPROJ}: already here" in screen
    assert re.search(rf"{re.escape(REPO)}: 100%\|.*\| 1\.70M/1\.70M, [\d.]+[kM]?B/s, ETA 00:00", screen)
    assert f"pulled {REPO} (gguf" in screen


def test_no_bars_when_piped_or_quiet(hub, home):
    status, out, err = _nexa_pull(home, hub.url, REPO, tty=False)
    assert status == 0, err
    assert out == f"pulled {REPO} (gguf, chat, vlm, 1.7 MB)\n"
    assert err == ""
    status, out, _ = _nexa_pull(home, hub.url, f"{REPO}:Q8_0", "--quiet", tty=True)
    assert status == 0
    assert "%|" not in out and "ETA" not in out and "already here" not in out
    assert f"pulled {REPO}:Q8_0" in out
