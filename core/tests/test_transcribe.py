"""Speech to text through the core: the hook, decoding and checking uploads, and OpenAI's
transcription and translation routes with every response format, streamed and whole.

Audio files are written here with PyAV's own encoders (wav, mp3, flac, ogg/opus,
m4a/aac, webm/opus); the echo backend is the declared test double that "transcribes"
one segment per second of audio. Real speech and the real Whisper model are tested in
the faster-whisper plugin and tests/.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import wave

import httpx
import openai
import pytest

from nexa.audio import decode_audio, sniff_container
from nexa.errors import BadRequest, PayloadTooLarge
from nexa.hookspecs import hookimpl
from nexa.plugins import load_plugins
from nexa.testing import EchoBackend, conformance, echo_manifest, serve
from nexa.types import Device, Task

av = pytest.importorskip("av")
np = pytest.importorskip("numpy")

FORMATS = {"wav": ("wav", "pcm_s16le"), "mp3": ("mp3", "mp3"), "flac": ("flac", "flac"),
           "ogg": ("ogg", "libopus"), "m4a": ("mp4", "aac"), "webm": ("webm", "libopus")}


def encode(seconds: float, kind: str = "wav", rate: int = 22050) -> bytes:
    """A tone of ``seconds`` in container ``kind``, written by FFmpeg's encoders."""
    container, codec = FORMATS[kind]
    rate = 48000 if codec == "libopus" else rate
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono"
        t = np.arange(int(seconds * rate)) / rate
        samples = (0.3 * np.sin(2 * math.pi * 440 * t)).astype("float32").reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def test_register_transcribe_backends_hook_registers_and_refuses():
    class Plugin:
        @hookimpl
        def register_transcribe_backends(self, register):
            register(EchoBackend)

    class Wrong:
        @hookimpl
        def register_transcribe_backends(self, register):
            register(object)

    plugins = load_plugins(load_entry_points=False, extra_plugins=[Plugin(), Wrong()])
    assert [cls for cls, _ in plugins.backends[Task.TRANSCRIBE]] == [EchoBackend]
    assert [f.stage for f in plugins.failures] == ["register_transcribe_backends"]


@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_every_container_decodes_to_16k_mono(kind):
    audio = decode_audio(encode(2.0, kind), max_seconds=60)
    assert audio.sample_rate == 16000
    assert abs(audio.duration - 2.0) < 0.1, audio.duration
    samples = np.frombuffer(audio.samples, "<f4")
    assert 0.2 < float(np.abs(samples).max()) < 0.4, "the tone's amplitude survives decoding"


def test_decoding_refuses_what_it_should():
    with pytest.raises(PayloadTooLarge):
        decode_audio(encode(3.0, "mp3"), max_seconds=1.0)
    with pytest.raises(BadRequest, match="not an audio file"):
        decode_audio(b"hello, world", max_seconds=60)
    with pytest.raises(BadRequest, match="could not be decoded"):
        decode_audio(encode(1.0, "flac")[:60], max_seconds=60)
    empty = io.BytesIO()
    with wave.open(empty, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
    with pytest.raises(BadRequest, match="no audio samples"):
        decode_audio(empty.getvalue(), max_seconds=60)
    # Formats that make FFmpeg open other files or URLs never reach it.
    playlist = b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n"
    assert sniff_container(playlist) is None
    assert sniff_container(b"ffconcat version 1.0\nfile '/etc/passwd'\n") is None


def test_echo_double_passes_the_transcribe_conformance_kit():
    backend = EchoBackend(echo_manifest(), Device("cpu"))
    asyncio.run(backend.start())
    conformance.check_transcribe(backend)


@pytest.fixture
def server(tmp_path):
    with serve([EchoBackend], home=tmp_path, models=[echo_manifest()], max_audio_seconds=30,
               max_audio_bytes=2_000_000) as handle:
        yield handle


def test_openai_client_gets_every_response_format(server):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="-")
    audio = ("speech.mp3", encode(2.5, "mp3"))
    text = client.audio.transcriptions.create(model="test/echo", file=audio, response_format="json")
    assert text.text == "Second 1. Second 2. Second 3."
    assert text.usage.seconds == 3
    plain = client.audio.transcriptions.create(model="test/echo", file=audio, response_format="text")
    assert plain == "Second 1. Second 2. Second 3.\n"
    srt = client.audio.transcriptions.create(model="test/echo", file=audio, response_format="srt")
    assert srt.startswith("1\n00:00:00,000 --> 00:00:01,000\nSecond 1.\n\n2\n00:00:01,000 --> 00:00:02,000\n")
    vtt = client.audio.transcriptions.create(model="test/echo", file=audio, response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.000\nSecond 1.\n")
    verbose = client.audio.transcriptions.create(
        model="test/echo", file=audio, response_format="verbose_json", language="fr",
        timestamp_granularities=["word", "segment"])
    assert verbose.language == "french" and abs(verbose.duration - 2.5) < 0.1
    assert [s.text for s in verbose.segments] == [" Second 1.", " Second 2.", " Second 3."]
    assert [w.word for w in verbose.words][:2] == ["Second", "1."]
    words_only = client.audio.transcriptions.create(
        model="test/echo", file=audio, response_format="verbose_json", timestamp_granularities=["word"])
    assert words_only.segments is None and words_only.words
    english = client.audio.translations.create(model="test/echo", file=audio, response_format="verbose_json")
    assert english.text == "Second 1. Second 2. Second 3."


def test_stream_sends_deltas_then_done(server):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="-")
    events = list(client.audio.transcriptions.create(
        model="test/echo", file=("a.wav", encode(3.0)), stream=True, prompt="hello there"))
    assert [e.type for e in events] == ["transcript.text.delta"] * 3 + ["transcript.text.done"]
    assert "".join(e.delta for e in events[:-1]) == "hello there Second 3."
    assert events[-1].text == "hello there Second 3."


