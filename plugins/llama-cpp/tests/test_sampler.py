"""The sampler's greedy shortcut: a greedy-only chain picks the logits' first maximum in
numpy instead of through ``llama_sampler_sample``. These tests pin that it chooses what
llama.cpp's greedy sampler chooses, row by row on real decodes and on exact ties, and that
any bias, penalty or grammar still goes through llama.cpp's chain."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from nexa.types import Sampling
from nexa_llama_cpp import testing as tiny
from nexa_llama_cpp.engine.sampler import Sampler, Scratch


@pytest.fixture(scope="module")
def llama():
    import llama_cpp.llama_cpp as L

    L.llama_backend_init()
    return L


@pytest.fixture(scope="module")
def tiny_model(llama, tmp_path_factory):
    path = tiny.write_tiny_llama(tmp_path_factory.mktemp("sampler") / "tiny-F32.gguf")
    model = llama.llama_model_load_from_file(str(path).encode(), llama.llama_model_default_params())
    yield model
    llama.llama_model_free(model)


def greedy_reference(L, ctx, idx: int) -> int:
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
    try:
        return L.llama_sampler_sample(chain, ctx, idx)
    finally:
        L.llama_sampler_free(chain)


def test_greedy_shortcut_picks_what_llama_cpp_picks_on_every_row(llama, tiny_model):
    L = llama
    vocab = L.llama_model_get_vocab(tiny_model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    params = L.llama_context_default_params()
    params.n_ctx, params.n_threads, params.n_threads_batch = 256, 1, 1
    ctx = L.llama_init_from_model(tiny_model, params)
    rng = np.random.default_rng(3)
    tokens = [int(t) for t in rng.integers(1, n_vocab, 48)]
    batch = L.llama_batch_init(len(tokens), 0, 1)
    try:
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, i, 1
            batch.seq_id[i][0], batch.logits[i] = 0, True
        batch.n_tokens = len(tokens)
        assert L.llama_decode(ctx, batch) == 0
        sampler = Sampler(L, vocab, n_vocab, Sampling(temperature=0.0))
        assert sampler.argmax_only
        try:
            chosen = [sampler.sample(ctx, i, None) for i in range(len(tokens))]
        finally:
            sampler.free()
        assert chosen == [greedy_reference(L, ctx, i) for i in range(len(tokens))]
        assert len(set(chosen)) > 1  # the rows differ: the comparison means something
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)


def test_greedy_shortcut_takes_the_first_of_tied_maxima_as_llama_cpp_does(llama, tiny_model):
    L = llama
    vocab = L.llama_model_get_vocab(tiny_model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    logits = np.zeros(n_vocab, dtype=np.float32)
    logits[[7, 3, 11]] = 5.0  # three tied maxima; the first in vocabulary order is 3
    shortcut = Sampler(L, vocab, n_vocab, Sampling(temperature=0.0))
    try:
        assert shortcut.sample(None, -1, Scratch(L, n_vocab), logits=logits) == 3
    finally:
        shortcut.free()
    # llama.cpp's own greedy sampler over the same candidates.
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
    cand = Scratch(L, n_vocab).candidates
    cand["id"], cand["logit"] = np.arange(n_vocab, dtype=np.int32), logits
    arr = L.llama_token_data_array(data=cand.ctypes.data_as(ctypes.POINTER(L.llama_token_data)), size=n_vocab,
                                   selected=-1, sorted=False)
    L.llama_sampler_apply(chain, ctypes.byref(arr))
    L.llama_sampler_free(chain)
    assert int(arr.data[arr.selected].id) == 3


@pytest.mark.parametrize(
    ("sampling", "grammar"),
    [
        (Sampling(temperature=0.0, repeat_penalty=1.1), None),
        (Sampling(temperature=0.0, presence_penalty=0.5), None),
        (Sampling(temperature=0.0, logit_bias={5: 3.0}), None),
        (Sampling(temperature=0.0), 'root ::= "a"'),
        (Sampling(temperature=0.7), None),
    ],
)
def test_anything_beyond_plain_greedy_goes_through_the_chain(llama, tiny_model, sampling, grammar):
    L = llama
    vocab = L.llama_model_get_vocab(tiny_model)
    sampler = Sampler(L, vocab, L.llama_vocab_n_tokens(vocab), sampling, grammar)
    try:
        assert not sampler.argmax_only
    finally:
        sampler.free()
