"""The plugin's entry point: registers the diffusers image backend with nexa.

Importing this module must stay cheap (no torch, no diffusers): the backend module
imports them only when a model loads.
"""

from __future__ import annotations

from collections.abc import Callable

from nexa.hookspecs import hookimpl


@hookimpl
def register_image_backends(register: Callable[[type], None]) -> None:
    from nexa_diffusers.backend import DiffusersBackend

    register(DiffusersBackend)
