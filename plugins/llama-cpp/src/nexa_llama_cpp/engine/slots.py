"""The batching engine's KV cache, seen as one slot per llama sequence id.

``SlotTable`` decides where a waiting request runs: which sequence id it gets, how much of
its prompt is already cached (in that id's cells, or copied from another id's), what idle
caches give way, and whether it should wait because a running request is computing the
same prefix right now. It also keeps the running ids contiguous (``compact``). Only the
engine thread calls it; ``Slot.active`` changes under the engine's lock, because
``BatchEngine.stats`` reads it from other threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from nexa_llama_cpp.engine.records import Job, Running, Slot, common_prefix


class SlotTable:
    """The sequence ids of one llama context and what each one's cells hold."""

    def __init__(
        self,
        lib: object,
        memory: object,
        *,
        n_seq: int,
        kv_unified: bool,
        kv_size: int,
        lock: threading.Condition,
        min_copy: int = 16,
        ctx: object = None,
        on_move: Callable[[int, int], None] | None = None,
    ) -> None:
        self._L = lib
        self._mem = memory
        self._ctx = ctx
        self._state = None  # a reusable host buffer for copying cells between sequences
        self.on_move = on_move
        """Told (source id, destination id) when ``compact`` moves a running sequence."""
        self.kv_unified = kv_unified
        self.kv_size = kv_size
        self.min_copy = min_copy
        """Shortest prefix worth copying from another sequence's own cells (a copy costs a
        pass over that sequence's cells, so a few tokens are cheaper to recompute)."""
        self._lock = lock
        self.slots = [Slot(seq_id=i) for i in range(n_seq)]

    def running(self) -> list[Running]:
        return [s.active for s in self.slots if s.active is not None]

    def reserved(self) -> int:
        """KV cells promised to the running sequences (their worst cases)."""
        return sum(seq.job.reserve for seq in self.running())

    # --- admission ------------------------------------------------------------------------

    def place(self, job: Job) -> tuple[Slot, int] | None:
        """The slot ``job`` runs in and how many prompt tokens it finds cached there (the
        cells are made to hold exactly those), or None: it must wait (no free id, no KV
        room for its worst case, or its prefix is being computed by a running request).
        The whole prompt is cached only when the slot also holds the logits that follow it
        (``Slot.logits``): its first token is sampled from them."""
        free = [s for s in self.slots if s.active is None]
        if not free:
            return None
        reserved = self.reserved()
        if self.kv_unified and reserved + job.reserve > self.kv_size:
            return None  # the pool can't promise this request its worst case yet
        prompt = job.request.prompt_tokens

        # The longest cached prefix, from any sequence (running ones too: the cells of the
        # tokens they have decoded can be shared or copied). Ties go to a free one.
        best, best_key = None, (0, False)
        for slot in self.slots:
            key = (common_prefix(slot.tokens, prompt), slot.active is None)
            if key[0] > 0 and key > best_key:
                best, best_key = slot, key
        # At least one prompt token must be computed to get logits to sample from, and two
        # when there are two: a lone last row gets different numbers (BatchEngine._step).
        # Unless an idle sequence kept the logits that follow exactly this prompt: then
        # nothing is computed, and the first token comes from the very numbers an uncached
        # run samples it from (the same prompt again: a retry, a regenerate, n choices).
        n_reuse = min(best_key[0], len(prompt) - min(2, len(prompt)))
        if (best is not None and best.active is None and best_key[0] == len(prompt) == best.logits_for
                and best.logits is not None):
            n_reuse = len(prompt)
        if best is not None and self._L.llama_memory_seq_pos_min(self._mem, best.seq_id) > 0:
            n_reuse = 0  # a sliding-window cache has dropped the start of that sequence
        if best is not None and best.active is not None and not self.kv_unified and n_reuse < self.min_copy:
            n_reuse = 0
        if self._prefix_coming(prompt, n_reuse):
            return None

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
                self.clear(victim)

        L, mem = self._L, self._mem
        if target is best and n_reuse > 0:
            if L.llama_memory_seq_rm(mem, target.seq_id, n_reuse, -1):
                target.cut(n_reuse)
            else:  # this memory cannot cut a sequence (recurrent models)
                self.clear(target)
                n_reuse = 0
        else:
            self.clear(target)
            if n_reuse > 0 and best is not None:
                if self.kv_unified:
                    # One pool: the cells are shared, only their metadata changes.
                    L.llama_memory_seq_cp(mem, best.seq_id, target.seq_id, 0, n_reuse)
                else:
                    self._copy_cells(best.seq_id, target.seq_id)
                    L.llama_memory_seq_rm(mem, target.seq_id, n_reuse, -1)
                target.tokens = list(prompt[:n_reuse])
        return target, n_reuse

    def _prefix_coming(self, prompt: Sequence[int], n_reuse: int) -> bool:
        """Whether a running sequence is still computing a prompt that shares a longer
        prefix with ``prompt`` than the cache holds now (requests that arrive together
        with the same system prompt). Waiting for it and copying its cells costs a step
        or two; computing the same tokens again costs every one of them."""
        for slot in self.slots:
            seq = slot.active
            if seq is None or not seq.n_prompt_left:
                continue
            full = slot.tokens + seq.pending[: seq.n_prompt_left]
            coming = min(common_prefix(full, prompt), len(prompt) - min(2, len(prompt)))
            if coming > len(slot.tokens) and coming - n_reuse >= self.min_copy:
                return True
        return False

    # --- upkeep ---------------------------------------------------------------------------

    def release(self, seq: Running) -> None:
        """Retire a sequence; its KV entries stay as a prefix cache for later requests."""
        slot = seq.slot
        with self._lock:
            slot.active = None
        slot.last_used = time.monotonic()

    def clear(self, slot: Slot) -> None:
        self._L.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
        slot.forget()

    def clear_idle(self) -> None:
        """Drop every idle prefix cache (the cache is full after all)."""
        for slot in self.slots:
            if slot.active is None and slot.tokens:
                self.clear(slot)

    def wipe(self) -> None:
        """Forget every cell (after a failed decode, whose cache state is unknown)."""
        for slot in self.slots:
            slot.forget()
        self._L.llama_memory_clear(self._mem, True)

    def _copy_cells(self, src: int, dst: int) -> None:
        """Give the (cleared) sequence ``dst`` a copy of ``src``'s cells.

        Separate per-sequence buffers: llama.cpp's own copy moves the whole buffer (all
        ``n_ctx`` cells; ~90 MB for SmolLM2 at 4096 tokens), so only the cells in use are
        copied, byte for byte, through llama.cpp's sequence state (in position order, as
        the cells of a sequence computed in place lie); a context that cannot (none given,
        or a memory without that state) falls back to the whole-buffer copy.
        """
        import ctypes

        L = self._L
        if self._ctx is not None:
            size = L.llama_state_seq_get_size(self._ctx, src)
            if self._state is None or len(self._state) < size:
                self._state = (ctypes.c_uint8 * max(size, 1 << 20))()
            written = L.llama_state_seq_get_data(self._ctx, self._state, size, src)
            if written and L.llama_state_seq_set_data(self._ctx, self._state, written, dst):
                return
            L.llama_memory_seq_rm(self._mem, dst, -1, -1)
        L.llama_memory_seq_cp(self._mem, src, dst, -1, -1)

    def compact(self) -> int:
        """Move running sequences down into free lower ids so the ids stay contiguous;
        returns how many moved.

        With per-sequence caches a gap (0, 1, 3) costs a second graph run every step (see
        BatchEngine._step). A move copies the sequence's cells (``_copy_cells``), far
        cheaper than that; the free id's cached prefix is lost.
        """
        if self.kv_unified:
            return 0
        L, mem = self._L, self._mem
        moved = 0
        while True:
            active = [s for s in self.slots if s.active is not None]
            if not active:
                return moved
            high = active[-1]
            low = next((s for s in self.slots if s.active is None), None)
            if low is None or low.seq_id > high.seq_id:
                return moved
            L.llama_memory_seq_rm(mem, low.seq_id, -1, -1)
            self._copy_cells(high.seq_id, low.seq_id)
            L.llama_memory_seq_rm(mem, high.seq_id, -1, -1)
            if self.on_move is not None:
                self.on_move(high.seq_id, low.seq_id)
            seq = high.active
            assert seq is not None
            with self._lock:
                low.active, high.active = seq, None
            low.take_over(high)
            seq.slot = low
            moved += 1
