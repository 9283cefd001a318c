"""The answer loop both MLX backends share: generated token ids in, chat chunks out.

Per token: cancellation, end of sequence, detokenizing, the reasoning split (core's
``ReasoningSplitter``: the thought goes to ``ChatChunk.reasoning``, or inline, or
nowhere), then stop strings and tool-call spans on the answer only (``AnswerParser``),
log-probability records of the answer's tokens, and at the end the finish reason and a
usage that counts reasoning tokens. Also the logits processors this loop relies on:
``ThoughtCloser`` forces the close of a thought whose budget ran out. ``mlx`` is imported
only inside the functions that need it.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import attrs

from nexa.backend import CancelToken
from nexa.reasoning import ReasoningSplitter, ThinkingBudget
from nexa.toolcalls import JsonCallStream
from nexa.types import ChatChunk, Reasoning, TokenLogprob, ToolCall, Usage
from nexa_mlx.text import AnswerParser, Stop, Text, ToolSpan, ToolText

# JSON has no -inf: a token the logits processors ruled out gets OpenAI's floor instead.
LOGPROB_FLOOR = -9999.0


@attrs.define(eq=False)
class AnswerLoop:
    """Everything one request's answer loop needs besides the token stream."""

    cancel: CancelToken
    prompt_tokens: int
    is_eos: Callable[[int], bool]
    detokenizer: Any
    token_text: Callable[[int], str]
    """One token's text, for log-probability records."""
    splitter: ReasoningSplitter = attrs.field(factory=lambda: ReasoningSplitter(None))
    reasoning: Reasoning = Reasoning()
    stops: tuple[str, ...] = ()
    tool_markers: tuple[str, str] = ("", "")
    tool_parser: Any = None
    tools: list[Mapping[str, Any]] = attrs.field(factory=list)
    logprobs: int | None = None
    _call: JsonCallStream | None = None
    _stop: str | None = None

    def run(self, steps: Iterator[tuple[int, Any]]) -> Iterator[ChatChunk]:
        start, end = self.tool_markers
        parser = AnswerParser(
            self.stops,
            tool_start=start if self.tool_parser else None,
            tool_end=end if self.tool_parser else None,
            stream_tools=True,
        )
        records: list[TokenLogprob] = []  # answer tokens not yet sent with a chunk
        undecided: list[TokenLogprob] = []  # tokens before the output showed whether it thinks
        generated = 0
        finish = "length"
        made_tool_call = False
        for token, logprobs in steps:
            # The generators already run the next token while we handle this one, so
            # a cancel lands within about one token.
            self.cancel.raise_if_cancelled()
            if self.is_eos(token):
                finish = "stop"
                break
            generated += 1
            self.detokenizer.add_token(token)
            before = self.splitter.reasoning_tokens
            split = self.splitter.feed(self.detokenizer.last_segment)
            if self.logprobs is not None:
                record = self.record(token, logprobs)
                if self.splitter.state == "start":
                    undecided.append(record)
                elif self.splitter.reasoning_tokens > before:
                    undecided.clear()
                elif not parser.stopped:
                    records += undecided + [record]
                    undecided.clear()
            for chunk in self._chunks(split.reasoning, split.answer, parser):
                made_tool_call |= bool(chunk.tool_calls)
                if chunk.content or chunk.tool_calls:
                    chunk, records = attrs.evolve(chunk, logprobs=tuple(records)), []
                yield chunk
            if parser.stopped:
                finish = "stop"
                break
        if not parser.stopped:
            self.detokenizer.finalize()
            tail = self.splitter.feed(_remaining_text(self.detokenizer), tokens=0)
            end_split = self.splitter.finish()
            for chunk in self._chunks(tail.reasoning + end_split.reasoning, tail.answer + end_split.answer,
                                      parser, final=True):
                made_tool_call |= bool(chunk.tool_calls)
                yield chunk
            if parser.stopped:
                finish = "stop"
        if made_tool_call and finish == "stop":
            finish = "tool_calls"
        usage = Usage(self.prompt_tokens, generated, reasoning_tokens=self.splitter.reasoning_tokens)
        yield ChatChunk(finish_reason=finish, usage=usage, logprobs=tuple(records + undecided),
                        stop_sequence=self._stop if finish == "stop" else None)

    def _chunks(self, reasoning: str, answer: str, parser: AnswerParser, final: bool = False) -> Iterator[ChatChunk]:
        """The chunks of one step's split: the thought as the format shows it, then the
        answer through stop strings and tool-call spans."""
        if reasoning:
            if self.reasoning.format == "separate":
                yield ChatChunk(reasoning=reasoning)
            elif self.reasoning.format == "inline":
                # The thought as written, outside the answer's stops and tool calls.
                yield ChatChunk(content=reasoning)
        events = parser.feed(answer) if answer else []
        if final:
            events += parser.finish()
        for event in events:
            if isinstance(event, Text) and event.text:
                yield ChatChunk(content=event.text)
            elif isinstance(event, ToolText):
                # A JSON call is streamed as it is written: its name, then its arguments.
                if self._call is None:
                    self._call = JsonCallStream(_names(self.tools))
                pieces = self._call.feed(event.text)
                if pieces:
                    yield ChatChunk(tool_calls=tuple(pieces))
            elif isinstance(event, ToolSpan):
                call, self._call = self._call, None
                if call is not None and call.streamed:
                    continue
                calls = parse_tool_calls(self.tool_parser, event.text, self.tools)
                if calls:
                    yield ChatChunk(tool_calls=calls)
                else:
                    # Not a call the parser understands (or cut off by max_tokens): the
                    # client still gets the text the model wrote, markers included.
                    start, end = self.tool_markers
                    yield ChatChunk(content=f"{start}{event.text}{end if event.closed else ''}")
            elif isinstance(event, Stop):
                self._stop = event.text
                return

    def record(self, token: int, logprobs: Any) -> TokenLogprob:
        """The log-probability record of ``token`` from the step's log-softmax vector."""
        import mlx.core as mx

        vector = logprobs.reshape(-1)
        top: tuple[tuple[str, float], ...] = ()
        n = self.logprobs or 0
        if n:
            best = mx.argpartition(-vector, kth=n - 1)[:n]
            values = vector[best].tolist()
            ranked = sorted(zip(best.tolist(), values, strict=True), key=lambda p: -p[1])
            top = tuple((self.token_text(int(i)), _finite(v)) for i, v in ranked)
        return TokenLogprob(self.token_text(token), _finite(vector[token].item()), top)


