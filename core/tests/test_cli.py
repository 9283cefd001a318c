"""The nexa command: fast help, store commands, refusal of an unsafe bind."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from test_store import write_gguf


def nexa(*args, home, timeout=120):
    env = dict(os.environ, NEXA_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "nexa.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_help_imports_nothing_heavy():
    code = ("import sys, nexa.cli; nexa.cli.build_parser().format_help();"
            "heavy = [m for m in ('litestar', 'uvicorn', 'torch', 'llama_cpp', 'mlx', 'huggingface_hub', 'numpy')"
            " if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_version_and_help(home):
    out = nexa("--version", home=home)
    assert out.returncode == 0 and out.stdout.startswith("nexa ")
    out = nexa("--help", home=home)
    for command in ("pull", "list", "show", "remove", "clean", "serve", "run", "plugins"):
        assert command in out.stdout


def test_pull_path_list_show_remove(home, tmp_path):
    src = write_gguf(tmp_path / "Tiny-Q8_0.gguf")
    out = nexa("pull", str(src), "--name", "me/tiny", home=home)
    assert out.returncode == 0, out.stderr
    assert "pulled me/tiny (gguf, chat" in out.stdout
    listing = nexa("list", home=home).stdout
    assert listing.splitlines()[0].split()[:3] == ["NAME", "FORMAT", "QUANT"]
    assert any(line.split()[:3] == ["me/tiny", "gguf", "Q8_0"] for line in listing.splitlines())
    shown = nexa("show", "me/tiny", home=home)
    assert '"name": "me/tiny"' in shown.stdout
    assert nexa("remove", "me/tiny", home=home).returncode == 0
    missing = nexa("show", "me/tiny", home=home)
    assert missing.returncode == 1 and "not in the store" in missing.stderr


def test_non_loopback_bind_without_key_is_refused(home):
    out = nexa("serve", "--host", "0.0.0.0", home=home, timeout=60)
    assert out.returncode != 0
    assert "without an API key" in out.stderr


def test_serve_aliases_and_response_store_settings():
    from nexa.cli import build_parser
    from nexa.cli.serve import server_config

    args = build_parser().parse_args(["serve", "--alias", "claude-sonnet-4-6=nexa/smollm2-135m-instruct",
                                      "--alias", "*=me/tiny", "--responses-ttl", "60", "--responses-max", "5"])
    config = server_config(args)
    assert config.aliases == (("claude-sonnet-4-6", "nexa/smollm2-135m-instruct"), ("*", "me/tiny"))
    assert (config.responses_ttl, config.responses_max) == (60.0, 5)


def test_malformed_alias_stops_serve(home):
    out = nexa("serve", "--alias", "no-equals-sign", home=home, timeout=60)
    assert out.returncode != 0 and "NAME=MODEL" in out.stderr


def test_serve_reasoning_flags_reach_the_server_config(home):
    from nexa.cli.main import build_parser
    from nexa.cli.serve import server_config

    parser = build_parser()
    config = server_config(parser.parse_args(["serve", "--reasoning-format", "hidden", "--reasoning-budget", "0"]))
    assert (config.reasoning_format, config.reasoning_budget) == ("hidden", 0)
    default = server_config(parser.parse_args(["serve"]))
    assert (default.reasoning_format, default.reasoning_budget) == ("separate", -1)
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--reasoning-format", "none"])
    with pytest.raises(SystemExit, match="reasoning-budget"):
        server_config(parser.parse_args(["serve", "--reasoning-budget", "-5"]))
