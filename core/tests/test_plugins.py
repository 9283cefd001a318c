"""Plugin discovery: entry points, a plugin that fails to import, and the disable switch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import httpx
import pytest

from nexa.plugins import load_plugins
from nexa.types import Task


@pytest.fixture
def plugin_path(tmp_path):
    """A folder on sys.path with two installed distributions: one good, one broken."""
    root = tmp_path / "site"
    root.mkdir()
    (root / "nexa_goodplugin.py").write_text(textwrap.dedent("""
        from nexa.hookspecs import hookimpl
        from nexa.testing.echo import EchoBackend, echo_manifest

        @hookimpl
        def register_chat_backends(register):
            register(EchoBackend)

        @hookimpl
        def register_models(register):
            register(echo_manifest("good/echo"))
    """))
    (root / "nexa_brokenplugin.py").write_text("raise ImportError('libfoo.so: cannot open shared object file')\n")
    for dist, module in (("good", "nexa_goodplugin"), ("broken", "nexa_brokenplugin")):
        info = root / f"nexa_{dist}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: nexa-{dist}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[nexa]\n{dist} = {module}\n")
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    for module in ("nexa_goodplugin", "nexa_brokenplugin"):
        sys.modules.pop(module, None)


def test_broken_plugin_is_recorded_not_fatal(plugin_path):
    plugins = load_plugins()
    assert "good" in plugins.loaded
    failure = next(f for f in plugins.failures if f.plugin == "broken")
    assert failure.stage == "import"
    assert "libfoo.so" in failure.error
    assert "good/echo" in [m.name for m in plugins.models]


def test_disable_env_skips_named_plugins(plugin_path, monkeypatch):
    monkeypatch.setenv("NEXA_DISABLE_PLUGINS", "broken, good")
    plugins = load_plugins()
    assert "good" not in plugins.loaded
    assert not [f for f in plugins.failures if f.plugin == "broken"]
    assert sorted(plugins.disabled) == ["broken", "good"]


def test_hook_that_raises_is_contained():
    from nexa.hookspecs import hookimpl

    class Bad:
        @hookimpl
        def register_chat_backends(self, register):
            raise RuntimeError("plugin bug")

    plugins = load_plugins(load_entry_points=False, extra_plugins=[Bad()])
    assert plugins.failures[0].stage == "register_chat_backends"
    assert "plugin bug" in plugins.failures[0].error


def test_registering_a_non_backend_is_refused():
    from nexa.hookspecs import hookimpl

    class Wrong:
        @hookimpl
        def register_embed_backends(self, register):
            register(object)

    plugins = load_plugins(load_entry_points=False, extra_plugins=[Wrong()])
    assert "not a Backend subclass" in plugins.failures[0].error


def test_async_hookimpl_is_a_plugin_failure():
    from nexa.hookspecs import hookimpl
    from nexa.testing import EchoBackend

    class Async:
        @hookimpl
        async def register_chat_backends(self, register):
            register(EchoBackend)

    plugins = load_plugins(load_entry_points=False, extra_plugins=[Async()])
    assert [(f.stage, "async def" in f.error) for f in plugins.failures] == [("register_chat_backends", True)]
    assert Task.CHAT not in plugins.backends
    assert not plugins.loaded


def test_hookimpl_returning_an_awaitable_is_a_plugin_failure():
    import asyncio

    from nexa.hookspecs import hookimpl

    class Sneaky:
        @hookimpl
        def register_models(self, register):
            return asyncio.sleep(0)  # a coroutine made by a sync function (a decorator, say)

    plugins = load_plugins(load_entry_points=False, extra_plugins=[Sneaky()])
    assert [f.stage for f in plugins.failures] == ["register_models"]
    assert "awaitable" in plugins.failures[0].error


def _env(plugin_path, home):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(plugin_path), env.get("PYTHONPATH", "")])
    env["NEXA_HOME"] = str(home)
    return env


def test_cli_plugins_and_serve_survive_a_broken_plugin(plugin_path, home):
    env = _env(plugin_path, home)
    out = subprocess.run([sys.executable, "-m", "nexa.cli", "plugins"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "plugin FAILED: broken at import: ImportError: libfoo.so" in out.stdout
    assert "echo" in out.stdout

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "nexa.cli", "serve", "good/echo", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        report = httpx.get(base + "/v1/plugins").json()
        assert report["failed"][0]["plugin"] == "broken"
        assert "good" in report["loaded"]
        answer = httpx.post(base + "/v1/chat/completions", json={
            "model": "good/echo", "messages": [{"role": "user", "content": "still works"}]}).json()
        assert answer["choices"][0]["message"]["content"] == "still works"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_nexa_run_chats_in_the_terminal(plugin_path, home):
    env = _env(plugin_path, home)
    out = subprocess.run([sys.executable, "-m", "nexa.cli", "run", "good/echo"], env=env,
                         input="hello from the terminal\n/bye\n", capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "hello from the terminal" in out.stdout


def test_each_task_hook_files_its_classes_under_its_task():
    from nexa.backend import Backend
    from nexa.hookspecs import hookimpl

    def backend_for(task):
        return type(f"{task.value.title()}Backend", (Backend,), {"name": task.value, "tasks": frozenset({task})})

    chat, vlm, image, embed = (backend_for(t) for t in (Task.CHAT, Task.VLM, Task.IMAGE, Task.EMBED))

    class EveryTask:
        @hookimpl
        def register_chat_backends(self, register):
            register(chat)

        @hookimpl
        def register_vlm_backends(self, register):
            register(vlm)

        @hookimpl
        def register_image_backends(self, register):
            register(image)

        @hookimpl
        def register_embed_backends(self, register):
            register(embed)

    plugins = load_plugins(load_entry_points=False, extra_plugins=[EveryTask()])
    assert not plugins.failures
    filed = {task: [cls for cls, _ in entries] for task, entries in plugins.backends.items()}
    assert filed == {Task.CHAT: [chat], Task.VLM: [vlm], Task.IMAGE: [image], Task.EMBED: [embed]}


def test_a_class_registered_for_a_task_it_does_not_serve_is_refused():
    from nexa.hookspecs import hookimpl
    from nexa.testing import EchoBackend

    class ChatOnly(EchoBackend):
        tasks = frozenset({Task.CHAT})

    class Misfiled:
        @hookimpl
        def register_image_backends(self, register):
            register(ChatOnly)

    plugins = load_plugins(load_entry_points=False, extra_plugins=[Misfiled()])
    assert [f.stage for f in plugins.failures] == ["register_image_backends"]
    assert "serving image" in plugins.failures[0].error
    assert Task.IMAGE not in plugins.backends