def _names(tools: list[Mapping[str, Any]]) -> list[str]:
    return [str((t.get("function") or {}).get("name")) for t in tools]


def _finite(value: float) -> float:
    return value if math.isfinite(value) else LOGPROB_FLOOR


def _remaining_text(detokenizer: Any) -> str:
    """All text not yet read, after ``finalize``.

    mlx-vlm's ``last_segment`` holds back text that ends in U+FFFD (it may be half a
    UTF-8 character); at the end nothing more is coming, so take it all.
    """
    text = getattr(detokenizer, "text", None)
    offset = getattr(detokenizer, "offset", None)
    if not isinstance(text, str) or not isinstance(offset, int):
        return detokenizer.last_segment
    detokenizer.offset = len(text)
    return text[offset:]


def parse_tool_calls(tool_parser: Any, text: str, tools: list) -> tuple[ToolCall, ...]:
    if tool_parser is None:
        return ()
    try:
        parsed = tool_parser(text, tools)
    except Exception:
        # Malformed JSON / unknown function: the caller falls back to plain content.
        return ()
    items = parsed if isinstance(parsed, list) else [parsed]
    calls = []
    for item in items:
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
            return ()
        arguments = item.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        calls.append(
            ToolCall(
                id=str(item.get("id") or f"call_{uuid.uuid4().hex[:24]}"),
                name=item["name"],
                arguments=arguments,
            )
        )
    return tuple(calls)


class ThoughtCloser:
    """Logits processor: when a thought has spent its budget, force its close marker.

    Generation calls it once per step with every token so far: the first call ends with
    the prompt, each later one with the token just generated. That token's text goes to
    core's ``ThinkingBudget``; when it says so, the close marker's tokens are forced, one
    per step, by ruling out every other token.
    """

    def __init__(self, budget: ThinkingBudget, token_text: Callable[[int], str],
                 encode: Callable[[str], list[int]]) -> None:
        self.budget = budget
        self.token_text = token_text
        self.encode = encode
        self.calls = 0
        self.forcing: list[int] = []

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import mlx.core as mx

        if self.calls:
            forced = self.budget.step(self.token_text(int(tokens[-1].item())))
            if forced:
                self.forcing = list(self.encode(forced))
        self.calls += 1
        if not self.forcing:
            return logits
        token = self.forcing.pop(0)
        allowed = mx.arange(logits.shape[-1]) == token
        return mx.where(allowed, logits, mx.array(-math.inf, dtype=logits.dtype))
