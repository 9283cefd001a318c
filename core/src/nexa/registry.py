"""Backend selection: which registered backend serves a model, decided in plain Python.

Order: an explicit pin (``nexa serve --backend``, else the manifest's backend hint) >
the backend declares the task, format and device and its ``supports()`` agrees >
higher priority > name. Never the order in which pluggy happened to call plugins.
"""

from __future__ import annotations

import attrs

from nexa.errors import NoBackend
from nexa.plugins import PluginSet
from nexa.types import BackendInfo, Device, Manifest, Task


@attrs.frozen
class Refusal:
    backend: str
    reason: str


@attrs.define(eq=False)
class BackendRegistry:
    """The backend classes every plugin registered, per task."""

    plugins: PluginSet
    pin: str | None = None
    """A backend name forced for every model (``nexa serve --backend``)."""

    def candidates(self, task: Task) -> list[tuple[type, str]]:
        return sorted(self.plugins.backends.get(task, []), key=lambda c: c[0].name)

    def infos(self) -> list[BackendInfo]:
        """One line per backend name; a plugin may serve one name with several classes
        (MLX text and vision), which are shown together: what the name can do at all."""
        seen: dict[str, BackendInfo] = {}
        for entries in self.plugins.backends.values():
            for cls, plugin in entries:
                info = cls.info(plugin)
                have = seen.get(cls.name)
                if have is not None and have.plugin == info.plugin:
                    info = attrs.evolve(
                        have,
                        tasks=have.tasks | info.tasks,
                        formats=have.formats | info.formats,
                        devices=have.devices | info.devices,
                        parallel=max(have.parallel, info.parallel),
                        priority=max(have.priority, info.priority),
                    )
                elif have is not None:
                    continue  # another plugin's class under a taken name: the first one shows
                seen[cls.name] = info
        return [seen[k] for k in sorted(seen)]

    def select(self, task: Task, manifest: Manifest, device: Device) -> type:
        """The backend class for ``task`` on ``manifest``; NoBackend lists every refusal."""
        pin = self.pin or manifest.backend
        pinned_by = "--backend" if self.pin else "the model's manifest"
        accepted: list[type] = []
        refusals: list[Refusal] = []
        for cls, _plugin in self.candidates(task):
            reason = self._refusal(cls, task, manifest, device)
            if reason is None and pin is not None and cls.name != pin:
                reason = f"backend {pin!r} is pinned by {pinned_by}"
            if reason is None:
                accepted.append(cls)
            else:
                refusals.append(Refusal(cls.name, reason))
        if accepted:
            accepted.sort(key=lambda c: (-c.priority, c.name))
            return accepted[0]
        if not refusals:
            hint = f" (pinned: {pin})" if pin else ""
            raise NoBackend(
                f"no installed backend serves task {task.value!r}{hint}; "
                "install a plugin for it (see `nexa plugins`)"
            )
        why = "; ".join(f"{r.backend}: {r.reason}" for r in refusals)
        if pin and pin not in {r.backend for r in refusals}:
            why += f"; pinned backend {pin!r} is not installed"
        raise NoBackend(
            f"no backend can serve model {manifest.name!r} for {task.value} on "
            f"{device.kind}: {why}"
        )

    @staticmethod
    def _refusal(cls: type, task: Task, manifest: Manifest, device: Device) -> str | None:
        if task not in manifest.tasks:
            return f"model does not declare task {task.value!r}"
        if manifest.format not in cls.formats:
            return f"format {manifest.format!r} not in {sorted(cls.formats)}"
        if device.kind not in cls.devices:
            return f"device {device.kind!r} not in {sorted(cls.devices)}"
        try:
            return cls.supports(manifest, device)
        except Exception as exc:  # a buggy supports() refuses instead of crashing selection
            return f"supports() raised {type(exc).__name__}: {exc}"
