"""What the server makes of a backend's stream before a client sees it.

``Backend.stream_answer`` and ``Backend.stream_completion_answer`` run the stages a
backend does not run itself, in this order:

1. refusal of request features the backend lacks (``Backend.capabilities``): a 400 naming
   ``logprobs`` or ``logit_bias``, never a silently ignored field;
2. the reasoning split, for chat backends without the ``reasoning`` capability: a thought
   the model opens with ``<think>`` at the start of its answer goes to
   ``ChatChunk.reasoning``, one reasoning token counted per chunk;
3. stop strings, for backends that do not stop natively, on the answer only;
4. at most ``max_tool_calls`` tool calls (all the pieces of each): later calls are
   dropped;
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
from nexa.types import ChatChunk, Reasoning, Sampling, ToolCall, Usage

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
                yield ChatChunk(finish_reason="stop", usage=Usage(prompt_tokens, produced, reasoning_tokens),
                                stop_sequence=holdback.matched)
                return
            if chunk.finish_reason is not None:
                text += holdback.flush()
            if text or chunk.reasoning or chunk.tool_calls or chunk.finish_reason is not None \
                    or chunk.usage is not None or chunk.logprobs:
                yield attrs.evolve(chunk, content=text)
    finally:
        await chunks.aclose()


async def limit_tool_calls(chunks: Chunks, limit: int) -> Chunks:
    """Stage 4: at most ``limit`` tool calls (every piece of each); later calls are dropped
    while the generation runs to its end, so the usage stays the backend's own count."""
    kept: set[str] = set()
    try:
        async for chunk in chunks:
            if chunk.tool_calls:
                calls = []
                for call in chunk.tool_calls:
                    if call.id in kept or len(kept) < limit:
                        kept.add(call.id)
                        calls.append(call)
                if len(calls) != len(chunk.tool_calls):
                    chunk = attrs.evolve(chunk, tool_calls=tuple(calls))
                    if not (chunk.content or chunk.reasoning or calls or chunk.logprobs
                            or chunk.finish_reason or chunk.usage):
                        continue
            yield chunk
    finally:
        await chunks.aclose()


async def whole_tool_calls(chunks: Chunks) -> Chunks:
    """Tool calls reassembled from their pieces (``ToolCall``), for writers that frame only
    whole calls: a call goes out once, whole, when anything else follows it."""
    pending: ToolCall | None = None
    try:
        async for chunk in chunks:
            ready: list[ToolCall] = []
            for call in chunk.tool_calls:
                if pending is not None and call.id == pending.id:
                    pending = attrs.evolve(pending, arguments=pending.arguments + call.arguments)
                    continue
                if pending is not None:
                    ready.append(pending)
                pending = call
            if pending is not None and (chunk.content or chunk.reasoning or chunk.finish_reason is not None):
                ready.append(pending)
                pending = None
            if chunk.tool_calls or ready:
                chunk = attrs.evolve(chunk, tool_calls=tuple(ready))
            if (chunk.content or chunk.reasoning or chunk.tool_calls or chunk.logprobs
                    or chunk.finish_reason is not None or chunk.usage is not None):
                yield chunk
        if pending is not None:
            yield ChatChunk(tool_calls=(pending,))
    finally:
        await chunks.aclose()


__all__ = ["cut_at_stops", "limit_tool_calls", "refuse_missing", "show_reasoning", "split_reasoning",
           "whole_tool_calls"]
