"""How long a chat model's context is, how its KV cache is laid out, and why.

The default context is the model's trained length, so that an agent's first request (a
10-12k-token system prompt and a dozen tools) fits, capped by what the KV cache may take
in memory for the sequences the engine runs at once (``--parallel``):

1. Every sequence gets the whole context in cells of its own (the engine's default
   layout: a request needs only a free sequence, and its numbers never depend on what
   else runs) when ``parallel`` full contexts fit in the KV budget.
2. Else one pool of cells that the sequences share (``kv_unified``): a request may still
   use the whole context, and is admitted while its worst case fits beside the running
   ones' (long answers then run fewer at once).
3. Else the context is what the budget holds, but never less than an agent's prompt
   needs (``AGENT_CONTEXT``, on models trained for that long) while the weights and the
   cache fit under ``MEMORY_CEILING`` of the device.

A token's KV bytes come from the GGUF header (``nexa.formats.read_gguf_metadata``):
every layer keeps ``head_count_kv`` heads of ``key_length`` (K) and ``value_length`` (V)
values per token, at the cache types' sizes (``--cache-type-k/-v``; f16 by default: 2 bytes,
q8_0 34 bytes per 32 values). That is an upper
bound for sliding-window and recurrent layers, which keep less. ``nexa serve --ctx``
fixes the length; the layout is then still chosen by the same budget.

Nothing here imports llama_cpp.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from nexa.errors import ContextLengthExceeded
from nexa.types import ContextPlan, Device
from nexa_llama_cpp.engine.kv_types import DEFAULT_KV_TYPE, KV_TYPES, KvType

AGENT_CONTEXT = 16384
"""The least context a model trained for at least this long gets by default: a coding
agent's first request (system prompt and tool definitions) with room to answer."""
FALLBACK_CONTEXT = 4096
"""The context of a model whose trained length is unknown."""
KV_SHARE = 0.25
"""The share of the device's memory one model's KV cache may take by default."""
MEMORY_CEILING = 0.75
"""Weights plus KV cache never past this share of the device's memory, even for
``AGENT_CONTEXT`` (the rest: the system, other models, compute buffers)."""
ASSUMED_MEMORY = 8 << 30
"""The memory assumed when the device does not say (as the server's model budget does)."""
TRAINED = "the length the model was trained for"
CELL_STEP = 256
"""Pools and capped contexts are whole multiples of this (llama.cpp pads to it)."""


@attrs.frozen
class KvShape:
    """The attention shape that sizes a token's KV cache entries."""

    n_layer: int
    n_head_kv: int
    key_length: int
    value_length: int

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any]) -> KvShape | None:
        """From a GGUF header's key/values; None when it lacks them."""
        arch = str(meta.get("general.architecture", ""))

        def number(key: str) -> int | None:
            value = meta.get(f"{arch}.{key}")
            return int(value) if isinstance(value, int | float) and not isinstance(value, bool) and value > 0 else None

        n_layer, n_head, n_embd = number("block_count"), number("attention.head_count"), number("embedding_length")
        if n_layer is None or n_head is None:
            return None
        head = n_embd // n_head if n_embd else None
        key_length = number("attention.key_length") or head
        value_length = number("attention.value_length") or head
        if key_length is None or value_length is None:
            return None
        # Without head_count_kv (or with a per-layer array, which the reader skips)
        # llama.cpp uses head_count: the bound is then the largest.
        return cls(n_layer, number("attention.head_count_kv") or n_head, key_length, value_length)

    def bytes_per_token(self, type_k: KvType | None = None, type_v: KvType | None = None) -> int:
        """K and V bytes of one token over all layers in caches of these types (default
        f16), stored in rows of whole type blocks as llama.cpp sizes them."""
        type_k = type_k or KV_TYPES[DEFAULT_KV_TYPE]
        type_v = type_v or KV_TYPES[DEFAULT_KV_TYPE]
        per_layer = type_k.row_bytes(self.n_head_kv * self.key_length) + type_v.row_bytes(
            self.n_head_kv * self.value_length)
        return self.n_layer * per_layer


@attrs.frozen
class KvBudget:
    """What a model's KV cache may take on a device."""

    soft: int
    """Bytes the cache takes at most by default (``KV_SHARE`` of the memory)."""
    hard: int
    """Bytes it may take at most at all (what the weights leave under ``MEMORY_CEILING``)."""
    memory: int
    assumed: bool = False
    """The device's memory is unknown; ``memory`` is ``ASSUMED_MEMORY``."""

    @classmethod
    def of(cls, device: Device, weights_bytes: int) -> KvBudget:
        memory, assumed = (device.memory_bytes, False) if device.memory_bytes > 0 else (ASSUMED_MEMORY, True)
        hard = max(0, int(memory * MEMORY_CEILING) - weights_bytes)
        return cls(soft=min(int(memory * KV_SHARE), hard), hard=hard, memory=memory, assumed=assumed)

    def describe(self) -> str:
        where = "an assumed" if self.assumed else "the device's"
        return f"the {size(self.soft)} budget for a KV cache ({KV_SHARE:.0%} of {where} {size(self.memory)})"


