"""Requests and results of the tasks besides chat: embeddings, image generation, rerank
and speech to text. Frozen attrs values like those of ``nexa.types``, which re-exports them
(``from nexa.types import RerankRequest`` works); backends receive them already validated.
"""

from __future__ import annotations

import attrs

# --- embeddings ---------------------------------------------------------------------


@attrs.frozen
class EmbedRequest:
    """One ``/v1/embeddings`` call: a batch of inputs, already checked against the
    server's caps (batch size, input length)."""

    inputs: tuple[str | tuple[int, ...], ...] = attrs.field(converter=tuple)
    """Non-empty texts, or non-empty arrays of non-negative token ids (OpenAI's token
    input); a backend checks ids against its vocabulary or refuses them (``BadRequest``,
    ``param="input"``)."""
    model: str = ""
    """The ``model`` string the client sent."""


@attrs.frozen
class EmbedResult:
    """The vectors of one ``EmbedRequest``. The server applies ``dimensions`` (truncate and
    renormalise) and ``encoding_format`` itself."""

    vectors: tuple[tuple[float, ...], ...]
    """One L2-normalised vector per input, in input order."""
    prompt_tokens: int
    """Tokens of all inputs together (reported as ``usage``)."""


# --- images -------------------------------------------------------------------------


@attrs.frozen
class ImageRequest:
    """One ``/v1/images/generations`` call, already checked against the server's caps."""

    prompt: str
    """What to draw."""
    n: int = 1
    """How many images."""
    width: int | None = None
    """None: the model's native resolution (the request named no ``size``)."""
    height: int | None = None
    """None: the model's native resolution."""
    seed: int | None = None
    """None: random; the same seed, prompt and settings give the same images."""
    steps: int | None = None
    """Denoising steps; None: the model's default."""
    guidance_scale: float | None = None
    """Classifier-free guidance strength; None: the model's default."""
    negative_prompt: str | None = None
    """What the image should not show."""
    model: str = ""
    """The ``model`` string the client sent."""


@attrs.frozen
class ImageResult:
    """The images of one ``ImageRequest``; the server turns them into URLs or base64."""

    images: tuple[bytes, ...]
    """PNG files, one per requested image."""
    seed: int | None = None
    """The seed used, when the backend knows it; for logs and tests (OpenAI's image
    response has no seed, so clients never see it)."""


# --- rerank -------------------------------------------------------------------------


@attrs.frozen
class RerankRequest:
    """Documents to score against one query, as a backend sees it (already checked)."""

    query: str
    """The text documents are scored against."""
    documents: tuple[str, ...] = attrs.field(converter=tuple)
    """Non-empty texts, in the client's order; scored together in batches, never one by one."""
    model: str = ""
    """The model name the client asked for."""


@attrs.frozen
class RerankResult:
    """One ``RerankRequest``'s scores, as a backend returns them."""

    scores: tuple[float, ...]
    """One relevance score per document, in document order; higher is more relevant. A
    cross-encoder returns the sigmoid of its logit (0..1), a bi-encoder the cosine
    similarity of query and document (-1..1). The core sorts, ties broken by index."""
    prompt_tokens: int
    """Tokens the model read, special tokens included."""


# --- speech to text -----------------------------------------------------------------

SAMPLE_RATE = 16_000
"""Samples per second of the audio every transcription backend receives (Whisper's rate)."""


@attrs.frozen
class Audio:
    """Decoded speech: mono 32-bit float PCM (little-endian) at ``SAMPLE_RATE``.

    The server has already decoded the uploaded file (wav, mp3, flac, ogg, m4a...) and
    checked its size and duration; a backend never receives a file or a path.
    ``numpy.frombuffer(audio.samples, "<f4")`` gives the array Whisper runtimes take.
    """

    samples: bytes = attrs.field(repr=lambda d: f"<{len(d) // 4} samples>")
    """Little-endian float32 samples in -1..1, one channel."""
    sample_rate: int = SAMPLE_RATE
    """Samples per second (always ``SAMPLE_RATE`` from the server)."""

    @property
    def duration(self) -> float:
        """Seconds of audio."""
        return len(self.samples) / 4 / self.sample_rate


@attrs.frozen
class TranscribeRequest:
    """One transcription (or translation into English), as a backend sees it."""

    audio: Audio
    """The speech, decoded and checked by the server."""
    language: str | None = None
    """ISO 639-1 code of the speech (``en``); None: the model detects it."""
    prompt: str | None = None
    """Text that precedes the audio (spellings, style); plain text, never control tokens."""
    temperature: float = 0.0
    """0: greedy, falling back to higher temperatures when decoding fails (as OpenAI's
    Whisper does); above 0: sample at exactly this temperature."""
    translate: bool = False
    """True: write the speech as English text (``/v1/audio/translations``)."""
    word_timestamps: bool = False
    """True: every segment carries its ``words`` with their times."""
    model: str = ""
    """The model name the client asked for."""


@attrs.frozen
class Word:
    """One word of a segment and when it was spoken (``timestamp_granularities=["word"]``)."""

    word: str
    """The word as the model wrote it (with its leading space)."""
    start: float
    """Seconds from the start of the audio."""
    end: float
    """Seconds from the start of the audio."""


@attrs.frozen
class TranscriptSegment:
    """A stretch of speech and its text, as Whisper's segments (OpenAI's ``verbose_json``)."""

    id: int
    """The segment's number, from 0 in the order spoken."""
    start: float
    """Seconds from the start of the audio."""
    end: float
    """Seconds from the start of the audio."""
    text: str
    """The text as the model wrote it (Whisper's begins with a space)."""
    words: tuple[Word, ...] = attrs.field(converter=tuple, default=())
    """Filled when the request asked for ``word_timestamps``."""
    seek: int = 0
    """Offset of the window this segment came from, in 10 ms frames."""
    tokens: tuple[int, ...] = attrs.field(converter=tuple, default=())
    """The model's token ids for ``text`` (``verbose_json``)."""
    temperature: float = 0.0
    """The temperature the segment was decoded at (higher after a fallback)."""
    avg_logprob: float = 0.0
    """Mean log probability of its tokens (``verbose_json``)."""
    compression_ratio: float = 0.0
    """gzip compression ratio of ``text`` (high means repetitive output)."""
    no_speech_prob: float = 0.0
    """The model's probability that the window holds no speech."""


@attrs.frozen
class TranscriptChunk:
    """What a transcription backend yields: one chunk per segment as its window is
    decoded, then a last chunk with ``done=True`` that names the language."""

    segment: TranscriptSegment | None = None
    """The segment just decoded; None on the last chunk."""
    done: bool = False
    """True on the last chunk."""
    language: str | None = None
    """ISO 639-1 code of the speech (detected, or the request's); set on the last chunk."""


@attrs.frozen
class Transcript:
    """A whole transcription: what ``Backend.run_transcribe`` returns."""

    segments: tuple[TranscriptSegment, ...]
    """Every segment, in the order spoken."""
    language: str
    """ISO 639-1 code of the speech."""
    duration: float
    """Seconds of audio transcribed."""

    @property
    def text(self) -> str:
        """The whole transcript: the segments' text joined, outer spaces trimmed."""
        return "".join(s.text for s in self.segments).strip()
