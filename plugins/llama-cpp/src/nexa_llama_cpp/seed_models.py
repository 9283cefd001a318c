"""Tiny GGUFs of the seed's architectures, for tests: the chat model (``qwen3``), the
vision model (``qwen3vl`` with its ``qwen3vl_merger`` mmproj) and the embedding model
(``jina-bert-v2``), each with its family's real chat template (``seed_templates``) and
tokenizer kind.

- ``write_scripted_qwen3``: a Qwen3 whose greedy output the test chooses. Random weights
  prove nothing about parsing, so the weights are set by hand: ``token_embd`` is one-hot
  (the hidden size is at least the vocabulary), every ``attn_output`` and ``ffn_down`` is
  zero (each layer adds nothing to the residual), so the last hidden state is the current
  token's own one-hot vector, and ``output`` is a next-token map. The model then writes,
  deterministically (a margin of ~60 logits, so even sampling at temperature 1 follows
  it), the continuation scripted after the prompt's last token, e.g. ``<think> hello
  world</think> paris`` after Qwen3's generation prompt. Unscripted tokens end the turn.
- ``write_tiny_qwen3vl``: a random Qwen3-VL text model (IMRoPE sections, one deepstack
  layer) and a random Qwen3-VL vision tower with its merger and deepstack projector, the
  tensors llama.cpp's ``qwen3vl`` and MTMD's ``qwen3vl_merger`` require.
- ``write_tiny_jina_v2``: a random jina-embeddings-v2-style encoder (ALiBi, GEGLU, mean
  pooling) with a WordPiece (``bert``) vocabulary.

Only ``gguf`` and ``numpy`` are needed (no llama_cpp import). The vocabularies are
SentencePiece byte-fallback ones (``testing``) with the families' special tokens added
(``<|im_start|>``..., Qwen3's ``<think>``/``</think>`` as user-defined tokens that show
in decoded text, as in the real GGUFs).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from nexa_llama_cpp.seed_templates import DEEPSEEK_R1_TEMPLATE, QWEN3_TEMPLATE, QWEN3_VL_TEMPLATE
from nexa_llama_cpp.testing import _vocab

# Token texts of the Qwen family's vocabulary that the tiny models carry besides the
# base SentencePiece vocabulary: control tokens (never in decoded text unless asked
# for), and the thought and tool markers, which are plain added tokens in Qwen3.
QWEN_CONTROL = ("<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
QWEN_ADDED = ("<think>", "</think>", "<tool_response>", "</tool_response>")
QWEN_NEWLINES = ("\n", "\n\n")
"""Qwen's vocabulary has one token for a newline and one for a blank line; the scripts
tell "after the generation prompt" (ending in ``\\n``) from "after a closed thought"
(ending in ``\\n\\n``) by them."""

THINKING_ON = "\n"
"""The last token of Qwen3's generation prompt (``<|im_start|>assistant\\n``)."""
THINKING_OFF = "\n\n"
"""The last token of a prompt that closed the thought (``</think>\\n\\n``)."""

_PIECE = re.compile(r"<[^<>\s]+>|\s*[^\s<]+|\s+")


def pieces(text: str) -> list[str]:
    """``text`` cut into the pieces a script is written in: markers (``<think>``...),
    words with their leading space, and runs of whitespace."""
    return _PIECE.findall(text)


def _spm(text: str) -> str:
    """A piece's text as the SentencePiece vocabulary stores it (spaces as ``\u2581``)."""
    return text.replace(" ", "\u2581")


