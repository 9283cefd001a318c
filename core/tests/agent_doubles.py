"""TEST DOUBLES for the agent API tests (Messages, Responses): protocol mechanics only.

``ScriptedEcho`` is the echo backend with a script read from its manifest's options, so
that the translation of every request field and the framing of every kind of answer
(reasoning, several tool calls, a failure midway) can be checked without a model:

- every ``ChatRequest`` it receives is kept in ``ScriptedEcho.requests`` (what the
  dialect translated the body into);
- ``think``: it "reasons" before answering (``ChatChunk.reasoning``), honouring
  ``Reasoning.enabled`` (False: no reasoning) and ``Reasoning.budget`` (words at most);
- ``calls``: with tools offered it calls the first ``calls`` of them, one call each;
- ``fail_after``: it raises after that many answer words.

No thinking model runs on this machine's test set yet: a real one is checked when the
reasoning issue's parser lands (phase 2).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from nexa.backend import CancelToken
from nexa.errors import NexaError
from nexa.testing import EchoBackend, ServerHandle, echo_manifest, serve
from nexa.types import ChatChunk, ChatRequest, Manifest, ToolCall, Usage

SCRIPTED = "scripted-echo"
ECHO = "test/echo"
SCRIPT = "test/scripted"
THINKER = "test/thinker"


def scripted_manifest(name: str, **options: object) -> Manifest:
    return attrs.evolve(echo_manifest(name, **options), format=SCRIPTED)


def models() -> list[Manifest]:
    """The echo model and the scripted ones the agent API tests use."""
    return [echo_manifest(ECHO), scripted_manifest(SCRIPT), scripted_manifest(THINKER, think=True),
            scripted_manifest("test/two-calls", calls=2), scripted_manifest("test/fails", fail_after=2)]


@contextlib.contextmanager
def scripted_server(home: Path, **config: Any) -> Iterator[ServerHandle]:
    """The real server with the echo and scripted models, the request record emptied."""
    ScriptedEcho.requests.clear()
    with serve([EchoBackend, ScriptedEcho], home=home, models=models(), **config) as handle:
        yield handle


def last_request() -> ChatRequest:
    return ScriptedEcho.requests[-1]


class ScriptedEcho(EchoBackend):
    """Test double: echo with a script (see the module docstring)."""

    name = SCRIPTED
    formats = frozenset({SCRIPTED})
    requests: list[ChatRequest] = []

    def chat(self, request: ChatRequest, cancel: CancelToken) -> Iterator[ChatChunk]:
        ScriptedEcho.requests.append(request)
        options = self.manifest.options
        prompt = self.count_prompt_tokens(request)
        calls = int(options.get("calls", 0))  # type: ignore[call-overload]
        if calls and request.tools and request.tool_choice != "none":
            made = tuple(
                ToolCall(f"call_{i}", t["function"]["name"], json.dumps({"n": i}))
                for i, t in enumerate(request.tools[:calls])
            )
            yield ChatChunk(tool_calls=made, finish_reason="tool_calls", usage=Usage(prompt, len(made)))
            return
        thought = 0
        if options.get("think") and request.reasoning.enabled is not False and request.reasoning.budget != 0:
            words = "let me think about this".split()
            if request.reasoning.budget > 0:
                words = words[: request.reasoning.budget]
            for i, word in enumerate(words):
                yield ChatChunk(reasoning=word if i == 0 else " " + word)
            thought = len(words)
        fail_after = options.get("fail_after")
        produced = 0
        finish = "stop"
        usage = Usage(prompt, 0)
        for chunk in super().chat(request, cancel):
            if chunk.content:
                if fail_after is not None and produced >= int(fail_after):  # type: ignore[call-overload]
                    raise NexaError("the scripted model failed midway", code="scripted_failure")
                produced += 1
                yield ChatChunk(content=chunk.content)
            if chunk.tool_calls:
                produced += 1
                yield ChatChunk(tool_calls=tuple(_free_text(call, request) for call in chunk.tool_calls))
            if chunk.finish_reason is not None:
                finish = chunk.finish_reason
                usage = chunk.usage or usage
        yield ChatChunk(finish_reason=finish, usage=Usage(usage.prompt_tokens, produced + thought,
                                                          reasoning_tokens=thought))


def _free_text(call: ToolCall, request: ChatRequest) -> ToolCall:
    """The echo's call, with its text as ``input`` for a tool that takes one string ``input``
    (how a free-text tool is offered)."""
    tool = next((t["function"] for t in request.tools if t["function"]["name"] == call.name), {})
    if tool.get("parameters", {}).get("required") == ["input"]:
        return attrs.evolve(call, arguments=json.dumps({"input": json.loads(call.arguments)["text"]}))
    return call
