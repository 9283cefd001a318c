"""The Ray engine's settings, read from ``ServerConfig.engine_options`` and checked once.

``nexa serve --engine ray`` flags land here: ``--ray-address`` (``address``),
``--replicas [MODEL=]N`` (``replicas``), ``--placement [MODEL=]JSON`` (``placement``).
A per-model value overrides the every-model one ("" key). Bad values raise a
``NexaError`` naming the flag, before anything connects to Ray.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs

from nexa.errors import NexaError

KNOWN_OPTIONS = frozenset({"address", "namespace", "replicas", "placement", "poll_interval", "start_timeout"})
PLACEMENT_KEYS = frozenset({
    "num_cpus", "num_gpus", "memory", "resources", "label_selector", "accelerator_type", "scheduling_strategy",
})
"""The Ray actor options a replica's placement may set; the rest (lifetime, name,
restarts, concurrency) are the engine's own."""
DEFAULT_NAMESPACE = "nexa"


class OptionError(NexaError):
    """A ``--engine ray`` setting is malformed."""

    status = 400
    type = "invalid_request_error"
    code = "bad_engine_option"


def _placement(flag_value: Any) -> dict[str, Any]:
    value = flag_value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise OptionError(f"--placement {flag_value!r} is not JSON: {exc}") from None
    if not isinstance(value, Mapping):
        raise OptionError(f"--placement {flag_value!r} must be a JSON object")
    unknown = set(value) - PLACEMENT_KEYS
    if unknown:
        raise OptionError(
            f"--placement does not take {sorted(unknown)}; it takes {sorted(PLACEMENT_KEYS)}"
        )
    for key in ("num_cpus", "num_gpus", "memory"):
        if key in value and (not isinstance(value[key], int | float) or value[key] < 0):
            raise OptionError(f"--placement {key} must be a number >= 0, not {value[key]!r}")
    for key in ("resources", "label_selector"):
        if key in value and not (
            isinstance(value[key], Mapping) and all(isinstance(k, str) for k in value[key])
        ):
            raise OptionError(f"--placement {key} must be a JSON object, not {value[key]!r}")
    if "scheduling_strategy" in value and value["scheduling_strategy"] not in ("SPREAD", "DEFAULT"):
        raise OptionError("--placement scheduling_strategy is SPREAD or DEFAULT")
    return dict(value)


@attrs.frozen
class RayOptions:
    """What the Ray engine was told."""

    address: str | None = None
    """The cluster (``ray.init(address=...)``); None: RAY_ADDRESS, else a new local cluster."""
    namespace: str = DEFAULT_NAMESPACE
    """Ray namespace of the replicas' actor names: servers in one namespace share replicas."""
    replicas: Mapping[str, int] = attrs.field(factory=dict)
    """Replicas per model name; "" is every model (default 1)."""
    placement: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    """Ray actor options per model name; "" is every model."""
    poll_interval: float = 0.5
    """Seconds between health and metrics polls of each replica."""
    start_timeout: float = 600.0
    """Seconds a model's start waits for its replicas to be placed and loaded."""

    @classmethod
    def from_engine_options(cls, options: Mapping[str, Any]) -> RayOptions:
        unknown = set(options) - KNOWN_OPTIONS
        if unknown:
            raise OptionError(f"the ray engine does not take {sorted(unknown)}")
        replicas: dict[str, int] = {}
        for model, n in dict(options.get("replicas") or {}).items():
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise OptionError(f"--replicas {model + '=' if model else ''}{n!r}: a whole number >= 1")
            replicas[model] = n
        placement = {model: _placement(v) for model, v in dict(options.get("placement") or {}).items()}
        try:
            poll = float(options.get("poll_interval", 0.5))
            start = float(options.get("start_timeout", 600.0))
        except (TypeError, ValueError):
            raise OptionError("poll_interval and start_timeout are seconds") from None
        if poll <= 0 or start <= 0:
            raise OptionError("poll_interval and start_timeout must be > 0")
        address = options.get("address")
        return cls(
            address=str(address) if address else None,
            namespace=str(options.get("namespace") or DEFAULT_NAMESPACE),
            replicas=replicas,
            placement=placement,
            poll_interval=poll,
            start_timeout=start,
        )

    def replicas_for(self, model: str) -> int:
        return self.replicas.get(model, self.replicas.get("", 1))

    def actor_options_for(self, model: str, *, threads: int | None, gpu: bool) -> dict[str, Any]:
        """Ray actor options of one replica of ``model``: defaults, then "" then the model's own.

        Default: as many CPUs as the backend will use (``--threads``, else 1), one GPU
        when serving on CUDA, replicas of a model spread over the nodes.
        """
        out: dict[str, Any] = {"num_cpus": threads or 1, "scheduling_strategy": "SPREAD"}
        if gpu:
            out["num_gpus"] = 1
        out.update(self.placement.get("", {}))
        out.update(self.placement.get(model, {}))
        return out
