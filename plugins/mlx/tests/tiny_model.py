"""Writes a tiny random Qwen2 model in the MLX layout that mlx-community repos use.

config.json + model.safetensors (saved by mlx_lm's own save utilities) + a byte-level
BPE tokenizer trained offline with the ``tokenizers`` library, with a ChatML template.
Random weights: the text it generates is gibberish, but deterministic under a seed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

MODEL_NAME = "mlx-community/tiny-test"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today? I am fine, thank you.",
    "Local models answer questions about code, cats, weather and numbers 0123456789.",
    "system user assistant tool: reply briefly, please.",
    "MLX runs on Apple Silicon and on Linux CPUs; tokens stream one at a time.",
] * 20


def write_tokenizer(
    folder: Path,
    vocab_size: int = 400,
    special_tokens: list[str] = SPECIAL_TOKENS,
    *,
    corpus: list[str] = CORPUS,
    added_tokens: list[str] = (),
    template: str = CHATML_TEMPLATE,
) -> None:
    """A byte-level BPE trained on ``corpus``, with ``added_tokens`` (not special: they
    show in decoded text, as Qwen's ``<think>``) and ``template`` as its chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    added = list(added_tokens)
    if added:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 512,
        "chat_template": template,
        "added_tokens_decoder": {
            str(tokenizer.token_to_id(t)): {"content": t, "special": t in special_tokens, "lstrip": False,
                                            "rstrip": False, "normalized": False, "single_word": False}
            for t in [*special_tokens, *added]
        },
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def write_model(folder: Path, *, seed: int = 0, vocab_size: int = 400, **overrides) -> Path:
    """Write the model into ``folder`` (created) and return it."""
    import mlx.core as mx
    from mlx_lm.models import qwen2
    from mlx_lm.utils import save_config, save_model

    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder, vocab_size)
    config = {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab_size,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "eos_token_id": SPECIAL_TOKENS.index("<|im_end|>"),
        **overrides,
    }
    mx.random.seed(seed)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    save_model(folder, model)
    save_config(dict(config), folder / "config.json")
    return folder


def variant(folder: Path, dest: Path, **config_changes) -> Path:
    """A copy of the model folder with config.json changed."""
    shutil.copytree(folder, dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(config_changes)
    (dest / "config.json").write_text(json.dumps(config))
    return dest
