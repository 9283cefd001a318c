"""Tool calls in plain text: prompting for them, and finding them in the answer.

- ``ToolCallStream`` turns streamed model text into content and tool calls (Hermes/Qwen
  ``<tool_call>{json}</tool_call>`` blocks, whose arguments stream as they are written
  (core's ``nexa.toolcalls.JsonCallStream``), or an answer that is one bare JSON call).
- ``tools_system_prompt`` / ``describe_tools``: for chat templates that ignore ``tools``,
  the tools as a system prompt, and earlier calls and results as text in that same form.
- ``call_schema``: the JSON schema of one call, from which ``grammar`` builds the GBNF
  that forces a call.

No llama_cpp import here: this is plain text handling, tested on strings.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from nexa.toolcalls import JsonCallStream, new_call_id
from nexa.types import ChatMessage, ToolCall


def _arguments_text(value: Any) -> str:
    if isinstance(value, str):
        # Some models put the arguments as a JSON string; OpenAI's field is JSON text.
        try:
            return json.dumps(json.loads(value), ensure_ascii=False)
        except ValueError:
            return value
    return json.dumps(value if value is not None else {}, ensure_ascii=False)


def call_from_json(
    obj: Any, known: Sequence[str] | None = None
) -> ToolCall | None:
    """A ToolCall from ``{"name": ..., "arguments"|"parameters": ...}``; None otherwise."""
    if not isinstance(obj, Mapping):
        return None
    if isinstance(obj.get("function"), Mapping):  # {"type": "function", "function": {...}}
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    if known is not None and name not in known:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return ToolCall(id=new_call_id(), name=name, arguments=_arguments_text(args))


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)


def parse_bare_calls(text: str, known: Sequence[str]) -> list[ToolCall] | None:
    """Tool calls when the whole text is one JSON call (or a list of them), else None."""
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    try:
        data = json.loads(body)
    except ValueError:
        return None
    items = data if isinstance(data, list) else [data]
    calls = [call_from_json(item, known) for item in items]
    if not calls or any(c is None for c in calls):
        return None
    return calls  # type: ignore[return-value]


OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"


class ToolCallStream:
    """Splits streamed model text into content and tool calls.

    Content is passed through as it comes, except text that might open a
    ``<tool_call>`` block (held until decided) and output that starts like a JSON
    object (held to the end, because the whole answer may be one bare JSON call).
    A tagged call to a known function in the usual JSON shape is streamed: its first
    piece names it, the next ones carry its arguments as they are written (pieces of one
    call share its id); any other tagged call is parsed whole at its close tag.
    """

    def __init__(self, known: Sequence[str]):
        self.known = tuple(known)
        self.calls: list[ToolCall] = []
        """The calls made (their first piece, for streamed ones)."""
        self._mode = "start"  # start | text | call | bare
        self._buf = ""
        self._call: JsonCallStream | None = None
        self._fed = 0  # how much of the open call's text the call stream has read

    def feed(self, text: str) -> list[str | ToolCall]:
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> list[str | ToolCall]:
        return self._drain(final=True)

    def _emit_call(self, out: list[str | ToolCall], call: ToolCall) -> None:
        self.calls.append(call)
        out.append(call)

    def _stream_call(self, out: list[str | ToolCall], upto: int) -> None:
        """Give the open call's text up to ``upto`` to its call stream; emit its pieces."""
        if self._call is None:
            self._call = JsonCallStream(self.known)
        if upto <= self._fed:
            return
        text, self._fed = self._buf[self._fed : upto], upto
        for piece in self._call.feed(text):
            if piece.name:
                self.calls.append(piece)
            out.append(piece)

    def _drain(self, final: bool) -> list[str | ToolCall]:
        out: list[str | ToolCall] = []
        while True:
            if self._mode == "start":
                head = self._buf.lstrip()
                if not head:
                    if final:
                        if self._buf:
                            out.append(self._buf)
                        self._buf = ""
                    return out
                if head.startswith(("{", "[", "```")):
                    self._mode = "bare"
                else:
                    self._mode = "text"
                continue
            if self._mode == "bare":
                if not final:
                    return out
                calls = parse_bare_calls(self._buf, self.known)
                if calls is None:
                    # Not a call after all (a JSON answer): continue as text, which also
                    # finds any tagged calls inside it.
                    self._mode = "text"
                    continue
                for call in calls:
                    self._emit_call(out, call)
                self._buf = ""
                return out
            if self._mode == "text":
                i = self._buf.find(OPEN_TAG)
                if i != -1:
                    if i:
                        out.append(self._buf[:i])
                    self._buf = self._buf[i + len(OPEN_TAG) :]
                    self._mode = "call"
                    continue
                keep = 0 if final else _prefix_overlap(self._buf, OPEN_TAG)
                text, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep :]
                if text:
                    out.append(text)
                return out
            if self._mode == "call":
                j = self._buf.find(CLOSE_TAG)
                if j == -1 and not final:
                    self._stream_call(out, len(self._buf) - _prefix_overlap(self._buf, CLOSE_TAG))
                    return out
                body = self._buf if j == -1 else self._buf[:j]
                rest = "" if j == -1 else self._buf[j + len(CLOSE_TAG) :]
                self._stream_call(out, len(body))
                streamed = self._call is not None and self._call.streamed
                self._call, self._fed = None, 0
                call = None
                if not streamed:
                    try:
                        call = call_from_json(json.loads(body.strip()))
                    except ValueError:
                        pass
                if call is not None:
                    self._emit_call(out, call)
                elif not streamed:
                    # Malformed: give the client what the model wrote rather than drop it.
                    out.append(OPEN_TAG + body + ("" if j == -1 else CLOSE_TAG))
                self._buf = rest
                self._mode = "text"
                if not self._buf and not final:
                    return out
                continue
            raise AssertionError(self._mode)


