"""Anthropic Messages API wire schemas (``POST /v1/messages``, ``/v1/messages/count_tokens``).

msgspec Structs, so Litestar validates bodies against them and ``/schema`` documents the
routes. Unknown fields are ignored: agents send beta fields (``context_management``,
``container``, ``mcp_servers``...) that have no meaning for a local model. The
translation to the task-level types lives in ``nexa.server.messages_convert``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from nexa.server.schemas import MIN0, Float01, MaxTokens, ModelName, Temperature

# --- request content blocks ---------------------------------------------------------


class TextBlock(msgspec.Struct, tag="text", tag_field="type", kw_only=True):
    text: str
    cache_control: dict[str, Any] | None = None
    """Prompt-caching hint; the server's prefix cache needs none (ignored)."""
    citations: list[dict[str, Any]] | None = None


class Base64Source(msgspec.Struct, tag="base64", tag_field="type", kw_only=True):
    media_type: str
    data: str


class UrlSource(msgspec.Struct, tag="url", tag_field="type", kw_only=True):
    url: Annotated[str, Meta(min_length=1)]


class FileSource(msgspec.Struct, tag="file", tag_field="type", kw_only=True):
    file_id: str


class TextSource(msgspec.Struct, tag="text", tag_field="type", kw_only=True):
    media_type: str = "text/plain"
    data: str


class ImageBlock(msgspec.Struct, tag="image", tag_field="type", kw_only=True):
    source: Base64Source | UrlSource | FileSource
    cache_control: dict[str, Any] | None = None


class DocumentBlock(msgspec.Struct, tag="document", tag_field="type", kw_only=True):
    """Plain-text documents are read as text; PDFs and files are refused (no reader here)."""

    source: Base64Source | UrlSource | FileSource | TextSource
    title: str | None = None
    context: str | None = None
    cache_control: dict[str, Any] | None = None


class ToolUseBlock(msgspec.Struct, tag="tool_use", tag_field="type", kw_only=True):
    id: str
    name: str
    input: Any = msgspec.field(default_factory=dict)
    cache_control: dict[str, Any] | None = None


class ToolResultBlock(msgspec.Struct, tag="tool_result", tag_field="type", kw_only=True):
    tool_use_id: str
    content: str | list[TextBlock | ImageBlock | DocumentBlock] | None = None
    is_error: bool = False
    cache_control: dict[str, Any] | None = None


class ThinkingBlock(msgspec.Struct, tag="thinking", tag_field="type", kw_only=True):
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(msgspec.Struct, tag="redacted_thinking", tag_field="type", kw_only=True):
    data: str


ContentBlock = (
    TextBlock | ImageBlock | DocumentBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock
)


class MessageParam(msgspec.Struct, kw_only=True):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


# --- request options ----------------------------------------------------------------


class ToolParam(msgspec.Struct, kw_only=True):
    """A client tool (``input_schema``). A tool with a versioned ``type`` and no schema
    (``web_search_20250305``, ``bash_20250124``...) runs on Anthropic's side: skipped."""

    name: Annotated[str, Meta(min_length=1, max_length=128)]
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None
    cache_control: dict[str, Any] | None = None


class ToolChoiceAuto(msgspec.Struct, tag="auto", tag_field="type", kw_only=True):
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAny(msgspec.Struct, tag="any", tag_field="type", kw_only=True):
    disable_parallel_tool_use: bool | None = None


class ToolChoiceTool(msgspec.Struct, tag="tool", tag_field="type", kw_only=True):
    name: str
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(msgspec.Struct, tag="none", tag_field="type", kw_only=True):
    pass


ToolChoice = ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone
ThinkingDisplay = Literal["summarized", "omitted"]
"""``omitted``: thinking blocks come back without their text (the signature only)."""


class ThinkingEnabled(msgspec.Struct, tag="enabled", tag_field="type", kw_only=True):
    budget_tokens: Annotated[int, Meta(ge=1)]
    display: ThinkingDisplay | None = None


class ThinkingAdaptive(msgspec.Struct, tag="adaptive", tag_field="type", kw_only=True):
    display: ThinkingDisplay | None = None


class ThinkingBetweenTools(msgspec.Struct, tag="between_tools", tag_field="type", kw_only=True):
    display: ThinkingDisplay | None = None


class ThinkingDisabled(msgspec.Struct, tag="disabled", tag_field="type", kw_only=True):
    pass


Thinking = ThinkingEnabled | ThinkingAdaptive | ThinkingBetweenTools | ThinkingDisabled


class OutputFormat(msgspec.Struct, kw_only=True):
    type: Literal["json_schema"]
    schema: dict[str, Any]


class OutputConfig(msgspec.Struct, kw_only=True):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: OutputFormat | None = None


class Metadata(msgspec.Struct, kw_only=True):
    user_id: str | None = None


class CountTokensRequest(msgspec.Struct, kw_only=True):
    """The prompt part of a Messages request: what ``count_tokens`` measures."""

    model: ModelName
    messages: Annotated[list[MessageParam], Meta(min_length=1)]
    system: str | list[TextBlock] | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    output_format: OutputFormat | None = None
    """The structured-outputs beta's spelling of ``output_config.format``."""


class MessagesRequest(CountTokensRequest, kw_only=True):
    max_tokens: MaxTokens
    """Required, as in Anthropic's API; any value >= 1, capped at the context's room."""
    stop_sequences: Annotated[list[str], Meta(max_length=16)] | None = None
    stream: bool = False
    temperature: Temperature | None = None
    top_p: Float01 | None = None
    top_k: Annotated[int, Meta(ge=0), MIN0] | None = None
    metadata: Metadata | None = None
    """Accepted; nothing here uses a per-user id."""
    service_tier: str | None = None
    """Accepted; there is one tier."""


# --- responses ----------------------------------------------------------------------


class TextOut(msgspec.Struct, tag="text", tag_field="type", kw_only=True):
    text: str


class ThinkingOut(msgspec.Struct, tag="thinking", tag_field="type", kw_only=True):
    thinking: str
    signature: str


class ToolUseOut(msgspec.Struct, tag="tool_use", tag_field="type", kw_only=True):
    id: str
    name: str
    input: Any


class Usage(msgspec.Struct, kw_only=True):
    input_tokens: int
    """Prompt tokens computed for this request (Anthropic leaves cache reads out)."""
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    """Prompt tokens the server's prefix cache served."""


class Message(msgspec.Struct, kw_only=True):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ThinkingOut | TextOut | ToolUseOut]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None = None
    usage: Usage


class TokenCount(msgspec.Struct, kw_only=True):
    input_tokens: int


class ErrorDetail(msgspec.Struct, kw_only=True):
    type: str
    message: str


class ErrorResponse(msgspec.Struct, kw_only=True):
    type: Literal["error"] = "error"
    error: ErrorDetail
