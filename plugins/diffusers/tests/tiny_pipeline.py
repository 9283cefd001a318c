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


# --- the same pipeline as one original-format (LDM) checkpoint ------------------------

_RESNET_TO_LDM = (
    ("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"),
)
_VAE_ATTENTION_TO_LDM = (
    ("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"),
)


def _rename(rest: str, pairs: tuple[tuple[str, str], ...]) -> str:
    head, _, leaf = rest.rpartition(".")
    for new, old in pairs:
        if head == new:
            return f"{old}.{leaf}"
    return rest


def _unet_to_ldm(key: str, layers: int, attention_up_blocks: set[int]) -> str:
    """A diffusers UNet2DConditionModel key as Stable Diffusion's original name."""
    fixed = {
        "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
    }
    head, _, leaf = key.rpartition(".")
    if head in fixed:
        return f"{fixed[head]}.{leaf}"
    parts = key.split(".")
    if parts[0] == "down_blocks":
        block, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":
            return f"input_blocks.{(block + 1) * (layers + 1)}.0.op.{leaf}"
        index = block * (layers + 1) + int(parts[3]) + 1
        rest = ".".join(parts[4:])
        if kind == "resnets":
            return f"input_blocks.{index}.0.{_rename(rest, _RESNET_TO_LDM)}"
        return f"input_blocks.{index}.1.{rest}"
    if parts[0] == "up_blocks":
        block, kind = int(parts[1]), parts[2]
        if kind == "upsamplers":
            slot = 2 if block in attention_up_blocks else 1
            return f"output_blocks.{block * (layers + 1) + layers}.{slot}.conv.{leaf}"
        index = block * (layers + 1) + int(parts[3])
        rest = ".".join(parts[4:])
        if kind == "resnets":
            return f"output_blocks.{index}.0.{_rename(rest, _RESNET_TO_LDM)}"
        return f"output_blocks.{index}.1.{rest}"
    if parts[0] == "mid_block":
        rest = ".".join(parts[3:])
        if parts[1] == "resnets":
            return f"middle_block.{2 * int(parts[2])}.{_rename(rest, _RESNET_TO_LDM)}"
        return f"middle_block.1.{rest}"
    raise KeyError(key)


def _vae_to_ldm(key: str, blocks: int) -> str:
    """A diffusers AutoencoderKL key as Stable Diffusion's original name."""
    key = key.replace("conv_norm_out", "norm_out")
    parts = key.split(".")
    coder = parts[0]
    if len(parts) < 3:
        return key
    if parts[1] in {"down_blocks", "up_blocks"}:
        block = int(parts[2])
        ldm_block = block if coder == "encoder" else blocks - 1 - block
        where = "down" if coder == "encoder" else "up"
        if parts[3] in {"downsamplers", "upsamplers"}:
            sampler = "downsample" if coder == "encoder" else "upsample"
            return f"{coder}.{where}.{ldm_block}.{sampler}.conv.{parts[-1]}"
        rest = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
        return f"{coder}.{where}.{ldm_block}.block.{parts[4]}.{rest}"
    if parts[1] == "mid_block":
        rest = ".".join(parts[4:])
        if parts[2] == "resnets":
            return f"{coder}.mid.block_{int(parts[3]) + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        return f"{coder}.mid.attn_1.{_rename(rest, _VAE_ATTENTION_TO_LDM)}"
    return key


def write_tiny_single_file(folder: Path, target: Path) -> Path:
    """The pipeline in ``folder`` as one SD1-style ``.safetensors`` (UNet, VAE, CLIP text)."""
    import json

    from safetensors.torch import load_file, save_file

    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    layers = unet_config["layers_per_block"]
    attention_up = {i for i, t in enumerate(unet_config["up_block_types"]) if "CrossAttn" in t}
    blocks = len(json.loads((folder / "vae" / "config.json").read_text())["down_block_types"])
    state = {}
    for key, value in load_file(folder / "unet" / "diffusion_pytorch_model.safetensors").items():
        state["model.diffusion_model." + _unet_to_ldm(key, layers, attention_up)] = value
    for key, value in load_file(folder / "vae" / "diffusion_pytorch_model.safetensors").items():
        state["first_stage_model." + _vae_to_ldm(key, blocks)] = value
    for key, value in load_file(folder / "text_encoder" / "model.safetensors").items():
        # transformers >= 5.6 saves CLIPTextModel flattened; originals say `text_model.`.
        key = key if key.startswith("text_model.") else "text_model." + key
        state["cond_stage_model.transformer." + key] = value
    save_file({k: v.contiguous() for k, v in state.items()}, str(target))
    return target


if __name__ == "__main__":
    import sys

    write_tiny_sd(Path(sys.argv[1]))
