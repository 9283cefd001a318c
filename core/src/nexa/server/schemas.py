"""OpenAI wire schemas: the JSON bodies the HTTP API accepts and returns.

msgspec Structs: request bodies are decoded into them strictly (``nexa.server.body``: a
string is never taken for a number or a boolean), and the OpenAPI document at ``/schema``
describes every endpoint truly, extension fields included. Unknown fields are ignored, as
OpenAI's clients send many optional ones. Conversion to the task-level types and the
server's configurable caps live in ``nexa.server.convert`` and ``nexa.server.limits``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from litestar.datastructures import UploadFile
from litestar.openapi.spec import OpenAPIType, Reference, Schema
from litestar.params import KwargDefinition
from msgspec import UNSET, Meta, UnsetType

from nexa.config import ServerConfig
from nexa.store import TAG_PART

# The server's default caps are part of the document (and enforced at decoding), so a
# client or fuzzer reading it knows the limits; a ServerConfig may only lower them
# (checked in ``convert``).
_CAPS = ServerConfig()



class _SchemaExtra(dict):
    """Extra OpenAPI keywords; hashable so Litestar accepts it inside a union member."""

    __hash__ = object.__hash__  # type: ignore[assignment]


# Litestar leaves out a constraint whose value is 0 (it tests the value for truth), so a
# documented ``ge=0`` has to be stated again; without it the document allows negatives.
MIN0 = KwargDefinition(schema_extra=_SchemaExtra(minimum=0))
ABOVE0 = KwargDefinition(schema_extra=_SchemaExtra(exclusive_minimum=0))
# Litestar also leaves out the constraints of a list in a union of three or more.
MAX16 = KwargDefinition(schema_extra=_SchemaExtra(max_items=16))


def documented_max_items(cap: int) -> Meta:
    """``maxItems`` in the document only: the server enforces the configured cap itself
    (``nexa.server.limits``), which ``nexa serve --limit`` may raise above the default."""
    return Meta(extra_json_schema={"extra": _SchemaExtra(max_items=cap)})


def documented_max_bytes(cap: int) -> KwargDefinition:
    """``maxProperties`` can't state a size in bytes; say it in the field's description."""
    return KwargDefinition(description=f"A JSON schema of at most {cap} bytes (the server's default cap)")

Float01 = Annotated[float, Meta(ge=0.0, le=1.0), MIN0]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
PositiveInt = Annotated[int, Meta(ge=1)]
# No upper bound: agents ask for 32k-128k; the backend caps it at the room the context
# leaves (finish reason ``length``) instead of refusing.
MaxTokens = Annotated[int, Meta(ge=1)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0), MIN0]
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
# Seconds as a string, or a Go-style duration ("5m", "1h30m", "-1s"), as Ollama takes.
DURATION_RE = rf"^[+-]?(?:{_NUMBER}|(?:{_NUMBER}(?:ns|us|µs|μs|ms|s|m|h))+)$"
_KEEP_ALIVE_TEXT = (
    "nexa extension (Ollama's field): how long the model stays loaded after this request, "
    "in seconds or as a duration (\"5m\", \"1h\"); 0 unloads it after the request, "
    "a negative value keeps it loaded"
)
# Litestar drops a string's constraints inside a union: the document states both shapes.
_KEEP_ALIVE_SCHEMA = KwargDefinition(
    schema_extra=_SchemaExtra(
        one_of=[
            Schema(type=OpenAPIType.NUMBER),
            Schema(type=OpenAPIType.STRING, max_length=64, pattern=DURATION_RE),
        ],
        type=None,
    ),
)
KeepAlive = Annotated[
    float | Annotated[str, Meta(max_length=64, pattern=DURATION_RE)],
    _KEEP_ALIVE_SCHEMA,
    Meta(description=_KEEP_ALIVE_TEXT),
]
# A model name is looked up in the store and echoed back: no control characters (C0, DEL,
# C1), and no space at either end (``"name\n"`` is refused, not quietly served as
# ``name``). Explicit ranges, not ``\s``: Python's and ECMAScript's differ (U+0085); and
# ``$(?!\n)``: Python's ``$`` also matches before a final newline, ECMAScript's doesn't.
MODEL_NAME_RE = r"^[^\x00-\x20\x7f-\x9f](?:[^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\x9f])?$(?!\n)"
ModelName = Annotated[str, Meta(min_length=1, max_length=256, pattern=MODEL_NAME_RE)]
ShortText = Annotated[str, Meta(max_length=256)]
"""Names and ids (a message's ``name``, tool call ids, ``user``)."""
StopText = Annotated[str, Meta(max_length=256), KwargDefinition(max_length=256)]


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


# --- embeddings ---------------------------------------------------------------------



EmbedText = Annotated[str, Meta(min_length=1, max_length=_CAPS.max_embed_input_chars)]
TokenId = Annotated[int, Meta(ge=0), MIN0]
TokenArray = Annotated[list[TokenId], Meta(min_length=1)]
_TEXT = Schema(type=OpenAPIType.STRING, min_length=1, max_length=_CAPS.max_embed_input_chars)
_TOKENS = Schema(type=OpenAPIType.ARRAY, items=Schema(type=OpenAPIType.INTEGER, minimum=0), min_items=1)
# msgspec allows one array type per union, so decoding accepts a mixed list and ``convert``
# rejects it; the document states the four real shapes.
_EMBED_INPUT = KwargDefinition(
    schema_extra={
        "one_of": [
            _TEXT,
            Schema(type=OpenAPIType.ARRAY, items=_TEXT, min_items=1, max_items=_CAPS.max_embed_batch),
            _TOKENS,
            Schema(type=OpenAPIType.ARRAY, items=_TOKENS, min_items=1, max_items=_CAPS.max_embed_batch),
        ],
        "type": None,
    }
)


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    model: ModelName
    # A string, a list of strings, a token array, or a list of token arrays.
    input: Annotated[
        EmbedText | Annotated[list[EmbedText | TokenId | TokenArray], Meta(min_length=1, max_length=_CAPS.max_embed_batch)],
        _EMBED_INPUT,
    ]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveInt | None = None
    user: Annotated[ShortText, Meta(description="Accepted for compatibility; not stored")] | None = None
    keep_alive: KeepAlive | None = None


class EmbeddingData(msgspec.Struct, kw_only=True):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


# --- images -------------------------------------------------------------------------


# WIDTHxHEIGHT, each side 8..2048 (the default max_image_side), no leading zeros.
_SIDE = r"(?:[89]|[1-9][0-9]|[1-9][0-9]{2}|1[0-9]{3}|20[0-3][0-9]|204[0-8])"
IMAGE_SIZE_RE = rf"^{_SIDE}x{_SIDE}$(?!\n)"


class ImageGenerationRequest(msgspec.Struct, kw_only=True):
    prompt: Annotated[str, Meta(min_length=1, max_length=10_000)]
    model: ModelName
    n: Annotated[int, Meta(ge=1, le=_CAPS.max_image_n)] = 1
    size: Annotated[str, Meta(pattern=IMAGE_SIZE_RE)] | None = None
    response_format: Literal["url", "b64_json"] = "url"
    seed: Annotated[int, Meta(ge=-(2**63), le=2**63 - 1, description=(
        "Extension: the same seed, prompt and settings give the same image"))] | None = None
    num_inference_steps: Annotated[int, Meta(ge=1, le=500, description=(
        "Extension: denoising steps (default: the model's own)"))] | None = None
    guidance_scale: Annotated[float, Meta(ge=0.0, le=50.0, description=(
        "Extension: how closely the image follows the prompt (default: the model's own)")), MIN0] | None = None
    negative_prompt: Annotated[str, Meta(max_length=10_000, description=(
        "Extension: what the image should not show"))] | None = None
    quality: Annotated[str, Meta(max_length=64, description=(
        "Accepted for compatibility with OpenAI's clients; ignored"))] | None = None
    style: Annotated[str, Meta(max_length=64, description=(
        "Accepted for compatibility with OpenAI's clients; ignored"))] | None = None
    user: Annotated[ShortText, Meta(description="Accepted for compatibility; not stored")] | None = None
    keep_alive: KeepAlive | None = None


class ImageData(msgspec.Struct, kw_only=True, omit_defaults=True):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(msgspec.Struct, kw_only=True):
    created: int
    data: list[ImageData]


# --- rerank -------------------------------------------------------------------------


# Not blank: a document or query of only whitespace has nothing to rank by. An explicit
# class, as Python's \s and JSON Schema's (ECMA) \s differ on control characters.
NOT_BLANK = r"[^ \t\n\r\f\v]"
RerankText = Annotated[str, Meta(max_length=_CAPS.max_rerank_chars, pattern=NOT_BLANK)]


class RerankDocument(msgspec.Struct, kw_only=True):
    text: RerankText


# Litestar leaves out the constraints of the string member of the items' union (and takes
# one constraint source per field): the document states them all here.
_RERANK_ITEMS = KwargDefinition(schema_extra={
    "items": Schema(one_of=[
        Schema(type=OpenAPIType.STRING, max_length=_CAPS.max_rerank_chars, pattern=NOT_BLANK),
        Reference(ref="#/components/schemas/RerankDocument"),
    ]),
    "min_items": 1,
    "max_items": _CAPS.max_rerank_documents,
})


class RerankRequest(msgspec.Struct, kw_only=True):
    """The rerank body of Jina, Cohere (v1 and v2), vLLM and llama.cpp's server."""

    model: Annotated[str, Meta(min_length=1, max_length=256)]
    query: RerankText
    # Counted in ``routes.rerank`` (none, too many) with messages that say so.
    documents: Annotated[list[RerankText | RerankDocument], _RERANK_ITEMS]
    top_n: PositiveInt | None = None
    return_documents: bool = False
    # Cohere options this server cannot honour (documents are scored whole, and refused
    # when too long): declared null-only so that sending one is a 400, never ignored.
    max_tokens_per_doc: None = None
    rank_fields: None = None
    max_chunks_per_doc: None = None


class RerankResultItem(msgspec.Struct, kw_only=True, omit_defaults=True):
    index: int
    relevance_score: float
    document: RerankDocument | UnsetType = UNSET
    """Present when the request asked for ``return_documents``."""


class RerankUsage(msgspec.Struct, kw_only=True):
    total_tokens: int


class RerankResponse(msgspec.Struct, kw_only=True):
    id: str
    model: str
    results: list[RerankResultItem]
    usage: RerankUsage


# --- speech to text -----------------------------------------------------------------


# OpenAI's diarized_json is left out: no speaker diarization here (a 400 naming the field).
TranscriptFormat = Literal["json", "text", "srt", "vtt", "verbose_json"]
Granularities = Literal["word", "segment"] | list[Literal["word", "segment"]]


class TranslationForm(msgspec.Struct, kw_only=True):
    """OpenAI's multipart form for ``/v1/audio/translations`` (speech to English text);
    ``language`` (the speech's, optional) and ``stream`` go beyond OpenAI's."""

    file: UploadFile
    model: Annotated[str, Meta(min_length=1, max_length=256)]
    language: Annotated[str, Meta(pattern=r"^[A-Za-z]{2,3}$")] | None = None
    prompt: Annotated[str, Meta(max_length=10_000)] | None = None
    temperature: Float01 | None = None
    response_format: TranscriptFormat = "json"
    stream: bool = False


class TranscriptionForm(TranslationForm, kw_only=True):
    """OpenAI's multipart form for ``/v1/audio/transcriptions``.

    ``timestamp_granularities[]`` is how OpenAI's clients name the repeated field; the
    plain name is taken too. Only with ``verbose_json`` (else a 400); ``stream`` only with
    ``json`` or ``text``.
    """

    timestamp_granularities: Granularities | None = None
    timestamp_granularities_list: Granularities | None = msgspec.field(default=None, name="timestamp_granularities[]")


class TranscriptWord(msgspec.Struct, kw_only=True):
    word: str
    start: float
    end: float


class TranscriptSegmentWire(msgspec.Struct, kw_only=True):
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


class DurationUsage(msgspec.Struct, kw_only=True):
    type: Literal["duration"] = "duration"
    seconds: int


class Transcription(msgspec.Struct, kw_only=True):
    text: str
    usage: DurationUsage


class TranscriptionVerbose(msgspec.Struct, kw_only=True, omit_defaults=True):
    task: Literal["transcribe", "translate"]
    language: str
    duration: float
    text: str
    segments: list[TranscriptSegmentWire] | UnsetType = UNSET
    words: list[TranscriptWord] | UnsetType = UNSET
    usage: DurationUsage


class TranscriptTextDelta(msgspec.Struct, kw_only=True):
    type: Literal["transcript.text.delta"] = "transcript.text.delta"
    delta: str


class TranscriptTextDone(msgspec.Struct, kw_only=True):
    type: Literal["transcript.text.done"] = "transcript.text.done"
    text: str
    usage: DurationUsage


# --- models, health, errors ---------------------------------------------------------


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    format: str
    tasks: list[str]
    size: int
    quant: str | None = None
    loaded: bool = False
    context_length: int | None = None
    """When loaded, by a backend with a fixed context: tokens one request's prompt and answer share."""
    context_reason: str | None = None
    """...and why that many (trained length, ``--ctx``, the KV cache's memory)."""
    runtime: dict[str, Any] | None = None
    """When loaded: what the model runs with (threads, KV cache size and types...)."""


class ModelList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct, kw_only=True):
    error: ErrorBody


