"""Uploaded audio files to checked speech: what a transcription backend receives.

``decode_audio`` turns the bytes of a wav, mp3, flac, ogg, m4a/mp4 or webm/mkv file into
16 kHz mono float PCM (:class:`nexa.types.Audio`) with PyAV (FFmpeg's decoders), and
refuses what it should: a file that is no audio it knows (400), one that fails to
decode (400), and one longer than the server allows (413), found while decoding so a
small file that expands to hours stops at the cap.

FFmpeg can read hundreds of formats, some of which open further files or URLs named
inside them (HLS playlists, concat lists). So the container is recognised here from its
first bytes and only its own demuxer is used; a file matching none of the audio
containers above never reaches FFmpeg's format probing. PyAV is imported only here,
when a file arrives.
"""

from __future__ import annotations

import io

from nexa.errors import BadRequest, NexaError, PayloadTooLarge
from nexa.types import SAMPLE_RATE, Audio

FORMATS = "wav, mp3, flac, ogg, m4a/mp4, webm"
"""The containers accepted, as error messages name them."""


def sniff_container(data: bytes) -> str | None:
    """The FFmpeg demuxer for an audio file's first bytes, or None when it is none we take."""
    head = data[:16]
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[4:8] == b"ftyp":
        return "mp4"  # FFmpeg's mov demuxer: mp4, m4a, mov
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"  # webm and mkv
    if head[:3] == b"ID3" or (len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "mp3"
    return None


def decode_audio(data: bytes, *, max_seconds: float, rate: int = SAMPLE_RATE) -> Audio:
    """Decode an uploaded file to mono float PCM at ``rate``; blocking (call off the loop)."""
    container_format = sniff_container(data)
    if container_format is None:
        raise BadRequest(f"file is not an audio file this server reads ({FORMATS})", param="file")
    try:
        import av
    except ImportError as exc:  # a transcription backend without the decoder installed
        raise NexaError("this server cannot decode audio: PyAV is not installed (pip install 'nexa-core[audio]')") from exc
    max_samples = int(max_seconds * rate)
    pcm = bytearray()

    def add(frames: list) -> None:  # noqa: ANN001 - av.AudioFrame
        for frame in frames:
            pcm.extend(bytes(frame.planes[0])[: frame.samples * 4])
        if len(pcm) // 4 > max_samples:
            raise PayloadTooLarge(
                f"the audio is longer than {max_seconds:g} seconds, the most this server transcribes at once",
                param="file",
            )

    try:
        with av.open(io.BytesIO(data), mode="r", format=container_format) as container:
            stream = next((s for s in container.streams if s.type == "audio"), None)
            if stream is None:
                raise BadRequest("file has no audio stream", param="file")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            for packet in container.demux(stream):
                for frame in packet.decode():
                    add(resampler.resample(frame))
            add(resampler.resample(None))
    except NexaError:
        raise
    except Exception as exc:  # FFmpeg's errors, and PyAV's on malformed streams
        raise BadRequest(
            f"file could not be decoded as {container_format} audio ({type(exc).__name__}); "
            f"send a complete {FORMATS} file",
            param="file",
        ) from exc
    if not pcm:
        raise BadRequest("file holds no audio samples", param="file")
    return Audio(bytes(pcm), rate)
