"""nexa-mlx: the MLX backend plugin for nexa (MLX-format models on mlx-lm).

The entry point is ``nexa_mlx.plugin``; the backend is ``nexa_mlx.backend.MlxBackend``.
Importing this package does not import mlx.
"""

__version__ = "0.1.0"
