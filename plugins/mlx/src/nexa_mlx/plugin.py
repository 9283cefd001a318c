"""The nexa entry point of nexa-mlx: registers the MLX backend classes.

Cheap to import: the backend modules import mlx, mlx-lm and mlx-vlm only when a model
loads.
"""

from __future__ import annotations

from collections.abc import Callable

from nexa.hookspecs import hookimpl


@hookimpl
def register_chat_backends(register: Callable[[type], None]) -> None:
    from nexa_mlx.backend import MlxBackend
    from nexa_mlx.vision import MlxVisionBackend

    register(MlxBackend)
    # Text chat on a vision model goes to the vision backend (it outranks MlxBackend
    # and refuses models without a vision tower).
    register(MlxVisionBackend)


@hookimpl
def register_vlm_backends(register: Callable[[type], None]) -> None:
    from nexa_mlx.vision import MlxVisionBackend

    register(MlxVisionBackend)
