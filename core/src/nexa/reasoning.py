"""Thinking models: which format a model thinks in, and its output split into reasoning
and answer. Backend-neutral plain Python on strings (no model library).

- ``ThinkFormat``: a model's thought markers (``<think>``/``</think>`` for Qwen3,
  DeepSeek-R1, GLM, ...) and whether the prompt itself opens the thought.
  ``detect_format`` finds it in a chat template's source; a backend may declare its own.
- ``prompt_position``: where a rendered prompt leaves the model (before a thought, inside
  one as DeepSeek-R1's template does, or after one the template already closed, as
  Qwen3's does with ``enable_thinking=false``); ``empty_thought`` is the text that closes
  the thought at once for a template that can't switch thinking off itself.
- ``template_kwargs``: what a request tells the chat template (``enable_thinking``,
  ``thinking``, ``reasoning_effort`` and the client's ``chat_template_kwargs``).
- ``ReasoningSplitter``: fed the text of each generated token, returns the reasoning and
  answer pieces that may be shown now (markers never shown partially), trims the
  whitespace around the thought, and counts reasoning tokens.
- ``ThinkingBudget``: says when a thought has used its token budget and which text the
  backend must force next to close it.

The pipeline a backend runs: the splitter first, then stop strings and tool-call parsing
on the answer only, so a ``<tool_call>`` or a stop string the model merely thinks about is
never acted on. Stop strings do not apply to the reasoning (unlike llama.cpp's server and
vLLM, which match them in the whole output): a client's stop strings delimit the answer
it reads, and a thought that mentions one must not end the answer before it starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import attrs

from nexa.text import partial_suffix
from nexa.types import ChatRequest, Reasoning

Position = Literal["before", "inside", "closed"]


@attrs.frozen
class ThinkFormat:
    """How a model marks its thought."""

    open: str = "<think>"
    """The marker that opens a thought."""
    close: str = "</think>"
    """The marker that closes it."""
    starts_inside: bool = False
    """True: every prompt already opens the thought (the model writes only its close).
    Otherwise the rendered prompt tells (``prompt_position``)."""


QWEN3 = ThinkFormat()
"""Qwen3, QwQ, GLM-4.5, SmolLM3...: the model opens ``<think>`` itself."""
DEEPSEEK_R1 = ThinkFormat(starts_inside=True)
"""DeepSeek-R1 and its distills: the generation prompt ends in ``<think>\\n``."""

KNOWN_FORMATS = (
    ThinkFormat("<seed:think>", "</seed:think>"),  # ByteDance Seed-OSS
    ThinkFormat("<|START_THINKING|>", "<|END_THINKING|>"),  # Cohere Command A Reasoning
    ThinkFormat("[THINK]", "[/THINK]"),  # Mistral Magistral
    ThinkFormat("<longcat_think>", "</longcat_think>"),
    QWEN3,
)


def detect_format(template: str | None) -> ThinkFormat | None:
    """The thought format a chat template's source writes, or None for a model that does
    not think. A template that renders a known pair of markers (to drop earlier turns'
    thoughts, or to open or close the thought in the generation prompt) thinks in them."""
    if not template:
        return None
    for fmt in KNOWN_FORMATS:
        if fmt.open in template and fmt.close in template:
            return fmt
    return None


def prompt_position(fmt: ThinkFormat, prompt: str) -> Position:
    """Where the rendered ``prompt`` leaves the model: ``inside`` a thought the prompt
    opened, after one it ``closed`` (thinking switched off by the template), or ``before``
    (the model decides whether to open one)."""
    tail = prompt.rstrip()
    if fmt.starts_inside or tail.endswith(fmt.open):
        return "inside"
    if tail.endswith(fmt.close):
        return "closed"
    return "before"


def empty_thought(fmt: ThinkFormat, position: Position) -> str:
    """Text to append to a prompt so that the answer starts at once (thinking off where
    the template did not switch it off itself): the shape Qwen3's template writes."""
    if position == "inside":
        return f"\n{fmt.close}\n\n"
    if position == "before":
        return f"{fmt.open}\n\n{fmt.close}\n\n"
    return ""


# Variables the server renders itself; a client may not set them.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "messages", "tools", "documents", "add_generation_prompt", "continue_final_message",
    "bos_token", "eos_token", "pad_token", "unk_token", "raise_exception", "strftime_now",
})


