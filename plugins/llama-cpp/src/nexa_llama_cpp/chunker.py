"""Generated text to ``ChatChunk``s, the same for the engine's text chats and image chats.

``AnswerChunker`` takes the generation's events (``engine.TextPiece`` / ``engine.Finished``)
and applies, in this order: stop strings (core's ``nexa.text.StopHoldBack``: the backend
stops natively, so the server leaves them to it), tool-call parsing (``tools.ToolCallStream``
when the request has tools), then the finish reason and usage. When it reports
``stopped``, its caller ends the generation (``Generation.finish``).
"""

from __future__ import annotations

from collections.abc import Sequence

from nexa.text import StopHoldBack
from nexa.types import ChatChunk, ToolCall, Usage
from nexa_llama_cpp.engine.records import Event, TextPiece
from nexa_llama_cpp.tools import ToolCallStream


class AnswerChunker:
    """One answer's chunks, from the prompt's token count, the tool names to parse and the stop strings."""

    def __init__(self, n_prompt: int, tool_names: Sequence[str], stops: Sequence[str]) -> None:
        self.n_prompt = n_prompt
        self.n_generated = 0
        self.n_cached = 0
        self.reason = "stop"
        self._stop = StopHoldBack(stops)
        self._tools = ToolCallStream(tool_names) if tool_names else None

    @property
    def stopped(self) -> bool:
        """A stop string was found: the caller stops generating."""
        return self._stop.stopped

    def take(self, event: Event) -> list[ChatChunk]:
        """The chunks a generation event gives (none for the final one: see ``finish``)."""
        if isinstance(event, TextPiece):
            self.n_generated += event.n_tokens
            return self._emit(self._stop.feed(event.text))
        self.reason = event.finish_reason
        self.n_generated = event.completion_tokens
        self.n_cached = event.cached_tokens
        return []

    def finish(self) -> list[ChatChunk]:
        """The held-back text, any pending tool call, and the last chunk with finish and usage."""
        out = self._emit(self._stop.flush())
        reason = "stop" if self.stopped else self.reason
        if self._tools is not None:
            out.extend(_chunk_of(event) for event in self._tools.finish())
            if self._tools.calls:
                reason = "tool_calls"
        usage = Usage(self.n_prompt, self.n_generated, cached_tokens=self.n_cached)
        out.append(ChatChunk(finish_reason=reason, usage=usage))
        return out

    def _emit(self, text: str) -> list[ChatChunk]:
        if not text:
            return []
        if self._tools is None:
            return [ChatChunk(content=text)]
        return [_chunk_of(event) for event in self._tools.feed(text)]


def _chunk_of(event: str | ToolCall) -> ChatChunk:
    if isinstance(event, ToolCall):
        return ChatChunk(tool_calls=(event,))
    return ChatChunk(content=event)
