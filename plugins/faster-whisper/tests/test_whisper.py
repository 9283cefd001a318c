"""faster-whisper: the real Whisper base on speech made by espeak-ng, and a tiny random
Whisper (written by the tests) for the mechanics, directly and over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from speech import SENTENCES, convert, espeak, word_error_rate

from nexa.audio import decode_audio
from nexa.errors import BadRequest
from nexa.plugins import load_plugins
from nexa.testing import conformance, serve
from nexa.types import Task, TranscribeRequest
from nexa_faster_whisper.backend import FasterWhisperBackend
from nexa_faster_whisper.plugin import WHISPER_BASE_NAME

FOX = ("fox", "lazy", "dog", "machine")


def audio_of(path: Path, max_seconds: float = 600):
    return decode_audio(path.read_bytes(), max_seconds=max_seconds)


def transcribe(backend, request):
    return asyncio.run(backend.run_transcribe(request))


# --- the plugin ---------------------------------------------------------------------


def test_entry_point_registers_the_backend_and_whisper_base():
    plugins = load_plugins()
    assert FasterWhisperBackend in [cls for cls, _ in plugins.backends[Task.TRANSCRIBE]]
    (base,) = [m for m in plugins.models if m.name == WHISPER_BASE_NAME]
    assert base.format == "ctranslate2" and base.tasks == {Task.TRANSCRIBE}
    assert base.size == 145_217_532 + sum(f.size for f in base.files if f.role != "weights")


def test_registering_the_plugin_imports_no_runtime():
    code = ("import sys; from nexa.plugins import load_plugins; load_plugins(); "
            "print([m for m in ('faster_whisper', 'ctranslate2', 'numpy', 'av') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[]"), out


def test_a_ctranslate2_whisper_folder_is_pulled_as_a_speech_model(tiny_whisper):
    assert (tiny_whisper.format, tiny_whisper.tasks) == ("ctranslate2", {Task.TRANSCRIBE})
    assert FasterWhisperBackend.supports(tiny_whisper, conformance_device()) is None


def conformance_device():
    from conftest import DEVICE

    return DEVICE


# --- mechanics on the tiny random model ---------------------------------------------


def test_tiny_whisper_passes_the_conformance_kit(tiny_backend):
    conformance.check_transcribe(tiny_backend, language="en")


def test_an_unknown_language_is_a_400_naming_it(tiny_backend, speech_dir):
    with pytest.raises(BadRequest) as caught:
        transcribe(tiny_backend, TranscribeRequest(audio_of(speech_dir / "s0.wav"), language="xx"))
    assert caught.value.param == "language"


# --- the real Whisper base ----------------------------------------------------------


def test_whisper_base_passes_the_conformance_kit_on_real_speech(base_backend, speech_dir):
    espeak(" ".join(SENTENCES[:2]), speech_dir / "fox.wav")
    conformance.check_transcribe(base_backend, audio_of(speech_dir / "fox.wav"), expected_words=FOX)


def test_word_error_rate_on_the_espeak_sentences_is_at_most_15_percent(base_backend, speech_dir):
    transcript = transcribe(base_backend, TranscribeRequest(audio_of(speech_dir / "all.wav")))
    rate = word_error_rate(" ".join(SENTENCES), transcript.text)
    assert transcript.language == "en"
    assert rate <= 0.15, f"WER {rate:.2%}: {transcript.text!r}"


def test_long_audio_goes_window_by_window_with_progress_and_stops_when_cancelled(base_backend, speech_dir):
    # Over a minute of speech: three 30-second windows at least.
    long = speech_dir / "long.wav"
    subprocess.run(["sox", *[str(speech_dir / "all.wav")] * 4, str(long)], check=True)
    audio = audio_of(long)
    assert audio.duration > 60
    before = base_backend.audio_seconds_done
    transcript = transcribe(base_backend, TranscribeRequest(audio, language="en"))
    assert len({s.seek for s in transcript.segments}) >= 3, "the audio was not decoded window by window"
    assert base_backend.audio_seconds_done - before == pytest.approx(audio.duration, abs=0.5)
    assert word_error_rate(" ".join(SENTENCES * 4), transcript.text) <= 0.15

    async def first_segment_then_leave():
        stream = base_backend.stream_transcribe(TranscribeRequest(audio, language="en"))
        with contextlib.suppress(StopAsyncIteration):
            await anext(stream)
        await stream.aclose()  # returns once the worker has stopped

    segments_before = base_backend.segments_done
    asyncio.run(first_segment_then_leave())
    done = base_backend.segments_done - segments_before
    assert done < len(transcript.segments) / 2, f"{done} of {len(transcript.segments)} segments after cancelling"


def test_a_prompt_is_text_never_control_tokens(base_backend, speech_dir):
    request = TranscribeRequest(audio_of(speech_dir / "s0.wav"), prompt="<|fr|><|translate|><|notimestamps|>")
    transcript = transcribe(base_backend, request)
    assert transcript.language == "en"
    assert "fox" in transcript.text.lower()


# --- over HTTP with the official client -------------------------------------------------


@pytest.fixture(scope="module")
def client(tmp_path_factory, whisper_base, tiny_whisper):
    with serve([FasterWhisperBackend], home=tmp_path_factory.mktemp("home"), models=[whisper_base, tiny_whisper],
               device=conformance_device().kind) as server:
        yield openai.OpenAI(base_url=server.base_url + "/v1", api_key="-", max_retries=0), server


@pytest.mark.parametrize("suffix", ["wav", "mp3", "flac", "ogg"])
def test_every_container_is_heard(client, speech_dir, suffix):
    openai_client, _ = client
    path = convert(speech_dir / "s0.wav", speech_dir / f"s0-{suffix}.{suffix}") if suffix != "wav" else speech_dir / "s0.wav"
    text = openai_client.audio.transcriptions.create(model=WHISPER_BASE_NAME, file=path).text.lower()
    # One short sentence through a lossy codec: its key words (the WER target is measured
    # on all the sentences, above).
    assert all(word in text for word in ("quick", "fox", "over", "lazy", "dog")), text


def test_every_response_format_through_the_openai_client(client, speech_dir):
    openai_client, _ = client
    path = speech_dir / "s1.wav"

    def create(**kw):
        with path.open("rb") as fh:
            return openai_client.audio.transcriptions.create(model=WHISPER_BASE_NAME, file=fh, **kw)

    assert "machine" in create(response_format="json").text.lower()
    assert "machine" in create(response_format="text").lower()
    srt = create(response_format="srt")
    assert srt.startswith("1\n00:00:0") and " --> " in srt and "machine" in srt.lower()
    vtt = create(response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n00:00:0") and "machine" in vtt.lower()
    verbose = create(response_format="verbose_json", timestamp_granularities=["word", "segment"])
    assert verbose.language == "english" and verbose.duration > 1
    assert verbose.segments and verbose.segments[0].tokens
    assert [w.word.lower().strip(".") for w in verbose.words][-1] == "machine"
    events = list(create(stream=True))
    assert events[-1].type == "transcript.text.done"
    assert "".join(e.delta for e in events[:-1]).strip() == events[-1].text
    english = openai_client.audio.translations.create(model=WHISPER_BASE_NAME, file=path)
    assert "machine" in english.text.lower()


def test_http_errors_in_the_openai_shape(client, speech_dir):
    _, server = client
    url = server.base_url + "/v1/audio/transcriptions"
    wav = (speech_dir / "s0.wav").read_bytes()
    r = httpx.post(url, data={"model": WHISPER_BASE_NAME, "language": "xx"}, files={"file": ("a.wav", wav)}, timeout=120)
    assert r.status_code == 400 and r.json()["error"]["param"] == "language", r.text
    r = httpx.post(url, data={"model": WHISPER_BASE_NAME}, files={"file": ("a.wav", wav[: len(wav) // 50])}, timeout=120)
    assert r.status_code in (200, 400), r.text  # a cut WAV decodes what it holds, or is refused
    r = httpx.post(url, data={"model": WHISPER_BASE_NAME}, files={"file": ("a.png", b"\x89PNG\r\n\x1a\n" + bytes(64))},
                   timeout=120)
    assert r.status_code == 400 and r.json()["error"]["param"] == "file", r.text


@pytest.mark.cuda
def test_whisper_base_on_the_gpu(whisper_base, speech_dir):
    backend = FasterWhisperBackend(whisper_base, conformance_device())
    asyncio.run(backend.start())
    try:
        assert backend.compute_type == "float16"
        transcript = transcribe(backend, TranscribeRequest(audio_of(speech_dir / "all.wav")))
        assert word_error_rate(" ".join(SENTENCES), transcript.text) <= 0.15, transcript.text
    finally:
        asyncio.run(backend.stop())


def test_nexa_pull_of_a_faster_whisper_repo_transcribes(tmp_path, monkeypatch, tiny_whisper, speech_dir):
    """A CTranslate2 Whisper repo (model.bin, config, tokenizer, vocabulary) pulled through
    huggingface_hub from a loopback Hub is stored as a speech model and served."""
    from nexa.hub import pull
    from nexa.store import ModelStore
    from nexa.testing.hubserver import HubServer

    assert tiny_whisper.root is not None
    files = {f.path: (Path(tiny_whisper.root) / f.path).read_bytes() for f in tiny_whisper.files}
    files["README.md"] = b"# a tiny random Whisper\n"
    for name in ("HF_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    with HubServer({"acme/whisper-tiny-ct2": files}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        manifest = pull(ModelStore(tmp_path / "home"), "acme/whisper-tiny-ct2")
    assert (manifest.format, manifest.tasks) == ("ctranslate2", {Task.TRANSCRIBE})
    assert {f.path for f in manifest.files} >= {"model.bin", "config.json", "tokenizer.json"}
    backend = FasterWhisperBackend(manifest, conformance_device())
    asyncio.run(backend.start())
    try:
        transcript = transcribe(backend, TranscribeRequest(audio_of(speech_dir / "s0.wav"), language="en"))
        assert transcript.language == "en" and transcript.duration > 1
    finally:
        asyncio.run(backend.stop())
