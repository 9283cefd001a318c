"""Continuous batching for llama.cpp: one decode loop that serves many generations at once.

This module owns ``BatchEngine``: one llama model and one llama context, driven through
llama-cpp-python's low-level ctypes API (``llama_cpp.llama_cpp``) from a single long-lived
thread. Each step of that thread's loop puts the next token of every running sequence into
one ``llama_decode`` batch, together with a bounded chunk of the prompts of newly admitted
requests, samples every sequence with its own sampler chain, and retires finished or
cancelled sequences at once. It also owns the KV-cache budget, prompt-prefix reuse across
requests, incremental UTF-8-safe detokenizing, stop strings and the engine's counters.

It knows nothing about chat templates, tools or HTTP: callers hand it token ids and a
``GenerationRequest`` and get ``TextPiece`` events and one final ``Finished`` event back,
either as a blocking iterator (for a backend's worker thread) or as an async iterator.

Only the engine thread touches the llama context; callers only enqueue work. That also
keeps clear of the OpenMP thread trap measured on this machine (see
shared/notes/environment.md), whatever build of llama-cpp-python is installed.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import contextlib
import ctypes
import itertools
import logging
import math
import os
import queue
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import attrs

from nexa.errors import BadRequest, Busy, Cancelled, ContextLengthExceeded, ModelLoadError

log = logging.getLogger(__name__)

__all__ = [
    "BatchEngine",
    "EngineStats",
    "Finished",
    "GenerationRequest",
    "PrefillAbort",
    "route_native_logs",
    "TextPiece",
    "TokenStream",
]


# --- public value types ----------------------------------------------------------------


def _tuple_of_str(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


@attrs.frozen
class GenerationRequest:
    """One text generation, as token ids plus everything that shapes its sampling."""

    prompt_tokens: tuple[int, ...] = attrs.field(converter=tuple)
    """The rendered prompt, tokenized (BOS included when the model wants one)."""
    max_tokens: int | None = None
    """Most tokens to generate; None: until end of generation or the context is full."""
    temperature: float = 1.0
    """0 (or less) means greedy decoding."""
    top_p: float = 1.0
    top_k: int | None = None
    """None or 0: no top-k cut."""
    min_p: float | None = None
    seed: int | None = None
    """None: a random seed. Same seed and prompt give the same text, alone or batched."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float | None = None
    """None or 1.0: off."""
    penalty_last_n: int = 64
    """How many recent tokens the penalties look at."""
    stop: tuple[str, ...] = attrs.field(converter=_tuple_of_str, default=())
    """Strings that end the generation; never emitted, not even in part."""
    grammar: str | None = None
    """GBNF grammar (root rule ``root``) the output must follow (json_schema, tools)."""
    grammar_triggers: tuple[str, ...] = attrs.field(converter=_tuple_of_str, default=())
    """Regex patterns; when given, the grammar is lazy and binds only once one matches
    the generated text (a tool call that starts after free text)."""
    render_special: bool = False
    """Emit the text of control tokens (``<|im_start|>``...) instead of dropping it."""

    @classmethod
    def from_sampling(cls, prompt_tokens: Sequence[int], sampling: Any) -> GenerationRequest:
        """From the backend's resolved ``textstream.Sampling`` (0 / 1.0 mean "off" there)."""
        return cls(
            prompt_tokens=tuple(prompt_tokens),
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k or None,
            min_p=sampling.min_p or None,
            seed=sampling.seed,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            repeat_penalty=sampling.repeat_penalty,
            grammar=sampling.grammar,
        )


@attrs.frozen
class TextPiece:
    """Newly generated text (never part of a stop string, never a broken UTF-8 character)."""

    text: str
    n_tokens: int = 1
    """Generated tokens since the previous piece (a character can span several tokens,
    and text held back for a stop string is counted where it is finally emitted)."""


@attrs.frozen
class Finished:
    """The last event of a generation."""

    finish_reason: str
    """``stop`` (end of generation, a stop string or the grammar completed) or ``length``."""
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    """Prompt tokens whose KV entries were reused from an earlier request (not recomputed)."""


Event = TextPiece | Finished


@attrs.frozen
class EngineStats:
    """A snapshot of the engine's gauges and (monotonic) counters, for ``/metrics``."""

    n_seq: int
    """Sequences the engine runs at once."""
    kv_size: int
    """KV cells in the cache (all sequences together)."""
    active_sequences: int
    waiting_requests: int
    """Admitted to the engine but waiting for a free sequence or KV room."""
    kv_cells_reserved: int
    """KV cells promised to running sequences (prompt + max new tokens each)."""
    requests_started: int
    requests_finished: int
    requests_cancelled: int
    prompt_tokens_evaluated: int
    """Prompt tokens actually computed."""
    prompt_tokens_reused: int
    """Prompt tokens skipped because their KV entries were already in the cache."""
    tokens_generated: int
    decode_steps: int
    embed_requests: int
    sequences_moved: int
    """Running sequences moved to a lower id to keep the ids contiguous."""


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
    between batches. ggml calls the callback after every graph node (~600 per decode on
    SmolLM2-135M) from its compute thread. The callback is native: the C library's
    ``strlen`` reading a one-byte flag (length 1 = abort), so it never takes the GIL. A
    Python callback took the GIL on every node: in the server, with the event loop in
    the same process, that made prompts ~18% slower (24 prompt tokens of SmolLM2: ~245
    vs ~200 ms, Nov 2026). While armed, a watcher thread checks ``should_abort`` every
    few milliseconds and sets the flag. A decode the callback stops returns 2, and
    llama.cpp has then already dropped that ubatch's cells; callers still cut their
    sequence back to what they know is cached.
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


# --- internal state ---------------------------------------------------------------------

_admission_order = itertools.count()


