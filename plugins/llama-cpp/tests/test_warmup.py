"""Warm-up at load: the engine decodes before it takes requests (as llama-server does), so
the first request finds the graph built and the weights paged in; the same decodes time the
shapes the thread governor and the drafting policy start from, and leave nothing behind in
the cache (the first request reuses no cells and answers as an unwarmed engine does)."""

from __future__ import annotations

from conftest import CHAT

from nexa.types import Sampling
from nexa_llama_cpp.engine import BatchEngine, Finished, GenerationRequest, TextPiece, warmup
from nexa_llama_cpp.engine.threads import generation_shape


def answer(engine: BatchEngine) -> tuple[str, Finished]:
    tokens = engine.tokenize("<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n")
    parts, final = [], None
    for event in engine.generate(GenerationRequest(tokens, Sampling(max_tokens=12, temperature=0.0))):
        if isinstance(event, TextPiece):
            parts.append(event.text)
        else:
            final = event
    assert final is not None
    return "".join(parts), final


def test_the_engine_warms_up_at_load_and_leaves_the_cache_empty(model_sources, monkeypatch):
    monkeypatch.setattr(warmup, "BUDGET", 600.0)  # every timing, however busy the machine
    with BatchEngine(model_sources[CHAT], n_seq=2, n_ctx=256, n_threads=2, adaptive_threads=True) as warm:
        assert warm.warmup_seconds > 0
        stats = warm.stats()
        # Done before any request, and none of it counted as a request's work.
        assert (stats.requests_started, stats.decode_steps, stats.prompt_tokens_evaluated) == (0, 0, 0)
        # The governor knows a one-row step at both counts it may use; the drafting policy
        # knows what more rows of one sequence cost.
        one_row = generation_shape(1, 1, 2)
        assert warm._governor.usual(2, one_row) is not None and warm._governor.usual(1, one_row) is not None
        assert warm._spec is not None and warm._spec.costs.seconds(2, 1, 4) is not None
        warm_text, warm_end = answer(warm)
        assert warm_end.cached_tokens == 0  # the warm-up's cells are gone

    with BatchEngine(model_sources[CHAT], n_seq=2, n_ctx=256, n_threads=2, adaptive_threads=True,
                     warmup=False) as cold:
        assert cold.warmup_seconds == 0
        assert cold._governor.usual(2, generation_shape(1, 1, 2)) is None
        cold_text, _ = answer(cold)
    assert warm_text == cold_text


def test_past_its_budget_the_warm_up_only_warms(model_sources, monkeypatch):
    # A machine whose cores are taken makes every decode slow: the timed decodes stop at
    # the budget (here none fit), the model is still warmed, and the engine times its own
    # steps from the first request on.
    monkeypatch.setattr(warmup, "BUDGET", 0.0)
    with BatchEngine(model_sources[CHAT], n_seq=2, n_ctx=256, n_threads=2, adaptive_threads=True) as engine:
        assert engine.warmup_seconds > 0
        one_row = generation_shape(1, 1, 2)
        assert engine._governor.usual(2, one_row) is None and engine._governor.usual(1, one_row) is None
        assert engine._spec is not None and engine._spec.costs.seconds(2, 1, 4) is None
        _text, end = answer(engine)
        assert end.cached_tokens == 0 and end.completion_tokens > 0
        assert engine.stats().decode_steps > 0