@pytest.mark.parametrize(("fields", "param"), [
    ({"response_format": "diarized_json"}, "response_format"),
    ({"timestamp_granularities[]": "word"}, "timestamp_granularities"),
    ({"response_format": "srt", "stream": "true"}, "stream"),
    ({"temperature": "1.5"}, "temperature"),
    ({"language": "english!"}, "language"),
])
def test_bad_fields_are_400s_naming_them(server, fields, param):
    r = httpx.post(server.base_url + "/v1/audio/transcriptions", data={"model": "test/echo", **fields},
                   files={"file": ("a.wav", encode(1.0))}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_files_too_long_too_big_or_not_audio(server):
    url = server.base_url + "/v1/audio/transcriptions"
    r = httpx.post(url, data={"model": "test/echo"}, files={"file": ("a.flac", encode(31.0, "flac", 8000))}, timeout=60)
    assert r.status_code == 413 and "30 seconds" in r.json()["error"]["message"], r.text
    r = httpx.post(url, data={"model": "test/echo"}, files={"file": ("a.wav", encode(60.0, "wav", 22050))}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["param"] == "file", r.text
    r = httpx.post(url, data={"model": "test/echo"}, files={"file": ("a.txt", b"just text")}, timeout=30)
    assert r.status_code == 400 and "not an audio file" in r.json()["error"]["message"], r.text
    r = httpx.post(url, data={"model": "test/echo"}, files={"file": ("a.mp3", b"ID3" + bytes(500))}, timeout=30)
    assert r.status_code == 400, r.text
    # JSON where a form is due: refused by media type, before any field is read.
    r = httpx.post(url, json={"model": "test/echo"}, timeout=30)
    assert r.status_code == 415 and r.json()["error"]["param"] == "Content-Type", r.text


def test_models_that_do_not_transcribe_are_refused_before_decoding(tmp_path):
    import attrs

    chat_only = attrs.evolve(echo_manifest("test/chatter"), tasks={Task.CHAT})
    with serve([EchoBackend], home=tmp_path, models=[chat_only]) as handle:
        r = httpx.post(handle.base_url + "/v1/audio/transcriptions", data={"model": "test/chatter"},
                       files={"file": ("a.txt", b"not audio at all")}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_supported", r.text
        r = httpx.post(handle.base_url + "/v1/audio/translations", data={"model": "no/such"},
                       files={"file": ("a.wav", encode(1.0))}, timeout=30)
        assert r.status_code == 404, r.text


def test_a_stream_cut_by_the_client_stops_the_transcription(tmp_path):
    slow = echo_manifest("test/slow", delay=0.2)
    with serve([EchoBackend], home=tmp_path, models=[slow]) as handle:
        with httpx.stream("POST", handle.base_url + "/v1/audio/transcriptions", timeout=30,
                          data={"model": "test/slow", "stream": "true"},
                          files={"file": ("a.wav", encode(25.0, "wav", 8000))}) as r:
            first = next(r.iter_lines())
            assert json.loads(first.removeprefix("data: "))["type"] == "transcript.text.delta"
        manager = handle.app.state.manager
        # The slot is freed once the worker stopped; wait on that state, not on time.
        for _ in range(600):
            entries = manager.loaded()
            if entries and entries[0].active == 0:
                break
            asyncio.run(asyncio.sleep(0.05))
        assert manager.loaded()[0].active == 0, "the transcription went on after the client left"
