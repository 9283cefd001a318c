"""The parser and ``main``: global options, each group's commands, and how a run ends.

A command returns an exit status. Domain errors (``NexaError``) become one ``error:``
line on stderr and status 1; Ctrl-C is status 130. A reader that stops reading
(``nexa list | head -1``) is not an error: output stops, no traceback, status 0.
"""

from __future__ import annotations

import argparse
import os
import sys

from nexa import __version__
from nexa.cli import admin, plugins, serve, store


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nexa", description="Run AI models locally behind the OpenAI HTTP API.")
    parser.add_argument("--version", action="version", version=f"nexa {__version__}")
    parser.add_argument("--home", default=None, help="model store folder (default: NEXA_HOME or the user cache dir)")
    sub = parser.add_subparsers(dest="command", required=True)
    store.add_commands(sub)
    plugins.add_commands(sub)
    serve.add_commands(sub)
    admin.add_commands(sub)
    return parser


def _stdout_gone() -> None:
    # Whatever is still buffered can't be written; point stdout at /dev/null so the
    # interpreter's own flush at exit finds nowhere to fail (Python's documented recipe).
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:
            sys.stdout.flush()  # --help and --version print, then exit through here
            raise
        status = args.func(args)
        # Flushed here, not at exit, so a closed pipe is seen while it can be handled.
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        _stdout_gone()
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from nexa.errors import NexaError

        if isinstance(exc, NexaError):
            print(f"error: {exc.message}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
