"""Glue to llama.cpp's native side that both generation paths use.

- ``route_native_logs``: llama.cpp's and MTMD's log lines through Python's logging, at
  their real levels.
- ``PrefillAbort``: llama.cpp's abort callback on one context, so a cancel stops a prompt
  batch between graph nodes instead of after the whole batch. The batching engine arms it
  for prompt batches, and the image path (``nexa_llama_cpp.vision``) for its prompt and
  image decodes.
- ``ThreadPool``: a persistent ggml thread pool whose workers poll for the next graph,
  attached to the batching engine's context while it decodes with every thread
  (llama-cpp-python 0.3.36 binds neither ggml's pool functions nor
  ``llama_attach_threadpool``).

``llama_cpp`` is imported inside the functions only.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["PrefillAbort", "ThreadPool", "route_native_logs"]


# ggml's log levels (ggml.h): 1 debug, 2 info, 3 warn, 4 error, 5 "continue the last line".
_GGML_LOG_LEVELS = {0: logging.INFO, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_native_log_callbacks: list[Any] = []


def route_native_logs() -> None:
    """Print llama.cpp's and MTMD's native log lines through the ``llama-cpp-python``
    logger at their real levels (it is at ERROR unless a Llama was made verbose).

    llama-cpp-python 0.3.36 reads ggml's levels with an older numbering, so a warning
    counted as an error and reached stderr with verbose off: every prompt batch a cancel
    aborted printed "decode: removing memory module entries ...". Idempotent."""
    if _native_log_callbacks:
        return
    import sys

    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd
    from llama_cpp._logger import logger

    last = [logging.INFO]

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, _user_data: Any) -> None:
        # Called from native threads mid-computation: never raise.
        try:
            if level != 5:
                last[0] = _GGML_LOG_LEVELS.get(level, logging.ERROR)
            if logger.isEnabledFor(last[0]):
                sys.stderr.write(text.decode("utf-8", "replace"))
                sys.stderr.flush()
        except Exception:
            pass

    _native_log_callbacks.append(callback)  # ctypes callbacks must outlive their use
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    for setter in ("mtmd_log_set", "mtmd_helper_log_set"):
        fn = getattr(mtmd, setter, None)
        if fn is not None:
            try:
                fn(callback, ctypes.c_void_p(0))
            except Exception:  # an older library without it stays as it was
                pass


def _native_flag_reader() -> Any:
    """The C library's ``strlen``: as an abort callback over a two-byte buffer it returns
    1 while the first byte is set and 0 otherwise, without ever taking Python's GIL.
    None where no C library can be found (then a Python callback is used)."""
    import ctypes.util

    names = ["msvcrt"] if os.name == "nt" else [None, ctypes.util.find_library("c")]
    for name in names:
        try:
            lib = ctypes.cdll.msvcrt if name == "msvcrt" else ctypes.CDLL(name)
            return ctypes.cast(lib.strlen, ctypes.c_void_p).value
        except (OSError, AttributeError):
            continue
    return None


class PrefillAbort:
    """llama.cpp's abort callback on one context, armed only while a prompt is decoded.

    A prompt batch takes seconds on a small CPU; without this a cancel could only be seen
    between batches. ggml calls the callback after every graph node from its compute
    thread. The callback is native: the C library's ``strlen`` reading a one-byte flag
    (length 1 = abort), so it never takes the GIL (a Python callback slowed prompts in the
    server; figures in docs/benchmarks.md). While armed, a watcher thread checks
    ``should_abort`` every few milliseconds and sets the flag. A decode the callback stops
    returns 2, and llama.cpp has then already dropped that ubatch's cells; callers still
    cut their sequence back to what they know is cached.
    """

    POLL_SECONDS = 0.005
    """How often the watcher asks ``should_abort`` while a prompt is decoded."""
    WATCHER_THREAD = "nexa-llama-abort"
    """The watcher thread's name; it looks only while a prompt batch is being decoded."""

    def __init__(self, lib: Any, ctx: Any) -> None:
        self._lib, self._ctx = lib, ctx
        self._flag = ctypes.create_string_buffer(2)  # b"\0\0": not aborted
        self._should_abort: Callable[[], bool] | None = None
        self._cv = threading.Condition()
        self._watcher: threading.Thread | None = None
        self._closed = False
        reader = _native_flag_reader()
        if reader is not None:
            self._callback = lib.ggml_abort_callback(reader)
            self._data = ctypes.cast(self._flag, ctypes.c_void_p)
        else:
            flag = self._flag

            def callback(_data: Any) -> bool:
                return flag.raw[0] != 0

            self._callback = lib.ggml_abort_callback(callback)
            self._data = None
        self._none = lib.ggml_abort_callback()

    @contextlib.contextmanager
    def armed(self, should_abort: Callable[[], bool]) -> Iterator[None]:
        """Decodes inside stop (status 2) soon after ``should_abort()`` turns true."""
        self._flag[0] = b"\1" if should_abort() else b"\0"
        with self._cv:
            self._should_abort = should_abort
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._watch, name=self.WATCHER_THREAD, daemon=True)
                self._watcher.start()
            self._cv.notify_all()
        self._lib.llama_set_abort_callback(self._ctx, self._callback, self._data)
        try:
            yield
        finally:
            self._lib.llama_set_abort_callback(self._ctx, self._none, None)
            with self._cv:
                self._should_abort = None
            self._flag[0] = b"\0"

    def close(self) -> None:
        """Stop the watcher thread (the context must no longer run decodes)."""
        with self._cv:
            self._closed = True
            self._should_abort = None
            self._cv.notify_all()

    def _watch(self) -> None:
        while True:
            with self._cv:
                while self._should_abort is None and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                check = self._should_abort
            try:
                if check():
                    self._flag[0] = b"\1"
            except Exception:  # a predicate that fails must not kill the watcher
                log.exception("abort check failed")
            with self._cv:
                if self._should_abort is check:
                    self._cv.wait(self.POLL_SECONDS)


