"""``/v1/embeddings`` through the real server with the packaged all-MiniLM-L6-v2."""

from __future__ import annotations

import base64
import math

import httpx
import numpy as np
import openai
import pytest
from st_helpers import cosine, flat_texts, paraphrase_margin

from nexa.testing import serve
from nexa_sentence_transformers.backend import SentenceTransformersBackend
from nexa_sentence_transformers.plugin import MINILM_NAME, packaged_minilm


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    # The ready model is registered the way the plugin's register_models hook does it.
    with serve(
        [SentenceTransformersBackend],
        home=tmp_path_factory.mktemp("nexa-http-home"),
        models=[packaged_minilm()],
    ) as handle:
        yield handle


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def test_ready_model_is_listed(client: openai.OpenAI) -> None:
    assert MINILM_NAME in [m.id for m in client.models.list().data]


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_vectors_match_sentence_transformers_called_directly(
    client: openai.OpenAI, reference, encoding_format: str
) -> None:
    texts = flat_texts()
    response = client.embeddings.create(
        model=MINILM_NAME, input=texts, encoding_format=encoding_format
    )
    expected = reference.encode(texts, normalize_embeddings=True)
    assert [d.index for d in response.data] == list(range(len(texts)))
    for item, want in zip(response.data, expected, strict=True):
        vector = item.embedding
        if encoding_format == "base64":
            # Asked for explicitly, the client hands the string over undecoded.
            assert isinstance(vector, str)
            vector = np.frombuffer(base64.b64decode(vector), dtype="<f4").tolist()
        assert len(vector) == 384
        assert cosine(vector, want.tolist()) >= 0.999
    assert response.usage.prompt_tokens == sum(
        len(ids) for ids in reference.tokenizer(texts)["input_ids"]
    )
    assert response.usage.prompt_tokens > 0


def test_default_request_of_the_openai_client(client: openai.OpenAI, reference) -> None:
    # openai-python asks for base64 unless told otherwise, and decodes it itself.
    response = client.embeddings.create(model=MINILM_NAME, input="Hello, world!")
    want = reference.encode(["Hello, world!"], normalize_embeddings=True)[0]
    assert cosine(response.data[0].embedding, want.tolist()) >= 0.999


def test_paraphrases_rank_above_unrelated_pairs_over_http(client: openai.OpenAI) -> None:
    response = client.embeddings.create(model=MINILM_NAME, input=flat_texts())
    lowest_related, highest_unrelated = paraphrase_margin([d.embedding for d in response.data])
    assert lowest_related > highest_unrelated + 0.1


def test_dimensions_truncates_and_renormalises(client: openai.OpenAI, reference) -> None:
    response = client.embeddings.create(model=MINILM_NAME, input="the cat", dimensions=64)
    vector = response.data[0].embedding
    assert len(vector) == 64
    assert abs(math.sqrt(sum(v * v for v in vector)) - 1.0) < 1e-4


def test_token_array_input(server, reference) -> None:
    ids = reference.tokenizer("the weather is lovely today", add_special_tokens=False)["input_ids"]
    response = httpx.post(
        server.base_url + "/v1/embeddings",
        json={"model": MINILM_NAME, "input": [ids], "encoding_format": "float"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    want = reference.encode(["the weather is lovely today"], normalize_embeddings=True)[0]
    assert cosine(response.json()["data"][0]["embedding"], want.tolist()) >= 0.999


def test_too_long_input_is_an_openai_shaped_400(server) -> None:
    response = httpx.post(
        server.base_url + "/v1/embeddings",
        json={"model": MINILM_NAME, "input": ["fine", "word " * 600]},
        timeout=120,
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "input" and "input[1]" in error["message"]
