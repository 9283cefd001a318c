"""The nexa command in scripts: pipelines that stop reading, and ``--json`` output whose
keys are the ones docs/cli.md documents."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from test_plugins import _env, plugin_path  # noqa: F401 - plugin_path is a fixture
from test_store import write_gguf

from nexa.testing import echo_manifest

DOCS = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
NEXA = [sys.executable, "-m", "nexa.cli"]
NOISE = ("Traceback", "BrokenPipeError", "Exception ignored")


def nexa(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([*NEXA, *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def plugin_env(plugin_path, home):  # noqa: F811 - the imported fixture
    """The environment of a user with the echo plugin (and a broken one) installed."""
    return _env(plugin_path, home)


@pytest.fixture
def crowded(home) -> Path:
    """A store whose listing is far bigger than a pipe's buffer (64 KiB on Linux), so a
    reader that stops after one line really leaves the writer with a broken pipe."""
    for i in range(1200):
        name = f"crowd/model-{i:04d}-with-a-rather-long-name-to-fill-the-pipe"
        folder = home / "models" / name
        folder.mkdir(parents=True)
        data = json.loads(echo_manifest(name).to_json())
        data["source"] = "local:test"
        (folder / "manifest.json").write_text(json.dumps(data))
    return home


def test_list_piped_into_head_exits_quietly(crowded, plugin_env):
    line = f"set -o pipefail; {shlex.join(NEXA)} list | head -1"
    done = subprocess.run(["bash", "-c", line], env=plugin_env, capture_output=True, text=True, timeout=180)
    # pipefail: the status is nexa's own, not only head's.
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[:2] == ["NAME", "FORMAT"]
    assert not any(word in done.stderr for word in NOISE), done.stderr


@pytest.mark.parametrize(
    "args",
    [["list"], ["list", "--json"], ["show", "good/echo"], ["show", "good/echo", "--json"],
     ["plugins"], ["plugins", "--json"], ["--help"], ["--version"], ["clean"],
     ["pull", "{gguf}", "--name", "me/tiny", "--quiet"], ["remove", "me/tiny"], ["run", "good/echo"]],
)
def test_every_printing_command_survives_a_closed_pipe(plugin_env, tmp_path, home, args):
    gguf = write_gguf(tmp_path / "Tiny-Q8_0.gguf")
    if args[0] == "remove":
        assert nexa("pull", str(gguf), "--name", "me/tiny", env=plugin_env).returncode == 0
    args = [a.format(gguf=gguf) for a in args]
    # The reader has gone before nexa writes a byte: every write meets a broken pipe.
    proc = subprocess.Popen([*NEXA, *args], env=plugin_env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    _, err = proc.communicate("hello\n/bye\n", timeout=120)
    assert proc.returncode == 0, err
    assert not any(word in err for word in NOISE), err
    if args[0] == "pull":
        assert nexa("show", "me/tiny", env=plugin_env).returncode == 0  # the work itself was done


def documented_keys(section: str) -> set[str]:
    """The backquoted keys listed in one ``### section`` of docs/cli.md."""
    text = DOCS.read_text()
    match = re.search(rf"^### {re.escape(section)}\n(.*?)(?=^#)", text, re.S | re.M)
    assert match, f"docs/cli.md has no section {section!r}"
    return set(re.findall(r"^- `([a-z0-9_]+)`", match.group(1), re.M))


def test_list_and_show_json_have_the_documented_keys(plugin_env, tmp_path):
    gguf = write_gguf(tmp_path / "Tiny-Q8_0.gguf")
    assert nexa("pull", str(gguf), "--name", "me/tiny", env=plugin_env).returncode == 0
    listing = json.loads(nexa("list", "--json", env=plugin_env).stdout)
    assert set(listing) == documented_keys("nexa list --json")
    assert listing["damaged"] == []
    models = {m["name"]: m for m in listing["models"]}
    assert {"me/tiny", "good/echo"} <= set(models)  # and ready models of installed plugins
    tiny = models["me/tiny"]
    assert set(tiny) == documented_keys("A model")
    assert (tiny["format"], tiny["quant"], tiny["tasks"]) == ("gguf", "Q8_0", ["chat"])
    assert tiny["size"] == gguf.stat().st_size and tiny["context_length"] == 2048
    assert Path(tiny["path"], "Tiny-Q8_0.gguf").is_file()

    shown = json.loads(nexa("show", "me/tiny", "--json", env=plugin_env).stdout)
    assert set(shown) == documented_keys("A model") | documented_keys("nexa show --json")
    assert {k: shown[k] for k in tiny} == tiny
    (entry,) = shown["files"]
    assert set(entry) == documented_keys("A file")
    assert (entry["path"], entry["role"], entry["size"]) == ("Tiny-Q8_0.gguf", "weights", tiny["size"])

    # Damaged manifests are listed for scripts too (on stderr in the table).
    (Path(tiny["path"]) / "manifest.json").write_text("{ not json")
    listing = json.loads(nexa("list", "--json", env=plugin_env).stdout)
    assert [d["folder"] for d in listing["damaged"]] == ["me/tiny"]
    assert set(listing["damaged"][0]) == documented_keys("A damaged folder")


def test_plugins_json_has_the_documented_keys(plugin_env):
    report = json.loads(nexa("plugins", "--json", env=plugin_env).stdout)
    assert set(report) == documented_keys("nexa plugins --json")
    assert "good" in report["loaded"] and "good/echo" in report["models"]
    (failure,) = [f for f in report["failed"] if f["plugin"] == "broken"]
    assert set(failure) == documented_keys("A failure")
    assert failure["stage"] == "import" and "libfoo.so" in failure["error"]
    assert "ImportError" in (failure["detail"] or "")
    echo = next(b for b in report["backends"] if b["name"] == "echo")
    assert set(echo) == documented_keys("A backend")
    assert echo["plugin"] == "good" and "chat" in echo["tasks"]


def test_human_output_is_unchanged_by_the_json_flags(plugin_env):
    table = nexa("list", env=plugin_env).stdout.splitlines()
    assert table[0].split() == ["NAME", "FORMAT", "QUANT", "TASKS", "SIZE", "SOURCE"]
    assert "plugins loaded:" in nexa("plugins", env=plugin_env).stdout
    shown = nexa("show", "good/echo", env=plugin_env)
    assert json.loads(shown.stdout)["name"] == "good/echo"  # the context goes to stderr
    assert "context when served by echo: 256 tokens (the echo model's manifest)" in shown.stderr
