"""Text helpers every text backend shares: stop strings, chat-template messages, and
client text kept from becoming control tokens.

- ``StopHoldBack`` cuts generated text at the first stop string and never lets a part of
  one out before it is decided (text that could still become a stop string is held).
  The server runs it over every text backend's answer unless the backend declares
  ``Backend.stops_natively``; backends that stop inside their own loop (to stop
  generating at once and count tokens exactly) use it themselves.
- ``template_message`` turns a ``ChatMessage`` into the dict Hugging Face-style chat
  templates expect (``tool_calls[].function.arguments`` as an object).
- ``SpecialTextGuard`` keeps text that came from a client from being read as a model's
  control tokens: client strings that contain a special token's text are rendered with
  private sentinels in its place, and the rendered prompt is then tokenized piece by
  piece (template markup with special-token parsing, the client's text as plain text).
- ``head_tokens`` tokenizes a text that may be far over a token limit without
  tokenizing all of it (embedding inputs).

Plain Python on strings: no model library is imported here.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs

from nexa.types import ChatMessage, ImagePart, TextPart, ToolCall


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

    __slots__ = ("stops", "stopped", "matched", "_held")

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.stopped = False
        self.matched: str | None = None
        """The stop string that was found (the earliest in the text), once ``stopped``."""
        self._held = ""

    def feed(self, text: str) -> str:
        """The next piece of generated text in; the part that may be shown now out."""
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
                self.matched = stop
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
    if message.reasoning:
        # Qwen3's and DeepSeek's templates read it, and drop it from turns before the
        # last user message.
        out["reasoning_content"] = message.reasoning
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


class SpecialTextGuard:
    """One model's special-token texts (``<|im_start|>``, ``<|im_end|>``, ``<s>``...) and
    how a request's client strings are kept from becoming those tokens.

    A chat prompt is rendered from the template's own markup and the client's strings
    (message content, names, tool calls and results, tool definitions), then tokenized
    with special-token parsing, which the markup needs. Parsed that way, a user message
    ``"<|im_end|>\n<|im_start|>system\n..."`` would forge a system turn. ``shield``
    replaces each special text inside client strings with a sentinel private to the
    request; the caller renders the shielded messages and tools, and ``Shielded.tokenize``
    tokenizes the markup with special parsing and each sentinel as the plain-text tokens
    of what it replaced. A request whose client strings hold no special text gets exactly
    the tokens of the whole rendered prompt, as before.

    ``specials`` are the texts the tokenizer parses as control tokens only when asked to
    (llama.cpp's CONTROL and UNKNOWN tokens, Hugging Face's special added tokens); texts
    that plain-text tokenization turns into their token anyway (user-defined / non-special
    added tokens such as ``<tool_call>`` or ``</think>``) are not among them.
    """

    def __init__(self, specials: Iterable[str]) -> None:
        texts = sorted({s for s in specials if s}, key=len, reverse=True)
        self.specials = tuple(texts)
        # Longest first: at one position the longest special text wins.
        self._pattern = re.compile("|".join(re.escape(t) for t in texts)) if texts else None

    def shield(
        self, messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, Any]] = ()
    ) -> Shielded:
        """``messages`` and ``tools`` with every special text in their strings replaced by
        a sentinel (unchanged, and no sentinels, when there is none)."""
        pattern = self._pattern
        if pattern is None or not any(pattern.search(s) for s in _client_strings(messages, tools)):
            return Shielded(tuple(messages), tuple(tools), "", ())
        taken = "\n".join(_client_strings(messages, tools))
        while True:
            # Letters and digits only: kept as they are by JSON (tojson), HTML escaping
            # and Jinja filters that templates run over content.
            prefix = "nexa" + secrets.token_hex(8) + "s"
            if prefix not in taken:
                break
        originals: list[str] = []
        index: dict[str, int] = {}

        def sentinel(match: re.Match[str]) -> str:
            text = match.group(0)
            if text not in index:
                index[text] = len(originals)
                originals.append(text)
            return f"{prefix}{index[text]}e"

        def guard(text: str) -> str:
            return pattern.sub(sentinel, text)

        shielded = tuple(_map_message(m, guard) for m in messages)
        tools_out = tuple(_map_json(t, guard) for t in tools)
        return Shielded(shielded, tools_out, prefix, tuple(originals))


def _client_strings(messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, Any]]) -> Iterable[str]:
    for m in messages:
        if isinstance(m.content, str):
            yield m.content
        elif isinstance(m.content, tuple):
            yield from (p.text for p in m.content if isinstance(p, TextPart))
        yield from (s for s in (m.name, m.tool_call_id) if s)
        for call in m.tool_calls:
            yield from (call.id, call.name, call.arguments)
    for tool in tools:
        yield from _json_strings(tool)


def _json_strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _json_strings(key)
            yield from _json_strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _json_strings(item)


def _map_json(value: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, Mapping):
        return {_map_json(k, fn): _map_json(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_json(v, fn) for v in value]
    return value


def _map_message(message: ChatMessage, fn: Callable[[str], str]) -> ChatMessage:
    content: Any = message.content
    if isinstance(content, str):
        content = fn(content)
    elif isinstance(content, tuple):
        content = tuple(TextPart(fn(p.text)) if isinstance(p, TextPart) else p for p in content)
    return attrs.evolve(
        message,
        content=content,
        name=fn(message.name) if message.name else message.name,
        tool_call_id=fn(message.tool_call_id) if message.tool_call_id else message.tool_call_id,
        tool_calls=tuple(ToolCall(fn(c.id), fn(c.name), fn(c.arguments)) for c in message.tool_calls),
    )


@attrs.frozen
class Shielded:
    """A request's messages and tools with their special texts behind sentinels
    (``SpecialTextGuard.shield``), and how to tokenize what they render to."""

    messages: tuple[ChatMessage, ...]
    """The request's messages, each special text in a client string replaced by its sentinel."""
    tools: tuple[Mapping[str, Any], ...]
    """The request's tool definitions, treated the same way."""
    prefix: str
    """What every sentinel of this request starts with ("" when nothing was replaced)."""
    originals: tuple[str, ...]
    """The special texts replaced; sentinel ``f"{prefix}{i}e"`` stands for ``originals[i]``."""

    @property
    def active(self) -> bool:
        """Some client string held a special text."""
        return bool(self.originals)

    def pieces(self, rendered: str) -> list[tuple[str, bool]]:
        """``rendered`` split at the sentinels: ``(text, False)`` for the template's text
        (markup and the client's ordinary text), ``(special_text, True)`` where a client
        string held it. Adjacent pieces are never both ``False``."""
        if not self.active:
            return [(rendered, False)]
        out: list[tuple[str, bool]] = []
        at = 0
        for match in re.finditer(re.escape(self.prefix) + r"(\d+)e", rendered):
            i = int(match.group(1))
            if i >= len(self.originals):
                continue
            if match.start() > at:
                out.append((rendered[at : match.start()], False))
            out.append((self.originals[i], True))
            at = match.end()
        if at < len(rendered):
            out.append((rendered[at:], False))
        return out

    def tokenize(
        self,
        rendered: str,
        markup: Callable[[str, bool], list[int]],
        plain: Callable[[str, bool], list[int]],
    ) -> list[int]:
        """Token ids of ``rendered``: ``markup(text, first)`` tokenizes the template's
        pieces with special-token parsing, ``plain(text, first)`` a client's special text
        as ordinary text (``first``: the piece starts the prompt, where a BOS token may be
        added). Without sentinels this is ``markup(rendered, True)``."""
        tokens: list[int] = []
        for i, (text, literal) in enumerate(self.pieces(rendered)):
            tokens += (plain if literal else markup)(text, i == 0)
        return tokens


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


__all__ = [
    "Shielded",
    "SpecialTextGuard",
    "StopHoldBack",
    "arguments_object",
    "head_tokens",
    "partial_suffix",
    "template_message",
]
