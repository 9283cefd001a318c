"""Fill-in-the-middle: the special tokens code models use to complete the gap between a
prefix and a suffix (``POST /v1/completions`` with ``suffix``). Plain Python on a
vocabulary; the prompt is ``prefix-token, prefix, suffix-token, suffix, middle-token``
(the prefix-suffix-middle order every family below was trained on)."""

from __future__ import annotations

from collections.abc import Mapping

import attrs

# (prefix, suffix, middle) token texts, by family.
FIM_TRIPLETS = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder, Qwen3-Coder
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, StarCoder2, SantaCoder
    ("<|fim▁begin|>", "<|fim▁hole|>", "<|fim▁end|>"),  # DeepSeek-Coder
    ("<|fim_begin|>", "<|fim_hole|>", "<|fim_end|>"),  # Granite, others
    ("▁<PRE>", "▁<SUF>", "▁<MID>"),  # CodeLlama (sentencepiece)
    ("<PRE>", "<SUF>", "<MID>"),
)


@attrs.frozen
class FimTokens:
    """A model's three fill-in-the-middle token ids."""

    prefix: int
    """Opens the text before the gap."""
    suffix: int
    """Opens the text after the gap."""
    middle: int
    """Where the model writes the gap's text."""


def fim_tokens(vocab: Mapping[str, int]) -> FimTokens | None:
    """The model's FIM token ids from its vocabulary (text -> id), or None without them."""
    for prefix, suffix, middle in FIM_TRIPLETS:
        if prefix in vocab and suffix in vocab and middle in vocab:
            return FimTokens(vocab[prefix], vocab[suffix], vocab[middle])
    return None


__all__ = ["FimTokens", "fim_tokens"]
