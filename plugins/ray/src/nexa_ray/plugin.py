"""The plugin's entry point: registers the Ray engine. Cheap to import (no Ray)."""

from __future__ import annotations

from collections.abc import Callable

from nexa.hookspecs import hookimpl


@hookimpl
def register_engines(register: Callable[[type], None]) -> None:
    from nexa_ray.engine import RayEngine

    register(RayEngine)
