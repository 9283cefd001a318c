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
class Stop:
    """A stop string matched; nothing after it is content."""


Event = Text | ToolSpan | Stop


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
    ) -> None:
        self.stops = tuple(s for s in stops if s)
        self.tool_start = tool_start or None
        self.tool_end = tool_end or None
        self.stopped = False
        self.matched: str | None = None
        """The stop string that ended the answer, once ``stopped``."""
        self._in_tool = False
        self._buffer = ""

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
                if not self.tool_end:
                    return events  # the span runs to the end of the answer
                end = self._buffer.find(self.tool_end)
                if end < 0:
                    return events
                events.append(ToolSpan(self._buffer[:end]))
                self._buffer = self._buffer[end + len(self.tool_end):]
                self._in_tool = False
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
                self.matched = marker
                self._buffer = ""
                events.append(Stop())
        return events

    def finish(self) -> list[Event]:
        """The answer ended (end of sequence or length): flush what was held back."""
        if self.stopped:
            return []
        rest, self._buffer = self._buffer, ""
        if self._in_tool:
            self._in_tool = False
            return [ToolSpan(rest, closed=False)]
        return [Text(rest)] if rest else []
