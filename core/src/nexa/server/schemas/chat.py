"""Wire schemas of chat completions and legacy text completions: requests, answers,
stream chunks, log-probabilities and usage."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from litestar.openapi.spec import OpenAPIType, Schema
from litestar.params import KwargDefinition
from msgspec import UNSET, Meta, UnsetType

from nexa.server.schemas.common import (
    _CAPS,
    ABOVE0,
    MAX16,
    MIN0,
    Float01,
    KeepAlive,
    MaxTokens,
    ModelName,
    Penalty,
    Seed,
    ShortText,
    StopText,
    Temperature,
    _SchemaExtra,
    documented_max_bytes,
    documented_max_items,
)

# --- chat ---------------------------------------------------------------------------


class ImageUrl(msgspec.Struct, kw_only=True):
    url: Annotated[str, Meta(min_length=1, description=(
        "A data: URI (base64), a local path under the server's media folders, or http(s) "
        "when the server allows it. PNG, JPEG, WebP or GIF (first frame)"))]
    detail: Annotated[Literal["auto", "low", "high"], Meta(
        description="Accepted for compatibility; the model sees the image at its own resolution")] | None = None


class TextContentPart(msgspec.Struct, tag="text", tag_field="type", kw_only=True):
    text: str


class ImageContentPart(msgspec.Struct, tag="image_url", tag_field="type", kw_only=True):
    image_url: ImageUrl


ContentPart = TextContentPart | ImageContentPart


class FunctionCall(msgspec.Struct, kw_only=True):
    name: ShortText
    arguments: str = ""


class ToolCallWire(msgspec.Struct, kw_only=True):
    id: ShortText = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(msgspec.Struct, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: ShortText | None = None
    tool_calls: list[ToolCallWire] | None = None
    tool_call_id: ShortText | None = None
    function_call: FunctionCall | None = None
    """An assistant turn's call in the deprecated ``functions`` style."""
    reasoning_content: str | None = None
    """An earlier assistant turn's reasoning, sent back; the chat template decides
    whether it belongs in the prompt."""


class FunctionDef(msgspec.Struct, kw_only=True):
    name: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$(?!\n)")]
    description: str | None = None
    parameters: Annotated[dict[str, Any], documented_max_bytes(_CAPS.max_schema_bytes)] | None = None
    strict: Annotated[bool, Meta(description=(
        "Accepted; arguments always follow `parameters` when the call is forced by `tool_choice`"))] | None = None


class Tool(msgspec.Struct, kw_only=True):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(msgspec.Struct, kw_only=True):
    name: str


class NamedToolChoice(msgspec.Struct, kw_only=True):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaSpec(msgspec.Struct, kw_only=True):
    name: ShortText = "response"
    schema: Annotated[dict[str, Any], documented_max_bytes(_CAPS.max_schema_bytes), Meta(
        description="The JSON schema the answer follows; absent or null: any JSON object")] | None = None
    strict: Annotated[bool, Meta(description="Accepted; the answer always follows the schema")] | None = None
    description: str | None = None


