"""The ``nexa`` command, one module per group of subcommands.

- ``main``: the parser (global options, one subparser per command) and ``main()``, which
  turns domain errors into one ``error:`` line and a reader closing the pipe (``nexa list
  | head -1``) into a quiet exit.
- ``store``: ``pull``, ``list``, ``show``, ``remove``, ``clean``.
- ``serve``: ``serve`` and ``run`` (the engine in a server or in the terminal).
- ``plugins``: ``plugins``.
- ``admin``: ``ps``, ``load``, ``unload`` (a running server's management API over HTTP).
- ``progress``: the pull's tqdm bars; ``common``: what several commands share.

Only the standard library is imported at start-up so ``nexa --help`` stays fast; each
command imports what it needs when it runs. A group module adds its commands with
``add_commands(subparsers)``.
"""

from __future__ import annotations

from nexa.cli.main import build_parser, main
from nexa.cli.serve import server_config

# The name the server-config builder had before the CLI became a package; tests use it.
_server_config = server_config

__all__ = ["build_parser", "main", "server_config"]
