"""From a ``ChatRequest`` to what the model reads, and what may constrain its answer.

- ``PromptBuilder.plan``: the GGUF's chat template rendered (``chat_template``) with the
  request's tools (given to the template, or described in a system prompt when the
  template ignores them), the grammar of a forced tool call or of ``response_format``,
  and the tool names the answer is parsed for.
- ``PromptBuilder.tokenize``: the rendered prompt's token ids. Client strings never
  become control tokens (``nexa.text.SpecialTextGuard``): the template's markup is
  tokenized with special-token parsing, a special token's text that came from a client
  as plain text.
- ``fit_context``: the one context check: the prompt must leave room to generate, and
  ``max_tokens`` is capped at that room.

Text only; the image path tokenizes through MTMD (``vision``) with the same pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import attrs

from nexa.errors import ContextLengthExceeded
from nexa.text import Shielded, SpecialTextGuard
from nexa.types import ChatRequest, Sampling
from nexa_llama_cpp.chat_template import ChatTemplate
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


class PromptBuilder:
    """One model's template, its special texts and its tokenizer, for building prompts.

    ``tokenize(text, add_bos, special)`` is the model's tokenizer (llama-cpp-python's
    ``Llama.tokenize`` over UTF-8); ``bos_text`` is the BOS token's text, which a template
    that writes it itself puts first (BOS is then not added a second time).
    """

    def __init__(
        self,
        template: ChatTemplate,
        specials: list[str],
        tokenize: Callable[[str, bool, bool], list[int]],
        bos_text: str = "",
    ) -> None:
        self.template = template
        self.guard = SpecialTextGuard(specials)
        self._tokenize = tokenize
        self.bos_text = bos_text

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
        prompt = template.render(messages, tools=template_tools, media_marker=media_marker)

        grammar = None
        if choice == "required" or named is not None:
            from nexa_llama_cpp.grammar import forced_call_gbnf

            # Our own tool prompt teaches the tagged form too.
            tagged = template.caps.tool_call_tags or not template.caps.tools
            grammar = forced_call_gbnf(tools, named, tagged=tagged)
        elif request.response_format:
            from nexa_llama_cpp.grammar import response_format_gbnf

            grammar = response_format_gbnf(request.response_format)
        names = tuple(f.get("name", "") for f in tool_functions(tools))
        return ChatPlan(prompt=prompt, shielded=shielded, grammar=grammar, tool_names=names)

    def tokenize(self, text: str, shielded: Shielded, *, at_start: bool = True) -> list[int]:
        """Token ids of rendered ``text`` (the whole prompt, or with ``at_start=False`` a
        part of it after the start: no BOS)."""
        add_bos = at_start and not (self.bos_text and text.startswith(self.bos_text))

        def markup(piece: str, first: bool) -> list[int]:
            return self._tokenize(piece, add_bos and first, True)

        def plain(piece: str, first: bool) -> list[int]:
            return self._tokenize(piece, add_bos and first, False)

        return shielded.tokenize(text, markup, plain)


def fit_context(sampling: Sampling, n_prompt: int, n_ctx: int) -> Sampling:
    """``sampling`` with ``max_tokens`` capped at the room a prompt of ``n_prompt`` tokens
    leaves in ``n_ctx``; a prompt that leaves none is the client's 400."""
    if n_prompt >= n_ctx:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {n_ctx} tokens. However, your "
            f"messages resulted in {n_prompt} tokens. Shorten the messages, or serve "
            "the model with a larger context.",
            param="messages",
        )
    room = n_ctx - n_prompt
    return attrs.evolve(sampling, max_tokens=min(sampling.max_tokens or room, room))


__all__ = ["ChatPlan", "PromptBuilder", "fit_context"]
