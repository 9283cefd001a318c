"""The default thread count: never every CPU on small machines, physical cores on big ones."""

from __future__ import annotations

import os

import pytest
from conftest import CHAT

from nexa.backend import LoadOptions
from nexa_llama_cpp import runtime
from nexa_llama_cpp.backend import LlamaCppBackend
from nexa_llama_cpp.runtime import default_threads


@pytest.mark.parametrize(("cpus", "threads"), [(1, 1), (2, 1), (3, 2), (4, 3), (8, 4), (16, 8), (64, 32)])
def test_default_threads_leaves_room_for_the_rest_of_the_machine(monkeypatch, cpus, threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(cpus)), raising=False)
    assert default_threads() == threads


def test_prompt_and_decode_threads_follow_the_default_or_the_setting(store, device, monkeypatch):
    monkeypatch.setattr(runtime, "default_threads", lambda: 1)
    for options, want in ((LoadOptions(parallel=1), 1), (LoadOptions(parallel=1, threads=2), 2)):
        backend = LlamaCppBackend(store.get(CHAT), device, options)
        backend.load()
        try:
            params = backend._llama.context_params
            assert (params.n_threads, params.n_threads_batch) == (want, want)
            assert (backend._engine.n_threads, backend._engine.n_threads_batch) == (want, want)
        finally:
            backend.close()


def test_the_cpu_device_keeps_prompt_batches_off_any_gpu(store, device):
    # A GPU build of llama.cpp offloads large prompt batches to the GPU even for layers
    # kept on the CPU ("op offload"); `--device cpu` means the CPU alone.
    for options in (LoadOptions(parallel=1), LoadOptions(parallel=2)):
        backend = LlamaCppBackend(store.get(CHAT), device, options)
        backend.load()
        try:
            assert backend._llama.context_params.op_offload is (device.kind != "cpu")
            assert backend._engine._op_offload is (device.kind != "cpu")
        finally:
            backend.close()
