"""Store commands: ``pull``, ``list``, ``show``, ``remove``, ``clean``.

``list --json`` and ``show --json`` print the keys documented in docs/cli.md; a key is
only ever added, never renamed or removed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from nexa.cli.common import add_json_flag, human, open_store, print_json


def model_dict(manifest: Any, *, detail: bool = False) -> dict[str, Any]:
    """A model as ``list --json`` (and, with ``detail``, ``show --json``) prints it."""
    out: dict[str, Any] = {
        "name": manifest.name,
        "format": manifest.format,
        "quant": manifest.quant,
        "tasks": sorted(t.value for t in manifest.tasks),
        "size": manifest.size,
        "source": manifest.source,
        "path": str(manifest.root) if manifest.root is not None else None,
        "context_length": manifest.context_length,
    }
    if detail:
        out["backend"] = manifest.backend
        out["options"] = dict(manifest.options)
        out["files"] = [
            {"path": f.path, "size": f.size, "sha256": f.sha256, "role": f.role} for f in manifest.files
        ]
    return out


def cmd_pull(args: argparse.Namespace) -> int:
    store, _ = open_store(args)
    target = args.model
    local = Path(target).expanduser()
    if local.exists() and (local.is_dir() or local.is_file()):
        manifest = store.import_path(local, name=args.name)
    else:
        from nexa.cli.progress import PullBars, wanted
        from nexa.hub import pull

        if wanted(quiet=args.quiet):
            with PullBars() as bars:
                manifest = pull(store, target, on_progress=bars)
        else:
            manifest = pull(store, target)
    tasks = ", ".join(sorted(t.value for t in manifest.tasks))
    print(f"pulled {manifest.name} ({manifest.format}, {tasks}, {human(manifest.size)})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    store, _ = open_store(args)
    models = store.list()
    broken = store.broken()
    if args.json:
        print_json({
            "models": [model_dict(m) for m in models],
            "damaged": [{"folder": folder, "reason": reason} for folder, reason in broken],
        })
        return 0
    rows = [("NAME", "FORMAT", "QUANT", "TASKS", "SIZE", "SOURCE")]
    for m in models:
        rows.append((m.name, m.format, m.quant or "-", ",".join(sorted(t.value for t in m.tasks)),
                     human(m.size), m.source.split("@", 1)[0]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    for folder, reason in broken:
        print(f"warning: models/{folder} has a damaged manifest ({reason})", file=sys.stderr)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    store, plugins = open_store(args)
    manifest = store.get(args.model)
    served = serve_context(manifest, plugins, args)
    if args.json:
        print_json({**model_dict(manifest, detail=True), "serve_context": served})
        return 0
    print(manifest.to_json())
    if served is not None:  # on stderr: stdout stays the manifest's JSON for scripts
        print(f"context when served by {served['backend']}: {served['length']} tokens ({served['reason']})",
              file=sys.stderr)
    return 0


def serve_context(manifest: Any, plugins: Any, args: argparse.Namespace) -> dict[str, Any] | None:
    """The context ``nexa serve`` would give ``manifest`` on this machine (with ``--ctx``,
    ``--parallel`` as given), and why: asked of the backend that would serve it, without
    loading it. None when no backend serves it here or its backend has no fixed context."""
    from nexa.backend import LoadOptions
    from nexa.device import detect_device
    from nexa.errors import NexaError
    from nexa.registry import BackendRegistry
    from nexa.types import Task

    device = detect_device()
    task = Task.CHAT if Task.CHAT in manifest.tasks else min(manifest.tasks, default=None)
    if task is None:
        return None
    try:
        cls = BackendRegistry(plugins).select(task, manifest, device)
        plan = cls(manifest, device, LoadOptions(context_length=args.ctx, parallel=args.parallel)).context_plan()
    except NexaError:
        return None
    if plan is None:
        return None
    return {"backend": cls.name, "length": plan.length, "reason": plan.reason}


def cmd_remove(args: argparse.Namespace) -> int:
    store, _ = open_store(args)
    manifest = store.remove(args.model)
    print(f"removed {manifest.name if manifest is not None else args.model}")
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    store, _ = open_store(args)
    print(f"freed {human(store.clean())}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pull", help="download ORG/REPO[:QUANT] from the hub, or import a local file/folder")
    p.add_argument("model", help="ORG/REPO, ORG/REPO:QUANT (kept beside the repo's other quants), or a path")
    p.add_argument("--name", help="store name for a local import (default: local/<file name>)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars (they are drawn only when stderr is a terminal)")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("list", help="list models in the store (each pulled quant on its own line)")
    add_json_flag(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="print a model's manifest and the context it gets when served")
    p.add_argument("model", help="ORG/REPO or ORG/REPO:QUANT")
    p.add_argument("--ctx", type=int, default=None, help="the context `nexa serve --ctx` would set")
    p.add_argument("--parallel", type=int, default=None, help="the requests `nexa serve --parallel` would run at once")
    add_json_flag(p)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("remove", help="delete a model (one quant: ORG/REPO:QUANT) from the store")
    p.add_argument("model")
    p.set_defaults(func=cmd_remove)

    sub.add_parser("clean", help="delete partial downloads and caches").set_defaults(func=cmd_clean)
