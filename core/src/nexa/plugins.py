"""Plugin discovery: the pluggy manager, entry-point loading and failure bookkeeping.

Plugins are found through the entry-point group ``nexa``. A plugin that fails to import
(or whose hook raises) is recorded in ``PluginSet.failures`` and shown by ``nexa plugins``
and ``GET /v1/plugins``; it never stops the core. ``NEXA_DISABLE_PLUGINS`` (comma
separated entry-point names) skips named plugins, so a broken one can be switched off.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import os
import traceback
from collections.abc import Iterable

import attrs
import pluggy

from nexa import hookspecs
from nexa.types import Manifest, Task

ENTRY_POINT_GROUP = "nexa"
DISABLE_ENV = "NEXA_DISABLE_PLUGINS"

_TASK_HOOKS = {
    Task.CHAT: "register_chat_backends",
    Task.VLM: "register_vlm_backends",
    Task.IMAGE: "register_image_backends",
    Task.EMBED: "register_embed_backends",
    Task.RERANK: "register_rerank_backends",
    Task.TRANSCRIBE: "register_transcribe_backends",
}


@attrs.frozen
class PluginFailure:
    """A plugin that could not be used, and why."""

    plugin: str
    stage: str
    """``import`` or the hook that raised."""
    error: str
    """One line: the exception type and message."""
    detail: str = ""
    """The traceback, for the log and ``nexa plugins --verbose``."""


@attrs.define(eq=False)
class PluginSet:
    """What the plugins registered: backend classes per task and packaged models."""

    manager: pluggy.PluginManager
    backends: dict[Task, list[tuple[type, str]]] = attrs.field(factory=dict)
    """Per task, (backend class, plugin name) pairs, in no meaningful order."""
    models: list[Manifest] = attrs.field(factory=list)
    engines: dict[str, tuple[type, str]] = attrs.field(factory=dict)
    """Engine classes by name (``register_engines``), with the plugin that registered each."""
    failures: list[PluginFailure] = attrs.field(factory=list)
    loaded: list[str] = attrs.field(factory=list)
    """Names of plugins that loaded."""
    disabled: list[str] = attrs.field(factory=list)


def disabled_names() -> set[str]:
    return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]


def get_plugin_manager(
    *, load_entry_points: bool = True, extra_plugins: Iterable[object] = ()
) -> tuple[pluggy.PluginManager, list[PluginFailure], list[str]]:
    """A manager with the specs added, entry points loaded one by one, and extras registered."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    failures: list[PluginFailure] = []
    disabled: list[str] = []
    if load_entry_points:
        skip = disabled_names()
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in skip:
                disabled.append(ep.name)
                continue
            if pm.get_plugin(ep.name) is not None:
                continue
            try:
                plugin = ep.load()
                pm.register(plugin, name=ep.name)
            except Exception as exc:  # any import-time failure is the plugin's, not ours
                failures.append(
                    PluginFailure(ep.name, "import", _one_line(exc), traceback.format_exc())
                )
    for plugin in extra_plugins:
        pm.register(plugin)
    pm.check_pending()
    return pm, failures, disabled


def collect(pm: pluggy.PluginManager, failures: list[PluginFailure] | None = None) -> PluginSet:
    """Call every registration hook, one plugin at a time so one failure stays contained."""
    result = PluginSet(manager=pm, failures=list(failures or []))
    for name, plugin in pm.list_name_plugin():
        plugin_name = name or repr(plugin)
        ok = True
        for task, hook_name in _TASK_HOOKS.items():
            ok &= _call_one(pm, plugin, plugin_name, hook_name, result, task)
        ok &= _call_one(pm, plugin, plugin_name, "register_models", result, None)
        ok &= _call_engines(pm, plugin, plugin_name, result)
        if ok:
            result.loaded.append(plugin_name)
    return result


def _registered(
    pm: pluggy.PluginManager, plugin: object, plugin_name: str, hook_name: str, result: PluginSet
) -> list | None:
    """What ``plugin``'s implementation of ``hook_name`` registered ([] when it has none);
    None when the hook raised (recorded as a failure)."""
    impls = [i for i in getattr(pm.hook, hook_name).get_hookimpls() if i.plugin is plugin]
    collected: list = []
    if not impls:
        return collected
    function = impls[0].function
    if inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function):
        # pluggy would call it and drop the coroutine unawaited: nothing registered, and
        # only a RuntimeWarning to show for it.
        result.failures.append(PluginFailure(
            plugin_name, hook_name, f"{hook_name} is declared 'async def'; nexa hooks are synchronous"))
        return None
    try:
        returned = function(register=collected.append)
    except Exception as exc:
        result.failures.append(
            PluginFailure(plugin_name, hook_name, _one_line(exc), traceback.format_exc())
        )
        return None
    if inspect.isawaitable(returned):
        if inspect.iscoroutine(returned):
            returned.close()
        result.failures.append(PluginFailure(
            plugin_name, hook_name, f"{hook_name} returned an awaitable; nexa hooks are synchronous"))
        return None
    return collected


def _call_one(
    pm: pluggy.PluginManager,
    plugin: object,
    plugin_name: str,
    hook_name: str,
    result: PluginSet,
    task: Task | None,
) -> bool:
    collected = _registered(pm, plugin, plugin_name, hook_name, result)
    if collected is None:
        return False
    if task is None:
        for manifest in collected:
            if not isinstance(manifest, Manifest):
                result.failures.append(
                    PluginFailure(plugin_name, hook_name, f"registered a non-Manifest: {manifest!r}")
                )
                return False
            result.models.append(manifest)
        return True
    from nexa.backend import Backend

    for cls in collected:
        if not (isinstance(cls, type) and issubclass(cls, Backend)) or task not in cls.tasks:
            result.failures.append(
                PluginFailure(
                    plugin_name,
                    hook_name,
                    f"registered {cls!r}, which is not a Backend subclass serving {task.value}",
                )
            )
            return False
        result.backends.setdefault(task, []).append((cls, plugin_name))
    return True


def _call_engines(pm: pluggy.PluginManager, plugin: object, plugin_name: str, result: PluginSet) -> bool:
    collected = _registered(pm, plugin, plugin_name, "register_engines", result)
    if collected is None:
        return False
    from nexa.engine import LOCAL, Engine

    for cls in collected:
        if not (isinstance(cls, type) and issubclass(cls, Engine)) or not cls.name:
            error = f"registered {cls!r}, which is not a named Engine subclass"
        elif cls.name == LOCAL or cls.name in result.engines:
            taken = "the in-process default" if cls.name == LOCAL else result.engines[cls.name][1]
            error = f"engine name {cls.name!r} is taken by {taken}"
        else:
            result.engines[cls.name] = (cls, plugin_name)
            continue
        result.failures.append(PluginFailure(plugin_name, "register_engines", error))
        return False
    return True


def load_plugins(
    *, load_entry_points: bool = True, extra_plugins: Iterable[object] = ()
) -> PluginSet:
    """Discover, register and collect every plugin. The single entry point for the core."""
    pm, failures, disabled = get_plugin_manager(
        load_entry_points=load_entry_points, extra_plugins=extra_plugins
    )
    result = collect(pm, failures)
    result.disabled = disabled
    return result