def template_kwargs(request: ChatRequest) -> dict[str, Any]:
    """The variables a chat template gets for ``request`` besides messages and tools.

    The client's ``chat_template_kwargs``, then the reasoning switches: ``enable_thinking``
    (Qwen3, GLM, SmolLM3...) and ``thinking`` (DeepSeek-V3.1, Granite) when thinking was
    switched on or off, ``reasoning_effort`` (gpt-oss) when an effort was asked for.
    """
    kwargs = dict(request.template_kwargs)
    reasoning = request.reasoning
    if reasoning.off:
        kwargs["enable_thinking"] = False
        kwargs["thinking"] = False
    elif reasoning.enabled:
        kwargs["enable_thinking"] = True
        kwargs["thinking"] = True
    if reasoning.effort and not reasoning.off:
        kwargs["reasoning_effort"] = reasoning.effort
    return kwargs


@attrs.frozen
class Split:
    """What one piece of model text turned out to be."""

    reasoning: str = ""
    """Text of the thought (as written, markers included, for a raw splitter)."""
    answer: str = ""
    """Text of the answer."""


class ReasoningSplitter:
    """Feed the text of each generated token; get back reasoning and answer text.

    A thought is recognised only at the start of the output (after whitespace), or from
    the first token when the prompt opened it (``inside``); a marker later in the answer
    is answer text. The thought's text is trimmed (no whitespace at its ends, markers
    dropped) and the whitespace between the thought and the answer is dropped. With
    ``raw`` (the ``inline`` format) nothing is dropped: the reasoning pieces are the text
    exactly as the model wrote it, markers included (and the opening marker the prompt
    wrote, so that the client sees a whole ``<think>...</think>`` block).

    ``reasoning_tokens`` counts the feeds (tokens) that belonged to the thought, markers
    included: a token fed while the thought was open, or while the output's start was
    undecided and then became a thought.
    """

    def __init__(self, fmt: ThinkFormat | None, *, inside: bool = False, raw: bool = False) -> None:
        self.fmt = fmt
        self.raw = raw
        self.state: Literal["start", "think", "answer"]
        if fmt is None:
            self.state = "answer"
        elif inside or fmt.starts_inside:
            self.state = "think"
        else:
            self.state = "start"
        self.reasoning_tokens = 0
        self._undecided = 0
        self._buffer = ""
        self._thought_begun = False  # some reasoning text was emitted (leading whitespace trimmed)
        self._trim_answer = False  # drop whitespace at the start of the answer
        self._prefix = fmt.open if raw and self.state == "think" and fmt is not None else ""

    @property
    def thinking(self) -> bool:
        """The thought is open now."""
        return self.state == "think"

    def feed(self, text: str, tokens: int = 1) -> Split:
        """The next generated text (``tokens`` tokens of it, for the count)."""
        if self.state == "think":
            self.reasoning_tokens += tokens
        elif self.state == "start":
            self._undecided += tokens
        reasoning, answer = self._drain(text, final=False)
        return Split(reasoning, answer)

    def finish(self) -> Split:
        """The output ended: what was held back."""
        reasoning, answer = self._drain("", final=True)
        return Split(reasoning, answer)

    # --- the state machine ------------------------------------------------------------

    def _drain(self, text: str, final: bool) -> tuple[str, str]:
        if self.state == "answer" and not self._buffer and not self._trim_answer:
            return "", text
        self._buffer += text
        reasoning: list[str] = []
        answer: list[str] = []
        while True:
            if self.state == "start":
                if not self._start(reasoning, answer, final):
                    break
            elif self.state == "think":
                if not self._think(reasoning, final):
                    break
            else:
                self._answer(answer)
                break
        out = "".join(reasoning)
        if out and self._prefix:
            out, self._prefix = self._prefix + out, ""
        return out, "".join(answer)

    def _start(self, reasoning: list[str], answer: list[str], final: bool) -> bool:
        assert self.fmt is not None
        head = self._buffer.lstrip()
        if head.startswith(self.fmt.open):
            lead = len(self._buffer) - len(head) + len(self.fmt.open)
            if self.raw:
                reasoning.append(self._buffer[:lead])
            self._buffer = self._buffer[lead:]
            self.state = "think"
            self.reasoning_tokens += self._undecided
            self._undecided = 0
            return True
        if not final and (not head or self.fmt.open.startswith(head)):
            return False  # may still become the opening marker
        self.state = "answer"
        self._undecided = 0
        return True

    def _think(self, reasoning: list[str], final: bool) -> bool:
        assert self.fmt is not None
        close = self.fmt.close
        at = self._buffer.find(close)
        if at != -1:
            thought = self._buffer[:at]
            if self.raw:
                reasoning.append(thought + close)
            else:
                self._emit_thought(reasoning, thought.rstrip())
                self._trim_answer = True
            self._buffer = self._buffer[at + len(close):]
            self.state = "answer"
            return True
        if final:
            ready, self._buffer = self._buffer, ""
            if not self.raw:
                ready = ready.rstrip()
        else:
            hold = partial_suffix(self._buffer, (close,))
            ready = self._buffer[: len(self._buffer) - hold]
            if not self.raw:
                # Whitespace before a possible close marker is held: it is trimmed if the
                # thought ends there.
                ready = ready.rstrip()
            self._buffer = self._buffer[len(ready):]
        if self.raw:
            reasoning.append(ready)
        else:
            self._emit_thought(reasoning, ready)
        return False

    def _emit_thought(self, reasoning: list[str], text: str) -> None:
        if not self._thought_begun:
            text = text.lstrip()
            self._thought_begun = bool(text)
        if text:
            reasoning.append(text)

    def _answer(self, answer: list[str]) -> None:
        text, self._buffer = self._buffer, ""
        if self._trim_answer:
            text = text.lstrip()
            self._trim_answer = not text
        if text:
            answer.append(text)


