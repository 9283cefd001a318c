"""Speech-to-text benchmark: real-time factor of Whisper base (faster-whisper) on >= 60 s.

The audio is English speech written by espeak-ng (Debian) from a few sentences, joined by
sox to at least ``--seconds`` seconds. The real-time factor is transcription time divided
by audio duration (0.3 means a minute of audio in 18 s), measured on the backend itself
(the model loaded once, audio already decoded) and through `nexa serve` with the
official openai client (upload, decoding and HTTP included). Beam size, compute type and
threads are printed with the figures. Target on 2 CPU cores: RTF <= 0.3.
Not a timed test: the lead records the figures in docs/benchmarks.md.

    python bench/bench_speech.py                           # CPU, int8, greedy (beam 1)
    python bench/bench_speech.py --beam 5 --compute-type int8 --threads 2 --runs 3
    python bench/bench_speech.py --device cuda --compute-type float16
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, start_nexa, stop  # noqa: E402

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Local models run on my own machine, with no network at all.",
    "Please call Stella and ask her to bring these things from the store.",
    "The weather today is sunny with a light breeze from the west.",
    "My favourite colour is green, and my brother likes to play football.",
)


def speech(folder: Path, seconds: float) -> Path:
    """A WAV of at least ``seconds`` of espeak-ng speech."""
    one = folder / "one.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(one), " ".join(SENTENCES)], check=True)
    length = float(subprocess.run(["soxi", "-D", str(one)], check=True, capture_output=True, text=True).stdout)
    out = folder / "speech.wav"
    subprocess.run(["sox", *[str(one)] * (int(seconds // length) + 1), str(out)], check=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--beam", type=int, default=1)
    parser.add_argument("--compute-type", default="int8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    from nexa.audio import decode_audio
    from nexa.backend import LoadOptions
    from nexa.types import Device, TranscribeRequest
    from nexa_faster_whisper.backend import FasterWhisperBackend
    from nexa_faster_whisper.plugin import WHISPER_BASE_NAME, packaged_whisper_base

    manifest = packaged_whisper_base()
    if manifest is None:
        raise SystemExit("Whisper base is not installed (pip install -e plugins/faster-whisper)")
    print(machine())
    with tempfile.TemporaryDirectory(prefix="nexa-bench-speech-") as tmp:
        wav = speech(Path(tmp), args.seconds)
        audio = decode_audio(wav.read_bytes(), max_seconds=3600)
        print(f"Whisper base (CTranslate2), {audio.duration:.1f} s of espeak-ng speech, device {args.device}, "
              f"compute type {args.compute_type}, beam size {args.beam}, {args.threads} threads")
        options = LoadOptions(threads=args.threads, extra={"beam_size": args.beam, "compute_type": args.compute_type})
        backend = FasterWhisperBackend(manifest, Device(args.device), options)
        started = time.perf_counter()
        asyncio.run(backend.start())
        print(f"load {time.perf_counter() - started:.2f} s")
        direct = []
        for run in range(args.runs):
            started = time.perf_counter()
            transcript = asyncio.run(backend.run_transcribe(TranscribeRequest(audio, language="en")))
            direct.append((time.perf_counter() - started) / audio.duration)
            print(f"backend run {run + 1}: RTF {direct[-1]:.3f} ({len(transcript.segments)} segments)")
        asyncio.run(backend.stop())
        print(f"backend median RTF {statistics.median(direct):.3f} (target <= 0.3); "
              f"text starts {transcript.text[:80]!r}")

        import openai

        home = Path(tmp) / "home"
        home.mkdir()
        proc, base = start_nexa(WHISPER_BASE_NAME, home, threads=args.threads, ctx=448,
                                gpu=args.device if args.device == "cuda" else None)
        try:
            client = openai.OpenAI(base_url=base + "/v1", api_key="-", max_retries=0, timeout=600)
            served = []
            for run in range(args.runs):
                started = time.perf_counter()
                with wav.open("rb") as fh:
                    client.audio.transcriptions.create(model=WHISPER_BASE_NAME, file=fh, language="en")
                served.append((time.perf_counter() - started) / audio.duration)
                print(f"server run {run + 1}: RTF {served[-1]:.3f}")
        finally:
            stop(proc)
        print(f"server median RTF {statistics.median(served):.3f} (server default: beam "
              f"{'5 on CUDA' if args.device == 'cuda' else '1'}, compute type int8 on CPU / float16 on CUDA)")


if __name__ == "__main__":
    main()