class Health(msgspec.Struct, kw_only=True):
    status: Literal["ok"]
    version: str
    device: str
    models_loaded: list[str]


class PluginFailureWire(msgspec.Struct, kw_only=True):
    plugin: str
    stage: str
    error: str


class BackendWire(msgspec.Struct, kw_only=True):
    name: str
    plugin: str
    tasks: list[str]
    formats: list[str]
    devices: list[str]
    parallel: int
    priority: int


class PluginsReport(msgspec.Struct, kw_only=True):
    loaded: list[str]
    failed: list[PluginFailureWire]
    disabled: list[str]
    backends: list[BackendWire]


# --- management (/v1/admin) ----------------------------------------------------------
# Request bodies refuse unknown fields: a management call that silently ignored a
# misspelt setting would load or unload something else than asked.


class ResidentModel(msgspec.Struct, kw_only=True):
    model: str
    backend: str
    device: str
    state: Literal["loading", "ready", "unloading"]
    weights_bytes: int
    kv_cache_bytes: int | None = None
    context: int | None = None
    slots_busy: int
    slots_total: int
    queued: int
    keep_alive: float | None = None
    """Seconds the model stays loaded when idle; null: for good."""
    expires_in: float | None = None
    """Seconds until keep-alive unloads it; null while it will not (pinned, in use, kept for good)."""
    pinned: bool


