"""Turning a stream of decoded text into answer pieces: stop strings and tool-call spans.

Pure Python, no MLX: text arrives a token's worth at a time; this module decides what
may be shown now, holds back anything that could still become a stop string or a
tool-call marker (so neither is ever emitted partially), and cuts tool-call spans out of
the content.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from nexa.text import partial_suffix


@attrs.frozen
class Text:
    """Content the client may see."""

    text: str


@attrs.frozen
class ToolSpan:
    """The raw text between a tool-call start and end marker (the end may be missing)."""

    text: str
    closed: bool = True


@attrs.frozen
class ToolText:
    """Text of a tool-call span as it arrives (with ``stream_tools``); the whole span still
    follows as a ``ToolSpan`` at its end."""

    text: str


@attrs.frozen
class Stop:
    """A stop string matched; nothing after it is content."""

    text: str = ""
    """The stop string."""


Event = Text | ToolText | ToolSpan | Stop


class AnswerParser:
    """Feed decoded text pieces; get back content, tool-call spans and a stop signal.

    Stop strings are matched in content only (not inside a tool call's JSON); the
    earliest match wins and the stop string itself is never emitted.
    """

    def __init__(
        self,
        stops: Sequence[str] = (),
        tool_start: str | None = None,
        tool_end: str | None = None,
        stream_tools: bool = False,
    ) -> None:
        self.stops = tuple(s for s in stops if s)
        self.tool_start = tool_start or None
        self.tool_end = tool_end or None
        self.stream_tools = stream_tools
        self.stopped = False
        self._in_tool = False
        self._buffer = ""
        self._sent = 0  # of the tool span in the buffer, already sent as ToolText

    @property
    def _content_markers(self) -> tuple[str, ...]:
        return self.stops + ((self.tool_start,) if self.tool_start else ())

    def feed(self, piece: str) -> list[Event]:
        if self.stopped:
            return []
        self._buffer += piece
        events: list[Event] = []
        while self._buffer and not self.stopped:
            if self._in_tool:
                end = self._buffer.find(self.tool_end) if self.tool_end else -1
                if end < 0:
                    if self.stream_tools:
                        hold = partial_suffix(self._buffer, (self.tool_end,)) if self.tool_end else 0
                        ready = len(self._buffer) - hold
                        if ready > self._sent:
                            events.append(ToolText(self._buffer[self._sent:ready]))
                            self._sent = ready
                    return events  # the span runs on (to the end, without an end marker)
                if self.stream_tools and end > self._sent:
                    events.append(ToolText(self._buffer[self._sent:end]))
                events.append(ToolSpan(self._buffer[:end]))
                self._buffer = self._buffer[end + len(self.tool_end):]
                self._in_tool = False
                self._sent = 0
                continue
            found = [(self._buffer.find(m), m) for m in self._content_markers]
            found = [(i, m) for i, m in found if i >= 0]
            if not found:
                hold = partial_suffix(self._buffer, self._content_markers)
                ready = self._buffer[: len(self._buffer) - hold]
                if ready:
                    events.append(Text(ready))
                self._buffer = self._buffer[len(ready):]
                return events
            # Earliest match; at the same position the longer marker is the real one.
            index, marker = min(found, key=lambda f: (f[0], -len(f[1])))
            if index:
                events.append(Text(self._buffer[:index]))
            self._buffer = self._buffer[index + len(marker):]
            if marker == self.tool_start:
                self._in_tool = True
            else:
                self.stopped = True
                self._buffer = ""
                events.append(Stop(marker))
        return events

    def finish(self) -> list[Event]:
        """The answer ended (end of sequence or length): flush what was held back."""
        if self.stopped:
            return []
        rest, self._buffer = self._buffer, ""
        if self._in_tool:
            self._in_tool = False
            events: list[Event] = []
            if self.stream_tools and len(rest) > self._sent:
                events.append(ToolText(rest[self._sent:]))
            self._sent = 0
            return events + [ToolSpan(rest, closed=False)]
        return [Text(rest)] if rest else []
