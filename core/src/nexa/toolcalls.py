"""Tool calls streamed as they are generated.

``JsonCallStream`` reads the text of one tool-call span in the JSON shape most chat
templates ask for (Hermes, Qwen2.5/Qwen3, Llama 3.x: ``{"name": "...", "arguments":
{...}}``) as it arrives, and returns ``ToolCall`` pieces (``nexa.types.ToolCall``): the
first names the call as soon as its name is complete, the next ones carry the arguments
object's text as it is written, so that a client (an agent showing progress) sees them
grow. A span in any other shape (arguments before the name, arguments as a string, the
XML of Qwen3-Coder) is left to the backend's own parser once it is complete
(``streamed`` stays False). Plain Python on strings.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable

from nexa.types import ToolCall

_WS = " \t\r\n"


def new_call_id() -> str:
    """A fresh tool-call id in OpenAI's form (``call_`` and 24 hex digits)."""
    return "call_" + secrets.token_hex(12)


class JsonCallStream:
    """Feed a tool-call span's text piece by piece; get back call pieces as they are known.

    ``known`` names the functions the request offered; a call to any other name is not
    streamed (the backend's parser decides what it is). After ``finish``, ``streamed``
    says whether this span was emitted as a call.
    """

    def __init__(self, known: Iterable[str] = ()) -> None:
        self.known = frozenset(known)
        self.streamed = False
        self.id = new_call_id()
        self._text = ""
        self._state = "head"  # head | args | tail | other
        self._args_from = 0
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def feed(self, text: str) -> list[ToolCall]:
        """The span's next text; returns the call pieces it completes (maybe none)."""
        self._text += text
        out: list[ToolCall] = []
        if self._state == "head":
            head = _read_head(self._text)
            if head is None:
                return out
            if head is False or head[0] not in self.known:
                self._state = "other"
                return out
            name, self._args_from = head
            self._state = "args"
            self.streamed = True
            out.append(ToolCall(self.id, name, ""))
        if self._state == "args":
            fragment = self._scan_arguments()
            if fragment:
                out.append(ToolCall(self.id, "", fragment))
        return out

    def _scan_arguments(self) -> str:
        """The arguments text not yet emitted, up to the end of the arguments object."""
        start = self._args_from
        i = start
        text = self._text
        while i < len(text):
            c = text[i]
            i += 1
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self._state = "tail"
                    break
        self._args_from = i
        return text[start:i]

    @property
    def text(self) -> str:
        """The span's whole text so far."""
        return self._text


def _read_head(text: str) -> tuple[str, int] | bool | None:
    """``(name, where the arguments object starts)`` once ``{"name": "...", "arguments": {``
    (or ``"parameters"``, Llama 3.1's word) is complete; None while the text may still
    become that; False when it can't."""
    i = 0
    name = ""
    for wanted in (("{",), ('"name"',), (":",), None, (",",), ('"arguments"', '"parameters"'), (":",), ("{",)):
        while i < len(text) and text[i] in _WS:
            i += 1
        if i == len(text):
            return None
        if wanted is None:  # the name, a JSON string
            if text[i] != '"':
                return False
            end = _string_end(text, i)
            if end is None:
                return None
            try:
                name = json.loads(text[i:end])
            except ValueError:
                return False
            i = end
            continue
        partial = False
        for word in wanted:
            chunk = text[i:i + len(word)]
            if chunk == word:
                i += len(word)
                break
            partial |= word.startswith(chunk)
        else:
            return None if partial else False
    return name, i - 1


def _string_end(text: str, start: int) -> int | None:
    """The index after the JSON string that starts at ``start`` (None: not closed yet)."""
    escaped = False
    for i in range(start + 1, len(text)):
        c = text[i]
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == '"':
            return i + 1
    return None


__all__ = ["JsonCallStream", "new_call_id"]
