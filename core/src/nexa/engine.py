"""The engine contract: where a model's backend runs when not in this process.

By default (``nexa serve`` with no ``--engine``) the ``ModelManager`` makes each backend
instance itself, in this process. An engine plugin (``register_engines``) can instead
run the backend elsewhere, in worker processes or across a cluster, and hand the manager
a stand-in: a ``Backend`` with the same async interface (``stream_chat``, ``run_embed``,
``run_images``, ``runtime_metrics``) whose calls reach the real backends. The manager's
slots, queue and keepalive and the HTTP layer work on the stand-in unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from nexa.errors import NexaError

if TYPE_CHECKING:
    from nexa.backend import Backend, LoadOptions
    from nexa.config import ServerConfig
    from nexa.plugins import PluginSet
    from nexa.types import Device, Manifest

LOCAL = "local"
"""The built-in engine name: backends in this process (what no ``--engine`` means)."""


class Engine:
    """Base class of every engine. One instance serves one ``ModelManager``.

    Lifecycle: ``start()`` once when the server starts; ``backend()`` for every model the
    manager loads (the manager then calls the returned object's ``start``/``stop``);
    at server stop ``detach()``, then every model's ``stop()``, then ``stop()``.
    """

    name: ClassVar[str] = ""

    def __init__(self, config: ServerConfig, device: Device) -> None:
        self.config = config
        self.device = device
        """This process's device; an engine's workers may detect their own."""

    async def start(self) -> None:
        """Connect to wherever backends run (off the event loop). Raise to stop the server."""

    def backend(
        self, cls: type[Backend], manifest: Manifest, device: Device, options: LoadOptions
    ) -> Backend:
        """A not yet started stand-in for ``cls(manifest, device, options)``.

        Its ``parallel`` is read at once (the manager's slots for the model), so it must
        be known before ``start()``. Must be cheap: loading happens in its ``start()``.
        """
        raise NotImplementedError

    def detach(self) -> None:
        """The server is stopping rather than unloading: the stand-ins' ``stop()`` calls
        that follow may leave their workers running (to be reattached by the next server),
        where the engine supports it. Outside shutdown, ``stop()`` frees the model."""

    async def stop(self) -> None:
        """After every model stopped: disconnect."""


def create_engine(plugins: PluginSet, config: ServerConfig, device: Device) -> Engine | None:
    """The engine ``config.engine`` names, not started; None for the in-process default."""
    name = config.engine
    if name is None or name == LOCAL:
        return None
    found = plugins.engines.get(name)
    if found is None:
        have = ", ".join(sorted([LOCAL, *plugins.engines]))
        raise NexaError(f"unknown engine {name!r} (installed: {have}); install its plugin, e.g. nexa-{name}")
    return found[0](config, device)
