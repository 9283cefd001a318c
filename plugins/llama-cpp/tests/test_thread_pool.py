"""The engine's persistent ggml thread pool (``nexa_llama_cpp.native.ThreadPool``) on the
real SmolLM2-135M-Instruct: attached while a CPU context decodes with all its threads,
detached and paused with fewer, and the answers the same whichever threads decode them.
(Its speed against per-graph threads is a benchmark's business: docs/benchmarks.md.)
"""

from __future__ import annotations

from test_engine_smollm2 import QUESTIONS, collect, prompt, req

from nexa_llama_cpp.engine import BatchEngine
from nexa_llama_cpp.native import ThreadPool, loaded_library


def answers(engine: BatchEngine) -> list[str]:
    # Short prompts: under 256 cached tokens one and two threads sum alike (benchmarks.md).
    return [collect(engine, req(prompt(engine, q), temperature=0.0, max_tokens=24))[0] for q in QUESTIONS[:3]]


def test_a_cpu_engine_with_two_threads_decodes_on_its_pool_and_answers_as_with_one(smollm2):
    with BatchEngine(smollm2, n_seq=1, n_ctx=512, n_threads=1) as one:
        assert one._c.pool is None  # one thread: nothing to keep waiting
        reference = answers(one)
    with BatchEngine(smollm2, n_seq=2, n_ctx=512, n_threads=2) as engine:
        pool = engine._c.pool
        assert isinstance(pool, ThreadPool) and pool.attached and pool.n_threads == 2
        assert answers(engine) == reference
        # What the thread governor does when it gives a thread back and takes it again
        # (between decodes, on the engine thread; here the engine is idle).
        engine._c.set_threads(1)
        assert not pool.attached
        assert answers(engine) == reference  # per-graph threads, one of them
        engine._c.set_threads(2)
        assert pool.attached
        assert answers(engine) == reference  # the paused pool resumed


def test_the_pool_is_released_before_its_context_when_the_engine_closes(smollm2):
    engine = BatchEngine(smollm2, n_seq=1, n_ctx=512, n_threads=2)
    engine.start()
    pool = engine._c.pool
    assert pool is not None and pool.attached
    assert collect(engine, req(prompt(engine, QUESTIONS[3]), temperature=0.0, max_tokens=4))[0]
    engine.close()
    assert pool._pool is None and not pool.attached


def test_the_pool_is_made_by_the_ggml_library_libllama_decodes_with(smollm2):
    # The wheel ships libggml-cpu.so and libggml-cpu.so.0 as two files. A pool made by the
    # copy libllama does not use runs its workers on uninitialised code (NaN logits on
    # Qwen2.5-Coder; test_quality.py checks that model): one copy must stay mapped.
    with BatchEngine(smollm2, n_seq=1, n_ctx=512, n_threads=2) as engine:
        assert engine._c.pool is not None
        used = loaded_library("libggml-cpu")
        assert used is not None  # exactly one file of that library in this process
        assert engine._c.pool._cpu._name == used