class _Sampler:
    """Per-sequence sampler chain plus an optional grammar sampler (owned C objects)."""

    def __init__(self, lib: Any, vocab: Any, n_vocab: int, request: GenerationRequest) -> None:
        self._lib = lib
        self.chain = None
        self.grammar = None
        L = lib
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        self.chain = chain
        repeat = request.repeat_penalty if request.repeat_penalty not in (None, 0.0) else 1.0
        if repeat != 1.0 or request.frequency_penalty or request.presence_penalty:
            L.llama_sampler_chain_add(
                chain,
                L.llama_sampler_init_penalties(
                    n_vocab,
                    request.penalty_last_n,
                    float(repeat),
                    float(request.frequency_penalty),
                    float(request.presence_penalty),
                ),
            )
        if request.temperature <= 0.0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
            self.seed = None
        else:
            if request.top_k:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(int(request.top_k)))
            if request.top_p < 1.0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(float(request.top_p), 1))
            if request.min_p:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(float(request.min_p), 1))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(float(request.temperature)))
            # The seed is drawn here, not left to llama.cpp's random default, so that
            # every sequence owns a reproducible RNG stream.
            self.seed = request.seed if request.seed is not None else random.getrandbits(32)
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(self.seed & 0xFFFFFFFF))
        if request.grammar is not None:
            grammar = request.grammar.encode("utf-8")
            if request.grammar_triggers:
                patterns = [p.encode("utf-8") for p in request.grammar_triggers]
                arr = (ctypes.c_char_p * len(patterns))(*patterns)
                self.grammar = L.llama_sampler_init_grammar_lazy_patterns(
                    vocab, grammar, b"root", arr, len(patterns), None, 0
                )
            else:
                self.grammar = L.llama_sampler_init_grammar(vocab, grammar, b"root")
            if not self.grammar:
                self.free()
                raise BadRequest("the grammar for this request could not be parsed", param="grammar")

    def free(self) -> None:
        if self.chain:
            self._lib.llama_sampler_free(self.chain)
            self.chain = None
        if self.grammar:
            self._lib.llama_sampler_free(self.grammar)
            self.grammar = None


@attrs.define(eq=False)
class _Job:
    """A submitted generation: request, where its events go, and how it is cancelled."""

    request: GenerationRequest
    sampler: _Sampler
    sink: Callable[[Event | BaseException], None]
    cancelled: Callable[[], bool]
    max_new: int
    """Tokens this request may generate (max_tokens clamped to the context)."""
    dead: bool = False
    """Set when its consumer can no longer take events (its event loop closed)."""

    @property
    def reserve(self) -> int:
        """KV cells this request can use at most."""
        return len(self.request.prompt_tokens) + self.max_new


