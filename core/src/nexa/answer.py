"""What the server makes of a backend's stream before a client sees it.

``Backend.stream_answer`` and ``Backend.stream_completion_answer`` run the stages a
backend does not run itself, in this order:

1. refusal of request features the backend lacks (``Backend.capabilities``): a 400 naming
   ``logprobs`` or ``logit_bias``, never a silently ignored field;
2. the reasoning split, for chat backends without the ``reasoning`` capability: a thought
   the model opens with ``<think>`` at the start of its answer goes to
   ``ChatChunk.reasoning``, one reasoning token counted per chunk;
3. stop strings, for backends that do not stop natively, on the answer only;
4. at most one tool call when the request turned parallel calls off: the answer ends
   after the first call (its pieces), and the generation is cancelled;
5. the thought shown as the request's format says (with stage 2): kept apart, put back
   in the content as written, or dropped.

Each stage is an async generator that closes the one it reads from when it is closed,
so closing the answer cancels the backend's work.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import attrs

from nexa.errors import BadRequest
from nexa.reasoning import QWEN3, ReasoningSplitter, Split, shown
from nexa.text import StopHoldBack
from nexa.types import ChatChunk, Reasoning, Sampling, Usage

Chunks = AsyncIterator[ChatChunk]


def refuse_missing(backend_name: str, capabilities: frozenset[str], *, logprobs: int | None,
                   sampling: Sampling) -> None:
    """A 400 naming the first field the backend cannot honour."""
    if logprobs is not None and "logprobs" not in capabilities:
        raise BadRequest(f"the {backend_name} backend does not return log-probabilities", param="logprobs")
    if sampling.logit_bias and "logit_bias" not in capabilities:
        raise BadRequest(f"the {backend_name} backend does not apply a logit bias", param="logit_bias")


async def split_reasoning(chunks: Chunks, reasoning: Reasoning) -> Chunks:
    """Stage 2: a ``<think>`` thought at the start of the content, split off as ``reasoning``
    (one token per chunk of it counted into ``usage.reasoning_tokens``); for the ``inline``
    format, as written (markers included), for ``show_reasoning`` to put back."""
    splitter = ReasoningSplitter(QWEN3, raw=reasoning.format == "inline")
    try:
        async for chunk in chunks:
            parts = [splitter.feed(chunk.content)] if chunk.content else []
            if chunk.finish_reason is not None:
                parts.append(splitter.finish())
            if not parts:
                yield chunk
                continue
            thought = "".join(p.reasoning for p in parts)
            usage = chunk.usage
            if usage is not None:
                usage = attrs.evolve(usage, reasoning_tokens=usage.reasoning_tokens + splitter.reasoning_tokens)
            yield attrs.evolve(chunk, content="".join(p.answer for p in parts), reasoning=chunk.reasoning + thought,
                               usage=usage)
    finally:
        await chunks.aclose()


async def show_reasoning(chunks: Chunks, reasoning: Reasoning) -> Chunks:
    """Stage 5: the thought split off by stage 2, shown as the request's format says."""
    try:
        async for chunk in chunks:
            if chunk.reasoning and reasoning.format != "separate":
                thought, content = shown(reasoning, Split(chunk.reasoning, chunk.content))
                chunk = attrs.evolve(chunk, reasoning=thought, content=content)
                if not (content or chunk.tool_calls or chunk.logprobs or chunk.finish_reason or chunk.usage):
                    continue
            yield chunk
    finally:
        await chunks.aclose()


async def cut_at_stops(chunks: Chunks, stops: tuple[str, ...]) -> Chunks:
    """Stage 3: the answer ends at the first stop string (never shown, not even in part);
    closing the backend's stream then cancels the rest of the generation. Usage counts one
    completion token per chunk received, as nothing better is known."""
    holdback = StopHoldBack(stops)
    produced = 0
    reasoning_tokens = 0
    prompt_tokens = 0
    try:
        async for chunk in chunks:
            if chunk.usage is not None:
                prompt_tokens = chunk.usage.prompt_tokens
            if chunk.content or chunk.reasoning or chunk.tool_calls:
                produced += 1
                reasoning_tokens += bool(chunk.reasoning) and not chunk.content
            text = holdback.feed(chunk.content) if chunk.content else ""
            if holdback.stopped:
                if text or chunk.reasoning or chunk.tool_calls:
                    yield ChatChunk(content=text, reasoning=chunk.reasoning, tool_calls=chunk.tool_calls,
                                    logprobs=chunk.logprobs)
                yield ChatChunk(finish_reason="stop", usage=Usage(prompt_tokens, produced, reasoning_tokens))
                return
            if chunk.finish_reason is not None:
                text += holdback.flush()
            if text or chunk.reasoning or chunk.tool_calls or chunk.finish_reason is not None \
                    or chunk.usage is not None or chunk.logprobs:
                yield attrs.evolve(chunk, content=text)
    finally:
        await chunks.aclose()


async def one_tool_call(chunks: Chunks) -> Chunks:
    """Stage 4: ``parallel_tool_calls: false``. The first call (all its pieces) goes
    through; a second call ends the answer with ``tool_calls``."""
    first: str | None = None
    usage: Usage | None = None
    produced = 0
    try:
        async for chunk in chunks:
            if chunk.usage is not None:
                usage = chunk.usage
            produced += 1
            calls = chunk.tool_calls
            if first is None and calls:
                first = calls[0].id
            extra = [c for c in calls if c.id != first]
            if not extra:
                yield chunk
                continue
            kept = tuple(c for c in calls if c.id == first)
            if kept or chunk.content or chunk.reasoning:
                yield attrs.evolve(chunk, tool_calls=kept, finish_reason=None, usage=None)
            # The generation is cancelled here, so the backend's own count never comes.
            prompt = usage.prompt_tokens if usage is not None else 0
            yield ChatChunk(finish_reason="tool_calls", usage=chunk.usage or Usage(prompt, produced))
            return
    finally:
        await chunks.aclose()


__all__ = ["cut_at_stops", "one_tool_call", "refuse_missing", "show_reasoning", "split_reasoning"]
