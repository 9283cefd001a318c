"""Wire schemas of the other tasks: embeddings, image generation, rerank and speech
to text."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from litestar.datastructures import UploadFile
from litestar.openapi.spec import OpenAPIType, Reference, Schema
from litestar.params import KwargDefinition
from msgspec import UNSET, Meta, UnsetType

from nexa.server.schemas.common import _CAPS, MIN0, Float01, KeepAlive, ModelName, PositiveInt, ShortText

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


