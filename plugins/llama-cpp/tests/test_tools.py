"""Tool-call parsing on plain strings, fed in awkward pieces (stop strings: core/tests/test_text.py)."""

from __future__ import annotations

import json

import pytest

from nexa.types import ToolCall, merge_tool_calls
from nexa_llama_cpp.tools import ToolCallStream, call_schema, parse_bare_calls


def events(stream: ToolCallStream, pieces: list[str]) -> list[str | ToolCall]:
    out: list[str | ToolCall] = []
    for piece in pieces:
        out += stream.feed(piece)
    return out + stream.finish()


def split_chars(text: str) -> list[str]:
    return list(text)


def test_tagged_calls_between_text_stream_out_in_order():
    text = (
        'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        '</tool_call>\n<tool_call>{"name": "get_time", "arguments": "{\\"tz\\": \\"UTC\\"}"}</tool_call>'
    )
    out = events(ToolCallStream(["get_weather", "get_time"]), split_chars(text))
    content = "".join(e for e in out if isinstance(e, str))
    pieces = [e for e in out if isinstance(e, ToolCall)]
    calls = merge_tool_calls(pieces)
    assert content.strip() == "Let me check."
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Paris"}
    assert json.loads(calls[1].arguments) == {"tz": "UTC"}
    assert calls[0].id.startswith("call_") and calls[0].id != calls[1].id
    # Fed a character at a time, the arguments came in many pieces, the name in the first only.
    assert len(pieces) > 4 and all(not p.name for p in pieces if p.id == calls[0].id and p is not pieces[0])


def test_text_is_streamed_before_the_answer_ends():
    stream = ToolCallStream(["f"])
    assert stream.feed("Hello there") == ["Hello there"]
    # A possible tag opener is held back, then released when it turns out not to be one.
    assert stream.feed(" <tool") == [" "]
    assert stream.feed("s are fun") == ["<tools are fun"]


def test_bare_json_call_and_llama3_parameters_key():
    out = events(ToolCallStream(["lookup"]), ['{"name": "lookup", ', '"parameters": {"q": "x"}}'])
    assert len(out) == 1 and isinstance(out[0], ToolCall)
    assert out[0].name == "lookup" and json.loads(out[0].arguments) == {"q": "x"}


def test_json_answer_that_is_not_a_known_call_stays_content():
    text = '{"name": "Bob", "age": 3}'
    out = events(ToolCallStream(["lookup"]), [text])
    assert out == [text]
    assert parse_bare_calls("```json\n[{\"name\": \"lookup\", \"arguments\": {}}]\n```", ["lookup"])


def test_malformed_tagged_call_is_returned_as_text():
    text = "<tool_call>{not json}</tool_call>"
    out = events(ToolCallStream(["f"]), [text])
    assert "".join(e for e in out if isinstance(e, str)) == text


def test_unterminated_call_at_end_is_still_parsed():
    out = events(ToolCallStream(["f"]), ['<tool_call>\n{"name": "f", "arguments": {}}'])
    assert [e.name for e in merge_tool_calls(e for e in out if isinstance(e, ToolCall))] == ["f"]


@pytest.mark.parametrize("n", [1, 2])
def test_call_schema_shape(n):
    fns = [{"name": f"f{i}", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}
           for i in range(n)]
    schema = call_schema(fns)
    options = schema["oneOf"] if n > 1 else [schema]
    assert [o["properties"]["name"]["const"] for o in options] == [f"f{i}" for i in range(n)]