class _PoolParams(ctypes.Structure):
    # ggml.h's struct ggml_threadpool_params (GGML_MAX_N_THREADS = 512).
    _fields_ = [
        ("cpumask", ctypes.c_bool * 512),
        ("n_threads", ctypes.c_int),
        ("prio", ctypes.c_int),
        ("poll", ctypes.c_uint32),
        ("strict_cpu", ctypes.c_bool),
        ("paused", ctypes.c_bool),
    ]


def loaded_library(stem: str) -> str | None:
    """The file of the library ``stem`` (``libggml-cpu``) that this process has mapped,
    from /proc/self/maps; None where none is, or more than one file is (two copies)."""
    found = set()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:  # address perms offset device inode [path]
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and os.path.basename(fields[5].strip()).startswith(stem + "."):
                    found.add(fields[5].strip())
    except OSError:
        return None
    return found.pop() if len(found) == 1 else None


@functools.cache
def _pool_libraries() -> tuple[Any, Any, Any] | None:
    """libllama, libggml-base and libggml-cpu with the pool functions' signatures set
    (once per process), or None where they are not found.

    They must be the very files libllama loaded: the wheel ships ``libggml-cpu.so`` and
    ``libggml-cpu.so.0`` as two copies, and a pool made by the copy libllama does not use
    runs its workers on that copy's code, whose ``ggml_cpu_init`` never ran (its
    half-precision tables are zeros): on Qwen2.5-Coder Q4_K_M every logit was NaN."""
    try:
        import llama_cpp.llama_cpp as L

        llama = L._lib
        paths = [loaded_library("libggml-base"), loaded_library("libggml-cpu")]
        if None in paths:
            raise OSError("the ggml libraries libllama uses were not found in /proc/self/maps")
        base, cpu = (ctypes.CDLL(path) for path in paths)
        if loaded_library("libggml-cpu") != paths[1]:
            raise OSError("binding the pool functions loaded a second copy of libggml-cpu")
        base.ggml_threadpool_params_default.restype = _PoolParams
        base.ggml_threadpool_params_default.argtypes = [ctypes.c_int]
        cpu.ggml_threadpool_new.restype = ctypes.c_void_p
        cpu.ggml_threadpool_new.argtypes = [ctypes.POINTER(_PoolParams)]
        for name in ("ggml_threadpool_free", "ggml_threadpool_pause", "ggml_threadpool_resume"):
            getattr(cpu, name).argtypes = [ctypes.c_void_p]
            getattr(cpu, name).restype = None
        llama.llama_attach_threadpool.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        llama.llama_attach_threadpool.restype = None
        llama.llama_detach_threadpool.argtypes = [ctypes.c_void_p]
        llama.llama_detach_threadpool.restype = None
        return llama, base, cpu
    except (OSError, AttributeError) as exc:
        log.debug("no persistent ggml thread pool: %s", exc)
        return None


class ThreadPool:
    """A persistent ggml thread pool of ``n_threads`` for one context, attached while the
    context decodes with all of them (``use``).

    Without one, ggml starts and joins its worker threads for every graph, so each token's
    decode begins with a thread start. llama.cpp's server attaches a pool whose workers
    poll for the next graph (``poll`` 50, its default): measured on SmolLM2 at 2 threads
    with 0.3 ms of other work between decodes, 1.023x the tokens/s of per-graph threads
    (median of 12 alternating pairs). Polling workers spin, though, and a spinning worker
    beside another busy process is what the thread governor steps away from: with fewer
    threads than the pool has, the pool is detached and paused (its workers sleep), and
    ggml's per-graph threads serve the smaller count.

    ``open`` gives None where the library does not export the pool functions (a build
    with dynamically loaded backends) or the files libllama loaded cannot be told (no
    /proc); decoding then works as without a pool."""

    POLL = 50

    def __init__(self, llama: Any, base: Any, cpu: Any, ctx: Any, n_threads: int) -> None:
        self._llama, self._cpu, self._ctx, self.n_threads = llama, cpu, ctx, n_threads
        params = base.ggml_threadpool_params_default(n_threads)
        params.poll = self.POLL
        params.paused = True
        self._pool = cpu.ggml_threadpool_new(ctypes.byref(params))
        if not self._pool:
            raise OSError("ggml_threadpool_new failed")
        self.attached = False

    @classmethod
    def open(cls, ctx: Any, n_threads: int) -> ThreadPool | None:
        libs = _pool_libraries()
        if libs is None:
            return None
        try:
            return cls(*libs, ctx, n_threads)
        except OSError as exc:  # ggml could not start the pool's threads
            log.debug("no persistent ggml thread pool: %s", exc)
            return None

    def use(self, threads: int) -> None:
        """The context decodes with ``threads`` from its next decode on."""
        if threads == self.n_threads and not self.attached:
            self._cpu.ggml_threadpool_resume(self._pool)
            self._llama.llama_attach_threadpool(self._ctx, self._pool, self._pool)
            self.attached = True
        elif threads != self.n_threads and self.attached:
            self._llama.llama_detach_threadpool(self._ctx)
            self._cpu.ggml_threadpool_pause(self._pool)
            self.attached = False

    def close(self) -> None:
        """Detach and free the pool (joins its workers); call before freeing the context."""
        if self._pool:
            if self.attached:
                self._llama.llama_detach_threadpool(self._ctx)
                self.attached = False
            self._cpu.ggml_threadpool_free(self._pool)
            self._pool = None
