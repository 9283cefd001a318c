"""nexa-sentence-transformers: embeddings (``/v1/embeddings``) with sentence-transformers."""

__version__ = "0.1.0"