def _prefix_overlap(text: str, tag: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


# --- prompts and grammars for tools ------------------------------------------------


def tool_functions(tools: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [t["function"] for t in tools if isinstance(t.get("function"), Mapping)]


def tools_system_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """Tool instructions for templates that do not render ``tools`` themselves."""
    lines = "\n".join(json.dumps(f, ensure_ascii=False) for f in tool_functions(tools))
    return (
        "You can call functions. Their JSON signatures are inside <tools></tools>:\n"
        f"<tools>\n{lines}\n</tools>\n"
        "To call a function, reply only with one JSON object per call inside tags:\n"
        '<tool_call>\n{"name": "<function-name>", "arguments": {<arguments>}}\n</tool_call>'
    )


def parameters_schema(function: Mapping[str, Any]) -> dict[str, Any]:
    params = function.get("parameters")
    if not isinstance(params, Mapping) or not params:
        return {"type": "object"}
    return dict(params)


def call_schema(functions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """JSON schema of one call to any of ``functions``: ``{"name", "arguments"}``."""
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": f["name"]},
                "arguments": parameters_schema(f),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    return options[0] if len(options) == 1 else {"oneOf": options}


def describe_tools(
    messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, Any]]
) -> tuple[ChatMessage, ...]:
    """For templates that ignore ``tools``: a system prompt, and calls/results as text."""
    instructions = tools_system_prompt(tools)
    out: list[ChatMessage] = []
    for m in messages:
        if m.role == "assistant" and m.tool_calls:
            calls = "\n".join(
                f'{OPEN_TAG}\n{{"name": {json.dumps(c.name)}, "arguments": {c.arguments or "{}"}}}\n{CLOSE_TAG}'
                for c in m.tool_calls
            )
            text = (m.text + "\n" if m.text else "") + calls
            out.append(ChatMessage(role="assistant", content=text))
        elif m.role == "tool":
            out.append(ChatMessage(role="user", content=f"<tool_response>\n{m.text}\n</tool_response>"))
        else:
            out.append(m)
    if out and out[0].role == "system":
        out[0] = ChatMessage(role="system", content=f"{out[0].text}\n\n{instructions}")
    else:
        out.insert(0, ChatMessage(role="system", content=instructions))
    return tuple(out)