@attrs.frozen
class ContextLayout:
    """One model's context per request, its KV cells and the reason for both."""

    n_ctx: int
    """Tokens one request's prompt and answer share."""
    kv_cells: int
    """Cells of the engine's KV cache: ``n_ctx`` per sequence, or one shared pool."""
    unified: bool
    """The sequences share one pool (``kv_unified``) rather than owning ``n_ctx`` each."""
    reason: str
    """Why, for people: logged at load, in ``nexa show``, ``/v1/models`` and the 400."""
    trained: int | None = None
    """The length the model was trained for, when it says."""
    bytes_per_token: int | None = None
    """A token's K and V over all layers, when the GGUF header tells the shape."""

    @property
    def kv_bytes(self) -> int | None:
        """The engine's KV cache in bytes (an upper bound), when the shape is known."""
        return None if self.bytes_per_token is None else self.bytes_per_token * self.kv_cells

    def plan(self) -> ContextPlan:
        """Core's view of it (``nexa show``, ``/v1/models``)."""
        return ContextPlan(length=self.n_ctx, reason=self.reason)

    def refusal(self, n_prompt: int) -> ContextLengthExceeded:
        """The client's 400 for a prompt of ``n_prompt`` tokens that leaves no room to answer:
        how large it is, the limit and why, and how to raise it."""
        wanted = _round_up(n_prompt + max(1024, n_prompt // 8), 1024)
        advice = f"serve the model with a larger context: nexa serve --ctx {wanted}"
        if self.trained and wanted > self.trained:
            advice += f" (the model was trained for {self.trained} tokens: answers past that may degrade)"
        return ContextLengthExceeded(
            f"This model's maximum context length is {self.n_ctx} tokens ({self.reason}). However, your "
            f"messages resulted in {n_prompt} tokens. Shorten the messages, or {advice}.",
            param="messages",
        )


def choose_context(
    *,
    trained: int | None,
    override: int | None,
    parallel: int,
    bytes_per_token: int | None,
    budget: KvBudget,
    extra_contexts: int = 0,
) -> ContextLayout:
    """The context and KV layout for a model (see the module's docstring).

    ``extra_contexts``: whole contexts of KV cache the model holds beside the engine's
    (the image chats' own ``Llama`` context for a model with an mmproj).
    """
    trained = trained if trained and trained > 0 else None
    if override:
        n_ctx, why = override, "set by --ctx"
    elif trained is None:
        n_ctx, why = FALLBACK_CONTEXT, "the model does not say how long a context it was trained for"
    elif bytes_per_token is None:
        n_ctx = min(trained, AGENT_CONTEXT)
        why = (TRAINED if n_ctx == trained else
               f"the model was trained for {trained} tokens, capped at {AGENT_CONTEXT}: the size of its KV cache "
               "is unknown")
    else:
        n_ctx, why = trained, TRAINED
    base = ContextLayout(n_ctx, n_ctx * parallel, False, why, trained, bytes_per_token)
    if bytes_per_token is None:
        return base

    bpt = bytes_per_token
    per_token = f"{size(bpt)} per token"
    sequences = f"{parallel} sequence{'s' if parallel != 1 else ''}"
    own = (parallel + extra_contexts) * n_ctx * bpt
    if own <= budget.soft:
        return attrs.evolve(base, reason=f"{why}; {sequences} x {n_ctx} tokens of KV cache take {size(own)} "
                                   f"({per_token}), within {budget.describe()}")
    single = (1 + extra_contexts) * n_ctx * bpt
    if override and parallel == 1:
        return attrs.evolve(base, reason=f"{why}; {size(own)} of KV cache ({per_token}), over {budget.describe()}")
    if single <= budget.soft or override:
        cells = (budget.soft // bpt) - extra_contexts * n_ctx
        cells = max(n_ctx, min(parallel * n_ctx, cells // CELL_STEP * CELL_STEP))
        over = f"{sequences} x {n_ctx} would take {size(own)}, over {budget.describe()}"
        if single > budget.soft:
            over = f"one context alone takes {size(single)}, over {budget.describe()}"
        return attrs.evolve(base, kv_cells=cells, unified=parallel > 1,
                      reason=f"{why}; one KV pool of {cells} tokens ({size(cells * bpt)}, {per_token}) shared by "
                             f"{sequences}: {over}")

    # Capped by memory: what the budget holds, but an agent's prompt fits where the model
    # was trained for it and the device has room.
    per_context = (1 + extra_contexts) * bpt
    capped = budget.soft // per_context // CELL_STEP * CELL_STEP
    floor = min(trained or FALLBACK_CONTEXT, AGENT_CONTEXT)
    room = budget.hard // per_context // CELL_STEP * CELL_STEP
    n_ctx = max(capped, min(floor, room), CELL_STEP)
    if n_ctx > capped:
        least = "the least an agent's prompt needs" if trained else "the length given a model that does not say"
        cause = (f"{least} (the {size(budget.soft)} budget holds {capped}; "
                 f"{size(n_ctx * bpt)} of KV cache at {per_token})")
    else:
        cause = f"what {budget.describe()} holds at {per_token}"
    trained_text = f"the model was trained for {trained} tokens" if trained else "the model does not say its length"
    return ContextLayout(n_ctx, n_ctx, parallel > 1,
                         f"capped by memory: {trained_text}; {n_ctx} is {cause}, in one pool shared by {sequences}",
                         trained, bpt)


def size(n: float) -> str:
    """Bytes for people, in powers of 1024 (as memory is shown)."""
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


__all__ = ["AGENT_CONTEXT", "ContextLayout", "KvBudget", "KvShape", "choose_context"]