class ResponseFormat(msgspec.Struct, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Annotated[JsonSchemaSpec, Meta(
        description="With type json_schema; absent or null means any JSON object")] | None = None


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False
    include_obfuscation: bool | None = None
    """Accepted and ignored: a loopback server has no side channel to pad against."""


# The unknown-field policy (docs/reasoning.md), one rule for every route: fields outside
# OpenAI's spec are ignored, as clients send vendor extensions (msgspec drops unknown
# fields); the OpenAI fields below marked "accepted and ignored" change nothing here; the
# ones marked "400 unless default" are refused when set (``nexa.server.chat_options``);
# every other field is honoured.
LogitBias = Annotated[
    dict[Annotated[str, Meta(pattern=r"^[0-9]{1,9}$")], Annotated[float, Meta(ge=-100.0, le=100.0)]],
    Meta(max_length=1024),
]
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
Effort3 = Literal["low", "medium", "high"]


class ChatCompletionRequest(msgspec.Struct, kw_only=True):
    model: ModelName
    messages: Annotated[list[Message], Meta(min_length=1), documented_max_items(_CAPS.max_messages)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: Float01 | None = None
    top_k: Annotated[int, Meta(ge=0, description="Extension: sample from the k likeliest tokens (0: off)"),
                     MIN0] | None = None
    min_p: Annotated[float, Meta(ge=0.0, le=1.0, description=(
        "Extension: drop tokens less likely than min_p times the likeliest (0: off)")), MIN0] | None = None
    seed: Seed | None = None
    stop: StopText | Annotated[list[StopText], Meta(max_length=16), MAX16] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    # Multiplicative: 0 would divide by zero in llama.cpp and MLX alike.
    repeat_penalty: Annotated[float, Meta(gt=0.0, le=10.0, description=(
        "Extension (llama.cpp's): divide the odds of tokens already seen (1: off)")), ABOVE0] | None = None
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=10.0, description=(
        "Extension: the same as repeat_penalty (the Hugging Face name)")), ABOVE0] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: Annotated[list[Tool], documented_max_items(_CAPS.max_tools)] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: Annotated[bool, Meta(description=(
        "false: at most one tool call in the answer (later ones are dropped)"))] | None = None
    functions: Annotated[list[FunctionDef], Meta(min_length=1, max_length=128)] | None = None
    """Deprecated form of ``tools``; the answer then carries ``function_call``."""
    function_call: Literal["none", "auto"] | NamedFunction | None = None
    """Deprecated form of ``tool_choice``."""
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20), MIN0] | None = None
    logit_bias: LogitBias | None = None
    # Thinking models (docs/reasoning.md): OpenAI's switch, vLLM's and llama.cpp's
    # template variables, Ollama's, and nexa's own format and budget.
    reasoning_effort: ReasoningEffort | None = None
    chat_template_kwargs: Annotated[dict[str, Any], Meta(max_length=64)] | None = None
    think: bool | Effort3 | None = None
    reasoning_format: Literal["separate", "inline", "hidden"] | None = None
    reasoning_budget: Annotated[int, Meta(ge=-1)] | None = None
    n: Annotated[int, Meta(ge=1, le=1, description="only 1 is supported")] = 1
    # 400 unless default: the schema admits only the default, so the document says so.
    audio: Annotated[None, Meta(description="audio output is not supported (null only)")] = None
    modalities: Annotated[list[Literal["text"]], Meta(min_length=1, max_length=1,
                                                      description='only ["text"]')] | None = None
    prediction: Annotated[None, Meta(description="predicted outputs are not supported (null only)")] = None
    web_search_options: Annotated[None, Meta(description="web search is not supported (null only)")] = None
    # Accepted and ignored.
    user: Annotated[ShortText, Meta(description="Accepted for compatibility; not stored")] | None = None
    keep_alive: KeepAlive | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class TopLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobWire(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(msgspec.Struct, kw_only=True):
    content: list[TokenLogprobWire] | None
    refusal: list[TokenLogprobWire] | None = None


class ChoiceMessage(msgspec.Struct, kw_only=True):
    role: str = "assistant"
    content: str | None = None
    reasoning_content: str | UnsetType = UNSET
    """The model's reasoning (thinking models, format ``separate``); absent when none."""
    tool_calls: list[ToolCallWire] | None = None
    function_call: FunctionCall | UnsetType = UNSET
    """The call, when the request used the deprecated ``functions``."""


class Choice(msgspec.Struct, kw_only=True):
    index: int
    message: ChoiceMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class CompletionTokensDetails(msgspec.Struct, kw_only=True):
    reasoning_tokens: int = 0
    """Of ``completion_tokens``, those spent thinking."""


class PromptTokensDetails(msgspec.Struct, kw_only=True):
    cached_tokens: int = 0


class UsageWire(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    """Every generated token, reasoning included."""
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails | UnsetType = UNSET
    prompt_tokens_details: PromptTokensDetails | UnsetType = UNSET


class ChatCompletion(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: UsageWire
    system_fingerprint: str | None = None


# One event of a streamed chat (``stream: true``): absent delta fields are left out, as
# OpenAI's are; ``usage`` is present (null until the last event) only with
# ``stream_options.include_usage``.


class FunctionCallDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str | UnsetType = UNSET
    arguments: str | UnsetType = UNSET


class FunctionCallDeltaLegacy(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str | UnsetType = UNSET
    arguments: str | UnsetType = UNSET


class ToolCallDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    index: int
    id: str | UnsetType = UNSET
    type: Literal["function"] | UnsetType = UNSET
    function: FunctionCallDelta


class ChunkDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: Literal["assistant"] | UnsetType = UNSET
    content: str | UnsetType = UNSET
    reasoning_content: str | UnsetType = UNSET
    tool_calls: list[ToolCallDelta] | UnsetType = UNSET
    function_call: FunctionCallDeltaLegacy | UnsetType = UNSET


class ChunkChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    delta: ChunkDelta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: UsageWire | None | UnsetType = UNSET


# --- legacy text completions -------------------------------------------------------


_EXCLUSIVE0 = KwargDefinition(schema_extra=_SchemaExtra(exclusive_minimum=0))
CompletionPromptItem = str | Annotated[int, Meta(ge=0), MIN0] | Annotated[list[Annotated[int, Meta(ge=0)]], Meta(min_length=1)]
# As for embeddings' input: the four real shapes, stated for the document.
MAX_PROMPTS = 16
"""Prompts in one legacy completion body (a list of strings or of token arrays; one token
array is one prompt of any length). Checked by ``convert.completion_requests``: the one
list type msgspec decodes can't tell a token array from a list of prompts."""
_PROMPT_TOKENS = Schema(type=OpenAPIType.ARRAY, items=Schema(type=OpenAPIType.INTEGER, minimum=0), min_items=1)
_PROMPT = KwargDefinition(
    schema_extra={
        "one_of": [
            Schema(type=OpenAPIType.STRING),
            Schema(type=OpenAPIType.ARRAY, items=Schema(type=OpenAPIType.STRING), min_items=1, max_items=MAX_PROMPTS),
            _PROMPT_TOKENS,
            Schema(type=OpenAPIType.ARRAY, items=_PROMPT_TOKENS, min_items=1, max_items=MAX_PROMPTS),
        ],
        "type": None,
    }
)


class CompletionRequest(msgspec.Struct, kw_only=True):
    model: Annotated[str, Meta(min_length=1, max_length=256)]
    # A string, a list of strings, a token array, or a list of token arrays (``convert``
    # refuses mixed lists: msgspec allows one array type per union).
    prompt: Annotated[str | Annotated[list[CompletionPromptItem], Meta(min_length=1)], _PROMPT]
    suffix: str | None = None
    max_tokens: MaxTokens | None = 16
    temperature: Temperature | None = None
    top_p: Float01 | None = None
    top_k: Annotated[int, Meta(ge=0), MIN0] | None = None
    min_p: Float01 | None = None
    seed: Seed | None = None
    stop: str | Annotated[list[str], Meta(max_length=16), MAX16] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    # Multiplicative: 0 would divide by zero (see ``convert``).
    repeat_penalty: Annotated[float, Meta(gt=0.0, le=10.0), _EXCLUSIVE0] | None = None
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=10.0), _EXCLUSIVE0] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    logprobs: Annotated[int, Meta(ge=0, le=5), MIN0] | None = None
    logit_bias: LogitBias | None = None
    n: Annotated[int, Meta(ge=1, le=1, description="only 1 is supported")] = 1
    best_of: Annotated[int, Meta(ge=1, le=1, description="only 1 is supported")] | None = None
    user: str | None = None
    keep_alive: KeepAlive | None = None


class CompletionLogprobs(msgspec.Struct, kw_only=True):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(msgspec.Struct, kw_only=True):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class TextCompletion(msgspec.Struct, kw_only=True):
    """A completion, whole or (with ``stream: true``) one event of it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageWire | None | UnsetType = UNSET
    system_fingerprint: str | None = None


