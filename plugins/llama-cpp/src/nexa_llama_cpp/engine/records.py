"""The batching engine's values: what a caller submits and gets back, the engine's figures,
and the records its thread keeps for each request, running sequence and KV slot.

Plain attrs classes; nothing here touches llama.cpp.
"""

from __future__ import annotations

import codecs
import itertools
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from nexa.types import Sampling, TokenLogprob

if TYPE_CHECKING:
    from nexa_llama_cpp.engine.sampler import Sampler

__all__ = [
    "EngineStats",
    "Event",
    "Finished",
    "GenerationRequest",
    "TextPiece",
]


# --- what a caller submits and receives ---------------------------------------------------


@attrs.frozen
class GenerationRequest:
    """One text generation: the prompt's token ids, core's ``Sampling`` and what constrains
    the output beyond it."""

    prompt_tokens: tuple[int, ...] = attrs.field(converter=tuple)
    """The rendered prompt, tokenized (BOS included when the model wants one)."""
    sampling: Sampling = Sampling()
    """Token choice and ``max_tokens`` (None or more than the context leaves: the room
    left). ``sampling.stop`` is not the engine's: its consumer cuts the text
    (``nexa.text.StopHoldBack``) and ends the generation with ``finish()``."""
    grammar: str | None = None
    """GBNF grammar (root rule ``root``) the output must follow (json_schema, tools)."""
    grammar_triggers: tuple[str, ...] = attrs.field(converter=tuple, default=())
    """Regex patterns; when given, the grammar is lazy: it binds only once one of them
    matches the generated text (llama.cpp's lazy grammar: the whole text must match, and
    the first capture group marks where the constrained part starts), e.g. a tool call
    after free text."""
    render_special: bool = False
    """Emit the text of control tokens (``<|im_start|>``, ``<think>``...) instead of dropping it."""
    logprobs: int | None = None
    """None, or n: each generated token's log-probability record with its n most likely
    alternatives (``TextPiece.logprobs``; ``engine.sampler`` says which numbers)."""
    steer: Callable[[int], Sequence[int]] | None = attrs.field(default=None, eq=False)
    """Called on the engine thread with each generated token; returns tokens the engine
    must generate next instead of sampling (a thinking budget forcing the thought's close
    marker). They count as generated tokens."""


@attrs.frozen
class TextPiece:
    """Newly generated text (never a broken UTF-8 character)."""

    text: str
    n_tokens: int = 1
    """Generated tokens since the previous piece (a character can span several tokens)."""
    logprobs: tuple[TokenLogprob, ...] = ()
    """Those tokens' log-probability records, when the request asked for them."""


@attrs.frozen
class Finished:
    """The last event of a generation."""

    finish_reason: str
    """``stop`` (end of generation, or the grammar completed) or ``length``."""
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
    """Ended by the model, by their length, or by their consumer (a stop string)."""
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
    tokens_drafted: int = 0
    """Guessed tokens checked by speculative decoding."""
    tokens_accepted: int = 0
    """Guessed tokens that were right (each one a decode step saved)."""
    threads: int = 0
    """CPU threads the engine decodes with now."""
    threads_most: int = 0
    """The most it uses (the adaptive count's ceiling, or ``--threads``)."""
    threads_given_back: int = 0
    """Times the engine decoded with one thread fewer because steps had slowed (contention)."""

    @property
    def draft_acceptance(self) -> float:
        """Share of guessed tokens that were right (0 before any)."""
        return self.tokens_accepted / self.tokens_drafted if self.tokens_drafted else 0.0


COUNTERS = (
    "requests_started",
    "requests_finished",
    "requests_cancelled",
    "prompt_tokens_evaluated",
    "prompt_tokens_reused",
    "tokens_generated",
    "decode_steps",
    "embed_requests",
    "sequences_moved",
    "tokens_drafted",
    "tokens_accepted",
)
"""The ``EngineStats`` fields the engine thread counts up."""


# --- the consumer's side of a request ------------------------------------------------------


