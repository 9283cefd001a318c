"""The continuous-batching engine on a tiny random GGUF (``nexa_llama_cpp.testing``).

Random weights give gibberish, but gibberish that is fully determined by the prompt and
the sampling setup, and a flat next-token distribution that flips on the smallest
numerical difference: a good probe for "batched gives exactly what solo gives".
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from nexa.backend import CancelToken
from nexa.errors import BadRequest, Cancelled
from nexa.types import Sampling
from nexa_llama_cpp import testing as tiny
from nexa_llama_cpp.engine import BatchEngine, Finished, GenerationRequest, TextPiece

SYSTEM = "<|im_start|>system\nYou are a terse assistant that answers every question.<|im_end|>\n"
# Never lets the model end (no end-of-generation token fits): runs exactly max_tokens.
ENDLESS = "root ::= [a-z] root"
QUESTIONS = [
    "hello world",
    "what is the capital of france",
    "the cat sat on the mat",
    "yes or no",
    "count to ten",
    "paris answer",
    "tell me a story",
    "no way",
]


def req(prompt, *, grammar=None, grammar_triggers=(), render_special=False, **sampling) -> GenerationRequest:
    """A request from the prompt's tokens and flat sampling fields (core's ``Sampling``)."""
    return GenerationRequest(
        prompt, Sampling(**sampling), grammar=grammar, grammar_triggers=grammar_triggers, render_special=render_special
    )


def wait_for(predicate, timeout: float = 60.0) -> None:
    """Poll observable state (engine stats) until ``predicate()`` holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the engine never reached the awaited state"
        time.sleep(0.002)


def chat_prompt(engine: BatchEngine, question: str, system: str = SYSTEM) -> list[int]:
    return engine.tokenize(f"{system}<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")


def collect(engine: BatchEngine, request: GenerationRequest, cancel=None) -> tuple[str, Finished]:
    pieces: list[str] = []
    final = None
    for event in engine.generate(request, cancel):
        if isinstance(event, TextPiece):
            assert event.text, "pieces are never empty"
            pieces.append(event.text)
        else:
            final = event
    assert final is not None
    return "".join(pieces), final


def run_concurrently(engine: BatchEngine, requests: list[GenerationRequest]) -> list[tuple[str, Finished]]:
    """All requests submitted together from their own threads (as the server's workers do)."""
    results: list = [None] * len(requests)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(requests))

    def work(i: int) -> None:
        try:
            barrier.wait()
            results[i] = collect(engine, requests[i])
        except BaseException as exc:  # re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return tiny.write_tiny_llama(tmp_path_factory.mktemp("engine") / "tiny-F32.gguf", context_length=2048)


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    with BatchEngine(tiny_gguf, n_seq=8, n_ctx=1024, n_threads=1, prompt_chunk=32) as engine:
        yield engine


def greedy(engine, question, **kw) -> GenerationRequest:
    kw.setdefault("max_tokens", 24)
    return req(chat_prompt(engine, question), temperature=0.0, **kw)


# --- batching gives what solo gives --------------------------------------------------------


def test_eight_concurrent_greedy_requests_match_solo(engine, tiny_gguf):
    requests = [greedy(engine, q) for q in QUESTIONS]
    # Solo reference from a separate engine, so neither run's prefix cache helps the other.
    with BatchEngine(tiny_gguf, n_seq=1, n_ctx=1024, n_threads=1) as solo_engine:
        solo = [collect(solo_engine, r) for r in requests]
    steps = engine.stats().decode_steps
    batched = run_concurrently(engine, requests)
    for (text_solo, fin_solo), (text_b, fin_b) in zip(solo, batched, strict=True):
        assert text_b == text_solo
        assert (fin_b.finish_reason, fin_b.completion_tokens) == (fin_solo.finish_reason, fin_solo.completion_tokens)
        assert fin_b.prompt_tokens == fin_solo.prompt_tokens
    # Really batched: one-at-a-time would take about one decode per generated token.
    generated = sum(f.completion_tokens for _, f in batched)
    assert engine.stats().decode_steps - steps < generated / 2


