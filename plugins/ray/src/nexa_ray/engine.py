"""The Ray engine: connects to a Ray cluster and makes one ``RayBackend`` per model.

Nothing of Ray is imported until ``start`` (the server's start with ``--engine ray``).
Connecting: ``--ray-address`` (or ``RAY_ADDRESS``) joins an existing cluster (``auto``:
the one ``ray start`` made on this machine); without either, a new single-node cluster
of this server's own starts on 127.0.0.1. Ray's token authentication stays as the
cluster has it: the server sends the token given in ``RAY_AUTH_TOKEN`` (or the file
named by ``RAY_AUTH_TOKEN_PATH``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from typing import TYPE_CHECKING, Any

from nexa.engine import Engine
from nexa.errors import NexaError
from nexa_ray.options import RayOptions

if TYPE_CHECKING:
    from nexa.backend import Backend, LoadOptions
    from nexa.config import ServerConfig
    from nexa.types import Device, Manifest

log = logging.getLogger("nexa.ray")

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Set to 0 so Ray keeps 127.0.0.1 rather than rewriting it to the machine's external
address (Ray's own switch, despite its name)."""


def _token_auth_env() -> None:
    """Before Ray is imported (it reads its settings once): a token given (``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``) means token auth: Ray's
    client otherwise connects without sending it unless ``RAY_AUTH_MODE=token`` is set too."""
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_MODE"] = "token"


class RayEngine(Engine):
    """``nexa serve --engine ray``: model replicas as Ray actors across a cluster."""

    name = "ray"

    def __init__(self, config: ServerConfig, device: Device) -> None:
        super().__init__(config, device)
        self.options = RayOptions.from_engine_options(config.engine_options)
        self.detached = False
        """Set at server shutdown: replicas stay up for the next server to reattach."""
        self._connected_here = False

    async def start(self) -> None:
        on_main_thread = threading.current_thread() is threading.main_thread()
        sigterm = signal.getsignal(signal.SIGTERM) if on_main_thread else None
        await asyncio.to_thread(self._connect)
        if on_main_thread and sigterm is not None:
            # Ray's driver installs a native SIGTERM handler that dumps a stack trace and
            # aborts the process after the server's graceful shutdown; the server's own
            # handler (uvicorn's) is put back.
            signal.signal(signal.SIGTERM, sigterm)

    def _connect(self) -> None:
        address = self.options.address or os.environ.get("RAY_ADDRESS") or "local"
        if address == "local":
            # A new cluster of this server's own: loopback only. Ray reads this switch when
            # it is imported (and its processes inherit it), so it is set first.
            os.environ.setdefault(LOOPBACK_ENV, "0")
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves the machine
        _token_auth_env()
        import ray

        if ray.is_initialized():
            return  # a test or embedding program connected this process already
        kwargs: dict[str, Any] = {
            "address": address,
            "namespace": self.options.namespace,
            "logging_level": logging.WARNING,
            "log_to_driver": False,
        }
        if address == "local":
            # No dashboard: one more listening port. The cluster's replicas end with it.
            kwargs.update(_node_ip_address="127.0.0.1", include_dashboard=False)
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
            raise NexaError(
                f"could not connect to the Ray cluster at {address}: {type(exc).__name__}: {exc} "
                "(a cluster with token authentication needs its token in RAY_AUTH_TOKEN)"
            ) from exc
        self._connected_here = True
        log.info("connected to Ray cluster %s (namespace %s)", address, self.options.namespace)

    def backend(self, cls: type[Backend], manifest: Manifest, device: Device, options: LoadOptions) -> Backend:
        from nexa_ray.proxy import RayBackend

        return RayBackend(self, cls, manifest, device, options)

    def detach(self) -> None:
        self.detached = True

    async def stop(self) -> None:
        if self._connected_here:
            import ray

            ray.shutdown()  # on the loop thread: from a worker thread it can abort the process
            self._connected_here = False
