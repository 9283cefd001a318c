"""``/v1/images/generations`` through the real server, with the openai client and raw HTTP."""

from __future__ import annotations

import base64
import io
import json
import logging
import socket
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image
from tiny_pipeline import import_copy

from nexa.testing import serve, wait_until
from nexa_diffusers.backend import DiffusersBackend

TINY = "test/tiny-sd"
SEED_MODEL = "NexaAI/Prefect-illustrious-XL-v2.0p-fp16-cuda"
FAST = {"seed": 11, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_sd_folder: Path):
    home = tmp_path_factory.mktemp("nexa-http-home")
    # device="cpu": the refusal test below is about a CPU server even on a CUDA machine.
    with serve([DiffusersBackend], home=home, device="cpu") as handle:
        import_copy(handle.store, tiny_sd_folder, TINY, tmp_path_factory.mktemp("copy"))
        yield handle


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def decode_png(data: bytes) -> Image.Image:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_b64_json_gives_plain_base64_pngs_that_differ(client: openai.OpenAI) -> None:
    response = client.images.generate(
        model=TINY, prompt="a red cat", n=2, size="64x64", response_format="b64_json",
        extra_body=FAST,
    )
    assert len(response.data) == 2
    pngs = []
    for item in response.data:
        assert item.url is None and not item.b64_json.startswith("data:")
        pngs.append(base64.b64decode(item.b64_json, validate=True))
    assert [decode_png(p).size for p in pngs] == [(64, 64), (64, 64)]
    assert pngs[0] != pngs[1]


def test_url_points_at_the_server_and_serves_the_png(client: openai.OpenAI, server) -> None:
    response = client.images.generate(
        model=TINY, prompt="a red cat", n=1, size="64x128", response_format="url",
        extra_body=FAST,
    )
    url = response.data[0].url
    assert url.startswith(server.base_url + "/v1/images/files/")
    fetched = httpx.get(url, timeout=30)
    assert fetched.status_code == 200
    assert fetched.headers["content-type"].startswith("image/png")
    assert decode_png(fetched.content).size == (64, 128)


def test_same_seed_same_bytes_over_http(client: openai.OpenAI) -> None:
    def one() -> bytes:
        item = client.images.generate(
            model=TINY, prompt="a red cat", size="64x64", response_format="b64_json",
            extra_body=FAST,
        ).data[0]
        return base64.b64decode(item.b64_json)

    assert one() == one()


@pytest.mark.parametrize("size", ["65x64", "64x100", "32x32"])
def test_bad_size_is_an_openai_shaped_400(server, size: str) -> None:
    response = httpx.post(
        server.base_url + "/v1/images/generations",
        json={"model": TINY, "prompt": "a red cat", "size": size, **FAST},
        timeout=120,
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "size"
    assert size in error["message"]


def test_bad_size_raises_bad_request_in_the_openai_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(model=TINY, prompt="a red cat", size="60x64", extra_body=FAST)
    assert "multiples of 8" in str(err.value)


def test_cuda_only_model_is_a_clear_400_on_a_cpu_server(
    server, tiny_sd_folder: Path, tmp_path: Path
) -> None:
    import_copy(server.store, tiny_sd_folder, SEED_MODEL, tmp_path)
    response = httpx.post(
        server.base_url + "/v1/images/generations",
        json={"model": SEED_MODEL, "prompt": "A white cat with blue eyes", "n": 1,
              "size": "512x512", "response_format": "url"},
        timeout=120,
    )
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert "CUDA" in message and "cpu" in message
    assert "Traceback" not in response.text


def test_client_disconnect_stops_generation(client: openai.OpenAI, server, caplog) -> None:
    client.images.generate(model=TINY, prompt="warm up", size="64x64", extra_body=FAST)
    steps = 400
    body = json.dumps({"model": TINY, "prompt": "a long one", "size": "64x64",
                       "num_inference_steps": steps, "seed": 1}).encode()
    head = (f"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()

    def messages() -> list[str]:
        return [r.getMessage() for r in caplog.records]

    def ran() -> list[str]:
        return [m for m in messages() if "step " in m and m.endswith(f"/{steps}")]

    with caplog.at_level(logging.INFO, logger="nexa.diffusers"):
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(head + body)
            wait_until(ran, "the generation has begun its steps", timeout=120)
        # The client has gone mid-generation (its socket is closed).
        wait_until(lambda: any("cancelled" in m for m in messages()), "the generation is cancelled", timeout=120)
    assert 0 < len(ran()) < steps
    # The model is free again: its slot is released and the next request is served.
    wait_until(lambda: server.metric(f'nexa_active_requests{{model="{TINY}"}}') == 0, "the model's slot is released")
    after = client.images.generate(model=TINY, prompt="after", size="64x64", extra_body=FAST)
    assert len(after.data) == 1