def test_mixed_sampling_parameters_do_not_leak(engine):
    prompt = chat_prompt(engine, "tell me a story")
    requests = [
        req(prompt, temperature=0.0, max_tokens=20),
        req(prompt, temperature=1.5, seed=1, max_tokens=20),
        req(prompt, temperature=1.5, seed=2, max_tokens=20),
        req(prompt, temperature=0.9, top_k=5, seed=3, max_tokens=20),
        req(prompt, temperature=0.9, top_p=0.5, seed=3, max_tokens=20),
        req(prompt, temperature=0.9, min_p=0.2, seed=3, max_tokens=20),
        req(prompt, temperature=0.0, repeat_penalty=1.5, frequency_penalty=0.5, max_tokens=20),
        req(prompt, temperature=0.0, presence_penalty=1.5, max_tokens=20),
    ]
    solo = [collect(engine, r)[0] for r in requests]
    batched = [text for text, _ in run_concurrently(engine, requests)]
    assert batched == solo
    # The parameters do matter on this model (else the test above proves nothing).
    assert len(set(solo)) >= 6


def test_same_seed_same_text_different_seed_differs(engine):
    prompt = chat_prompt(engine, "yes or no")

    def sampled(seed):
        return collect(engine, req(prompt, temperature=1.2, seed=seed, max_tokens=20))[0]

    assert sampled(42) == sampled(42)
    assert len({sampled(s) for s in range(5)}) >= 4


# --- cancellation, waiting, long prompts ---------------------------------------------------


def test_cancel_mid_batch_frees_the_sequence_and_others_continue(engine):
    keep = [greedy(engine, q, max_tokens=60) for q in QUESTIONS[:3]]
    solo = [collect(engine, r)[0] for r in keep]
    doomed = req(chat_prompt(engine, "count to ten"), max_tokens=900, grammar=ENDLESS)
    cancel = CancelToken()
    outcome: dict[str, object] = {}
    received = [0]
    got_tokens = threading.Event()

    def run_doomed():
        try:
            for event in engine.generate(doomed, cancel):
                if isinstance(event, TextPiece):
                    received[0] += 1
                    if received[0] == 5:
                        got_tokens.set()
                else:
                    outcome["finished"] = event
        except Cancelled:
            outcome["cancelled"] = received[0]

    before = engine.stats()
    t = threading.Thread(target=run_doomed)
    t.start()
    assert got_tokens.wait(60)
    others = {}
    workers = [threading.Thread(target=lambda i=i: others.__setitem__(i, collect(engine, keep[i])[0])) for i in range(3)]
    for w in workers:
        w.start()
    # The cancel lands while the others run beside it: all four were admitted.
    wait_for(lambda: engine.stats().requests_started >= before.requests_started + 4)
    at_cancel = received[0]
    cancel.cancel()
    t.join(60)
    assert "finished" not in outcome
    # The consumer stops at its next event: nothing the engine made after the cancel reaches it.
    assert outcome["cancelled"] - at_cancel <= 2
    for w in workers:
        w.join(60)
    assert [others[i] for i in range(3)] == solo
    # The consumer raises at its next event; the engine retires the sequence at its next
    # step, which may come a moment later when the others were already done.
    wait_for(lambda: engine.stats().active_sequences == 0)
    after = engine.stats()
    assert after.requests_cancelled == before.requests_cancelled + 1


def test_requests_wait_for_a_free_sequence_and_are_not_corrupted(tiny_gguf):
    with BatchEngine(tiny_gguf, n_seq=2, n_ctx=512, n_threads=1) as engine:
        requests = [greedy(engine, q, max_tokens=40) for q in QUESTIONS[:6]]
        solo = [collect(engine, r)[0] for r in requests]
        seen_waiting = []
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                s = engine.stats()
                seen_waiting.append((s.active_sequences, s.waiting_requests))
                time.sleep(0.002)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            batched = [text for text, _ in run_concurrently(engine, requests)]
        finally:
            stop.set()
            watcher.join()
        assert batched == solo
        assert max(a for a, _ in seen_waiting) == 2  # never more than the engine's sequences
        assert max(w for _, w in seen_waiting) >= 2  # the rest waited their turn