def qwen_vocab(extra: Iterable[str] = (), *, control_think: bool = False) -> tuple[list[str], list[float], list[int]]:
    """The tiny Qwen vocabulary: ``testing``'s base one (``<|im_start|>``/``<|im_end|>``,
    ``<tool_call>``, bytes, ASCII, a few words, ``hello`` whole), Qwen's control and added
    tokens, its newline tokens, then ``extra`` pieces (a script's words) as normal tokens."""
    from gguf import TokenType

    tokens, scores, types = _vocab(("hello",))
    known = set(tokens)

    def add(text: str, kind: int) -> None:
        if text not in known:
            known.add(text)
            tokens.append(text)
            scores.append(-0.3)
            types.append(int(kind))

    for text in QWEN_CONTROL:
        add(text, TokenType.CONTROL)
    for text in QWEN_ADDED:
        # Some GGUFs mark the thought's markers as control tokens (hidden in decoded text).
        control = control_think and text in ("<think>", "</think>")
        add(text, TokenType.CONTROL if control else TokenType.USER_DEFINED)
    for text in QWEN_NEWLINES:
        add(text, TokenType.NORMAL)
    for text in extra:
        add(_spm(text), TokenType.NORMAL)
    return tokens, scores, types


def _writer(path: str | Path, arch: str, name: str):  # noqa: ANN202
    from gguf import GGUFWriter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = GGUFWriter(str(path), arch)
    w.add_name(name)
    return w


def _add_qwen_tokenizer(w, tokens: list[str], scores: list[float], types: list[int], template: str | None) -> None:  # noqa: ANN001
    from nexa_llama_cpp.testing import IM_END_ID, UNK_ID, _add_vocab

    _add_vocab(w, tokens, scores, types)
    w.add_unk_token_id(UNK_ID)
    w.add_eos_token_id(IM_END_ID)
    w.add_add_bos_token(False)  # Qwen writes no BOS
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    if template:
        w.add_chat_template(template)


def _finish(w) -> Path:  # noqa: ANN001
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(w.path)


