"""Generated text to ``ChatChunk``s, the same for the engine's text chats, image chats and
text completions.

``AnswerChunker`` takes the generation's events (``engine.TextPiece`` / ``engine.Finished``)
and applies, in this order: the reasoning split (core's ``nexa.reasoning.ReasoningSplitter``:
the thought goes to ``ChatChunk.reasoning``, or stays in the content as written for the
``inline`` format, or is dropped for ``hidden``), then, on the answer only, stop strings
(core's ``nexa.text.StopHoldBack``: the backend stops natively, so the server leaves them
to it) and tool-call parsing (``tools.ToolCallStream`` when the request has tools), then
the finish reason, the stop string that ended the answer (``ChatChunk.stop_sequence``) and
usage (reasoning tokens counted apart). Log-probability records travel with the answer
chunks that complete their tokens; the thought's tokens have none. When it reports
``stopped``, its caller ends the generation (``Generation.finish``).
"""

from __future__ import annotations

from collections.abc import Sequence

from nexa.reasoning import ReasoningSplitter, Split
from nexa.text import StopHoldBack
from nexa.types import ChatChunk, Reasoning, TokenLogprob, ToolCall, Usage
from nexa_llama_cpp.engine.records import Event, TextPiece
from nexa_llama_cpp.tools import ToolCallStream


class AnswerChunker:
    """One answer's chunks, from the prompt's token count, the tool names to parse and the
    stop strings; ``splitter`` and ``reasoning`` for a thinking model (the splitter of
    ``nexa.reasoning.reasoning_for``; none: all answer)."""

    def __init__(
        self,
        n_prompt: int,
        tool_names: Sequence[str],
        stops: Sequence[str],
        *,
        splitter: ReasoningSplitter | None = None,
        reasoning: Reasoning = Reasoning(),
    ) -> None:
        self.n_prompt = n_prompt
        self.n_generated = 0
        self.n_cached = 0
        self.reason = "stop"
        self.reasoning = reasoning
        self._split = splitter or ReasoningSplitter(None)
        self._stop = StopHoldBack(stops)
        self._tools = ToolCallStream(tool_names) if tool_names else None
        self._records: list[TokenLogprob] = []  # the answer's, not yet sent with a chunk
        self._undecided: list[TokenLogprob] = []  # before the output showed whether it thinks

    @property
    def stopped(self) -> bool:
        """A stop string was found: the caller stops generating."""
        return self._stop.stopped

    def take(self, event: Event) -> list[ChatChunk]:
        """The chunks a generation event gives (none for the final one: see ``finish``)."""
        if isinstance(event, TextPiece):
            self.n_generated += event.n_tokens
            before = self._split.reasoning_tokens
            split = self._split.feed(event.text, tokens=event.n_tokens)
            if event.logprobs:
                self._sort(event.logprobs, thought=self._split.reasoning_tokens > before)
            return self._chunks(split)
        self.reason = event.finish_reason
        self.n_generated = event.completion_tokens
        self.n_cached = event.cached_tokens
        return []

    def take_all(self, events: Sequence[Event]) -> list[ChatChunk]:
        """The chunks of events that arrived together (a guessed step's tokens), with text
        next to text joined into one chunk, so the client gets one piece, not one per token;
        none are taken past a stop string."""
        out: list[ChatChunk] = []
        for event in events:
            for chunk in self.take(event):
                last = out[-1] if out else None
                if last is not None and _joinable(last, chunk):
                    out[-1] = ChatChunk(content=last.content + chunk.content, reasoning=last.reasoning + chunk.reasoning,
                                        logprobs=last.logprobs + chunk.logprobs)
                else:
                    out.append(chunk)
            if self.stopped:
                break
        return out

    def finish(self) -> list[ChatChunk]:
        """The held-back text, any pending tool call, and the last chunk with finish and usage."""
        out = [] if self.stopped else self._chunks(self._split.finish())
        out += self._emit(self._stop.flush())
        reason = "stop" if self.stopped else self.reason
        if self._tools is not None:
            out.extend(self._attach(_chunk_of(event)) for event in self._tools.finish())
            if self._tools.calls:
                reason = "tool_calls"
        usage = Usage(self.n_prompt, self.n_generated, reasoning_tokens=self._split.reasoning_tokens,
                      cached_tokens=self.n_cached)
        matched = self._stop.matched if reason == "stop" and self.stopped else None
        records = tuple(self._records + self._undecided)
        out.append(ChatChunk(finish_reason=reason, usage=usage, stop_sequence=matched, logprobs=records))
        return out

    def _sort(self, records: tuple[TokenLogprob, ...], *, thought: bool) -> None:
        """File a piece's records: the answer's go out with it, the thought's are dropped,
        and those of an output that may still turn out to be a thought wait."""
        if self._split.state == "start":
            self._undecided += records
        elif thought:
            self._undecided.clear()
        elif not self.stopped:
            self._records += self._undecided + list(records)
            self._undecided.clear()

    def _chunks(self, split: Split) -> list[ChatChunk]:
        out = []
        if split.reasoning:
            if self.reasoning.format == "separate":
                out.append(ChatChunk(reasoning=split.reasoning))
            elif self.reasoning.format == "inline":
                # The thought as written, outside the answer's stops and tool calls.
                out.append(ChatChunk(content=split.reasoning))
        if split.answer:
            out += self._emit(self._stop.feed(split.answer))
        return out

    def _emit(self, text: str) -> list[ChatChunk]:
        if not text:
            return []
        if self._tools is None:
            return [self._attach(ChatChunk(content=text))]
        return [self._attach(_chunk_of(event)) for event in self._tools.feed(text)]

    def _attach(self, chunk: ChatChunk) -> ChatChunk:
        """``chunk`` with the answer's records not yet sent."""
        if not self._records:
            return chunk
        records, self._records = tuple(self._records), []
        return ChatChunk(content=chunk.content, tool_calls=chunk.tool_calls, logprobs=records)


def _chunk_of(event: str | ToolCall) -> ChatChunk:
    if isinstance(event, ToolCall):
        return ChatChunk(tool_calls=(event,))
    return ChatChunk(content=event)


def _joinable(a: ChatChunk, b: ChatChunk) -> bool:
    """Both are plain text of the same kind (answer or thought), so one can carry both."""
    plain = all(not c.tool_calls and c.finish_reason is None and c.usage is None for c in (a, b))
    return plain and ((not a.reasoning and not b.reasoning) or (not a.content and not b.content))