def test_unified_kv_pool_admits_only_what_fits(tiny_gguf):
    # 4 sequence ids but cells for only two worst cases (prompt + max_tokens each).
    with BatchEngine(tiny_gguf, n_seq=4, n_ctx=256, kv_size=300, kv_unified=True, n_threads=1) as engine:
        requests = [greedy(engine, q, max_tokens=100) for q in QUESTIONS[:4]]
        assert all(len(r.prompt_tokens) + 100 > 150 for r in requests)
        peak, over = [], []
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                s = engine.stats()
                peak.append(s.active_sequences)
                over.append(s.kv_cells_reserved > s.kv_size)
                time.sleep(0.002)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            results = run_concurrently(engine, requests)
        finally:
            stop.set()
            watcher.join()
        assert max(peak) == 1 and not any(over)
        for _text, fin in results:
            assert fin.completion_tokens == 100 or fin.finish_reason == "stop"


def test_long_prompt_is_admitted_in_chunks_while_others_stream(engine):
    streaming = req(chat_prompt(engine, "tell me a story"), max_tokens=400, grammar=ENDLESS)
    long_prompt = engine.tokenize(SYSTEM + "<|im_start|>user\n" + "zq" * 320 + "<|im_end|>\n")
    assert len(long_prompt) > 600
    arrivals: list[tuple[str, float]] = []
    started = threading.Event()

    def stream():
        for _event in engine.generate(streaming):
            arrivals.append(("a", time.monotonic()))
            started.set()

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(60)
    submitted = time.monotonic()
    text, fin = collect(engine, req(long_prompt, temperature=0.0, max_tokens=1))
    first_b = time.monotonic()
    t.join(60)
    assert arrivals[-1][1] > first_b  # the stream was still running when the long prompt finished
    during = [ts for who, ts in arrivals if submitted < ts < first_b]
    # 600+ prompt tokens in 32-token bites: the stream got a token between the bites.
    assert len(during) >= len(long_prompt) // 32 // 2
    assert fin.prompt_tokens == len(long_prompt)


# --- prefix reuse ------------------------------------------------------------------------


def test_prefix_reuse_skips_the_shared_prompt(tiny_gguf):
    with BatchEngine(tiny_gguf, n_seq=2, n_ctx=1024, n_threads=1) as engine:
        system = "<|im_start|>system\n" + "Answer with care and in detail. " * 6 + "<|im_end|>\n"
        first = req(chat_prompt(engine, "hello world", system), temperature=0.0, max_tokens=8)
        second = req(chat_prompt(engine, "the cat sat", system), temperature=0.0, max_tokens=8)
        shared = next(i for i, (a, b) in enumerate(zip(first.prompt_tokens, second.prompt_tokens, strict=False)) if a != b)
        assert shared > 150

        before = engine.stats()
        collect(engine, first)
        mid = engine.stats()
        assert mid.prompt_tokens_evaluated - before.prompt_tokens_evaluated == len(first.prompt_tokens)
        text, fin = collect(engine, second)
        after = engine.stats()
        assert fin.cached_tokens == shared
        assert after.prompt_tokens_reused - mid.prompt_tokens_reused == shared
        assert after.prompt_tokens_evaluated - mid.prompt_tokens_evaluated == len(second.prompt_tokens) - shared

        # The same prompt again computes nothing: its slot kept the logits that follow it
        # (test_kept_logits.py).
        again, fin_again = collect(engine, second)
        assert fin_again.cached_tokens == len(second.prompt_tokens)
        assert again == text

    # Reused cells give the same text as a fresh computation.
    with BatchEngine(tiny_gguf, n_seq=1, n_ctx=1024, n_threads=1) as fresh:
        assert collect(fresh, second)[0] == text


def test_prefix_is_copied_from_a_running_sequence(tiny_gguf):
    with BatchEngine(tiny_gguf, n_seq=3, n_ctx=512, n_threads=1) as engine:
        system = "<|im_start|>system\n" + "Be brief. " * 8 + "<|im_end|>\n"
        a = req(chat_prompt(engine, "hello world", system), temperature=0.0, max_tokens=200)
        b = req(chat_prompt(engine, "the cat", system), temperature=0.0, max_tokens=12)
        solo_b = collect(engine, b)[0]
    with BatchEngine(tiny_gguf, n_seq=3, n_ctx=512, n_threads=1) as engine:
        events = engine.generate(a)
        next(events)  # a is generating: its prompt's cells exist
        text_b, fin_b = collect(engine, b)
        events.close()
        assert fin_b.cached_tokens >= 16
        assert text_b == solo_b


