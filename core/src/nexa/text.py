"""Text helpers every text backend shares: stop strings and chat-template messages.

- ``StopHoldBack`` cuts generated text at the first stop string and never lets a part of
  one out before it is decided (text that could still become a stop string is held).
  The server runs it over every text backend's answer unless the backend declares
  ``Backend.stops_natively``; backends that stop inside their own loop (to stop
  generating at once and count tokens exactly) use it themselves.
- ``template_message`` turns a ``ChatMessage`` into the dict Hugging Face-style chat
  templates expect (``tool_calls[].function.arguments`` as an object).
- ``head_tokens`` tokenizes a text that may be far over a token limit without
  tokenizing all of it (embedding inputs).

Plain Python on strings: no model library is imported here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from nexa.types import ChatMessage, ImagePart, TextPart


def partial_suffix(text: str, markers: Iterable[str]) -> int:
    """Length of the longest end of ``text`` that is a proper prefix of some marker."""
    longest = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:k]):
                longest = k
                break
    return longest


class StopHoldBack:
    """Feed generated text; get back what may be shown now. Cuts at the first stop string.

    ``feed`` returns the text that is safe to emit: everything except a tail that is the
    start of some stop string (held until later text decides it). When a stop string
    appears, the text before its first occurrence is returned, ``stopped`` turns true,
    and everything after is dropped. ``flush`` at the end of generation returns the held
    tail (it was not a stop string after all).
    """

    __slots__ = ("stops", "stopped", "_held")

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.stopped = False
        self._held = ""

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        if self.stopped:
            return ""
        text = self._held + text
        first = -1
        for stop in self.stops:
            i = text.find(stop)
            if i != -1 and (first == -1 or i < first):
                first = i
        if first != -1:
            self._held = ""
            self.stopped = True
            return text[:first]
        hold = partial_suffix(text, self.stops)
        self._held = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold]

    @property
    def held(self) -> str:
        """Text held back now (a possible start of a stop string)."""
        return self._held

    def flush(self) -> str:
        """The generation ended: what was held back is text after all."""
        out, self._held = ("" if self.stopped else self._held), ""
        return out


def arguments_object(arguments: str) -> Any:
    """Tool-call arguments as templates expect them: the JSON object (Qwen, Llama 3.x and
    Hermes templates ``tojson`` them, as transformers passes objects); text that is not
    JSON stays as it is."""
    try:
        return json.loads(arguments)
    except (TypeError, ValueError):
        return arguments


def template_message(
    message: ChatMessage, *, media_marker: str | None = None, list_content: bool = False
) -> dict[str, Any]:
    """``message`` as a chat-template dict (Hugging Face conventions).

    Content is a string unless ``list_content`` (a template that only renders OpenAI-style
    part lists): text parts joined, each image replaced in place by ``media_marker`` (the
    multimodal tokenizer's placeholder) or dropped when there is none. ``None`` content
    becomes ``""`` for string templates, which concatenate it.
    """
    content: Any = message.content
    if isinstance(content, tuple):
        parts = []
        for part in content:
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
            elif isinstance(part, ImagePart) and media_marker is not None:
                parts.append({"type": "text", "text": media_marker})
        content = parts if list_content else "".join(p["text"] for p in parts)
    if content is None and not list_content:
        content = ""
    out: dict[str, Any] = {"role": message.role, "content": content}
    if message.name:
        out["name"] = message.name
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": arguments_object(call.arguments)},
            }
            for call in message.tool_calls
        ]
    return out


__all__ = ["StopHoldBack", "arguments_object", "partial_suffix", "template_message"]


CHARS_PER_TOKEN = 16
"""Characters of a prefix looked at per token of a limit (``head_tokens``): text
averages 3-6 characters a token, so a prefix this long holds the limit several times."""


def head_tokens(tokenize: Callable[[str], Sequence[int]], text: str, limit: int) -> tuple[Sequence[int], int]:
    """Token ids of ``text[:end]`` and ``end``, for a caller that refuses (or truncates)
    more than ``limit`` tokens; ``end == len(text)`` when the ids are the whole text's.

    A long text is first tokenized as a prefix of ``(limit + 1) * CHARS_PER_TOKEN``
    characters; when that prefix alone is well over the limit (twice it: the cut may split
    its last word differently from the whole text), the whole text is too, and the
    prefix is what is returned, so a 100,000-character input is never tokenized whole to
    be refused. Otherwise (a short text, or a sparse one: long runs of spaces, very long
    tokens) the whole text is tokenized.
    """
    cut = (limit + 1) * CHARS_PER_TOKEN
    if len(text) > cut:
        ids = tokenize(text[:cut])
        if len(ids) > 2 * (limit + 1):
            return ids, cut
    return tokenize(text), len(text)