class ResidentList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[ResidentModel]


class LoadModelRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: ModelName
    context: Annotated[int, Meta(ge=16, le=1 << 20)] | None = None
    parallel: Annotated[int, Meta(ge=1, le=256)] | None = None
    keep_alive: KeepAlive | None = None


class UnloadModelRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: ModelName
    mode: Literal["wait", "cancel"] = "wait"
    """``wait``: let in-flight requests finish; ``cancel``: stop them (their clients get an error)."""


class UnloadResult(msgspec.Struct, kw_only=True):
    model: str
    unloaded: bool
    cancelled: int
    """Requests cancelled (mode ``cancel``)."""


class PinModelRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: ModelName
    pinned: bool = True


# A repo id the Hub takes (huggingface_hub's ``validate_repo_id``: each part starts and
# ends with a letter, digit or "_", at most 96 characters, no "--", no "..", no ".git" at
# the end), ASCII only as the store names it, then an optional ``:QUANT``. Refused here,
# with the field named, rather than by the pull; ``$(?!\n)`` as in ``MODEL_NAME_RE``.
HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
PULL_RE = rf"^(?!.*\.\.)(?![^:]*--)(?![^:]*\.git(?::|$)){HUB_PART}(?:/{HUB_PART})?(?::{TAG_PART})?$(?!\n)"


class PullRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: Annotated[str, Meta(min_length=1, max_length=300, pattern=PULL_RE)]
    """``ORG/REPO`` or ``ORG/REPO:QUANT`` on the Hub."""
