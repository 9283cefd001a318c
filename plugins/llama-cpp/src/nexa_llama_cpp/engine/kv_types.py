"""KV-cache data types (``nexa serve --cache-type-k/--cache-type-v``) and what a token's
cache entries cost in memory.

The names are llama.cpp's own (``llama-server --cache-type-k``): f16 (the default), bf16,
f32, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1. A quantized V cache needs flash attention
(llama.cpp reads V only through its flash-attention kernel then); ``check`` refuses that
pairing with both named, before llama.cpp would fail with a bare "could not create a
context". Nothing here imports llama_cpp.
"""

from __future__ import annotations

from typing import Any

import attrs

from nexa.errors import ModelLoadError


@attrs.frozen
class KvType:
    name: str
    ggml_type: int
    """ggml's ``enum ggml_type`` value."""
    block_bytes: int
    block_elems: int
    """Bytes of one block of ``block_elems`` values (a row is whole blocks)."""

    @property
    def quantized(self) -> bool:
        return self.block_elems > 1

    def row_bytes(self, elems: int) -> int:
        return elems // self.block_elems * self.block_bytes


KV_TYPES = {
    t.name: t
    for t in (
        KvType("f16", 1, 2, 1),
        KvType("bf16", 30, 2, 1),
        KvType("f32", 0, 4, 1),
        KvType("q8_0", 8, 34, 32),
        KvType("q4_0", 2, 18, 32),
        KvType("q4_1", 3, 20, 32),
        KvType("iq4_nl", 20, 18, 32),
        KvType("q5_0", 6, 22, 32),
        KvType("q5_1", 7, 24, 32),
    )
}
DEFAULT_KV_TYPE = "f16"


def kv_type(name: str | None, *, flag: str) -> KvType:
    """The type called ``name`` (None: f16); a clear error naming ``flag`` otherwise."""
    if name is None:
        return KV_TYPES[DEFAULT_KV_TYPE]
    found = KV_TYPES.get(name.lower())
    if found is None:
        raise ModelLoadError(f"{flag} {name!r} is not a KV-cache type; choose one of {', '.join(KV_TYPES)}")
    return found


def check(type_k: KvType, type_v: KvType, *, flash_attn: bool, model: str) -> None:
    """Refuse a pairing llama.cpp cannot run (a quantized V cache without flash attention)."""
    if type_v.quantized and not flash_attn:
        raise ModelLoadError(
            f"--cache-type-v {type_v.name} needs flash attention, which is off for {model!r} "
            "(its manifest's options.flash_attn is false): use --cache-type-v f16, or turn flash attention on"
        )


@attrs.frozen
class KvFootprint:
    """What a model's KV cache costs with one pair of types."""

    type_k: str
    type_v: str
    bytes_per_token: int
    """All layers' K and V entries of one token (what one more token of context costs)."""
    cells: int
    """Tokens the cache holds (all sequences together)."""

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_token * self.cells

    def describe(self) -> str:
        return (
            f"KV cache {self.type_k}/{self.type_v}: {self.total_bytes / 2**20:.1f} MiB for {self.cells} tokens "
            f"({self.bytes_per_token / 1024:.1f} KiB per token)"
        )


def check_head_sizes(lib: Any, model: Any, type_k: KvType, type_v: KvType) -> None:
    """Refuse a quantized type whose blocks do not divide the model's attention heads
    (llama.cpp stores each head's values in whole blocks)."""
    key_len, value_len = head_sizes(lib, model)
    for flag, kind, size in (("--cache-type-k", type_k, key_len), ("--cache-type-v", type_v, value_len)):
        if size % kind.block_elems:
            raise ModelLoadError(
                f"{flag} {kind.name} stores values in blocks of {kind.block_elems}, which do not divide this "
                f"model's attention heads of {size} values: use f16, bf16 or f32"
            )


def head_sizes(lib: Any, model: Any) -> tuple[int, int]:
    """Values per attention head in K and in V (the GGUF's ``{arch}.attention.key_length``
    and ``value_length``, else ``n_embd / n_head``)."""
    n_head = max(1, lib.llama_model_n_head(model))
    default_head = lib.llama_model_n_embd(model) // n_head
    arch = _meta(lib, model, "general.architecture") or ""
    key_len = int(_meta(lib, model, f"{arch}.attention.key_length") or default_head)
    value_len = int(_meta(lib, model, f"{arch}.attention.value_length") or default_head)
    return key_len, value_len


def bytes_per_token(lib: Any, model: Any, type_k: KvType, type_v: KvType) -> int:
    """K and V bytes of one token over all layers, from the model's attention shape.

    Every layer holds ``n_head_kv`` heads of ``head_sizes`` values per token in K and
    in V, stored in rows of whole type blocks, as llama.cpp sizes them.
    """
    n_layer = lib.llama_model_n_layer(model)
    n_head_kv = lib.llama_model_n_head_kv(model)
    key_len, value_len = head_sizes(lib, model)
    per_layer = type_k.row_bytes(key_len * n_head_kv) + type_v.row_bytes(value_len * n_head_kv)
    return n_layer * per_layer


def _meta(lib: Any, model: Any, key: str) -> str | None:
    import ctypes

    buf = ctypes.create_string_buffer(128)
    n = lib.llama_model_meta_val_str(model, key.encode("utf-8"), buf, len(buf))
    return buf.value.decode("utf-8", "replace") if n >= 0 else None
