"""pytest plugin shipped with nexa-core: the ``nexa_serve`` fixture for backend authors."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture
def nexa_serve() -> Iterator[Any]:
    """``nexa_serve(backends=[...], home=tmp_path, **config)`` -> a running ServerHandle."""
    from nexa.testing import serve

    with contextlib.ExitStack() as stack:
        yield lambda *args, **kwargs: stack.enter_context(serve(*args, **kwargs))
