"""Embeddings on a tiny llama with mean pooling: batching, normalisation, token arrays."""

from __future__ import annotations

import asyncio
import math

import attrs
import pytest
from conftest import EMBED

from nexa.backend import CancelToken
from nexa.errors import BadRequest, ContextLengthExceeded
from nexa.testing import conformance
from nexa.types import EmbedRequest, Task
from nexa_llama_cpp.embeddings import LlamaCppEmbedBackend


def embed(backend, *inputs):
    return backend.embed(EmbedRequest(inputs=inputs), CancelToken())


def dot(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_store_marks_the_model_as_embedding(store):
    assert store.get(EMBED).tasks == {Task.EMBED}


def test_conformance(store, device, tiny_options):
    backend = LlamaCppEmbedBackend(store.get(EMBED), device, tiny_options)
    try:
        asyncio.run(backend.start())
        conformance.check_embed(backend)
    finally:
        asyncio.run(backend.stop())


def test_batched_vectors_equal_single_ones(embed_backend):
    texts = ["hello world", "the cat", "paris is the capital", "yes", "no no no"]
    together = embed(embed_backend, *texts)
    assert len(together.vectors) == 5
    for text, vec in zip(texts, together.vectors, strict=True):
        alone = embed(embed_backend, text).vectors[0]
        assert dot(alone, vec) > 0.9999
        assert abs(math.sqrt(dot(vec, vec)) - 1) < 1e-6
    assert dot(together.vectors[0], together.vectors[1]) < 0.9999


def test_usage_counts_every_token(embed_backend):
    llama = embed_backend._llama
    texts = ["hello world", "the cat sat"]
    expected = sum(len(llama.tokenize(t.encode(), add_bos=True, special=False)) for t in texts)
    assert embed(embed_backend, *texts).prompt_tokens == expected


def test_token_arrays_match_text(embed_backend):
    ids = embed_backend._llama.tokenize(b"hello world", add_bos=True, special=False)
    from_text, from_ids = embed(embed_backend, "hello world", tuple(ids)).vectors
    assert dot(from_text, from_ids) > 0.9999


def test_many_inputs_split_over_several_decodes(store, device, tiny_options):
    # A 256-token context forces several decodes for 40 inputs of ~12 tokens.
    backend = LlamaCppEmbedBackend(store.get(EMBED), device, attrs.evolve(tiny_options, context_length=256))
    backend.load()
    try:
        texts = [f"item number {i} here" for i in range(40)]
        result = backend.embed(EmbedRequest(inputs=texts), CancelToken())
        assert len(result.vectors) == 40
        for i in (0, 17, 39):
            alone = backend.embed(EmbedRequest(inputs=[texts[i]]), CancelToken()).vectors[0]
            assert dot(alone, result.vectors[i]) > 0.9999
        with pytest.raises(ContextLengthExceeded):
            backend.embed(EmbedRequest(inputs=["hello " * 400]), CancelToken())
    finally:
        backend.close()


def test_bad_inputs_are_400(embed_backend):
    with pytest.raises(BadRequest):
        embed(embed_backend, (1, 2, 10**9))
    with pytest.raises(BadRequest):
        embed(embed_backend, ())
