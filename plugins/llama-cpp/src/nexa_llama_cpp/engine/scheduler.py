"""``BatchEngine``: one llama.cpp model serving many generations at once by continuous batching.

The engine drives one llama model and one llama context through llama-cpp-python's
low-level ctypes API (``llama_cpp.llama_cpp``) from a single long-lived thread. Each step
of that thread's loop puts the next token of every running sequence into one
``llama_decode`` batch, then a bounded bite of the prompts of newly admitted requests,
samples every sequence with its own sampler (``engine.sampler``), and retires finished or
cancelled sequences at once. Where a request runs and how much of its prompt is already
cached is ``engine.slots``; embeddings on the same weights are ``engine.embedding``.
Around that loop: the decode thread count (``engine.threads``), the warm-up at load
(``engine.warmup``), speculative decoding (``engine.speculative``, ``engine.draft_model``)
and KV-cache types (``engine.kv_types``), each behind one call here.

It knows nothing about chat templates, tools, stop strings or HTTP: callers hand it token
ids and a ``GenerationRequest`` and read ``TextPiece`` events and one ``Finished`` event
(``engine.streams``). Only the engine thread touches the llama context; callers only
enqueue work. That also keeps llama.cpp's decode calls on one OS thread (OpenMP builds
slow down for good once a second thread has decoded).
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from nexa.errors import BadRequest, Cancelled, ModelLoadError
from nexa_llama_cpp.engine import kv_types
from nexa_llama_cpp.engine.context import EngineContext
from nexa_llama_cpp.engine.decoding import Decoding
from nexa_llama_cpp.engine.embedding import EmbeddingContext, EmbeddingJobs
from nexa_llama_cpp.engine.records import (
    COUNTERS,
    Control,
    EmbedJob,
    EngineStats,
    Event,
    GenerationRequest,
    Job,
    Running,
)
from nexa_llama_cpp.engine.sampler import Sampler, Scratch
from nexa_llama_cpp.engine.slots import SlotTable
from nexa_llama_cpp.engine.speculative import PromptLookup, Speculator
from nexa_llama_cpp.engine.streams import AsyncGeneration, Generation
from nexa_llama_cpp.engine.threads import ThreadGovernor, physical_cores

DRAFT_LOOKUP = "lookup"
"""``draft=``: guess from the sequence's own tokens (prompt lookup), the default."""
DRAFT_OFF = "off"