class Control:
    """How the engine thread learns that a request's consumer is done with it: it cancelled
    (its ``cancel`` token, or it closed the stream), or it ended the generation early as
    finished (``finish``: the consumer found a stop string)."""

    __slots__ = ("_token", "_closed", "finished_early")

    def __init__(self, cancel: Any = None) -> None:
        self._token = cancel
        self._closed = threading.Event()
        self.finished_early = False

    @property
    def token_cancelled(self) -> bool:
        """The caller's cancel token (``nexa.backend.CancelToken``) is set."""
        return self._token is not None and self._token.cancelled

    def done(self) -> bool:
        """The engine should stop this request (read from the engine thread every step)."""
        return self._closed.is_set() or self.token_cancelled

    def close(self) -> None:
        self._closed.set()

    def finish(self) -> None:
        self.finished_early = True
        self._closed.set()


# --- what the engine thread keeps -----------------------------------------------------------

_admission_order = itertools.count()


@attrs.define(eq=False)
class Job:
    """A submitted generation: request, sampler, where its events go, how it ends early."""

    request: GenerationRequest
    sampler: Sampler
    sink: Callable[[Sequence[Event | BaseException]], None]
    """Takes the job's next events, in order (a step's together; an exception ends them)."""
    control: Control
    max_new: int
    """Tokens this request may generate (max_tokens within the room its context leaves)."""
    dead: bool = False
    """Set when its consumer can no longer take events (its event loop closed)."""

    @property
    def reserve(self) -> int:
        """KV cells this request can use at most."""
        return len(self.request.prompt_tokens) + self.max_new

    def ended(self) -> bool:
        return self.dead or self.control.done()


@attrs.define(eq=False)
class Running:
    """A running generation bound to one llama sequence id (its slot)."""

    job: Job
    slot: Slot
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
    """Index of this sequence's (first) output row in the current batch, -1 when none."""
    decoder: Any = attrs.field(factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    drafts: Any = None
    """Its speculative-decoding record (``engine.speculative.DraftStats``), once it generates."""
    held: list[Event] = attrs.field(factory=list)
    """Events made in this step, not yet handed to the consumer (``Decoding._deliver``)."""


@attrs.define(eq=False)
class Slot:
    """One llama sequence id and what its part of the KV cache holds."""

    seq_id: int
    tokens: list[int] = attrs.field(factory=list)
    """Tokens whose KV entries the cache holds for this sequence id, positions 0..n-1.
    Changed only through ``cut``, ``forget`` and appending."""
    active: Running | None = None
    last_used: float = 0.0
    logits: Any = None
    """The logits computed after the first ``logits_for`` tokens (a prompt's last row, as
    its first token was sampled from them; a float32 array over the vocabulary), kept so
    that the same prompt again is answered without computing anything (``SlotTable.place``)."""
    logits_for: int = 0
    """How many of ``tokens`` those logits follow; 0: none kept."""

    def cut(self, n: int) -> None:
        """Keep the first ``n`` tokens (the caller removes the cells after them)."""
        del self.tokens[n:]
        if n < self.logits_for:
            self.logits_for = 0

    def forget(self) -> None:
        """Hold nothing (the caller removes the cells)."""
        self.tokens = []
        self.logits_for = 0

    def keep_logits(self, row: Any) -> None:
        """Keep ``row`` (the logits just computed after all of ``tokens``), copied."""
        import numpy as np

        if self.logits is None or self.logits.shape != row.shape:
            self.logits = np.empty(row.shape, dtype=np.float32)
        np.copyto(self.logits, row)
        self.logits_for = len(self.tokens)

    def take_over(self, other: Slot) -> None:
        """Hold what ``other`` held (its cells were moved here); ``other`` holds nothing."""
        self.tokens, other.tokens = other.tokens, []
        self.logits, other.logits = other.logits, self.logits
        self.logits_for, other.logits_for = other.logits_for, 0
        self.last_used = other.last_used


@attrs.define(eq=False)
class EmbedJob:
    """Token sequences to embed on the chat model, and where the vectors go."""

    inputs: list[list[int]]
    normalize: bool
    done: Callable[[list[list[float]] | BaseException], None]
    control: Control


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    i = 0
    # Compare in blocks first: prompts share long system prompts.
    step = 64
    while i + step <= n and a[i : i + step] == b[i : i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i