def test_requests_arriving_together_compute_their_shared_prefix_once(tiny_gguf):
    with BatchEngine(tiny_gguf, n_seq=4, n_ctx=512, n_threads=1) as solo_engine:
        system = "<|im_start|>system\n" + "Answer with care and in detail. " * 4 + "<|im_end|>\n"
        requests = [
            req(chat_prompt(solo_engine, q, system), temperature=0.0, max_tokens=6)
            for q in QUESTIONS[:4]
        ]
        solo = [collect(solo_engine, r)[0] for r in requests]
    shared = min(
        next(i for i, (a, b) in enumerate(zip(requests[0].prompt_tokens, r.prompt_tokens, strict=False)) if a != b)
        for r in requests[1:]
    )
    assert shared > 60
    with BatchEngine(tiny_gguf, n_seq=4, n_ctx=512, n_threads=1) as engine:
        # Nothing cached yet; all four are submitted at once, before any is admitted.
        results = run_concurrently(engine, requests)
        stats = engine.stats()
    assert [text for text, _ in results] == solo
    # One of them computed the shared part; the other three copied it.
    assert stats.prompt_tokens_reused >= 3 * shared
    assert sum(f.cached_tokens for _, f in results) == stats.prompt_tokens_reused


# --- per-request features ----------------------------------------------------------------


def test_max_tokens_and_usage(engine):
    text, fin = collect(engine, greedy(engine, "count to ten", max_tokens=7))
    assert fin.finish_reason in ("length", "stop")
    if fin.finish_reason == "length":
        assert fin.completion_tokens == 7
    assert fin.prompt_tokens == len(chat_prompt(engine, "count to ten"))


def test_token_counts_add_up(engine):
    total = 0
    final = None
    for event in engine.generate(greedy(engine, "tell me a story", max_tokens=50)):
        if isinstance(event, TextPiece):
            total += event.n_tokens
        else:
            final = event
    assert total <= final.completion_tokens <= total + 1  # the EOG token is not counted


def test_grammar_constrains_the_output(engine):
    prompt = chat_prompt(engine, "yes or no")
    for seed in range(4):
        text, fin = collect(engine, req(prompt, temperature=1.0, seed=seed, max_tokens=10, grammar='root ::= "yes" | "no"'))
        assert text in ("yes", "no")
        assert fin.finish_reason == "stop"


def test_multibyte_characters_are_never_split(engine):
    # Byte-fallback vocab: each of these characters is two or three byte tokens.
    grammar = 'root ::= "é" "日本" "ü"'
    pieces = []
    for event in engine.generate(req(chat_prompt(engine, "hello"), temperature=0.0, max_tokens=12, grammar=grammar)):
        if isinstance(event, TextPiece):
            pieces.append(event)
    assert "".join(p.text for p in pieces) == "é日本ü"
    assert all("\ufffd" not in p.text for p in pieces)
    assert sum(p.n_tokens for p in pieces) == 2 + 3 + 3 + 2


def test_grammar_requests_batched_beside_free_ones(engine):
    prompt = chat_prompt(engine, "yes or no")
    grammar = 'root ::= ("yes" | "no") " " ("cat" | "world")'
    requests = [req(prompt, temperature=0.0, max_tokens=20, grammar=grammar if i % 2 else None) for i in range(6)]
    solo = [collect(engine, r)[0] for r in requests]
    assert [t for t, _ in run_concurrently(engine, requests)] == solo
    assert solo[1] in ("yes cat", "yes world", "no cat", "no world")


# --- bad input ---------------------------------------------------------------------------


