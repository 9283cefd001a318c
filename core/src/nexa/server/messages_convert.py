"""Anthropic Messages <-> task-level types: a thin translation at the edge.

A Messages body becomes the same ``ChatRequest`` (``Sampling``, ``Reasoning``, OpenAI-style
tools) that chat completions produce for the same conversation, so both render the same
prompt and share the backend's prefix cache. An answer (``Collected``) becomes a
``Message`` with thinking, text and tool_use blocks.

Mapping choices:
- ``system`` blocks are joined with blank lines; a block starting with
  ``x-anthropic-billing-header:`` (a per-request nonce a coding agent sends) is dropped,
  or no two requests would share a prefix.
- ``tool_result`` blocks become ``tool`` messages (before the user's other blocks, as
  Anthropic orders them); images inside one follow as a user message, as only user
  turns carry images. ``is_error`` results are marked ``Error:``.
- ``thinking`` blocks sent back are dropped: chat templates render past turns without
  their reasoning.
- ``tool_choice`` auto/any/tool/none -> auto/required/the named function/none;
  ``disable_parallel_tool_use`` keeps the first call only.
- ``thinking`` enabled -> ``Reasoning(enabled=True, budget=budget_tokens)``, adaptive and
  between_tools -> enabled with no budget (a local template has no finer switch), disabled
  -> off; ``output_config.effort`` -> ``Reasoning.effort``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from typing import Any

import attrs

from nexa.config import ServerConfig
from nexa.errors import BadRequest
from nexa.server import messages_wire as wire
from nexa.server.answer import Collected
from nexa.server.limits import check_chat, check_count
from nexa.server.media import fetch_image
from nexa.types import ChatMessage, ChatRequest, ContentPart, ImagePart, Reasoning, Sampling, TextPart, ToolCall, Usage

BILLING_HEADER = "x-anthropic-billing-header:"


@attrs.frozen
class MessagesTask:
    """What a Messages body asks for, in task-level terms."""

    chat: ChatRequest
    """Its ``max_tool_calls`` is 1 with ``disable_parallel_tool_use``."""
    show_thinking: bool = True
    """False with ``thinking.display: "omitted"``: thinking blocks carry no text."""


def messages_task(body: wire.CountTokensRequest, config: ServerConfig) -> MessagesTask:
    """The task for a Messages (or count_tokens) body; fetches images (blocking: call off the loop)."""
    check_count(body.messages, config.max_messages, "messages", "messages", "max_messages")
    images = _ImageBudget(config)
    messages: list[ChatMessage] = []
    system = system_text(body.system)
    if system:
        messages.append(ChatMessage("system", system))
    for i, message in enumerate(body.messages):
        messages.extend(_messages(message, images, f"messages[{i}]"))
    tools = tuple(
        {
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description or "",
                "parameters": t.input_schema or {"type": "object", "properties": {}},
            },
        }
        for t in body.tools or ()
        if t.input_schema is not None or t.type in (None, "custom")
    )
    tool_choice, max_tool_calls = _tool_choice(body.tool_choice, tools)
    thinking = body.thinking
    sampling = Sampling()
    if isinstance(body, wire.MessagesRequest):
        sampling = Sampling(
            max_tokens=body.max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            stop=tuple(body.stop_sequences or ()),
        )
    chat = ChatRequest(
        messages=messages,
        sampling=sampling,
        tools=tools,
        tool_choice=tool_choice,
        response_format=_response_format(body),
        reasoning=_reasoning(thinking, body.output_config),
        max_tool_calls=max_tool_calls,
        model=body.model,
    )
    check_chat(chat, config, tool_schema="tools[{i}].input_schema", response_schema="output_config.format.schema")
    omitted = getattr(thinking, "display", None) == "omitted"
    return MessagesTask(chat, show_thinking=not omitted)


def system_text(system: str | list[wire.TextBlock] | None) -> str:
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    return "\n\n".join(b.text for b in system if not b.text.lstrip().startswith(BILLING_HEADER))


class _ImageBudget:
    """Fetches images through the server's media policy, at most ``max_images_per_request``."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.count = 0

    def fetch(self, block: wire.ImageBlock) -> ImagePart:
        self.count += 1
        if self.count > self.config.max_images_per_request:
            raise BadRequest(f"at most {self.config.max_images_per_request} images per request", param="messages")
        source = block.source
        if isinstance(source, wire.Base64Source):
            return fetch_image(f"data:{source.media_type};base64,{source.data}", self.config)
        if isinstance(source, wire.UrlSource):
            return fetch_image(source.url, self.config)
        raise BadRequest("image blocks with a file source are not supported here (send base64 or a URL)",
                         param="messages", code="unsupported_content")