def _qwen3_blocks(w, rng: np.random.Generator | None, *, n_layer: int, n_embd: int, n_head: int, n_head_kv: int,  # noqa: ANN001
                  head_dim: int, n_ff: int) -> None:
    """The layers of a Qwen3 network: random weights with ``rng``, else the scripted
    model's (every projection zero: each layer adds nothing to the residual)."""

    def t(*shape: int) -> np.ndarray:
        if rng is None:
            return np.zeros(shape, dtype=np.float32)
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", t(n_head * head_dim, n_embd))
        w.add_tensor(f"blk.{i}.attn_k.weight", t(n_head_kv * head_dim, n_embd))
        w.add_tensor(f"blk.{i}.attn_v.weight", t(n_head_kv * head_dim, n_embd))
        w.add_tensor(f"blk.{i}.attn_output.weight", t(n_embd, n_head * head_dim))
        w.add_tensor(f"blk.{i}.attn_q_norm.weight", np.ones(head_dim, dtype=np.float32))
        w.add_tensor(f"blk.{i}.attn_k_norm.weight", np.ones(head_dim, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", t(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", t(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", t(n_embd, n_ff))


def _qwen3_header(w, *, context_length: int, n_embd: int, n_layer: int, n_head: int, n_head_kv: int,  # noqa: ANN001
                  head_dim: int, n_ff: int, n_vocab: int) -> None:
    w.add_context_length(context_length)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(1_000_000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(n_vocab)


Script = tuple[str, Sequence[str]] | tuple[str, Sequence[str], bool]


def write_scripted_qwen3(
    path: str | Path,
    scripts: Sequence[Script],
    *,
    template: str = QWEN3_TEMPLATE,
    context_length: int = 4096,
    name: str = "tiny-scripted-qwen3",
    control_think: bool = False,
    mmproj: str | Path | None = None,
) -> Path:
    """A Qwen3 GGUF that, after a prompt ending in each script's first item (one piece:
    ``THINKING_ON``, ``THINKING_OFF``, ``<|fim_middle|>``, `` hello``...), writes the
    script's pieces (``pieces("<think> hello world</think> paris")``) and ends its turn;
    a third item False leaves the turn open (the last piece goes on as scripted elsewhere).

    Every piece of every script is one token of the vocabulary; a token may lead to one
    successor only, across all scripts (checked). ``control_think``: ``<think>`` and
    ``</think>`` are control tokens rather than Qwen3's user-defined ones. ``mmproj``: also
    write there a random CLIP projector into this model's width (``testing``), for image
    chats: the scripted output follows the last token, whatever the images' embeddings."""
    words = [p for start, script, *_ in scripts for p in (start, *script)]
    tokens, scores, types = qwen_vocab(words, control_think=control_think)
    ids = {text: i for i, text in enumerate(tokens)}
    end = ids["<|im_end|>"]
    following: dict[int, int] = {}
    for start, script, *ends in scripts:
        chain = [ids[_spm(start)], *(ids[_spm(p)] for p in script)]
        if ends in ([], [True]):
            chain.append(end)
        for current, after in zip(chain, chain[1:], strict=False):
            earlier = following.setdefault(current, after)
            assert earlier == after, f"token {tokens[current]!r} is scripted twice"
    n_vocab = len(tokens)
    n_embd = n_vocab + (-n_vocab % 32)
    n_head = n_head_kv = 2
    head_dim = 16
    w = _writer(path, "qwen3", name)
    _qwen3_header(w, context_length=context_length, n_embd=n_embd, n_layer=1, n_head=n_head, n_head_kv=n_head_kv,
                  head_dim=head_dim, n_ff=32, n_vocab=n_vocab)
    _add_qwen_tokenizer(w, tokens, scores, types, template)
    embd = np.zeros((n_vocab, n_embd), dtype=np.float32)
    embd[np.arange(n_vocab), np.arange(n_vocab)] = 1.0
    w.add_tensor("token_embd.weight", embd)
    _qwen3_blocks(w, None, n_layer=1, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim, n_ff=32)
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    # The final RMS norm scales the one-hot state to sqrt(n_embd) (~20), so 3.0 here is a
    # margin of ~60 logits for the successor; unscripted tokens lead to the end of turn.
    head = np.zeros((n_vocab, n_embd), dtype=np.float32)
    successor = [following.get(i, end) for i in range(n_vocab)]
    head[successor, np.arange(n_vocab)] = 3.0
    w.add_tensor("output.weight", head)
    if mmproj is not None:
        from nexa_llama_cpp.testing import write_tiny_mmproj

        write_tiny_mmproj(mmproj, text_n_embd=n_embd)
    return _finish(w)


def write_tiny_qwen3vl(
    folder: str | Path,
    *,
    seed: int = 6,
    n_embd: int = 64,
    n_head: int = 4,
    head_dim: int = 16,
    n_layer: int = 2,
    context_length: int = 4096,
    vision_embd: int = 32,
    patch_size: int = 16,
) -> Path:
    """A folder as a Qwen3-VL GGUF repo has it: ``Qwen3-VL-tiny-F32.gguf`` (the ``qwen3vl``
    text model: Qwen3 layers, IMRoPE sections, one deepstack layer whose image features
    are added after layer 0) and ``mmproj-Qwen3-VL-tiny-F32.gguf`` (a ``qwen3vl_merger``
    vision tower: two temporal patch kernels, learned positions, fused QKV, 2x2 patch
    merger, and the deepstack projector of its layer 0). Random weights."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    tokens, scores, types = qwen_vocab()
    n_vocab = len(tokens)
    w = _writer(folder / "Qwen3-VL-tiny-F32.gguf", "qwen3vl", "tiny-qwen3vl")
    _qwen3_header(w, context_length=context_length, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                  n_head_kv=n_head, head_dim=head_dim, n_ff=2 * n_embd, n_vocab=n_vocab)
    quarter = head_dim // 4
    w.add_array("qwen3vl.rope.dimension_sections", [quarter, quarter // 2 + quarter % 2, quarter // 2, 0])
    w.add_uint32("qwen3vl.n_deepstack_layers", 1)
    _add_qwen_tokenizer(w, tokens, scores, types, QWEN3_VL_TEMPLATE)
    w.add_tensor("token_embd.weight", (rng.standard_normal((n_vocab, n_embd))).astype(np.float32))
    _qwen3_blocks(w, rng, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head, head_dim=head_dim,
                  n_ff=2 * n_embd)
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor("output.weight", (rng.standard_normal((n_vocab, n_embd))).astype(np.float32))
    _finish(w)
    _write_qwen3vl_mmproj(folder / "mmproj-Qwen3-VL-tiny-F32.gguf", rng, text_embd=n_embd, n_embd=vision_embd,
                          patch_size=patch_size)
    return folder


def _write_qwen3vl_mmproj(path: Path, rng: np.random.Generator, *, text_embd: int, n_embd: int, patch_size: int,
                          n_layer: int = 2, n_head: int = 2, image_size: int = 64) -> Path:
    w = _writer(path, "clip", "tiny-qwen3vl-mmproj")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_string("clip.projector_type", "qwen3vl_merger")
    w.add_uint32("clip.vision.embedding_length", n_embd)
    w.add_uint32("clip.vision.feed_forward_length", 2 * n_embd)
    w.add_uint32("clip.vision.block_count", n_layer)
    w.add_uint32("clip.vision.projection_dim", text_embd)
    w.add_uint32("clip.vision.attention.head_count", n_head)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    w.add_uint32("clip.vision.image_size", image_size)
    w.add_uint32("clip.vision.patch_size", patch_size)
    w.add_uint32("clip.vision.spatial_merge_size", 2)
    w.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    w.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    w.add_bool("clip.use_gelu", True)

    def t(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    def zeros(n: int) -> np.ndarray:
        return np.zeros(n, dtype=np.float32)

    merged = 4 * n_embd  # a 2x2 group of patches
    n_pos = (image_size // patch_size) ** 2
    w.add_tensor("v.patch_embd.weight", t(n_embd, 3, patch_size, patch_size))
    w.add_tensor("v.patch_embd.weight.1", t(n_embd, 3, patch_size, patch_size))
    w.add_tensor("v.patch_embd.bias", zeros(n_embd))
    w.add_tensor("v.position_embd.weight", t(n_pos, n_embd))
    for i in range(n_layer):
        w.add_tensor(f"v.blk.{i}.attn_qkv.weight", t(3 * n_embd, n_embd))
        w.add_tensor(f"v.blk.{i}.attn_qkv.bias", zeros(3 * n_embd))
        w.add_tensor(f"v.blk.{i}.attn_out.weight", t(n_embd, n_embd))
        w.add_tensor(f"v.blk.{i}.attn_out.bias", zeros(n_embd))
        for ln in ("ln1", "ln2"):
            w.add_tensor(f"v.blk.{i}.{ln}.weight", np.ones(n_embd, dtype=np.float32))
            w.add_tensor(f"v.blk.{i}.{ln}.bias", zeros(n_embd))
        w.add_tensor(f"v.blk.{i}.ffn_up.weight", t(2 * n_embd, n_embd))
        w.add_tensor(f"v.blk.{i}.ffn_up.bias", zeros(2 * n_embd))
        w.add_tensor(f"v.blk.{i}.ffn_down.weight", t(n_embd, 2 * n_embd))
        w.add_tensor(f"v.blk.{i}.ffn_down.bias", zeros(n_embd))
    # Deepstack: layer 0's merged features, projected to the text model's width.
    w.add_tensor("v.deepstack.0.norm.weight", np.ones(merged, dtype=np.float32))
    w.add_tensor("v.deepstack.0.norm.bias", zeros(merged))
    w.add_tensor("v.deepstack.0.fc1.weight", t(merged, merged))
    w.add_tensor("v.deepstack.0.fc1.bias", zeros(merged))
    w.add_tensor("v.deepstack.0.fc2.weight", t(text_embd, merged))
    w.add_tensor("v.deepstack.0.fc2.bias", zeros(text_embd))
    w.add_tensor("v.post_ln.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor("v.post_ln.bias", zeros(n_embd))
    w.add_tensor("mm.0.weight", t(merged, merged))
    w.add_tensor("mm.0.bias", zeros(merged))
    w.add_tensor("mm.2.weight", t(text_embd, merged))
    w.add_tensor("mm.2.bias", zeros(text_embd))
    return _finish(w)


# --- jina-embeddings-v2 ---------------------------------------------------------------------

_WORDPIECE_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WORDPIECE_WORDS = ["hello", "world", "the", "cat", "paris", "capital", "of", "france", "is"]


def wordpiece_vocab() -> list[str]:
    """A small BERT WordPiece vocabulary as llama.cpp's converter writes it: word-initial
    pieces with ``\u2581`` (its phantom space), continuations bare, specials as they are."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    punctuation = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
    words = ["\u2581" + w for w in _WORDPIECE_WORDS]
    vocab = [*_WORDPIECE_SPECIAL, *("\u2581" + c for c in letters + punctuation), *letters, *words]
    assert len(set(vocab)) == len(vocab), "llama.cpp aborts on a vocabulary with a token twice"
    return vocab


def write_tiny_jina_v2(
    path: str | Path,
    *,
    seed: int = 7,
    n_embd: int = 32,
    n_head: int = 4,
    n_layer: int = 2,
    n_ff: int = 64,
    context_length: int = 512,
    name: str = "tiny-jina-embeddings-v2",
) -> Path:
    """A random jina-bert-v2 GGUF as llama.cpp's converter writes jina-embeddings-v2:
    ALiBi attention (no position embeddings), GEGLU feed-forward (``ffn_up`` holds the
    gate and the up projection), post-layer norms, mean pooling, a WordPiece vocabulary
    (tokenizer ``bert``, pre-tokenizer ``jina-v2-en``) with [CLS] and [SEP] added."""
    from gguf import PoolingType, TokenType

    rng = np.random.default_rng(seed)
    tokens = wordpiece_vocab()
    n_vocab = len(tokens)
    types = [int(TokenType.CONTROL if t in _WORDPIECE_SPECIAL else TokenType.NORMAL) for t in tokens]
    types[1] = int(TokenType.UNKNOWN)
    w = _writer(path, "jina-bert-v2", name)
    w.add_context_length(context_length)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_layer_norm_eps(1e-12)
    w.add_causal_attention(False)
    w.add_pooling_type(PoolingType.MEAN)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre("jina-v2-en")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_type_count(2)
    w.add_pad_token_id(0)
    w.add_unk_token_id(1)
    w.add_bos_token_id(2)  # [CLS]
    w.add_sep_token_id(3)
    w.add_mask_token_id(4)
    w.add_add_bos_token(True)
    w.add_add_sep_token(True)

    def t(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    def zeros(n: int) -> np.ndarray:
        return np.zeros(n, dtype=np.float32)

    w.add_tensor("token_embd.weight", t(n_vocab, n_embd))
    w.add_tensor("token_types.weight", t(2, n_embd))
    w.add_tensor("token_embd_norm.weight", ones(n_embd))
    w.add_tensor("token_embd_norm.bias", zeros(n_embd))
    for i in range(n_layer):
        for proj in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{proj}.weight", t(n_embd, n_embd))
            w.add_tensor(f"blk.{i}.{proj}.bias", zeros(n_embd))
        w.add_tensor(f"blk.{i}.attn_output_norm.weight", ones(n_embd))
        w.add_tensor(f"blk.{i}.attn_output_norm.bias", zeros(n_embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", t(2 * n_ff, n_embd))  # GEGLU: gate and up
        w.add_tensor(f"blk.{i}.ffn_down.weight", t(n_embd, n_ff))
        w.add_tensor(f"blk.{i}.ffn_down.bias", zeros(n_embd))
        w.add_tensor(f"blk.{i}.layer_output_norm.weight", ones(n_embd))
        w.add_tensor(f"blk.{i}.layer_output_norm.bias", zeros(n_embd))
    return _finish(w)


__all__ = [
    "DEEPSEEK_R1_TEMPLATE",
    "QWEN3_TEMPLATE",
    "QWEN3_VL_TEMPLATE",
    "THINKING_OFF",
    "THINKING_ON",
    "pieces",
    "qwen_vocab",
    "write_scripted_qwen3",
    "write_tiny_jina_v2",
    "write_tiny_qwen3vl",
]