@attrs.define(eq=False)
class _Sequence:
    """A running generation bound to one llama sequence id (its slot)."""

    job: _Job
    slot: _Slot
    pending: list[int]
    """Tokens to feed to the model: the rest of the prompt, then each sampled token."""
    n_prompt_left: int
    """How many of ``pending`` are still prompt tokens."""
    n_reused: int
    order: int = attrs.field(factory=lambda: next(_admission_order))
    n_generated: int = 0
    n_unreported: int = 0
    """Generated tokens not yet counted in a TextPiece."""
    i_batch: int = -1
    """Index of this sequence's output row in the current batch, -1 when none."""
    decoder: Any = attrs.field(factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    held: str = ""
    """Decoded text not yet emitted because it could be the start of a stop string."""


@attrs.define(eq=False)
class _Slot:
    """One llama sequence id and what its part of the KV cache holds."""

    seq_id: int
    tokens: list[int] = attrs.field(factory=list)
    """Tokens whose KV entries the cache holds for this sequence id, positions 0..n-1."""
    active: _Sequence | None = None
    last_used: float = 0.0


@attrs.define(eq=False)
class _EmbedJob:
    inputs: list[list[int]]
    normalize: bool
    done: Callable[[list[list[float]] | BaseException], None]
    cancelled: Callable[[], bool]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    # Compare in blocks first: prompts share long system prompts.
    step = 64
    while i + step <= n and a[i : i + step] == b[i : i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _split_stop(text: str, stops: tuple[str, ...]) -> tuple[str, str, bool]:
    """Split ``text`` into (emit now, hold back, stopped).

    When a stop string occurs, everything before its first occurrence is emitted and the
    generation stops. Otherwise the longest tail that is a prefix of some stop string is
    held back, so a stop string is never emitted in part.
    """
    if not stops:
        return text, "", False
    first = -1
    for s in stops:
        if not s:
            continue
        i = text.find(s)
        if i != -1 and (first == -1 or i < first):
            first = i
    if first != -1:
        return text[:first], "", True
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    if hold:
        return text[:-hold], text[-hold:], False
    return text, "", False


# --- the engine -------------------------------------------------------------------------


class BatchEngine:
    """One llama.cpp model serving up to ``n_seq`` generations at once by continuous batching.

    ``model_path`` is a GGUF file; alternatively pass ``model`` (a ``llama_model*`` loaded
    elsewhere, e.g. ``Llama._model.model``), which the engine then does not free.

    KV budget, default layout (``kv_unified=False``): every sequence id owns its own
    ``n_ctx`` cells, so a request needs a free sequence id and nothing else; it waits
    (first come, first served) while all ``n_seq`` are busy. In this layout a token's
    logits are the same whatever else shares the batch and however the prompt was cut
    into chunks (measured with flash attention on and off; it is on by default), so a
    seeded or greedy request gives the same text alone or batched.

    ``kv_unified=True`` puts all sequences in one pool of ``kv_size`` cells: a request is
    admitted only when its worst case (prompt + max new tokens) fits beside the worst
    cases of the running ones, else it waits. Denser when requests are short, but the
    numbers then depend slightly on the batch (texts may differ from a solo run).

    Prefix reuse: a finished sequence's cells stay cached. A new request whose tokens
    start like a cached or running sequence keeps (or copies) that prefix and computes
    only the rest. Requests that arrive together with a shared prefix (a system prompt)
    are admitted one after the other: the second waits until the first has computed the
    shared part, then copies it.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        model: Any = None,
        n_seq: int = 4,
        n_ctx: int = 4096,
        kv_size: int | None = None,
        kv_unified: bool = False,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        n_batch: int = 512,
        prompt_chunk: int = 64,
        max_waiting: int | None = None,
        flash_attn: bool | None = None,
        n_gpu_layers: int = 0,
        op_offload: bool | None = None,
        embed_pooling: int | None = None,
    ) -> None:
        if model_path is None and model is None:
            raise ValueError("give model_path or model")
        if n_seq < 1:
            raise ValueError("n_seq must be at least 1")
        self.model_path = None if model_path is None else os.fspath(model_path)
        self.n_seq = n_seq
        self.n_ctx = n_ctx
        """Most tokens (prompt + generated) one request may hold."""
        self.kv_unified = kv_unified
        if kv_unified:
            self.kv_size = max(kv_size or n_ctx * n_seq, n_ctx)
        else:
            self.kv_size = n_ctx * n_seq
        self.min_copy = 16
        """Shortest prefix worth copying from another sequence's own cells (the copy
        moves that sequence's whole KV buffer, so a few tokens are cheaper to recompute)."""
        self.n_threads = n_threads or max(1, min(os.cpu_count() or 1, 8))
        self.n_threads_batch = n_threads_batch or self.n_threads
        self.n_batch = max(n_batch, n_seq)
        self.prompt_chunk = max(4, prompt_chunk)
        """Prompt tokens per step while other sequences are generating: a long prompt is
        taken in bites so the running streams keep flowing. With nothing else running a
        prompt goes in ``n_batch`` at a time."""
        self.max_waiting = max_waiting
        self._flash_attn = flash_attn
        self._n_gpu_layers = n_gpu_layers
        # A GPU build of llama.cpp sends large prompt batches to the GPU even for layers
        # kept on the CPU; off when the engine runs on the CPU alone (no layer offloaded).
        self._op_offload = op_offload if op_offload is not None else (model is not None or n_gpu_layers != 0)
        self._embed_pooling = embed_pooling

        self._model = model
        self._owns_model = model is None
        self._ctx = None
        self._mem = None
        self._vocab = None
        self.n_vocab = 0
        self._batch = None
        self._embed_ctx = None
        self._abort: PrefillAbort | None = None
        self._L: Any = None

        self._cv = threading.Condition()
        self._inbox: collections.deque[_Job] = collections.deque()
        self._embed_inbox: collections.deque[_EmbedJob] = collections.deque()
        self._waiting: collections.deque[_Job] = collections.deque()
        self._slots: list[_Slot] = []
        self._closing = False
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None

        self._counters = dict.fromkeys(
            (
                "requests_started",
                "requests_finished",
                "requests_cancelled",
                "prompt_tokens_evaluated",
                "prompt_tokens_reused",
                "tokens_generated",
                "decode_steps",
                "embed_requests",
                "sequences_moved",
            ),
            0,
        )

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread and load the model on it; raises ModelLoadError."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="nexa-llama-batch", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._thread.join()
            self._thread = None
            raise self._start_error

    def close(self) -> None:
        """Stop the loop; running and waiting requests end with ``Cancelled``; frees the model."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def __enter__(self) -> BatchEngine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- tokens ------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of ``text`` with this model's vocabulary (safe from any thread)."""
        self._check_open()
        L, raw = self._L, text.encode("utf-8")
        n_max = len(raw) + 16
        buf = (L.llama_token * n_max)()
        n = L.llama_tokenize(self._vocab, raw, len(raw), buf, n_max, add_special, parse_special)
        if n < 0:
            n_max = -n
            buf = (L.llama_token * n_max)()
            n = L.llama_tokenize(self._vocab, raw, len(raw), buf, n_max, add_special, parse_special)
        return list(buf[:n])

    def _check_open(self) -> None:
        if self._thread is None or self._model is None:
            raise RuntimeError("the engine is not running")

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        L = self._L
        buf = ctypes.create_string_buffer(64)
        n = L.llama_token_to_piece(self._vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        return b"".join(self.token_bytes(t, special=special) for t in tokens).decode("utf-8", "replace")

    # --- generation: submit + the two consumer APIs -------------------------------------

    def _submit(
        self,
        request: GenerationRequest,
        sink: Callable[[Event | BaseException], None],
        cancelled: Callable[[], bool],
    ) -> None:
        self._check_open()
        prompt = request.prompt_tokens
        if not prompt:
            raise BadRequest("the prompt is empty", param="messages")
        if len(prompt) >= self.n_ctx:
            raise ContextLengthExceeded(
                f"this model's context holds {self.n_ctx} tokens; the prompt has {len(prompt)} "
                "and no room is left to generate",
                param="messages",
            )
        if min(prompt) < 0 or max(prompt) >= self.n_vocab:
            raise BadRequest("prompt token id out of the vocabulary's range", param="prompt")
        if request.max_tokens is not None and request.max_tokens < 1:
            raise BadRequest("max_tokens must be at least 1", param="max_tokens")
        room = self.n_ctx - len(prompt)
        max_new = room if request.max_tokens is None else min(request.max_tokens, room)
        sampler = _Sampler(self._L, self._vocab, self.n_vocab, request)
        job = _Job(request=request, sampler=sampler, sink=sink, cancelled=cancelled, max_new=max_new)
        with self._cv:
            if self._closing:
                sampler.free()
                raise Cancelled()
            if self.max_waiting is not None and len(self._waiting) + len(self._inbox) >= self.max_waiting:
                sampler.free()
                raise Busy("too many requests are waiting for this model", retry_after=1)
            self._inbox.append(job)
            self._cv.notify_all()

    def generate(self, request: GenerationRequest, cancel: Any = None) -> Iterator[Event]:
        """Events of one generation, blocking; for a worker thread.

        ``cancel`` is anything with a ``cancelled`` property (``nexa.backend.CancelToken``);
        the engine checks it every step. Closing the iterator early cancels too. Raises
        ``nexa.errors.Cancelled`` when cancelled, ``BadRequest`` for a bad request.
        """
        events: queue.SimpleQueue[Event | BaseException] = queue.SimpleQueue()
        gone = threading.Event()

        def cancelled() -> bool:
            return gone.is_set() or (cancel is not None and cancel.cancelled)

        self._submit(request, events.put, cancelled)
        return self._drain(events, gone, cancel)

    @staticmethod
    def _drain(events: queue.SimpleQueue[Event | BaseException], gone: threading.Event, cancel: Any) -> Iterator[Event]:
        try:
            while True:
                # Events the engine made before it saw the cancel are not delivered.
                if cancel is not None and cancel.cancelled:
                    raise Cancelled()
                event = events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            gone.set()

    async def agenerate(self, request: GenerationRequest, cancel: Any = None) -> AsyncIterator[Event]:
        """Events of one generation as an async iterator; closing it cancels the generation."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        gone = threading.Event()

        def sink(event: Event | BaseException) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        def cancelled() -> bool:
            return gone.is_set() or (cancel is not None and cancel.cancelled)

        self._submit(request, sink, cancelled)
        try:
            while True:
                event = await events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            gone.set()

    def token_stream(self, request: GenerationRequest, cancel: Any = None) -> TokenStream:
        """The generation as ``(text, None)`` once per generated token, then
        ``(text, finish_reason)``: the llama-cpp backend's generation boundary."""
        return TokenStream(self, request, cancel)

    # --- embeddings on the chat model ---------------------------------------------------

    def embed(
        self, inputs: Sequence[Sequence[int]], *, normalize: bool = True, cancel: Any = None
    ) -> list[list[float]]:
        """Pooled embeddings of token sequences, computed on the engine thread between
        decode steps (ahead of waiting generations), so they never wait for chats to end."""
        result: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._submit_embed(inputs, normalize, result.put, cancel)
        value = result.get()
        if isinstance(value, BaseException):
            raise value
        return value

    async def aembed(
        self, inputs: Sequence[Sequence[int]], *, normalize: bool = True, cancel: Any = None
    ) -> list[list[float]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def done(value: Any) -> None:
            def settle() -> None:
                if future.done():
                    return
                if isinstance(value, BaseException):
                    future.set_exception(value)
                else:
                    future.set_result(value)

            loop.call_soon_threadsafe(settle)

        gone = threading.Event()
        self._submit_embed(inputs, normalize, done, _Either(cancel, gone))
        try:
            return await future
        finally:
            gone.set()

    def _submit_embed(self, inputs: Sequence[Sequence[int]], normalize: bool, done: Any, cancel: Any) -> None:
        self._check_open()
        token_lists = [list(t) for t in inputs]
        for tokens in token_lists:
            if not tokens:
                raise BadRequest("an input is empty", param="input")
            if len(tokens) > self.n_ctx:
                raise ContextLengthExceeded(
                    f"an input has {len(tokens)} tokens; this model takes at most {self.n_ctx}",
                    param="input",
                )
            if min(tokens) < 0 or max(tokens) >= self.n_vocab:
                raise BadRequest("input token id out of the vocabulary's range", param="input")
        job = _EmbedJob(
            inputs=token_lists,
            normalize=normalize,
            done=done,
            cancelled=(lambda: cancel is not None and cancel.cancelled),
        )
        with self._cv:
            if self._closing:
                raise Cancelled()
            self._embed_inbox.append(job)
            self._cv.notify_all()

    # --- observability -------------------------------------------------------------------

    def stats(self) -> EngineStats:
        with self._cv:
            active = [s.active for s in self._slots if s.active is not None]
            return EngineStats(
                n_seq=self.n_seq,
                kv_size=self.kv_size,
                active_sequences=len(active),
                waiting_requests=len(self._waiting) + len(self._inbox),
                kv_cells_reserved=sum(s.job.reserve for s in active),
                **self._counters,
            )

    # --- the engine thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._load()
        except BaseException as exc:
            self._start_error = exc if isinstance(exc, ModelLoadError) else ModelLoadError(str(exc))
            self._free()
            self._started.set()
            return
        self._started.set()
        try:
            while True:
                with self._cv:
                    while (
                        not self._closing
                        and not self._inbox
                        and not self._embed_inbox
                        and not self._waiting
                        and not any(s.active for s in self._slots)
                    ):
                        self._cv.wait()
                    if self._closing:
                        break
                    self._waiting.extend(self._inbox)
                    self._inbox.clear()
                    embed_job = self._embed_inbox.popleft() if self._embed_inbox else None
                if embed_job is not None:
                    self._run_embed(embed_job)
                try:
                    self._step()
                except Exception as exc:  # keep serving: fail what was running, wipe the cache
                    self._fail_all_active(exc)
        finally:
            self._shutdown()

    def _load(self) -> None:
        import llama_cpp.llama_cpp as L  # heavy: only on the engine thread
        from llama_cpp._logger import logger as native_log

        self._L = L
        if native_log.level == logging.NOTSET:
            # llama.cpp logs every tensor at load unless told otherwise (as Llama(verbose=False) does).
            native_log.setLevel(logging.ERROR)
        route_native_logs()
        L.llama_backend_init()
        if self._model is None:
            params = L.llama_model_default_params()
            params.n_gpu_layers = self._n_gpu_layers
            assert self.model_path is not None
            if not os.path.isfile(self.model_path):
                raise ModelLoadError(f"model file not found: {self.model_path}")
            self._model = L.llama_model_load_from_file(self.model_path.encode("utf-8"), params)
            if not self._model:
                raise ModelLoadError(f"llama.cpp could not load {self.model_path}")
        self._vocab = L.llama_model_get_vocab(self._model)
        self.n_vocab = L.llama_vocab_n_tokens(self._vocab)

        cparams = L.llama_context_default_params()
        cparams.n_ctx = self.kv_size
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = self.n_batch
        cparams.n_seq_max = self.n_seq
        cparams.n_threads = self.n_threads
        cparams.n_threads_batch = self.n_threads_batch
        cparams.kv_unified = self.kv_unified
        cparams.op_offload = self._op_offload
        cparams.no_perf = True
        # Flash attention on unless asked otherwise, as llama.cpp's own server does
        # ("auto"): on this project's 2-core AVX2 VM it decoded SmolLM2 ~15% faster with
        # one thread and read long prompts up to ~10% faster (Nov 2026), and solo and
        # batched greedy texts stay the same (tests/test_engine_smollm2.py).
        flash = self._flash_attn if self._flash_attn is not None else True
        cparams.flash_attn_type = 1 if flash else 0
        self._ctx = L.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            raise ModelLoadError("llama.cpp could not create a context (out of memory?)")
        self._mem = L.llama_get_memory(self._ctx)
        self._abort = PrefillAbort(L, self._ctx)
        self._batch = L.llama_batch_init(self.n_batch, 0, 1)
        self._slots = [_Slot(seq_id=i) for i in range(self.n_seq)]

    def _free(self) -> None:
        L = self._L
        if L is None:
            return
        if self._batch is not None:
            L.llama_batch_free(self._batch)
            self._batch = None
        if self._embed_ctx:
            L.llama_free(self._embed_ctx)
            self._embed_ctx = None
        if self._ctx:
            L.llama_free(self._ctx)
            self._ctx = None
        if self._abort is not None:
            self._abort.close()
        self._abort = None  # its callback may go only once no context can call it
        if self._model and self._owns_model:
            L.llama_model_free(self._model)
        self._model = None

    def _shutdown(self) -> None:
        with self._cv:
            jobs = list(self._waiting) + list(self._inbox)
            self._waiting.clear()
            self._inbox.clear()
            embeds = list(self._embed_inbox)
            self._embed_inbox.clear()
        for slot in self._slots:
            if slot.active is not None:
                jobs.append(slot.active.job)
                slot.active = None
        for job in jobs:
            job.sampler.free()
            self._emit(job, Cancelled())
        for e in embeds:
            e.done(Cancelled())
        self._free()

    # --- one step ------------------------------------------------------------------------

    def _emit(self, job: _Job, event: Event | BaseException) -> None:
        try:
            job.sink(event)
        except RuntimeError:  # the consumer's event loop is gone: treat as cancelled
            job.dead = True

    def _step(self) -> None:
        self._drop_cancelled_waiting()
        self._retire_cancelled()
        self._admit()
        self._compact()
        running = sorted((s.active for s in self._slots if s.active is not None), key=lambda q: q.order)
        # Generated tokens of all sequences go in one batch; a prompt goes in its own
        # call, one sequence at a time. llama.cpp's CPU kernels give a token slightly
        # different numbers when it is its sequence's only row in a batch than when it
        # comes with others of the same sequence (measured), and a mixed batch is cut
        # into ubatches in ways that can leave such lone rows; this split keeps every
        # sequence's numbers the same whatever runs beside it.
        # In sequence-id order: llama.cpp puts per-sequence caches' tokens in one ubatch
        # only while the ids go up by one (split_equal, sequential), so 0,1,2,3 is one
        # graph run and 3,1,0,2 would be four.
        generating = [(q, 1) for q in sorted(running, key=lambda q: q.slot.seq_id) if not q.n_prompt_left]
        if generating:
            self._decode(generating)
        # Prompts, oldest first, until this step's budget is spent: several short prompts
        # start together, a long one is taken in bites while the others keep streaming.
        budget = self.prompt_chunk if generating else self.n_batch
        for q in running:
            if budget <= 0:
                break
            if not q.n_prompt_left or q.slot.active is not q or q.job.dead or q.job.cancelled():
                continue
            take = min(budget, q.n_prompt_left)
            if q.n_prompt_left - take == 1:
                take -= 1  # never leave a lone last prompt token (see above)
            job = q.job
            # A prompt batch takes seconds on a CPU: a cancel or close stops it mid-graph.
            if not self._decode([(q, take)], abort=lambda job=job: self._closing or job.dead or job.cancelled()):
                if self._closing:
                    return  # the loop ends; _shutdown cancels what is left
                self._cancel(q)
            budget -= take

    def _drop_cancelled_waiting(self) -> None:
        with self._cv:
            keep = collections.deque()
            dropped = []
            for job in self._waiting:
                (dropped if job.dead or job.cancelled() else keep).append(job)
            self._waiting = keep
        for job in dropped:
            job.sampler.free()
            self._counters["requests_cancelled"] += 1
            self._emit(job, Cancelled())

    def _retire_cancelled(self) -> None:
        for slot in self._slots:
            seq = slot.active
            if seq is not None and (seq.job.dead or seq.job.cancelled()):
                self._cancel(seq)

    def _cancel(self, seq: _Sequence) -> None:
        self._counters["requests_cancelled"] += 1
        self._release(seq)
        self._emit(seq.job, Cancelled())

    def _release(self, seq: _Sequence) -> None:
        """Retire a sequence; its KV entries stay as a prefix cache for later requests."""
        seq.job.sampler.free()
        slot = seq.slot
        with self._cv:
            slot.active = None
        slot.last_used = time.monotonic()

    def _clear_slot(self, slot: _Slot) -> None:
        self._L.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
        slot.tokens = []

    def _admit(self) -> None:
        """Bind waiting requests, first come first served, to free sequence ids."""
        while True:
            with self._cv:
                if not self._waiting:
                    return
                job = self._waiting[0]
            free = [s for s in self._slots if s.active is None]
            if not free:
                return
            reserved = sum(s.active.job.reserve for s in self._slots if s.active is not None)
            if self.kv_unified and reserved + job.reserve > self.kv_size:
                return  # the pool can't promise this request its worst case yet
            prompt = job.request.prompt_tokens

            # The longest cached prefix, from any sequence (running ones too: the cells of
            # the tokens they have decoded can be shared or copied). Ties go to a free one.
            best, best_key = None, (0, False)
            for slot in self._slots:
                key = (_common_prefix(slot.tokens, prompt), slot.active is None)
                if key[0] > 0 and key > best_key:
                    best, best_key = slot, key
            # At least one prompt token must be computed to get logits to sample from,
            # and two when there are two: a lone last row gets different numbers (_step).
            n_reuse = min(best_key[0], len(prompt) - min(2, len(prompt)))
            if best is not None and self._L.llama_memory_seq_pos_min(self._mem, best.seq_id) > 0:
                n_reuse = 0  # a sliding-window cache has dropped the start of that sequence
            if best is not None and best.active is not None and not self.kv_unified and n_reuse < self.min_copy:
                n_reuse = 0
            if self._prefix_coming(prompt, n_reuse):
                return  # first come, first served: the requests behind it wait too

            if best is not None and best.active is None and n_reuse > 0:
                target = best  # keep its cells, cut what differs
            elif self.kv_unified:
                target = min(free, key=lambda s: (len(s.tokens) > 0, s.last_used))
            else:
                # The lowest free id keeps running ids contiguous (one ubatch, see _step).
                target = free[0]

            if self.kv_unified:
                # Idle caches stay only while the worst cases of everything still fit.
                idle = sorted((s for s in free if s is not target and s.tokens), key=lambda s: s.last_used)
                cached = sum(len(s.tokens) for s in idle)
                while idle and reserved + job.reserve + cached > self.kv_size:
                    victim = idle.pop(0)
                    cached -= len(victim.tokens)
                    self._clear_slot(victim)

            L, mem = self._L, self._mem
            if target is best and n_reuse > 0:
                if L.llama_memory_seq_rm(mem, target.seq_id, n_reuse, -1):
                    del target.tokens[n_reuse:]
                else:  # this memory cannot cut a sequence (recurrent models)
                    self._clear_slot(target)
                    n_reuse = 0
            else:
                self._clear_slot(target)
                if n_reuse > 0 and best is not None:
                    if self.kv_unified:
                        # One pool: the cells are shared, only their metadata changes.
                        L.llama_memory_seq_cp(mem, best.seq_id, target.seq_id, 0, n_reuse)
                    else:
                        # Separate buffers: llama.cpp copies whole buffers only; cut after.
                        L.llama_memory_seq_cp(mem, best.seq_id, target.seq_id, -1, -1)
                        L.llama_memory_seq_rm(mem, target.seq_id, n_reuse, -1)
                    target.tokens = list(prompt[:n_reuse])

            with self._cv:
                self._waiting.popleft()
                seq = _Sequence(
                    job=job,
                    slot=target,
                    pending=list(prompt[n_reuse:]),
                    n_prompt_left=len(prompt) - n_reuse,
                    n_reused=n_reuse,
                )
                target.active = seq
            target.last_used = time.monotonic()
            self._counters["requests_started"] += 1
            self._counters["prompt_tokens_reused"] += n_reuse

    def _prefix_coming(self, prompt: Sequence[int], n_reuse: int) -> bool:
        """Whether a running sequence is still computing a prompt that shares a longer
        prefix with ``prompt`` than the cache holds now (requests that arrive together
        with the same system prompt). Waiting for it and copying its cells costs a step
        or two; computing the same tokens again costs every one of them."""
        for slot in self._slots:
            seq = slot.active
            if seq is None or not seq.n_prompt_left:
                continue
            full = slot.tokens + seq.pending[: seq.n_prompt_left]
            coming = min(_common_prefix(full, prompt), len(prompt) - min(2, len(prompt)))
            if coming > len(slot.tokens) and coming - n_reuse >= self.min_copy:
                return True
        return False

    def _compact(self) -> None:
        """Move running sequences down into free lower ids so the ids stay contiguous.

        With per-sequence caches a gap (0, 1, 3) costs a second graph run every step (see
        _step). A move is one buffer copy inside llama.cpp (done at the next decode, before
        anything is computed), far cheaper than that; the free id's cached prefix is lost.
        """
        if self.kv_unified:
            return
        L, mem = self._L, self._mem
        while True:
            active = [s for s in self._slots if s.active is not None]
            if not active:
                return
            high = active[-1]
            low = next((s for s in self._slots if s.active is None), None)
            if low is None or low.seq_id > high.seq_id:
                return
            L.llama_memory_seq_rm(mem, low.seq_id, -1, -1)
            L.llama_memory_seq_cp(mem, high.seq_id, low.seq_id, -1, -1)
            L.llama_memory_seq_rm(mem, high.seq_id, -1, -1)
            seq = high.active
            assert seq is not None
            with self._cv:
                low.active, high.active = seq, None
            low.tokens, high.tokens = high.tokens, []
            low.last_used = high.last_used
            seq.slot = low
            self._counters["sequences_moved"] += 1

    def _decode(self, feeds: list[tuple[_Sequence, int]], abort: Callable[[], bool] | None = None) -> bool:
        """One ``llama_decode``: the next ``k`` pending tokens of each sequence given.

        With ``abort``, the decode stops mid-graph once it returns true; then False is
        returned and the sequences' caches hold exactly what their ``slot.tokens`` say.
        """
        L, batch = self._L, self._batch
        n = 0
        for seq, k in feeds:
            pos0 = len(seq.slot.tokens)
            # Logits only where a token gets sampled: a generated token, or a prompt's last.
            last = k == len(seq.pending) if seq.n_prompt_left else True
            for j in range(k):
                self._put(n, seq.pending[j], pos0 + j, seq.slot.seq_id, last and j == k - 1)
                n += 1
            seq.i_batch = n - 1 if last else -1
        batch.n_tokens = n

        armed = self._abort.armed(abort) if abort is not None and self._abort is not None else None
        with armed or contextlib.nullcontext():
            ret = L.llama_decode(self._ctx, batch)
            if ret == 1:
                # No room in the cache (the budget should prevent this): drop the idle
                # prefix caches and try once more; a failed call leaves the cache unchanged.
                for slot in self._slots:
                    if slot.active is None and slot.tokens:
                        self._clear_slot(slot)
                ret = L.llama_decode(self._ctx, batch)
        if ret == 2 and abort is not None:
            # Aborted: cut each sequence back to its known cached tokens (llama.cpp drops
            # the aborted ubatch's cells itself; this also covers earlier ubatches).
            for seq, _k in feeds:
                L.llama_memory_seq_rm(self._mem, seq.slot.seq_id, len(seq.slot.tokens), -1)
                seq.i_batch = -1
            return False
        if ret != 0:
            raise RuntimeError(f"llama_decode failed with status {ret}")
        self._counters["decode_steps"] += 1

        for seq, k in feeds:
            seq.slot.tokens.extend(seq.pending[:k])
            del seq.pending[:k]
            if seq.n_prompt_left:
                seq.n_prompt_left -= k
                self._counters["prompt_tokens_evaluated"] += k
        for seq, _k in feeds:
            if seq.i_batch >= 0:
                self._sample_and_emit(seq)
                seq.i_batch = -1
        return True

    def _put(self, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        b = self._batch
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq_id
        b.logits[i] = logits

    def _sample(self, seq: _Sequence) -> int:
        L, sampler = self._L, seq.job.sampler
        if sampler.grammar is None:
            return L.llama_sampler_sample(sampler.chain, self._ctx, seq.i_batch)
        return self._sample_grammar(sampler, seq.i_batch)

    def _sample_grammar(self, sampler: _Sampler, idx: int) -> int:
        """Sample, then check the token against the grammar; only when it is rejected run
        the grammar over the whole vocabulary (llama.cpp's common_sampler does the same:
        the full pass costs milliseconds per token on a large vocabulary)."""
        import numpy as np

        L, nv = self._L, self.n_vocab
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(self._ctx, idx), shape=(nv,))
        cand = self._candidates()

        def run(with_grammar: bool) -> int:
            cand["id"] = self._ids
            cand["logit"] = logits
            cand["p"] = 0.0
            arr = L.llama_token_data_array(
                data=cand.ctypes.data_as(ctypes.POINTER(L.llama_token_data)),
                size=nv,
                selected=-1,
                sorted=False,
            )
            if with_grammar:
                L.llama_sampler_apply(sampler.grammar, ctypes.byref(arr))
            L.llama_sampler_apply(sampler.chain, ctypes.byref(arr))
            return int(arr.data[arr.selected].id)

        token = run(False)
        one = L.llama_token_data(id=token, logit=1.0, p=0.0)
        one_arr = L.llama_token_data_array(data=ctypes.pointer(one), size=1, selected=-1, sorted=False)
        L.llama_sampler_apply(sampler.grammar, ctypes.byref(one_arr))
        if math.isinf(one.logit) and one.logit < 0:
            token = run(True)
        L.llama_sampler_accept(sampler.grammar, token)
        L.llama_sampler_accept(sampler.chain, token)
        return token

    def _candidates(self) -> Any:
        import numpy as np

        cand = getattr(self, "_cand", None)
        if cand is None:
            dtype = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
            assert dtype.itemsize == ctypes.sizeof(self._L.llama_token_data)
            cand = self._cand = np.zeros(self.n_vocab, dtype=dtype)
            self._ids = np.arange(self.n_vocab, dtype=np.int32)
        return cand

    def _sample_and_emit(self, seq: _Sequence) -> None:
        L, job = self._L, seq.job
        token = self._sample(seq)
        if L.llama_vocab_is_eog(self._vocab, token):
            self._finish(seq, "stop")
            return
        seq.n_generated += 1
        seq.n_unreported += 1
        self._counters["tokens_generated"] += 1
        text = seq.held + seq.decoder.decode(self.token_bytes(token, special=job.request.render_special))
        emit, seq.held, stopped = _split_stop(text, job.request.stop)
        if emit:
            self._emit(job, TextPiece(emit, seq.n_unreported))
            seq.n_unreported = 0
        if stopped:
            self._finish(seq, "stop", flush=False)
        elif seq.n_generated >= job.max_new:
            self._finish(seq, "length")
        else:
            seq.pending.append(token)

    def _finish(self, seq: _Sequence, reason: str, *, flush: bool = True) -> None:
        job = seq.job
        if flush:
            # Held-back text was not a stop string after all. The bytes of a character
            # the generation ended inside (max_tokens cut it) are dropped: its last
            # bytes were never generated, and U+FFFD would be text the model never wrote.
            seq.decoder.reset()
            emit, _held, _stopped = _split_stop(seq.held, job.request.stop)
            seq.held = ""
            if emit:
                self._emit(job, TextPiece(emit, seq.n_unreported))
                seq.n_unreported = 0
        self._release(seq)
        self._counters["requests_finished"] += 1
        self._emit(
            job,
            Finished(
                finish_reason=reason,
                prompt_tokens=len(job.request.prompt_tokens),
                completion_tokens=seq.n_generated,
                cached_tokens=seq.n_reused,
            ),
        )

    def _fail_all_active(self, exc: BaseException) -> None:
        for slot in self._slots:
            seq = slot.active
            if seq is not None:
                self._release(seq)
                self._emit(seq.job, exc)
            slot.tokens = []
        if self._mem is not None:
            self._L.llama_memory_clear(self._mem, True)

    # --- embeddings ----------------------------------------------------------------------

    def _run_embed(self, job: _EmbedJob) -> None:
        if job.cancelled():
            job.done(Cancelled())
            return
        try:
            job.done(self._embed_now(job))
            self._counters["embed_requests"] += 1
        except BaseException as exc:
            job.done(exc)

    def _embed_now(self, job: _EmbedJob) -> list[list[float]]:
        import numpy as np

        L = self._L
        longest = max(len(t) for t in job.inputs)
        if self._embed_ctx is None or self._embed_n_ctx < longest:
            if self._embed_ctx is not None:
                L.llama_free(self._embed_ctx)
                self._embed_ctx = None
            # A second, small context with pooled embeddings on the same weights; driven
            # from this thread, so it never races the chat context.
            n_ctx = max(512, 1 << (longest - 1).bit_length())
            p = L.llama_context_default_params()
            p.n_ctx = n_ctx
            p.n_batch = n_ctx
            p.n_ubatch = n_ctx
            p.n_seq_max = 1
            p.n_threads = self.n_threads
            p.n_threads_batch = self.n_threads_batch
            p.embeddings = True
            p.op_offload = self._op_offload
            p.no_perf = True
            pooling = self._embed_pooling
            p.pooling_type = L.LLAMA_POOLING_TYPE_UNSPECIFIED if pooling is None else pooling
            ctx = L.llama_init_from_model(self._model, p)
            if not ctx:
                raise RuntimeError("llama.cpp could not create an embedding context")
            if L.llama_pooling_type(ctx) == L.LLAMA_POOLING_TYPE_NONE:
                # A chat model declares no pooling: mean over its tokens.
                L.llama_free(ctx)
                p.pooling_type = L.LLAMA_POOLING_TYPE_MEAN
                ctx = L.llama_init_from_model(self._model, p)
                if not ctx:
                    raise RuntimeError("llama.cpp could not create an embedding context")
            self._embed_ctx, self._embed_n_ctx = ctx, n_ctx
            self._embed_batch = None
        ctx = self._embed_ctx
        n_embd = L.llama_model_n_embd(self._model)
        batch = L.llama_batch_init(self._embed_n_ctx, 0, 1)
        out: list[list[float]] = []
        try:
            mem = L.llama_get_memory(ctx)
            for tokens in job.inputs:
                if job.cancelled():
                    raise Cancelled()
                L.llama_memory_clear(mem, True)
                for i, t in enumerate(tokens):
                    batch.token[i] = t
                    batch.pos[i] = i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = 1
                batch.n_tokens = len(tokens)
                ret = L.llama_decode(ctx, batch)
                if ret != 0:
                    raise RuntimeError(f"llama_decode failed with status {ret} while embedding")
                ptr = L.llama_get_embeddings_seq(ctx, 0)
                if not ptr:
                    raise RuntimeError("llama.cpp returned no pooled embedding")
                vec = np.ctypeslib.as_array(ptr, shape=(n_embd,)).astype(np.float64)
                if job.normalize:
                    norm = float(np.linalg.norm(vec))
                    if norm > 0:
                        vec = vec / norm
                out.append(vec.tolist())
        finally:
            L.llama_batch_free(batch)
        return out


class TokenStream:
    """One generation in the per-token shape of ``LlamaCppBackend._generate``.

    Yields ``(text, None)`` once per generated token (the text is empty for tokens whose
    text came out with a later token) and finally ``("", finish_reason)``, which is not a
    token. ``close()`` cancels the generation; the engine frees its sequence within a step.
    """

    def __init__(self, engine: BatchEngine, request: GenerationRequest, cancel: Any = None) -> None:
        self._events: queue.SimpleQueue[Event | BaseException] = queue.SimpleQueue()
        self._gone = threading.Event()
        self._pending: collections.deque[tuple[str, str | None]] = collections.deque()
        self._counted = 0
        self._done = False
        self._cancel = cancel
        self.finished: Finished | None = None
        """The final event (usage, cached prompt tokens) once the stream has ended."""
        # Only the flag and the caller's token are handed over, so a dropped stream is
        # collected (and cancelled in __del__) even while its generation runs.
        engine._submit(request, self._events.put, _Either(cancel, self._gone))

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> tuple[str, str | None]:
        if self._cancel is not None and self._cancel.cancelled and not self._done:
            self.close()
            raise Cancelled()
        if self._pending:
            return self._pending.popleft()
        if self._done:
            raise StopIteration
        event = self._events.get()
        if isinstance(event, BaseException):
            self.close()
            raise event
        if isinstance(event, TextPiece):
            self._counted += event.n_tokens
            self._pending.extend([("", None)] * (event.n_tokens - 1))
            return event.text, None
        self.finished = event
        self._done = True
        self._pending.extend([("", None)] * (event.completion_tokens - self._counted))
        self._pending.append(("", event.finish_reason))
        return self._pending.popleft()

    def close(self) -> None:
        self._done = True
        self._pending.clear()
        self._gone.set()

    def __del__(self) -> None:
        self._gone.set()


class _Either:
    """Cancelled when either the caller's token or the consumer's own flag is set."""

    def __init__(self, token: Any, flag: threading.Event) -> None:
        self._token, self._flag = token, flag

    @property
    def cancelled(self) -> bool:
        return self._flag.is_set() or (self._token is not None and self._token.cancelled)

    def __call__(self) -> bool:
        return self.cancelled