class BatchEngine(Decoding, EmbeddingJobs):
    """One llama.cpp model serving up to ``n_seq`` generations at once by continuous batching.

    ``model_path`` is a GGUF file; alternatively pass ``model`` (a ``llama_model*`` loaded
    elsewhere, e.g. ``Llama._model.model``), which the engine then does not free.

    KV budget, default layout (``kv_unified=False``): every sequence id owns its own
    ``n_ctx`` cells, so a request needs a free sequence id and nothing else; it waits
    (first come, first served) while all ``n_seq`` are busy. In this layout a token's
    logits are the same whatever else shares the batch and however the prompt was cut
    into chunks (with flash attention on and off), so a seeded or greedy request gives
    the same text alone or batched.

    ``kv_unified=True`` puts all sequences in one pool of ``kv_size`` cells: a request is
    admitted only when its worst case (prompt + max new tokens) fits beside the worst
    cases of the running ones, else it waits. Denser when requests are short, but the
    numbers then depend slightly on the batch (texts may differ from a solo run).

    Prefix reuse: a finished sequence's cells stay cached. A new request whose tokens
    start like a cached or running sequence keeps (or copies) that prefix and computes
    only the rest. Requests that arrive together with a shared prefix (a system prompt)
    are admitted one after the other: the second waits until the first has computed the
    shared part, then copies it. A finished sequence also keeps the logits that followed
    its prompt: the same prompt again starts from them with nothing to compute.

    Threads: ``n_threads`` (default: the physical cores) is the most the engine decodes
    with; with ``adaptive_threads`` (default: when no count is given and no layer is on a
    GPU) it gives threads back while other work takes cores (``engine.threads``).
    Drafting (``draft``): ``"lookup"`` (guesses from the sequence's own tokens), ``"off"``,
    or the path of a draft model's GGUF with the same vocabulary; a sequence drafts only
    in steps where the measured costs say it pays (``engine.speculative``), or always
    ``draft_length`` tokens when that is given (tests, benchmarks).
    ``type_k``/``type_v``: the KV cache's data types (``engine.kv_types``).
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
        adaptive_threads: bool | None = None,
        n_batch: int = 512,
        prompt_chunk: int = 64,
        flash_attn: bool | None = None,
        n_gpu_layers: int = 0,
        op_offload: bool | None = None,
        embed_pooling: int | None = None,
        draft: str | os.PathLike[str] | None = DRAFT_LOOKUP,
        draft_length: int | None = None,
        type_k: str | None = None,
        type_v: str | None = None,
        warmup: bool = True,
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
        # Adaptive unless the count is given, or the model runs on a GPU (threads then
        # only feed it, and its step times say nothing about CPU contention).
        if adaptive_threads is None:
            adaptive_threads = n_threads is None and n_gpu_layers == 0
        self.adaptive_threads = adaptive_threads
        self.n_threads = n_threads or physical_cores()
        self.n_threads_batch = n_threads_batch or self.n_threads
        self.n_batch = max(n_batch, n_seq)
        self.prompt_chunk = max(4, prompt_chunk)
        """Prompt tokens per step while other sequences are generating: a long prompt is
        taken in bites so the running streams keep flowing. With nothing else running a
        prompt goes in ``n_batch`` at a time."""
        self._flash_attn = flash_attn
        self._n_gpu_layers = n_gpu_layers
        # A GPU build of llama.cpp sends large prompt batches to the GPU even for layers
        # kept on the CPU; off when the engine runs on the CPU alone (no layer offloaded).
        self._op_offload = op_offload if op_offload is not None else (model is not None or n_gpu_layers != 0)
        self._embed_pooling = embed_pooling
        self._draft = DRAFT_OFF if draft is None else os.fspath(draft)
        self._draft_length = draft_length
        self.type_k = kv_types.kv_type(type_k, flag="--cache-type-k")
        self.type_v = kv_types.kv_type(type_v, flag="--cache-type-v")
        self._warmup = warmup
        self.kv_footprint: kv_types.KvFootprint | None = None
        """What the KV cache takes in memory (known once started)."""
        self.warmup_seconds = 0.0
        self._governor: ThreadGovernor | None = None
        self._spec: Speculator | None = None

        self._model = model
        self._c: EngineContext | None = None
        self.n_vocab = 0
        self._kv: SlotTable | None = None
        self._scratch: Scratch | None = None
        self._embedder: EmbeddingContext | None = None

        self._cv = threading.Condition()
        self._inbox: collections.deque[Job] = collections.deque()
        self._embed_inbox: collections.deque[EmbedJob] = collections.deque()
        self._waiting: collections.deque[Job] = collections.deque()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._counters = dict.fromkeys(COUNTERS, 0)

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
        return self._open().tokenize(text, add_special=add_special, parse_special=parse_special)

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        return self._open().token_bytes(token, special=special)

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        return self._open().detokenize(tokens, special=special)

    def _open(self) -> EngineContext:
        if self._thread is None or self._c is None:
            raise RuntimeError("the engine is not running")
        return self._c

    # --- generation ----------------------------------------------------------------------

    def generate(self, request: GenerationRequest, cancel: Any = None) -> Generation:
        """Submit ``request``; its events for a blocking consumer (``engine.streams``).

        ``cancel`` is anything with a ``cancelled`` property (``nexa.backend.CancelToken``);
        the engine checks it every step. Raises ``BadRequest`` for a bad request.
        """
        return Generation(self, request, cancel)

    def agenerate(self, request: GenerationRequest, cancel: Any = None) -> AsyncGeneration:
        """Submit ``request``; its events as an async iterator (call inside the event loop)."""
        return AsyncGeneration(self, request, cancel)

    def _submit(
        self, request: GenerationRequest, sink: Callable[[Sequence[Event | BaseException]], None], control: Control
    ) -> None:
        c = self._open()
        prompt = request.prompt_tokens
        if not prompt:
            raise BadRequest("the prompt is empty", param="messages")
        if min(prompt) < 0 or max(prompt) >= self.n_vocab:
            raise BadRequest("prompt token id out of the vocabulary's range", param="prompt")
        room = self.n_ctx - len(prompt)
        if room < 1:
            # The caller (the backend) refuses such a prompt with the client's error first.
            raise ValueError(f"a prompt of {len(prompt)} tokens leaves no room in a context of {self.n_ctx}")
        wanted = request.sampling.max_tokens
        max_new = room if wanted is None else min(wanted, room)
        sampler = Sampler(
            c.L, c.vocab, self.n_vocab, request.sampling, request.grammar, request.grammar_triggers,
            logprobs=request.logprobs, steer=request.steer,
            token_bytes=lambda t: c.token_bytes(t, special=request.render_special),
        )
        job = Job(request=request, sampler=sampler, sink=sink, control=control, max_new=max_new)
        with self._cv:
            if self._closing:
                sampler.free()
                raise Cancelled()
            self._inbox.append(job)
            self._cv.notify_all()

    # --- observability -------------------------------------------------------------------

    def stats(self) -> EngineStats:
        with self._cv:
            running = self._kv.running() if self._kv is not None else []
            return EngineStats(
                n_seq=self.n_seq,
                kv_size=self.kv_size,
                active_sequences=len(running),
                waiting_requests=len(self._waiting) + len(self._inbox),
                kv_cells_reserved=sum(s.job.reserve for s in running),
                threads=self.threads,
                threads_most=self.n_threads,
                threads_given_back=self._governor.stepped_down if self._governor is not None else 0,
                **self._counters,
            )

    @property
    def threads(self) -> int:
        """CPU threads the engine decodes with now."""
        return self._governor.current if self._governor is not None else self.n_threads

    @property
    def drafting(self) -> str:
        """``off``, ``lookup`` or the draft model's file name."""
        return self._draft if self._draft in (DRAFT_OFF, DRAFT_LOOKUP) else os.path.basename(self._draft)

    # --- the engine thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._load()
        except BaseException as exc:
            self._free()
            self._start_error = exc if isinstance(exc, ModelLoadError) else ModelLoadError(str(exc))
            self._started.set()
            return
        self._started.set()
        kv = self._kv
        assert kv is not None
        try:
            while True:
                with self._cv:
                    while (
                        not self._closing
                        and not self._inbox
                        and not self._embed_inbox
                        and not self._waiting
                        and not kv.running()
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
                    self._fail_all_running(exc)
        finally:
            self._shutdown()

    def _load(self) -> None:
        # Flash attention on unless asked otherwise, as llama.cpp's own server does
        # ("auto"); solo and batched greedy texts stay the same with it
        # (tests/test_engine_smollm2.py). Speed: docs/benchmarks.md.
        flash_attn = self._flash_attn if self._flash_attn is not None else True
        kv_types.check(self.type_k, self.type_v, flash_attn=flash_attn, model=self.model_path or "this model")
        c = self._c = EngineContext(
            model_path=self.model_path,
            model=self._model,
            n_gpu_layers=self._n_gpu_layers,
            kv_size=self.kv_size,
            n_seq=self.n_seq,
            n_batch=self.n_batch,
            n_threads=self.n_threads,
            n_threads_batch=self.n_threads_batch,
            kv_unified=self.kv_unified,
            op_offload=self._op_offload,
            flash_attn=flash_attn,
            type_k=self.type_k,
            type_v=self.type_v,
        )
        self.n_vocab = c.n_vocab
        self.kv_footprint = kv_types.KvFootprint(
            self.type_k.name, self.type_v.name,
            kv_types.bytes_per_token(c.L, c.model, self.type_k, self.type_v), self.kv_size,
        )
        self._kv = SlotTable(
            c.L, c.memory, n_seq=self.n_seq, kv_unified=self.kv_unified, kv_size=self.kv_size, lock=self._cv,
            ctx=c.ctx, on_move=self._moved,
        )
        self._embedder = EmbeddingContext(
            c.L, c.model, n_threads=self.n_threads, n_threads_batch=self.n_threads_batch,
            op_offload=self._op_offload, pooling=self._embed_pooling,
        )
        self._governor = ThreadGovernor(self.n_threads, self._set_threads, adaptive=self.adaptive_threads)
        self._spec = self._speculator(flash_attn)
        if self._warmup:
            from nexa_llama_cpp.engine.warmup import warm_up

            step_cost = None if self._spec is None else self._spec.costs.observe
            self.warmup_seconds = warm_up(c.L, c.ctx, c.batch, c.vocab, self._governor, self.n_batch, step_cost)

    def _speculator(self, flash_attn: bool) -> Speculator | None:
        if self._draft == DRAFT_OFF:
            return None
        c = self._c
        assert c is not None and self._governor is not None
        if self._draft == DRAFT_LOOKUP:
            drafter: Any = PromptLookup()
        else:
            from nexa_llama_cpp.engine.draft_model import DraftModel

            drafter = DraftModel(
                c.L, self._draft, target_vocab=c.vocab, n_seq=self.n_seq, n_ctx=self.n_ctx,
                n_threads=self.n_threads, n_gpu_layers=self._n_gpu_layers, flash_attn=flash_attn,
                op_offload=self._op_offload,
            )
        governor = self._governor
        return Speculator(drafter, lambda: governor.current, max_rows=self.n_batch, fixed=self._draft_length)

    def _moved(self, src: int, dst: int) -> None:
        if self._spec is not None:
            self._spec.moved(src, dst)

    def _set_threads(self, n: int) -> None:
        c = self._c
        assert c is not None
        c.set_threads(n)
        drafter = self._spec.drafter if self._spec is not None else None
        if drafter is not None and hasattr(drafter, "set_threads"):
            drafter.set_threads(n)

    def _free(self) -> None:
        if self._spec is not None:
            self._spec.close()
            self._spec = None
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        if self._c is not None:
            self._c.free()

    def _shutdown(self) -> None:
        with self._cv:
            jobs = list(self._waiting) + list(self._inbox)
            self._waiting.clear()
            self._inbox.clear()
            embeds = list(self._embed_inbox)
            self._embed_inbox.clear()
        if self._kv is not None:
            for seq in self._kv.running():
                jobs.append(seq.job)
                seq.slot.active = None
        for job in jobs:
            job.sampler.free()
            self._emit(job, [Cancelled()])
        for e in embeds:
            e.done(Cancelled())
        self._free()

    # --- one step ------------------------------------------------------------------------

    def _emit(self, job: Job, events: Sequence[Event | BaseException]) -> None:
        try:
            job.sink(events)
        except RuntimeError:  # the consumer's event loop is gone: treat as cancelled
            job.dead = True

    def _step(self) -> None:
        kv = self._kv
        assert kv is not None
        self._drop_ended_waiting()
        for seq in kv.running():
            if seq.job.ended():
                self._end_early(seq)
        self._admit()
        self._counters["sequences_moved"] += kv.compact()
        running = sorted(kv.running(), key=lambda q: q.order)
        # Generated tokens of all sequences go in one batch (with the same number of
        # rows each); a prompt goes in its own call, one sequence at a time. llama.cpp's
        # CPU flash attention computes a lone query row of a lone sequence over 512 or
        # more cached cells with a split-KV kernel whose sums differ from the one every
        # other row gets (and depend on the thread count: measured), and a mixed batch is
        # cut into ubatches in ways that can leave such lone rows; this split keeps every
        # sequence's numbers the same whatever runs beside it.
        # In sequence-id order: llama.cpp puts per-sequence caches' tokens in one ubatch
        # only while the ids go up by one (split_equal, sequential), so 0,1,2,3 is one
        # graph run and 3,1,0,2 would be four.
        generating = [q for q in sorted(running, key=lambda q: q.slot.seq_id) if not q.n_prompt_left]
        if generating:
            self._generate(generating)
        # Prompts, oldest first, until this step's budget is spent: several short prompts
        # start together, a long one is taken in bites while the others keep streaming.
        budget = self.prompt_chunk if generating else self.n_batch
        for q in running:
            if budget <= 0:
                break
            if not q.n_prompt_left or q.slot.active is not q or q.job.ended():
                continue
            take = min(budget, q.n_prompt_left)
            if q.n_prompt_left - take == 1:
                take -= 1  # never leave a lone last prompt token (see above)
            job = q.job
            # A prompt batch takes seconds on a CPU: a cancel or close stops it mid-graph.
            if not self._decode([(q, take)], abort=lambda job=job: self._closing or job.ended()):
                if self._closing:
                    return  # the loop ends; _shutdown cancels what is left
                self._end_early(q)
            budget -= take

    def _drop_ended_waiting(self) -> None:
        with self._cv:
            keep: collections.deque[Job] = collections.deque()
            dropped = []
            for job in self._waiting:
                (dropped if job.ended() else keep).append(job)
            self._waiting = keep
        for job in dropped:
            job.sampler.free()
            self._counters["requests_cancelled"] += 1
            self._emit(job, [Cancelled()])

    def _end_early(self, seq: Running) -> None:
        """Retire a sequence its consumer is done with: ended as finished (``finish()``, a
        stop string) or cancelled (the stream closed, the cancel token, the loop gone)."""
        job = seq.job
        self._release(seq)
        if job.control.finished_early and not job.dead:
            self._counters["requests_finished"] += 1
        else:
            self._counters["requests_cancelled"] += 1
            self._emit(job, [Cancelled()])

    def _release(self, seq: Running) -> None:
        seq.job.sampler.free()
        assert self._kv is not None
        self._kv.release(seq)

    def _admit(self) -> None:
        """Bind waiting requests, first come first served, to free sequence ids."""
        kv = self._kv
        assert kv is not None
        while True:
            with self._cv:
                if not self._waiting:
                    return
                job = self._waiting[0]
            placed = kv.place(job)
            if placed is None:
                return  # first come, first served: the requests behind it wait too
            slot, n_reuse = placed
            prompt = job.request.prompt_tokens
            with self._cv:
                self._waiting.popleft()
                slot.active = Running(
                    job=job,
                    slot=slot,
                    pending=list(prompt[n_reuse:]),
                    n_prompt_left=len(prompt) - n_reuse,
                    n_reused=n_reuse,
                )
            self._counters["requests_started"] += 1
            self._counters["prompt_tokens_reused"] += n_reuse
            if n_reuse == len(prompt):  # the slot kept the logits that follow this prompt
                assert slot.active is not None
                self._start_from_kept_logits(slot.active)

    def _fail_all_running(self, exc: BaseException) -> None:
        assert self._kv is not None
        for seq in self._kv.running():
            self._release(seq)
            self._emit(seq.job, [exc])
        self._kv.wipe()