def _document_text(block: wire.DocumentBlock, where: str) -> str:
    if not isinstance(block.source, wire.TextSource):
        raise BadRequest(f"{where}: only plain-text document blocks are supported here (no PDF or file reader)",
                         param="messages", code="unsupported_content")
    head = "\n".join(x for x in (block.title, block.context) if x)
    return f"{head}\n{block.source.data}" if head else block.source.data


def _parts(blocks: list[Any], images: _ImageBudget, where: str) -> list[ContentPart]:
    parts: list[ContentPart] = []
    for block in blocks:
        if isinstance(block, wire.TextBlock):
            parts.append(TextPart(block.text))
        elif isinstance(block, wire.ImageBlock):
            parts.append(images.fetch(block))
        elif isinstance(block, wire.DocumentBlock):
            parts.append(TextPart(_document_text(block, where)))
    return parts


def _content(parts: list[ContentPart]) -> str | tuple[ContentPart, ...]:
    # Text only: a plain string, as chat completions sends it, so both render alike.
    if all(isinstance(p, TextPart) for p in parts):
        return "".join(p.text for p in parts if isinstance(p, TextPart))
    return tuple(parts)


def _messages(message: wire.MessageParam, images: _ImageBudget, where: str) -> list[ChatMessage]:
    if isinstance(message.content, str):
        return [ChatMessage(message.role, message.content)]
    if message.role == "assistant":
        text: list[str] = []
        calls: list[ToolCall] = []
        for block in message.content:
            if isinstance(block, wire.TextBlock):
                text.append(block.text)
            elif isinstance(block, wire.ToolUseBlock):
                calls.append(ToolCall(block.id, block.name, json.dumps(block.input, ensure_ascii=False)))
            elif isinstance(block, wire.ThinkingBlock | wire.RedactedThinkingBlock):
                continue
            else:
                raise BadRequest(f"{where}: {_kind(block)} blocks are only accepted in user messages", param="messages")
        return [ChatMessage("assistant", "".join(text) or (None if calls else ""), tool_calls=tuple(calls))]
    out: list[ChatMessage] = []
    after: list[ContentPart] = []
    user: list[ContentPart] = []
    for block in message.content:
        if isinstance(block, wire.ToolResultBlock):
            content = block.content
            parts = [TextPart(content)] if isinstance(content, str) else _parts(content or [], images, where)
            result = "".join(p.text for p in parts if isinstance(p, TextPart))
            out.append(ChatMessage("tool", f"Error: {result}" if block.is_error else result,
                                   tool_call_id=block.tool_use_id))
            after.extend(p for p in parts if isinstance(p, ImagePart))
        elif isinstance(block, wire.ToolUseBlock | wire.ThinkingBlock | wire.RedactedThinkingBlock):
            raise BadRequest(f"{where}: {_kind(block)} blocks are only accepted in assistant messages",
                             param="messages")
        else:
            user.extend(_parts([block], images, where))
    if after:
        user = [TextPart("(images from the tool results above)"), *after, *user]
    if user or not out:
        out.append(ChatMessage("user", _content(user)))
    return out


