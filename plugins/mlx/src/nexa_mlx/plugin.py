"""The nexa entry point of nexa-mlx: registers the MLX backend classes.

Cheap to import: the backend module imports mlx and mlx-lm only when a model loads.
"""

from __future__ import annotations

from collections.abc import Callable

from nexa.hookspecs import hookimpl


@hookimpl
def register_chat_backends(register: Callable[[type], None]) -> None:
    from nexa_mlx.backend import MlxBackend

    register(MlxBackend)


@hookimpl
def register_vlm_backends(register: Callable[[type], None]) -> None:
    # Registered only so that selection states why MLX vision models are refused.
    from nexa_mlx.backend import MlxVisionBackend

    register(MlxVisionBackend)
