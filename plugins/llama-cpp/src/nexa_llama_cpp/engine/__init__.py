"""Continuous batching for llama.cpp: one decode loop that serves many generations at once.

- ``scheduler``: ``BatchEngine``, the engine thread and its step (admit, decode, sample, retire).
- ``slots``: the KV cache as one slot per sequence id (placement, prefix reuse, compaction).
- ``sampler``: one sequence's sampler chain and (lazy) grammar, from core's ``Sampling``.
- ``streams``: the consumer's side of a generation (blocking or async), cancel and finish.
- ``records``: the values (``GenerationRequest``, ``TextPiece``, ``Finished``, ``EngineStats``)
  and the records the engine thread keeps.
- ``embedding``: pooled embeddings on the engine's own weights, between decode steps.

``llama_cpp`` is imported on the engine thread only, when an engine starts.
"""

from nexa_llama_cpp.engine.records import EngineStats, Event, Finished, GenerationRequest, TextPiece
from nexa_llama_cpp.engine.scheduler import BatchEngine
from nexa_llama_cpp.engine.streams import AsyncGeneration, Generation

__all__ = [
    "AsyncGeneration",
    "BatchEngine",
    "EngineStats",
    "Event",
    "Finished",
    "Generation",
    "GenerationRequest",
    "TextPiece",
]
