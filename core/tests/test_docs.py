"""The docs stay true: every hook is documented, and the plugin guide's example works."""

from __future__ import annotations

import asyncio
import inspect
import io
import re
import wave
from pathlib import Path

import openai

from nexa import hookspecs
from nexa.testing import conformance, serve
from nexa.types import Device, Manifest, ModelFile, Task

DOCS = Path(__file__).resolve().parents[2] / "docs"


def hook_names():
    return [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
            if hasattr(fn, "nexa_spec")]


def test_every_hook_is_documented():
    text = (DOCS / "hooks.md").read_text()
    names = hook_names()
    assert len(names) == 7
    for name in names:
        assert f"## {name}" in text, f"hook {name} is missing from docs/hooks.md"


def guide_backend():
    text = (DOCS / "plugin-guide.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    assert len(code.splitlines()) <= 60, "the guide's example should stay about 50 lines"
    namespace: dict = {}
    exec(compile(code, "plugin-guide.md", "exec"), namespace)
    return namespace["RulesBackend"]


def rules_manifest(tmp_path):
    rules = tmp_path / "rules.json"
    rules.write_text('[["hello", "Hello to you too, friend."], ["weather", "It is always sunny in here."]]')
    return Manifest(name="me/eliza", format="rules", tasks={Task.CHAT},
                    files=[ModelFile("rules.json", rules.stat().st_size)], root=tmp_path)


def test_plugin_guide_example_passes_the_test_kit(tmp_path):
    cls = guide_backend()
    backend = cls(rules_manifest(tmp_path), Device("cpu"))
    asyncio.run(backend.start())
    conformance.check_chat(backend)


def test_plugin_guide_example_serves_over_http(tmp_path):
    cls = guide_backend()
    with serve([cls], home=tmp_path / "home", models=[rules_manifest(tmp_path)]) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="-")
        answer = client.chat.completions.create(
            model="me/eliza", messages=[{"role": "user", "content": "How is the weather?"}])
        assert answer.choices[0].message.content == "It is always sunny in here."


def guide_example(class_name: str):
    text = (DOCS / "plugin-guide.md").read_text()
    code = next(c for c in re.findall(r"```python\n(.*?)```", text, re.S) if f"class {class_name}" in c)
    namespace: dict = {}
    exec(compile(code, "plugin-guide.md", "exec"), namespace)
    return namespace[class_name]


def test_plugin_guide_reranker_passes_the_test_kit():
    cls = guide_example("OverlapReranker")
    backend = cls(Manifest(name="me/overlap", format="overlap", tasks={Task.RERANK}), Device("cpu"))
    asyncio.run(backend.start())
    conformance.check_rerank(backend, relevance=True)


def test_plugin_guide_transcriber_passes_the_test_kit_and_serves_over_http(tmp_path):
    cls = guide_example("LoudnessTranscriber")
    manifest = Manifest(name="me/loudness", format="loudness", tasks={Task.TRANSCRIBE})
    backend = cls(manifest, Device("cpu"))
    asyncio.run(backend.start())
    conformance.check_transcribe(backend)
    wav = io.BytesIO()
    with wave.open(wav, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(b"\x00\x40" * 16000 + b"\x00\x00" * 16000)
    with serve([cls], home=tmp_path / "home", models=[manifest]) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="-")
        answer = client.audio.transcriptions.create(model="me/loudness", file=("a.wav", wav.getvalue()))
        assert answer.text == "loud quiet"
