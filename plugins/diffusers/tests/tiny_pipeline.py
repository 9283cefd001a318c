"""Writes a tiny random Stable Diffusion pipeline (~6.5 MB) as a diffusers folder.

Real diffusion weights are not on PyPI and the hub is unreachable here, so the tests
build the smallest pipeline with the real architecture: a 2-block UNet, a 2-block VAE,
a 2-layer CLIP text encoder with a byte-level BPE vocabulary, and DDIM. Its images are
noise, but every code path (loading through the store, seeding, steps, decoding, PNG)
is the real one.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def _byte_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    # CLIP's byte-to-unicode table: every byte has a printable stand-in, so any prompt
    # tokenizes without unknown tokens.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    merges = [("c", "a"), ("ca", "t</w>"), ("r", "e"), ("re", "d</w>")]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return vocab, merges


def write_tiny_sd(folder: Path) -> Path:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )
    # steps_offset=1 is what real SD schedulers ship with; without it diffusers warns.
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
    )
    vocab, merges = _byte_vocab()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
            layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2,
            vocab_size=len(vocab), max_position_embeddings=77,
        )
    )
    # transformers 5 ignores vocab_file/merges_file keywords: pass the objects.
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    pipe = StableDiffusionPipeline(
        unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def import_copy(store, source: Path, name: str, tmp_path: Path):  # noqa: ANN001, ANN201
    """Import the folder under another name, from a fresh copy, as `nexa pull PATH` would."""
    copy = tmp_path / name.replace("/", "--")
    shutil.copytree(source, copy)
    return store.import_path(copy, name=name)


if __name__ == "__main__":
    import sys

    write_tiny_sd(Path(sys.argv[1]))
