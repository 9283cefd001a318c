"""Glue to llama.cpp's native side that both generation paths use.

- ``route_native_logs``: llama.cpp's and MTMD's log lines through Python's logging, at
  their real levels.
- ``PrefillAbort``: llama.cpp's abort callback on one context, so a cancel stops a prompt
  batch between graph nodes instead of after the whole batch. The batching engine arms it
  for prompt batches, and the image path (``nexa_llama_cpp.vision``) for its prompt and
  image decodes.

``llama_cpp`` is imported inside the functions only.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["PrefillAbort", "route_native_logs"]


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
