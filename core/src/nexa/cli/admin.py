"""``nexa ps``, ``nexa load`` and ``nexa unload``: a running server's management API
(``/v1/admin``) from the terminal, as ``ollama ps`` and ``ollama stop`` are.

They talk HTTP to ``--url`` (default: this machine's default port, or ``NEXA_PORT``) with
``NEXA_API_KEY`` as the bearer key when set. Standard library only, so the commands start
fast and need nothing the server does not already have.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from typing import Any

from nexa.config import DEFAULT_PORT
from nexa.errors import NexaError

__all__ = ["AdminClient", "add_commands"]


class AdminError(NexaError):
    """The server refused (its error message), or no server answered; ``nexa`` prints it."""


class AdminClient:
    """The management calls of one server."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def _call(self, path: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(self.url + path, method="GET" if body is None else "POST")
        if body is not None:
            request.data = json.dumps(body).encode()
            request.add_header("Content-Type", "application/json")
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            try:
                message = json.load(exc)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {exc.code} {exc.reason}"
            raise AdminError(message) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminError(f"no nexa server answered at {self.url} ({reason}); start one with `nexa serve`") from None

    def resident(self) -> list[dict[str, Any]]:
        return self._call("/v1/admin/models")["data"]

    def load(self, model: str, **settings: Any) -> dict[str, Any]:
        body = {"model": model, **{k: v for k, v in settings.items() if v is not None}}
        return self._call("/v1/admin/models/load", body)

    def unload(self, model: str, mode: str = "wait") -> dict[str, Any]:
        return self._call("/v1/admin/models/unload", {"model": model, "mode": mode})


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def _until(entry: dict[str, Any]) -> str:
    if entry["pinned"]:
        return "pinned"
    if entry["keep_alive"] is None:
        return "forever"
    if entry["expires_in"] is None:
        return "in use" if entry["slots_busy"] or entry["queued"] else entry["state"]
    seconds = entry["expires_in"]
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _client(args: argparse.Namespace) -> AdminClient:
    return AdminClient(args.url, os.environ.get("NEXA_API_KEY") or None)


def cmd_ps(args: argparse.Namespace) -> int:
    entries = _client(args).resident()
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    rows = [("NAME", "BACKEND", "DEVICE", "WEIGHTS", "KV CACHE", "CONTEXT", "SLOTS", "QUEUE", "UNLOADS")]
    for e in entries:
        rows.append((e["model"], e["backend"], e["device"], _human(e["weights_bytes"]), _human(e["kv_cache_bytes"]),
                     str(e["context"] or "-"), f"{e['slots_busy']}/{e['slots_total']}", str(e["queued"]), _until(e)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    entry = _client(args).load(args.model, context=args.ctx, parallel=args.parallel, keep_alive=args.keep_alive)
    print(f"loaded {entry['model']} ({entry['backend']} on {entry['device']}, "
          f"{entry['slots_total']} slot(s), context {entry['context'] or '-'})")
    return 0


def cmd_unload(args: argparse.Namespace) -> int:
    result = _client(args).unload(args.model, "cancel" if args.cancel else "wait")
    extra = f", {result['cancelled']} request(s) cancelled" if args.cancel else ""
    print(f"unloaded {result['model']}{extra}")
    return 0


def _keep_alive(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value


def add_commands(sub: Any) -> None:
    """Add ``ps``, ``load`` and ``unload`` to the ``nexa`` parser's subcommands."""
    default_url = f"http://127.0.0.1:{os.environ.get('NEXA_PORT', DEFAULT_PORT)}"

    def url_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", default=default_url,
                       help=f"the running server (default {default_url}); NEXA_API_KEY is sent as its key")

    p = sub.add_parser("ps", help="models loaded in the running server: memory, slots, queue, keep-alive")
    url_arg(p)
    p.add_argument("--json", action="store_true", help="print the server's JSON")
    p.set_defaults(func=cmd_ps)

    p = sub.add_parser("load", help="load a model in the running server now")
    p.add_argument("model")
    url_arg(p)
    p.add_argument("--ctx", type=int, default=None, help="context length for this model")
    p.add_argument("--parallel", type=int, default=None, help="requests this model runs at once")
    p.add_argument("--keep-alive", type=_keep_alive, default=None,
                   help="how long it stays loaded when idle: seconds or a duration (10m, 1h; -1: for good)")
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("unload", help="unload a model from the running server (as `ollama stop`)")
    p.add_argument("model")
    url_arg(p)
    p.add_argument("--cancel", action="store_true", help="cancel its requests instead of waiting for them")
    p.set_defaults(func=cmd_unload)
