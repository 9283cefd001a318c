"""Writes a tiny random Qwen2-VL model in the MLX layout that mlx-community vision repos use.

config.json (Qwen2-VL's: text settings at the top, ``vision_config`` beside them) +
model.safetensors (saved by mlx-vlm's own save utilities) + preprocessor_config.json +
a byte-level BPE tokenizer trained offline with ``tokenizers`` (with Qwen's vision
tokens) and a Qwen2-VL-style ChatML template that renders OpenAI-style content lists.
A 2-block vision tower with 14-pixel patches merged 2x2: every 28x28 pixels of the
(resized) image become one ``<|image_pad|>`` token, so a 56x56 image costs 4 prompt
tokens and a 56x112 one 8. Random weights: the text is gibberish, but deterministic.
"""

from __future__ import annotations

import json
from pathlib import Path

import tiny_model

VISION_MODEL_NAME = "mlx-community/tiny-qwen2-vl"

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
SPECIAL_TOKENS = [*tiny_model.SPECIAL_TOKENS, *VISION_TOKENS]

PATCH = 14
MERGE = 2
PIXELS_PER_TOKEN = (PATCH * MERGE) ** 2
# Images are resized to between 1 and 16 tokens' worth of pixels.
MIN_PIXELS = PIXELS_PER_TOKEN
MAX_PIXELS = 16 * PIXELS_PER_TOKEN

# Qwen2-VL's template, shortened: an image part is vision_start + image_pad + vision_end
# (the processor repeats image_pad once per merged patch).
VISION_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_processor(folder: Path) -> None:
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
        "patch_size": PATCH,
        "temporal_patch_size": 2,
        "merge_size": MERGE,
        "min_pixels": MIN_PIXELS,
        "max_pixels": MAX_PIXELS,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }, indent=2))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = VISION_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def write_model(folder: Path, *, seed: int = 0, vocab_size: int = 400, **overrides) -> Path:
    """Write the model into ``folder`` (created) and return it."""
    import mlx.core as mx
    from mlx_vlm.models import qwen2_vl
    from mlx_vlm.utils import save_config, save_weights, update_module_configs

    folder.mkdir(parents=True, exist_ok=True)
    tiny_model.write_tokenizer(folder, vocab_size, special_tokens=SPECIAL_TOKENS)
    write_processor(folder)
    token_id = SPECIAL_TOKENS.index
    config = {
        "model_type": "qwen2_vl",
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab_size,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        # head_dim 16: the 8 rotary frequencies split over time, height and width.
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "tie_word_embeddings": False,
        "eos_token_id": token_id("<|im_end|>"),
        "image_token_id": token_id("<|image_pad|>"),
        "video_token_id": token_id("<|video_pad|>"),
        "vision_start_token_id": token_id("<|vision_start|>"),
        "vision_end_token_id": token_id("<|vision_end|>"),
        "vision_config": {
            "model_type": "qwen2_vl",
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 4,
            "mlp_ratio": 2,
            "patch_size": PATCH,
            "spatial_patch_size": PATCH,
            "spatial_merge_size": MERGE,
            "temporal_patch_size": 2,
            "in_channels": 3,
        },
        **overrides,
    }
    mx.random.seed(seed)
    # The same two steps as mlx_vlm.utils.load_model: the top config, then its parts.
    # (from_dict copies the top-level text settings into its argument's text_config.)
    parts = dict(config)
    model_config = update_module_configs(
        qwen2_vl.ModelConfig.from_dict(parts), qwen2_vl, parts, ["text", "vision"]
    )
    model = qwen2_vl.Model(model_config)
    mx.eval(model.parameters())
    save_weights(folder, model)
    save_config(dict(config), folder / "config.json")
    return folder


def png(width: int, height: int, color: tuple[int, int, int]) -> bytes:
    """A one-colour PNG, as a client would send it."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()
