"""Rendering a GGUF's own chat template, safely.

A GGUF carries its chat template as Jinja source written by whoever published the
file, so it is untrusted code: it is compiled in jinja2's ``ImmutableSandboxedEnvironment``
(attribute access to internals such as ``__globals__`` or ``__subclasses__`` raises
``SecurityError``; CVE-2024-34359 was llama-cpp-python rendering templates without a
sandbox). This module owns that environment, the conversion of ``ChatMessage`` values to
the dicts templates expect (HF conventions: ``tool_calls[].function.arguments`` as an
object), and what a template can do (tools, list content), found by inspecting it.
No llama_cpp import here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import attrs
import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from nexa.errors import BadRequest, ModelLoadError
from nexa.text import template_message
from nexa.types import ChatMessage

# Used when a GGUF has no template (base models): ChatML is what llama.cpp's own server
# falls back to, and it at least keeps roles apart.
CHATML_FALLBACK = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_PROBE = "\u2063nexa-probe\u2063"


class _GenerationTag(jinja2.ext.Extension):
    """Pass-through for Hugging Face's ``{% generation %}`` tag (training-only markup)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Hugging Face's tojson: no HTML escaping, unicode kept (jinja's own escapes '<').
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise BadRequest(f"the model's chat template rejected the conversation: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def sandbox() -> ImmutableSandboxedEnvironment:
    """The Jinja environment every chat template is compiled in."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
        undefined=jinja2.Undefined,
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@attrs.frozen
class TemplateCaps:
    """What a compiled template can do, found once at load."""

    tools: bool
    """It reads the ``tools`` variable (so tool definitions are rendered by it)."""
    tool_call_tags: bool
    """It talks about ``<tool_call>`` tags (Hermes/Qwen style tool calls)."""
    list_content: bool
    """It renders OpenAI-style list content (text parts) rather than only strings."""
    string_content: bool
    """It renders plain string content."""


class ChatTemplate:
    """One model's chat template, compiled in the sandbox."""

    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = ""):
        self.source = source or CHATML_FALLBACK
        self.is_fallback = not source
        self.bos_token = bos_token
        self.eos_token = eos_token
        env = sandbox()
        try:
            ast = env.parse(self.source)
            self._template = env.from_string(self.source)
        except TemplateError as exc:
            raise ModelLoadError(f"the model's chat template does not compile: {exc}") from exc
        variables = jinja2.meta.find_undeclared_variables(ast)
        self.caps = TemplateCaps(
            tools="tools" in variables,
            tool_call_tags="<tool_call>" in self.source,
            list_content=self._renders([{"role": "user", "content": [{"type": "text", "text": _PROBE}]}]),
            string_content=self._renders([{"role": "user", "content": _PROBE}]),
        )

    def _renders(self, messages: list[dict[str, Any]]) -> bool:
        try:
            return _PROBE in self._render(messages, None, True)
        except Exception:
            return False

    def _render(
        self,
        messages: list[dict[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None,
        gen: bool,
        variables: Mapping[str, Any] | None = None,
    ) -> str:
        return self._template.render(
            {
                **(variables or {}),
                "messages": messages,
                "tools": list(tools) if tools else None,
                "add_generation_prompt": gen,
                "bos_token": self.bos_token,
                "eos_token": self.eos_token,
            }
        )

    def render(
        self,
        messages: Sequence[ChatMessage],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        media_marker: str | None = None,
        variables: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt text for ``messages``, ending with the assistant's turn opener.

        Images become ``media_marker`` (the multimodal tokenizer's placeholder); a
        conversation with images on a text model is refused by the caller before this.
        ``variables``: further template variables (``enable_thinking``, a client's
        ``chat_template_kwargs``; core already refused the names set here).
        """
        dicts = [self.message_dict(m, media_marker) for m in messages]
        try:
            return self._render(dicts, tools, True, variables)
        except BadRequest:
            raise
        except SecurityError as exc:
            raise BadRequest(
                "the model's chat template tried an operation the sandbox forbids "
                f"({exc}); the template is unsafe and was not run"
            ) from exc
        except (TemplateError, TypeError, ValueError, KeyError, AttributeError) as exc:
            raise BadRequest(
                f"the model's chat template could not render this conversation: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def message_dict(self, message: ChatMessage, media_marker: str | None) -> dict[str, Any]:
        # Most GGUF templates concatenate content as a string (SmolLM2's does
        # `'...' + message['content']`), and a string is what llama.cpp's own server gives
        # them; part lists only for templates that render nothing else.
        return template_message(
            message,
            media_marker=media_marker,
            list_content=self.caps.list_content and not self.caps.string_content,
        )
