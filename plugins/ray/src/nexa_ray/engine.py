"""The Ray engine: connects to a Ray cluster and makes one ``RayBackend`` per model.

Nothing of Ray is imported until ``start`` (the server's start with ``--engine ray``).
Connecting: ``--ray-address`` (or ``RAY_ADDRESS``) joins an existing cluster; without
either, a new single-node cluster starts on 127.0.0.1 for this server. Ray's token
authentication is left as the cluster has it: a client of a token-protected cluster
needs ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN`` (or the token file) in its
environment, exactly as Ray's own tools do.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Any

from nexa.engine import Engine
from nexa.errors import NexaError
from nexa_ray.options import RayOptions

if TYPE_CHECKING:
    from nexa.backend import Backend, LoadOptions
    from nexa.config import ServerConfig
    from nexa.types import Device, Manifest
    from nexa_ray.proxy import RayBackend

log = logging.getLogger("nexa.ray")

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Set to 0 so Ray keeps 127.0.0.1 rather than rewriting it to the machine's external
address (Ray's own switch, despite its name)."""


class RayEngine(Engine):
    """``nexa serve --engine ray``: model replicas as Ray actors across a cluster."""

    name = "ray"

    def __init__(self, config: ServerConfig, device: Device) -> None:
        super().__init__(config, device)
        self.options = RayOptions.from_engine_options(config.engine_options)
        self.detached = False
        """Set at server shutdown: replicas stay up for the next server to reattach."""
        self.backends: list[RayBackend] = []
        self._connected_here = False

    async def start(self) -> None:
        await asyncio.to_thread(self._connect)

    def _connect(self) -> None:
        import ray

        if ray.is_initialized():
            return  # a test or embedding program connected this process already
        address = self.options.address or os.environ.get("RAY_ADDRESS") or None
        kwargs: dict[str, Any] = {
            "namespace": self.options.namespace,
            "logging_level": logging.WARNING,
            "log_to_driver": False,
        }
        if address is None:
            # A cluster of our own: loopback only, no dashboard (it would be one more
            # listening port).
            os.environ.setdefault(LOOPBACK_ENV, "0")
            kwargs.update(_node_ip_address="127.0.0.1", include_dashboard=False)
        else:
            kwargs["address"] = address
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError) as exc:
            raise NexaError(
                f"could not connect to the Ray cluster at {address or 'a new local cluster'}: {exc} "
                "(a cluster with token authentication needs RAY_AUTH_MODE=token and RAY_AUTH_TOKEN)"
            ) from exc
        self._connected_here = True
        log.info("connected to Ray %s (namespace %s)", address or "(new local cluster)", self.options.namespace)

    def backend(self, cls: type[Backend], manifest: Manifest, device: Device, options: LoadOptions) -> Backend:
        from nexa_ray.proxy import RayBackend

        backend = RayBackend(self, cls, manifest, device, options)
        self.backends.append(backend)
        return backend

    def detach(self) -> None:
        self.detached = True

    async def stop(self) -> None:
        self.backends.clear()
        if self._connected_here:
            import ray

            await asyncio.to_thread(ray.shutdown)
            self._connected_here = False
