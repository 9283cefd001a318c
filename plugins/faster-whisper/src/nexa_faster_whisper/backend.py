"""The faster-whisper backend: speech to text with Whisper models in CTranslate2 format.

This module owns loading a CTranslate2 Whisper folder (or the packaged Whisper base,
whose weights come in two parts, joined in memory and checked against their sha256)
and turning decoded audio into segments, window by window: faster-whisper decodes the
audio 30 seconds at a time and yields each segment as its window is done, so segments
stream out as progress, the ``CancelToken`` is checked between them, and the seconds of
audio done show on ``/metrics``. A client's prompt is tokenized as plain text (never as
Whisper's control tokens) and handed over as token ids. faster_whisper and numpy are
imported only in ``load`` and the methods.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from nexa.backend import Backend, CancelToken
from nexa.errors import BadRequest, ModelLoadError, UnsupportedTask
from nexa.types import (
    BackendMetric,
    Device,
    Manifest,
    Task,
    TranscribeRequest,
    TranscriptChunk,
    TranscriptSegment,
    Word,
)

logger = logging.getLogger("nexa.faster_whisper")

# OpenAI's Whisper decodes greedily and retries a window at rising temperatures when
# the text looks wrong (too repetitive, too unlikely); faster-whisper's default schedule.
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
SPLIT_WEIGHTS = "split_weights"
"""Manifest option of a packaged model: the files (relative to its root) that make up
``model.bin`` in order; its other files are taken by name wherever they lie."""
WEIGHTS_SHA256 = "weights_sha256"
"""Manifest option: the sha256 the joined parts must have."""


def _seconds(value: Any, duration: float) -> float:
    """A time as a plain float to the millisecond, within the audio (faster-whisper's word
    times are numpy floats)."""
    return round(min(max(float(value), 0.0), duration), 3)


def compute_type(device: Device, requested: str | None) -> str:
    """int8 on CPUs (fastest there, with little loss), float16 on GPUs."""
    if requested:
        return requested
    return "float16" if device.kind == "cuda" else "int8"


class FasterWhisperBackend(Backend):
    """Whisper on CTranslate2 (CPU, CUDA): one transcription at a time per loaded model."""

    name: ClassVar[str] = "faster-whisper"
    tasks: ClassVar[frozenset[Task]] = frozenset({Task.TRANSCRIBE})
    formats: ClassVar[frozenset[str]] = frozenset({"ctranslate2"})
    devices: ClassVar[frozenset[str]] = frozenset({"cpu", "cuda"})
    # CTranslate2 already spreads one transcription over every core.
    parallel = 1
    priority: ClassVar[int] = 0

    @classmethod
    def supports(cls, manifest: Manifest, device: Device) -> str | None:
        architecture = manifest.options.get("architecture")
        if architecture not in (None, "whisper"):
            return f"a CTranslate2 {architecture} model, not Whisper"
        return None

    def __init__(self, manifest: Manifest, device: Device, options: Any = None):
        super().__init__(manifest, device, options)
        self.model: Any = None
        self.prompt_tokenizer: Any = None
        extra = {**manifest.options, **self.options.extra}
        # Greedy by default: on a 2-core CPU beam 5 costs about twice the time for a small
        # gain in accuracy; a GPU affords the beam.
        self.beam_size = int(extra.get("beam_size", 5 if device.kind == "cuda" else 1))
        self.compute_type = compute_type(device, extra.get("compute_type"))
        self.audio_seconds_done = 0.0
        self.segments_done = 0

    def load(self) -> None:
        if self.manifest.root is None:
            raise ModelLoadError(f"model {self.manifest.name!r} has no folder on disk")
        from faster_whisper import WhisperModel
        from tokenizers import Tokenizer

        started = time.monotonic()
        root = Path(self.manifest.root)
        files = self._packaged_files(root)
        try:
            model = WhisperModel(
                str(root),
                device="cuda" if self.device.kind == "cuda" else "cpu",
                compute_type=self.compute_type,
                cpu_threads=self.options.threads or 0,
                local_files_only=True,
                files=files,
            )
        except Exception as exc:
            raise ModelLoadError(
                f"could not load Whisper model {self.manifest.name!r}: {type(exc).__name__}: {str(exc)[:300]}"
            ) from exc
        # A copy of the tokenizer that reads "<|en|>" or "<|endoftext|>" in a prompt as
        # the characters they are, not as the control tokens they name.
        prompt_tokenizer = Tokenizer.from_str(model.hf_tokenizer.to_str())
        prompt_tokenizer.encode_special_tokens = True
        self.model = model
        self.prompt_tokenizer = prompt_tokenizer
        logger.info("loaded %s (%s, beam %d) in %.2fs", self.manifest.name, self.compute_type, self.beam_size,
                    time.monotonic() - started)

    def _packaged_files(self, root: Path) -> dict[str, Any] | None:
        """The files of a model whose ``model.bin`` ships in parts, joined in memory."""
        parts = self.manifest.options.get(SPLIT_WEIGHTS)
        if not parts:
            return None
        weights = b"".join((root / p).read_bytes() for p in parts)
        expected = self.manifest.options.get(WEIGHTS_SHA256)
        if expected and hashlib.sha256(weights).hexdigest() != expected:
            raise ModelLoadError(f"the parts of model {self.manifest.name!r} do not add up to its weights (sha256)")
        files: dict[str, Any] = {"model.bin": weights}
        for f in self.manifest.files:
            if f.path not in parts:
                files[Path(f.path).name] = (root / f.path).read_bytes()
        return files

    def close(self) -> None:
        self.model = None

    def runtime_metrics(self) -> list[BackendMetric]:
        return [
            BackendMetric("transcribe_audio_seconds", self.audio_seconds_done, "counter",
                          "Seconds of audio transcribed (advances as each segment is decoded)"),
            BackendMetric("transcribe_segments", self.segments_done, "counter", "Segments decoded"),
        ]

    def transcribe(self, request: TranscribeRequest, cancel: CancelToken) -> Iterator[TranscriptChunk]:
        if self.model is None:
            raise ModelLoadError(f"model {self.manifest.name!r} is not loaded")
        import numpy as np

        language = self._language(request)
        audio = np.frombuffer(request.audio.samples, dtype="<f4").copy()
        prompt = None
        if request.prompt and request.prompt.strip():
            prompt = self.prompt_tokenizer.encode(" " + request.prompt.strip(), add_special_tokens=False).ids
        temperature = FALLBACK_TEMPERATURES if request.temperature == 0 else (request.temperature,)
        cancel.raise_if_cancelled()
        segments, info = self.model.transcribe(
            audio,
            language=language,
            task="translate" if request.translate else "transcribe",
            beam_size=self.beam_size,
            temperature=list(temperature),
            initial_prompt=prompt,
            word_timestamps=request.word_timestamps,
            vad_filter=False,
        )
        # faster-whisper decodes a window only when the next segment is asked for.
        reached = 0.0
        duration = request.audio.duration
        floor = 0.0
        for segment in segments:
            self.segments_done += 1
            # Times within the audio and never going backwards (subtitles need ordered
            # cues): Whisper's timestamp tokens can point past the end of the audio, and a
            # window decoded at a fallback temperature can restart earlier than the last.
            start = max(floor, _seconds(segment.start, duration))
            end = max(start, _seconds(segment.end, duration))
            floor = start
            self.audio_seconds_done += max(0.0, end - reached)
            reached = max(reached, end)
            words = tuple(
                Word(w.word, min(max(_seconds(w.start, duration), start), end), min(max(_seconds(w.end, duration), start), end))
                for w in segment.words or ()
            )
            yield TranscriptChunk(segment=TranscriptSegment(
                id=segment.id,
                start=start,
                end=end,
                text=segment.text,
                words=words,
                seek=segment.seek,
                tokens=tuple(segment.tokens),
                temperature=float(segment.temperature or 0.0),
                avg_logprob=float(segment.avg_logprob),
                compression_ratio=float(segment.compression_ratio),
                no_speech_prob=float(segment.no_speech_prob),
            ))
            cancel.raise_if_cancelled()
        self.audio_seconds_done += max(0.0, request.audio.duration - reached)
        yield TranscriptChunk(done=True, language=info.language)

    def _language(self, request: TranscribeRequest) -> str | None:
        multilingual = self.model.model.is_multilingual
        if request.translate and not multilingual:
            raise UnsupportedTask(f"model {self.manifest.name!r} knows English only; it cannot translate")
        language = request.language
        if language is None:
            return None
        supported = set(self.model.supported_languages)
        if language not in supported:
            raise BadRequest(
                f"language {language!r} is not one model {self.manifest.name!r} knows "
                f"(ISO 639-1 codes such as {', '.join(sorted(supported)[:8])}...)",
                param="language",
            )
        return language