def test_bad_requests_are_refused_before_queueing(engine):
    with pytest.raises(BadRequest):
        engine.generate(req([], max_tokens=4))
    with pytest.raises(BadRequest):
        engine.generate(req([engine.n_vocab + 5], max_tokens=4))
    with pytest.raises(BadRequest, match="grammar"):
        engine.generate(req([1, 2, 3], max_tokens=4, grammar="root ::= ("))
    # The backend refuses such a prompt with the client's 400 first (prompt.fit_context).
    with pytest.raises(ValueError, match="no room"):
        engine.generate(req([5] * 1024, max_tokens=4))
    assert engine.stats().waiting_requests == 0


def test_max_tokens_is_capped_by_the_context(tiny_gguf):
    with BatchEngine(tiny_gguf, n_seq=1, n_ctx=64, n_threads=1) as engine:
        prompt = chat_prompt(engine, "hi", system="")
        text, fin = collect(engine, req(prompt, temperature=0.0, max_tokens=10_000, grammar=ENDLESS))
        assert fin.finish_reason == "length"
        assert fin.prompt_tokens + fin.completion_tokens == 64


# --- async API, embeddings, shutdown -------------------------------------------------------


def test_async_api_streams_and_closing_cancels(engine):
    requests = [greedy(engine, q, max_tokens=16) for q in QUESTIONS[:4]]
    solo = [collect(engine, r)[0] for r in requests]

    async def one(request):
        parts = []
        async for event in engine.agenerate(request):
            if isinstance(event, TextPiece):
                parts.append(event.text)
        return "".join(parts)

    async def abandon():
        stream = engine.agenerate(greedy(engine, "count to ten", max_tokens=500))
        async for _event in stream:
            break
        await stream.aclose()

    async def main():
        before = engine.stats().requests_cancelled
        texts = await asyncio.gather(*(one(r) for r in requests), abandon())
        for _ in range(200):
            if engine.stats().requests_cancelled > before:
                break
            await asyncio.sleep(0.01)
        return texts[:4], engine.stats().requests_cancelled - before

    texts, cancelled = asyncio.run(main())
    assert texts == solo
    assert cancelled == 1


def test_embeddings_run_between_decode_steps(engine):
    chat = req(chat_prompt(engine, "tell me a story"), max_tokens=600, grammar=ENDLESS)
    before = engine.stats().tokens_generated
    long_chat = threading.Thread(target=collect, args=(engine, chat))
    long_chat.start()
    wait_for(lambda: engine.stats().tokens_generated > before)  # the chat is generating
    tokens = [engine.tokenize("hello world"), engine.tokenize("the cat")]
    vectors = engine.embed(tokens)
    still_chatting = engine.stats().active_sequences > 0
    long_chat.join(60)
    assert len(vectors) == 2 and len(vectors[0]) == 64
    assert abs(sum(x * x for x in vectors[0]) - 1.0) < 1e-6
    assert vectors[0] != vectors[1]
    assert engine.embed(tokens[:1])[0] == pytest.approx(vectors[0])
    assert still_chatting  # the embedding did not wait for the chat to end
    assert asyncio.run(engine.aembed(tokens[1:]))[0] == pytest.approx(vectors[1])


def test_close_cancels_running_and_waiting_requests(tiny_gguf):
    engine = BatchEngine(tiny_gguf, n_seq=1, n_ctx=512, n_threads=1)
    engine.start()
    later = greedy(engine, "hello")
    running = engine.generate(req(later.prompt_tokens, max_tokens=400, grammar=ENDLESS))
    waiting = engine.generate(greedy(engine, "hello world", max_tokens=400))
    next(running)
    engine.close()
    for stream in (running, waiting):
        with pytest.raises(Cancelled):
            for _ in stream:
                pass
    with pytest.raises(RuntimeError):
        engine.generate(later)
    with pytest.raises(RuntimeError):
        engine.tokenize("hello")


def test_a_bad_model_file_is_a_load_error(tmp_path):
    from nexa.errors import ModelLoadError

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelLoadError):
        BatchEngine(bad, n_seq=1, n_ctx=128, n_threads=1).start()


# --- the consumer's side: close, drop, finish; lazy grammars, control-token text ------------