class ThinkingBudget:
    """Counts a generation's thinking tokens and says when the thought must be closed.

    Fed the text of every generated token (forced ones included), ``step`` returns the
    text the backend must force next (the close marker, once) when the thought is still
    open after ``budget`` reasoning tokens; None otherwise. A backend that can force
    tokens (a logits mask, or feeding them into its batch) turns that text into tokens.
    """

    def __init__(self, fmt: ThinkFormat, budget: int, *, inside: bool = False) -> None:
        self.fmt = fmt
        self.budget = budget
        self._splitter = ReasoningSplitter(fmt, inside=inside, raw=True)
        self._closed = False

    @property
    def active(self) -> bool:
        """The budget may still close the thought."""
        return self.budget >= 0 and not self._closed

    def step(self, text: str) -> str | None:
        """The text of the token just generated; returns the text to force next, or None."""
        self._splitter.feed(text)
        if self._closed or self.budget < 0 or not self._splitter.thinking:
            return None
        if self._splitter.reasoning_tokens >= self.budget:
            self._closed = True
            return f"\n{self.fmt.close}\n\n"
        return None


def reasoning_for(reasoning: Reasoning, fmt: ThinkFormat | None, position: Position) -> ReasoningSplitter:
    """The splitter a backend runs for one request: the model's format (none when it does
    not think, or when the prompt already closed the thought: a ``<think>`` then is answer
    text), started inside the thought when the prompt opened it, raw for ``inline``."""
    if position == "closed":
        fmt = None
    return ReasoningSplitter(fmt, inside=position == "inside", raw=reasoning.format == "inline")


def shown(reasoning: Reasoning, split: Split) -> tuple[str, str]:
    """(reasoning, content) of a split as the request's format shows them: ``separate``
    keeps them apart, ``inline`` puts the thought back in the content, ``hidden`` drops it."""
    if reasoning.format == "inline":
        return "", split.reasoning + split.answer
    if reasoning.format == "hidden":
        return "", split.answer
    return split.reasoning, split.answer


def declared_format(options: Mapping[str, Any]) -> ThinkFormat | None:
    """A format declared in a manifest's options (``think_open``/``think_close``/
    ``think_starts_inside``), for models whose template does not show it."""
    open_, close = options.get("think_open"), options.get("think_close")
    if isinstance(open_, str) and isinstance(close, str) and open_ and close:
        return ThinkFormat(open_, close, bool(options.get("think_starts_inside", False)))
    return None


# The constants (QWEN3, DEEPSEEK_R1, KNOWN_FORMATS, RESERVED_TEMPLATE_KWARGS) are public
# too; __all__ lists what the API reference documents.
__all__ = [
    "ReasoningSplitter",
    "Split",
    "ThinkFormat",
    "ThinkingBudget",
    "declared_format",
    "detect_format",
    "empty_thought",
    "prompt_position",
    "reasoning_for",
    "shown",
    "template_kwargs",
]
