"""From a ``ChatRequest`` to what the model reads, and what may constrain its answer.

- ``PromptBuilder.plan``: the GGUF's chat template rendered (``chat_template``) with the
  request's tools (given to the template, or described in a system prompt when the
  template ignores them) and its reasoning switches (``nexa.reasoning.template_kwargs``),
  the thought closed for the model where thinking is off but the template did not close
  it, the grammar of a forced tool call or of ``response_format``, and the tool names the
  answer is parsed for.
- ``PromptBuilder.completion``: a legacy completion's tokens (``/v1/completions``): the
  client's text as plain text, or its token ids, or the fill-in-the-middle layout.
- ``PromptBuilder.tokenize``: the rendered prompt's token ids. Client strings never
  become control tokens (``nexa.text.SpecialTextGuard``): the template's markup is
  tokenized with special-token parsing, a special token's text that came from a client
  as plain text.
- ``fit_context``: the one context check: the prompt must leave room to generate, and
  ``max_tokens`` is capped at that room (the context itself: ``context_size``).

Text only; the image path tokenizes through MTMD (``vision``) with the same pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import attrs

from nexa.errors import BadRequest
from nexa.fim import FimTokens
from nexa.reasoning import Position, ThinkFormat, empty_thought, prompt_position, template_kwargs
from nexa.text import Shielded, SpecialTextGuard
from nexa.types import ChatRequest, CompletionRequest, Sampling
from nexa_llama_cpp.chat_template import ChatTemplate
from nexa_llama_cpp.context_size import ContextLayout
from nexa_llama_cpp.tools import describe_tools, tool_functions


@attrs.frozen
class ChatPlan:
    """A chat request made ready for the model."""

    prompt: str
    """The rendered prompt; client special texts are behind ``shielded``'s sentinels."""
    shielded: Shielded
    grammar: str | None
    """GBNF the answer must follow (a forced tool call, ``response_format``), or None."""
    tool_names: tuple[str, ...]
    """Non-empty when the answer is parsed for tool calls."""
    position: Position = "before"
    """Where the prompt leaves a thinking model (``nexa.reasoning.prompt_position``):
    ``closed`` when thinking is off; always ``before`` for a model that does not think."""


class PromptBuilder:
    """One model's template, its special texts and its tokenizer, for building prompts.

    ``tokenize(text, add_bos, special)`` is the model's tokenizer (llama-cpp-python's
    ``Llama.tokenize`` over UTF-8); ``bos_text`` is the BOS token's text, which a template
    that writes it itself puts first (BOS is then not added a second time). ``think``: the
    model's thought format, None for a model that does not think.
    """

    def __init__(
        self,
        template: ChatTemplate,
        specials: list[str],
        tokenize: Callable[[str, bool, bool], list[int]],
        bos_text: str = "",
        think: ThinkFormat | None = None,
    ) -> None:
        self.template = template
        self.guard = SpecialTextGuard(specials)
        self._tokenize = tokenize
        self.bos_text = bos_text
        self.think = think

    def plan(self, request: ChatRequest, *, media_marker: str | None = None) -> ChatPlan:
        template = self.template
        choice = request.tool_choice
        named: str | None = None
        if isinstance(choice, Mapping):  # core checked it names one of the tools
            named = choice["function"]["name"]
        tools = tuple(request.tools) if choice != "none" else ()

        shielded = self.guard.shield(request.messages, tools)
        messages = shielded.messages
        template_tools = None
        if tools:
            if template.caps.tools:
                template_tools = shielded.tools
            else:
                messages = describe_tools(messages, shielded.tools)

        grammar = None
        if choice == "required" or named is not None:
            from nexa_llama_cpp.grammar import forced_call_gbnf

            # Our own tool prompt teaches the tagged form too.
            tagged = template.caps.tool_call_tags or not template.caps.tools
            grammar = forced_call_gbnf(tools, named, tagged=tagged)
        elif request.response_format:
            from nexa_llama_cpp.grammar import response_format_gbnf

            grammar = response_format_gbnf(request.response_format)
        if grammar is not None and self.think is not None:
            # A grammar binds the output from its first token, which leaves no room for a
            # thought: thinking is switched off for this request.
            request = attrs.evolve(request, reasoning=attrs.evolve(request.reasoning, enabled=False))
        prompt = template.render(messages, tools=template_tools, media_marker=media_marker,
                                 variables=template_kwargs(request))
        position: Position = "before"
        if self.think is not None:
            position = prompt_position(self.think, prompt)
            if request.reasoning.off and position != "closed":
                # A template that can't switch thinking off: the thought is closed for it.
                prompt += empty_thought(self.think, position)
                position = "closed"
        names = tuple(f.get("name", "") for f in tool_functions(tools))
        return ChatPlan(prompt=prompt, shielded=shielded, grammar=grammar, tool_names=names, position=position)

    def tokenize(self, text: str, shielded: Shielded, *, at_start: bool = True) -> list[int]:
        """Token ids of rendered ``text`` (the whole prompt, or with ``at_start=False`` a
        part of it after the start: no BOS)."""
        add_bos = at_start and not (self.bos_text and text.startswith(self.bos_text))

        def markup(piece: str, first: bool) -> list[int]:
            return self._tokenize(piece, add_bos and first, True)

        def plain(piece: str, first: bool) -> list[int]:
            return self._tokenize(piece, add_bos and first, False)

        return shielded.tokenize(text, markup, plain)

    def completion(self, request: CompletionRequest, n_vocab: int, fim: FimTokens | None) -> list[int]:
        """A legacy completion's prompt tokens. The client's text is never parsed as control
        tokens (a token array names them where a client wants them); BOS goes first where
        the model wants one. With a ``suffix``, the fill-in-the-middle layout: prefix token,
        prompt, suffix token, suffix, middle token (``fim``; None: the model has none, a 400)."""
        fill = request.suffix is not None
        if fill and fim is None:
            raise BadRequest("this model has no fill-in-the-middle tokens", param="suffix")
        if isinstance(request.prompt, tuple):
            bad = [t for t in request.prompt if not 0 <= t < n_vocab]
            if bad:
                raise BadRequest(f"prompt token {bad[0]} is outside this model's vocabulary (0..{n_vocab - 1})",
                                 param="prompt")
            tokens = list(request.prompt)
        else:
            tokens = self._tokenize(request.prompt, not fill, False)
        if fill:
            assert fim is not None and request.suffix is not None
            bos = self._tokenize("", True, False)
            tokens = [*bos, fim.prefix, *tokens, fim.suffix, *self._tokenize(request.suffix, False, False),
                      fim.middle]
        if not tokens:
            raise BadRequest("the prompt is empty", param="prompt")
        return tokens


def fit_context(sampling: Sampling, n_prompt: int, limit: ContextLayout) -> Sampling:
    """``sampling`` with ``max_tokens`` capped at the room a prompt of ``n_prompt`` tokens
    leaves in the context; a prompt that leaves none is the client's 400, which says the
    prompt's size, the limit and why, and how to raise it."""
    if n_prompt >= limit.n_ctx:
        raise limit.refusal(n_prompt)
    room = limit.n_ctx - n_prompt
    return attrs.evolve(sampling, max_tokens=min(sampling.max_tokens or room, room))


__all__ = ["ChatPlan", "PromptBuilder", "fit_context"]
