"""OpenAI Responses API wire schemas (``/v1/responses``).

The request body is a msgspec Struct (validated by Litestar, documented at ``/schema``).
``input`` items and ``tools`` come in many kinds, some of them run only on OpenAI's side
(``web_search``, ``mcp``...): the body takes them as objects, and
``nexa.server.responses_convert`` reads each kind it understands with the Structs below
(a 400 names the item that does not fit) and skips the hosted ones. Unknown top-level
fields are ignored (agents send ``client_metadata`` and the like).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from nexa.server.schemas import Float01, MaxTokens, ModelName, PositiveInt, Temperature

# --- input items --------------------------------------------------------------------


class InputText(msgspec.Struct, tag="input_text", tag_field="type", kw_only=True):
    text: str


class InputImage(msgspec.Struct, tag="input_image", tag_field="type", kw_only=True):
    image_url: str | None = None
    file_id: str | None = None
    detail: str | None = None


class InputFile(msgspec.Struct, tag="input_file", tag_field="type", kw_only=True):
    file_id: str | None = None
    file_data: str | None = None
    filename: str | None = None
    file_url: str | None = None


class OutputText(msgspec.Struct, tag="output_text", tag_field="type", kw_only=True):
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class Refusal(msgspec.Struct, tag="refusal", tag_field="type", kw_only=True):
    refusal: str


class MessageItem(msgspec.Struct, kw_only=True):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText | InputImage | InputFile | OutputText | Refusal]
    id: str | None = None
    status: str | None = None
    phase: str | None = None


class FunctionCallItem(msgspec.Struct, kw_only=True):
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str = ""
    namespace: str | None = None
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(msgspec.Struct, kw_only=True):
    type: Literal["function_call_output"] = "function_call_output"
    call_id: str
    output: str | list[InputText | InputImage | InputFile]
    id: str | None = None
    status: str | None = None


class CustomToolCallItem(msgspec.Struct, kw_only=True):
    type: Literal["custom_tool_call"] = "custom_tool_call"
    call_id: str
    name: str
    input: str = ""
    namespace: str | None = None
    id: str | None = None
    status: str | None = None


class CustomToolCallOutputItem(msgspec.Struct, kw_only=True):
    type: Literal["custom_tool_call_output"] = "custom_tool_call_output"
    call_id: str
    output: str | list[InputText | InputImage | InputFile]
    id: str | None = None


class ReasoningItem(msgspec.Struct, kw_only=True):
    type: Literal["reasoning"] = "reasoning"
    id: str | None = None
    summary: list[Any] = msgspec.field(default_factory=list)
    content: list[Any] | None = None
    encrypted_content: str | None = None
    status: str | None = None


ITEM_TYPES: dict[str, type[msgspec.Struct]] = {
    "message": MessageItem,
    "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutputItem,
    "custom_tool_call": CustomToolCallItem,
    "custom_tool_call_output": CustomToolCallOutputItem,
    "reasoning": ReasoningItem,
}
"""The input item kinds that reach the model (``type`` absent means ``message``)."""

# --- tools --------------------------------------------------------------------------


class FunctionTool(msgspec.Struct, kw_only=True):
    type: Literal["function"] = "function"
    name: Annotated[str, Meta(min_length=1, max_length=128)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    defer_loading: bool | None = None


class CustomTool(msgspec.Struct, kw_only=True):
    type: Literal["custom"] = "custom"
    name: Annotated[str, Meta(min_length=1, max_length=128)]
    description: str | None = None
    format: dict[str, Any] | None = None
    """``{"type": "text"}`` or ``{"type": "grammar", "syntax": ..., "definition": ...}``."""
    defer_loading: bool | None = None


class NamespaceTool(msgspec.Struct, kw_only=True):
    type: Literal["namespace"] = "namespace"
    name: Annotated[str, Meta(min_length=1, max_length=128)]
    description: str | None = None
    tools: list[dict[str, Any]]


# --- request ------------------------------------------------------------------------


class TextFormat(msgspec.Struct, kw_only=True):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None


class TextConfig(msgspec.Struct, kw_only=True):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    """Accepted; a hint for OpenAI's models that local ones do not take."""


class ReasoningConfig(msgspec.Struct, kw_only=True):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    """Accepted; reasoning comes back whole (``reasoning_text``), never summarised."""
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(msgspec.Struct, kw_only=True):
    model: ModelName
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: PositiveInt | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: Float01 | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    include: list[str] | None = None
    prompt_cache_key: str | None = None
    """Accepted; the backend's prefix cache finds shared prefixes by itself."""
    metadata: dict[str, str] | None = None
    store: bool = True
    stream: bool = False
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    service_tier: str | None = None


# --- response -----------------------------------------------------------------------


class InputTokensDetails(msgspec.Struct, kw_only=True):
    cached_tokens: int = 0


class OutputTokensDetails(msgspec.Struct, kw_only=True):
    reasoning_tokens: int = 0


class ResponseUsage(msgspec.Struct, kw_only=True):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(msgspec.Struct, kw_only=True):
    reason: Literal["max_output_tokens"]


class ResponseError(msgspec.Struct, kw_only=True):
    code: str
    message: str


class ResponseObject(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    max_tool_calls: int | None = None
    model: str
    output: list[dict[str, Any]]
    """Output items: ``reasoning``, ``message``, ``function_call``, ``custom_tool_call``."""
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: dict[str, Any] = msgspec.field(default_factory=dict)
    store: bool = True
    temperature: float = 1.0
    text: dict[str, Any] = msgspec.field(default_factory=dict)
    tool_choice: Any = "auto"
    tools: list[dict[str, Any]] = msgspec.field(default_factory=list)
    top_p: float = 1.0
    truncation: str = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    prompt_cache_key: str | None = None


class DeletedResponse(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True
