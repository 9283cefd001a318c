"""The conformance kit catches broken backends, and the server applies stop strings for
backends that do not stop natively.

The backends here are declared TEST DOUBLES: a well-behaved word list, and copies of it
each broken in one way a real plugin could be.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from nexa.backend import Backend
from nexa.testing import EchoBackend, conformance, echo_manifest, serve
from nexa.types import ChatChunk, Device, Manifest, Task, Usage

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()


class Words(Backend):
    """Test double: answers the same ten words to anything."""

    name = "words"
    tasks = frozenset({Task.CHAT})
    formats = frozenset({"words"})
    parallel = 1

    def prompt_tokens(self, request):
        return sum(len(m.text.split()) for m in request.messages)

    def limit(self, request):
        return request.sampling.max_tokens or len(WORDS)

    def chat(self, request, cancel):
        limit = self.limit(request)
        sent = 0
        for word in WORDS[:limit]:
            cancel.raise_if_cancelled()
            sent += 1
            yield ChatChunk(content=word if sent == 1 else " " + word)
        yield ChatChunk(finish_reason="length" if limit < len(WORDS) else "stop",
                        usage=Usage(self.prompt_tokens(request), sent))


class IgnoresMaxTokens(Words):
    name = "ignores-max-tokens"

    def chat(self, request, cancel):
        limit = self.limit(request)
        for i, word in enumerate(WORDS):
            cancel.raise_if_cancelled()
            yield ChatChunk(content=word if i == 0 else " " + word)
        # ...and reports what it was asked for, so usage alone would not give it away.
        yield ChatChunk(finish_reason="length", usage=Usage(self.prompt_tokens(request), min(limit, len(WORDS))))


class FixedPromptUsage(Words):
    name = "fixed-usage"

    def prompt_tokens(self, request):
        return 3


class ClaimsNativeStop(Words):
    name = "claims-native-stop"
    stops_natively = True  # ...but never looks at request.sampling.stop


class NeverChecksCancel(Words):
    name = "never-checks-cancel"

    def chat(self, request, cancel):
        limit = self.limit(request)
        for i, word in enumerate(WORDS[:limit]):
            yield ChatChunk(content=word if i == 0 else " " + word)
        yield ChatChunk(finish_reason="stop", usage=Usage(self.prompt_tokens(request), limit))


def started(cls):
    backend = cls(Manifest(name="test/words", format="words", tasks={Task.CHAT}), Device("cpu"))
    asyncio.run(backend.start())
    return backend


def test_a_well_behaved_backend_passes():
    conformance.check_chat(started(Words))


def test_the_echo_double_passes_every_check():
    backend = EchoBackend(echo_manifest(), Device("cpu"))
    asyncio.run(backend.start())
    conformance.check_chat(backend)
    conformance.check_embed(backend)
    conformance.check_images(backend)


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (IgnoresMaxTokens, "max_tokens is ignored"),
        (FixedPromptUsage, "longer prompt must report more prompt tokens"),
        (ClaimsNativeStop, "stop 'lp'"),
        (NeverChecksCancel, "cancelled CancelToken"),
    ],
)
def test_the_kit_catches_a_broken_backend(cls, message):
    with pytest.raises(AssertionError, match=message):
        conformance.check_chat(started(cls))


@pytest.fixture
def words_server(tmp_path):
    model = Manifest(name="test/words", format="words", tasks={Task.CHAT})
    with serve([Words], home=tmp_path / "home", models=[model]) as server:
        yield server


def chat(server, **body):
    body = {"model": "test/words", "messages": [{"role": "user", "content": "hi"}], **body}
    return httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=30)


def test_the_server_cuts_a_non_native_backend_at_its_stop_strings(words_server):
    whole = chat(words_server, stop=["epsilon", "zeta"]).json()
    assert whole["choices"][0]["message"]["content"] == "alpha beta gamma delta "
    assert whole["choices"][0]["finish_reason"] == "stop"
    # Five chunks arrived before the cut (the fifth held "epsilon"): counted as tokens.
    assert whole["usage"]["completion_tokens"] == 5


def test_a_streamed_answer_is_cut_too_and_never_shows_part_of_a_stop(words_server):
    with httpx.stream("POST", words_server.base_url + "/v1/chat/completions", timeout=30, json={
        "model": "test/words", "messages": [{"role": "user", "content": "hi"}], "stream": True,
        "stop": "a delta e", "stream_options": {"include_usage": True},
    }) as resp:
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    import json

    events = [json.loads(line[6:]) for line in lines[:-1]]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == "alpha beta gamm"
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "stop"
    assert events[-1]["usage"]["completion_tokens"] == 5  # the stop was found in the fifth chunk
    assert all(e["object"] == "chat.completion.chunk" for e in events)
