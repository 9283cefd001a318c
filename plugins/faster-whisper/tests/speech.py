"""Test material for the speech tests: real speech written by espeak-ng (converted by sox),
word error rate, and a tiny random Whisper in CTranslate2 format.

The tiny model is a 2-layer WhisperForConditionalGeneration with random weights, built
with transformers and converted by CTranslate2's own converter, with the real Whisper
base vocabulary (so its token ids, language ids and suppressed tokens are Whisper's). It
writes nonsense, fast: it exercises windows, streaming, formats and cancellation.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Local models run on my own machine.",
    "Please call Stella and ask her to bring these things from the store.",
    "The weather today is sunny with a light breeze from the west.",
    "My favourite colour is green, and my brother likes to play football.",
)


def require(tool: str) -> str:
    path = shutil.which(tool)
    assert path, f"{tool} is not installed (apt-get install espeak-ng sox; .ci/run installs them)"
    return path


def espeak(text: str, path: Path, voice: str = "en-us", speed: int = 150) -> Path:
    """``text`` spoken by espeak-ng into a WAV (22.05 kHz mono)."""
    subprocess.run([require("espeak-ng"), "-v", voice, "-s", str(speed), "-w", str(path), text], check=True,
                   capture_output=True)
    return path


def convert(source: Path, target: Path) -> Path:
    """Another container and codec, chosen by ``target``'s suffix (sox)."""
    subprocess.run([require("sox"), str(source), str(target)], check=True, capture_output=True)
    return target


def concatenate(sources: list[Path], target: Path, gap: float = 0.5) -> Path:
    """One WAV of the sources with ``gap`` seconds of silence between them (sox)."""
    silence = target.with_name("silence.wav")
    subprocess.run([require("sox"), "-n", "-r", "22050", "-c", "1", str(silence), "trim", "0", str(gap)],
                   check=True, capture_output=True)
    parts: list[str] = []
    for source in sources:
        parts += [str(source), str(silence)]
    subprocess.run([require("sox"), *parts, str(target)], check=True, capture_output=True)
    return target


def normalise(text: str) -> str:
    text = text.lower().replace("favorite", "favourite").replace("color", "colour")
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text).split())


def word_error_rate(reference: str, hypothesis: str) -> float:
    import jiwer

    return jiwer.wer(normalise(reference), normalise(hypothesis))


def write_tiny_whisper(target: Path, base_root: Path, base_data: str) -> Path:
    """A random 2-layer Whisper in CTranslate2 format at ``target`` (about 7 MB)."""
    import ctranslate2
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    base_config = json.loads((base_root / base_data / "config.json").read_text())
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=51865, num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=2,
        decoder_layers=2, decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_source_positions=1500, max_target_positions=448, pad_token_id=50257, bos_token_id=50257,
        eos_token_id=50257, decoder_start_token_id=50258,
    )
    hf = target.with_name(target.name + "-hf")
    WhisperForConditionalGeneration(config).save_pretrained(hf)
    shutil.copy2(base_root / base_data / "tokenizer.json", hf / "tokenizer.json")
    ctranslate2.converters.TransformersConverter(str(hf), copy_files=["tokenizer.json"]).convert(
        str(target), quantization="int8", force=True)
    # The same vocabulary as Whisper base, so its language and suppressed ids hold here.
    config_path = target / "config.json"
    converted = json.loads(config_path.read_text())
    for key in ("lang_ids", "suppress_ids", "suppress_ids_begin"):
        converted[key] = base_config[key]
    config_path.write_text(json.dumps(converted))
    shutil.rmtree(hf)
    return target