def _kind(block: Any) -> str:
    return type(block).__struct_config__.tag


def _tool_choice(choice: wire.ToolChoice | None, tools: tuple[dict[str, Any], ...]) -> tuple[Any, int | None]:
    if choice is None:
        return None, None
    if isinstance(choice, wire.ToolChoiceNone):
        return "none", None
    single = 1 if choice.disable_parallel_tool_use else None
    if isinstance(choice, wire.ToolChoiceAuto):
        return "auto", single
    kind = "any" if isinstance(choice, wire.ToolChoiceAny) else "tool"
    if not tools:
        raise BadRequest(f"tool_choice {kind!r} needs tools", param="tool_choice")
    if isinstance(choice, wire.ToolChoiceAny):
        return "required", single
    if choice.name not in {t["function"]["name"] for t in tools}:
        raise BadRequest(f"tool_choice names {choice.name!r}, which is not in tools", param="tool_choice.name")
    return {"type": "function", "function": {"name": choice.name}}, single


def _reasoning(thinking: wire.Thinking | None, output: wire.OutputConfig | None) -> Reasoning:
    effort = output.effort if output is not None else None
    if thinking is None:
        return Reasoning(effort=effort)
    if isinstance(thinking, wire.ThinkingDisabled):
        return Reasoning(enabled=False, budget=0)
    if isinstance(thinking, wire.ThinkingEnabled):
        return Reasoning(enabled=True, effort=effort, budget=thinking.budget_tokens)
    return Reasoning(enabled=True, effort=effort)


def _response_format(body: wire.CountTokensRequest) -> dict[str, Any] | None:
    fmt = body.output_config.format if body.output_config is not None else None
    fmt = fmt or body.output_format
    if fmt is None:
        return None
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt.schema}}


# --- answers ------------------------------------------------------------------------


def signature(thinking: str) -> str:
    """The ``signature`` every thinking block carries: a digest of its text. Clients only
    pass it back; nothing here checks it (thinking sent back is not rendered)."""
    return base64.b64encode(hashlib.sha256(thinking.encode()).digest()).decode("ascii")


def tool_input(arguments: str) -> Any:
    """A tool call's JSON arguments as Anthropic's ``input`` object (text that is not a
    JSON object is kept under ``input``, never dropped)."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return {"input": arguments}
    return value if isinstance(value, dict) else {"input": value}


def call_id(call: ToolCall) -> str:
    return call.id or f"toolu_{uuid.uuid4().hex[:24]}"


def stop_reason(answer: Collected) -> str:
    if answer.tool_calls:
        return "tool_use"
    if answer.finish_reason == "length":
        return "max_tokens"
    if answer.stop_sequence is not None:
        return "stop_sequence"
    return "end_turn"


def usage_out(usage: Usage) -> wire.Usage:
    return wire.Usage(
        input_tokens=max(0, usage.prompt_tokens - usage.cached_tokens),
        output_tokens=usage.completion_tokens,
        cache_read_input_tokens=usage.cached_tokens,
    )


def message_out(answer: Collected, message_id: str, model: str, show_thinking: bool) -> wire.Message:
    content: list[wire.ThinkingOut | wire.TextOut | wire.ToolUseOut] = []
    if answer.reasoning:
        shown = answer.reasoning if show_thinking else ""
        content.append(wire.ThinkingOut(thinking=shown, signature=signature(answer.reasoning)))
    if answer.content or not (answer.tool_calls or content):
        content.append(wire.TextOut(text=answer.content))
    content.extend(wire.ToolUseOut(id=call_id(c), name=c.name, input=tool_input(c.arguments)) for c in answer.tool_calls)
    return wire.Message(
        id=message_id,
        model=model,
        content=content,
        stop_reason=stop_reason(answer),  # type: ignore[arg-type]
        stop_sequence=answer.stop_sequence,
        usage=usage_out(answer.usage),
    )
