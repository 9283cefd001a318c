"""What several commands share: opening the store, sizes for people, JSON for scripts."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def open_store(args: argparse.Namespace):
    """The store (``--home`` or the default) with the packaged models plugins offer."""
    from nexa.plugins import load_plugins
    from nexa.store import ModelStore

    store = ModelStore(args.home) if args.home else ModelStore()
    plugins = load_plugins()
    store.packaged = list(plugins.models)
    return store, plugins


def human(n: int | float) -> str:
    """Bytes for people, in powers of 1000 (as disk and download sizes are usually shown)."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def print_json(data: Any) -> None:
    """One JSON document on stdout, keys sorted so output is stable between runs."""
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print JSON for scripts (keys: see docs/cli.md)")