def test_closing_or_dropping_a_stream_cancels_it(engine):
    before = engine.stats().requests_cancelled
    stream = engine.generate(req(chat_prompt(engine, "hi"), max_tokens=900, grammar=ENDLESS))
    next(stream)
    stream.close()
    assert list(stream) == []
    dropped = engine.generate(req(chat_prompt(engine, "ho"), max_tokens=900, grammar=ENDLESS))
    next(dropped)
    del dropped  # a consumer that just lets go
    wait_for(lambda: engine.stats().requests_cancelled == before + 2 and engine.stats().active_sequences == 0)


def test_finish_ends_a_generation_as_finished(engine):
    # What the backend does on a stop string: it has what it wants; nothing was cancelled.
    before = engine.stats()
    stream = engine.generate(req(chat_prompt(engine, "hi"), max_tokens=900, grammar=ENDLESS))
    assert isinstance(next(stream), TextPiece)
    stream.finish()
    assert list(stream) == []
    wait_for(lambda: engine.stats().active_sequences == 0)
    after = engine.stats()
    assert after.requests_finished == before.requests_finished + 1
    assert after.requests_cancelled == before.requests_cancelled
    assert after.tokens_generated - before.tokens_generated < 900


def test_a_lazy_grammar_binds_only_after_its_trigger(engine):
    # The free greedy answer's first word-like piece after its start is the trigger: the
    # answer is free up to it, then the grammar makes it go on with "yes".
    prompt = chat_prompt(engine, "hello world")
    pieces = [e.text for e in engine.generate(req(prompt, temperature=0.0, max_tokens=8)) if isinstance(e, TextPiece)]
    k = next(
        i for i in range(1, len(pieces))
        if pieces[i].isalnum() and "".join(pieces[: i + 1]).find(pieces[i]) == len("".join(pieces[:i]))
    )
    trigger, before = pieces[k], "".join(pieces[:k])
    grammar = f'root ::= "{trigger}" "yes"'
    # llama.cpp's form: the pattern matches the whole text so far; the grammar takes over
    # from its first capture group.
    lazy = req(prompt, temperature=0.0, max_tokens=12, grammar=grammar, grammar_triggers=[f"[\\s\\S]*?({trigger}[\\s\\S]*)"])
    text, fin = collect(engine, lazy)
    assert text == before + trigger + "yes" and fin.finish_reason == "stop"
    # Without triggers the same grammar binds from the first token.
    assert collect(engine, req(prompt, temperature=0.0, max_tokens=12, grammar=grammar))[0] == trigger + "yes"


def test_render_special_emits_control_token_text(engine):
    # Sampling at a high temperature writes <|im_start|> (a control token, not an end of
    # generation) now and then; its text is dropped unless the request renders specials.
    prompt = chat_prompt(engine, "hello world")
    for seed in range(200):
        shown, _ = collect(engine, req(prompt, temperature=3.0, seed=seed, max_tokens=40, render_special=True))
        if "<|im_start|>" in shown:
            break
    else:
        raise AssertionError("no sample wrote <|im_start|> in 200 seeds")
    hidden, _ = collect(engine, req(prompt, temperature=3.0, seed=seed, max_tokens=40))
    assert hidden == shown.replace("<|im_start|>", "")


def test_running_sequences_move_down_when_a_lower_one_ends(tiny_gguf):
    with BatchEngine(tiny_gguf, n_seq=1, n_ctx=512, n_threads=1) as engine:
        requests = [
            req(chat_prompt(engine, q), temperature=0.0, max_tokens=n, grammar=ENDLESS)
            for q, n in zip(QUESTIONS, (150, 10, 150, 150), strict=False)
        ]
        solo = [collect(engine, r)[0] for r in requests]
    with BatchEngine(tiny_gguf, n_seq=4, n_ctx=512, n_threads=1) as engine:
        # Submitted in order to an empty engine, so they get ids 0..3; the short one
        # (id 1) ends first and a higher one then moves into its place.
        streams = [engine.generate(r) for r in requests]
        texts: dict[int, str] = {}

        def drain(i):
            texts[i] = "".join(e.text for e in streams[i] if isinstance(e, TextPiece))

        threads = [threading.Thread(target=drain, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [texts[i] for i in range(4)] == solo
        assert engine.stats().sequences_moved >= 1
