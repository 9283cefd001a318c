"""``nexa plugins``: installed plugins, their failures, the backends they registered.

``--json`` prints the keys of ``GET /v1/plugins`` (``loaded``, ``failed``, ``disabled``,
``backends``) plus ``models`` (ready models from packages) and each failure's ``detail``
(the traceback, which the HTTP endpoint never sends). See docs/cli.md.
"""

from __future__ import annotations

import argparse

from nexa.cli.common import add_json_flag, print_json


def cmd_plugins(args: argparse.Namespace) -> int:
    from nexa.plugins import load_plugins
    from nexa.registry import BackendRegistry

    plugins = load_plugins()
    registry = BackendRegistry(plugins)
    backends = [
        {
            "name": b.name,
            "plugin": b.plugin,
            "tasks": sorted(t.value for t in b.tasks),
            "formats": sorted(b.formats),
            "devices": sorted(b.devices),
            "parallel": b.parallel,
            "priority": b.priority,
        }
        for b in registry.infos()
    ]
    if args.json:
        print_json({
            "loaded": sorted(plugins.loaded),
            "failed": [{"plugin": f.plugin, "stage": f.stage, "error": f.error, "detail": f.detail or None}
                       for f in plugins.failures],
            "disabled": sorted(plugins.disabled),
            "backends": backends,
            "models": [m.name for m in plugins.models],
        })
        return 0
    print("plugins loaded: " + (", ".join(sorted(plugins.loaded)) or "none"))
    for name in plugins.disabled:
        print(f"plugin disabled: {name} (NEXA_DISABLE_PLUGINS)")
    for f in plugins.failures:
        print(f"plugin FAILED: {f.plugin} at {f.stage}: {f.error}")
        if args.verbose and f.detail:
            print(f.detail)
    print("backends:")
    for b in backends:
        print(f"  {b['name']:<22} tasks={','.join(b['tasks'])} formats={','.join(b['formats'])} "
              f"devices={','.join(b['devices'])} parallel={b['parallel']} priority={b['priority']} "
              f"plugin={b['plugin']}")
    engines = ", ".join(f"{name} ({plugin})" for name, (_, plugin) in sorted(plugins.engines.items()))
    print("engines: local (in-process, the default)" + (f", {engines}" if engines else ""))
    if plugins.models:
        print("ready models from packages: " + ", ".join(m.name for m in plugins.models))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plugins", help="installed plugins, failures and backends")
    p.add_argument("--verbose", action="store_true", help="print each failure's traceback")
    add_json_flag(p)
    p.set_defaults(func=cmd_plugins)
