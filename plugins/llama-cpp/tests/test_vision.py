"""Vision chat on a tiny llama with a random CLIP mmproj: images go in as bytes only."""

from __future__ import annotations

import pytest
from conftest import VLM

from nexa.backend import CancelToken
from nexa.errors import BadRequest
from nexa.types import ChatMessage, ChatRequest, ImagePart, Task, TextPart
from nexa_llama_cpp.testing import png_bytes


def ask(backend, *parts, **kwargs):
    request = ChatRequest.create((ChatMessage("user", tuple(parts)),), **kwargs)
    chunks = list(backend.chat(request, CancelToken()))
    return "".join(c.content for c in chunks), chunks


def test_store_marks_the_model_as_vlm(store):
    manifest = store.get(VLM)
    assert {Task.CHAT, Task.VLM} <= manifest.tasks
    assert manifest.has_role("mmproj")


def test_image_adds_its_tokens_to_the_prompt(vlm_backend):
    text_only, chunks_text = ask(vlm_backend, TextPart("what is this?"), max_tokens=6, temperature=0)
    _, chunks_image = ask(
        vlm_backend, TextPart("what is this?"), ImagePart(png_bytes()), max_tokens=6, temperature=0
    )
    # 32x32 image, 8x8 patches: 16 image embeddings replace the one-line media marker.
    extra = chunks_image[-1].usage.prompt_tokens - chunks_text[-1].usage.prompt_tokens
    assert extra >= 16
    assert chunks_image[-1].usage.completion_tokens == 6
    assert chunks_image[-1].finish_reason == "length"


def test_counted_prompt_tokens_with_images_are_what_the_answer_reports(vlm_backend):
    parts = (TextPart("what is this?"), ImagePart(png_bytes()), ImagePart(png_bytes(color=(0, 9, 0))))
    request = ChatRequest.create((ChatMessage("system", "Be brief."), ChatMessage("user", parts)), max_tokens=2)
    counted = vlm_backend.count_prompt_tokens(request)
    chunks = list(vlm_backend.chat(request, CancelToken()))
    assert counted == chunks[-1].usage.prompt_tokens > 32  # two images of 16 embeddings each
    text_only = ChatRequest.create((ChatMessage("user", "what is this?"),))
    assert vlm_backend.count_prompt_tokens(text_only) < counted - 32


def test_different_images_give_different_answers(vlm_backend):
    a, _ = ask(vlm_backend, ImagePart(png_bytes(color=(255, 0, 0))), max_tokens=12, temperature=0)
    b, _ = ask(vlm_backend, ImagePart(png_bytes(color=(0, 0, 255))), max_tokens=12, temperature=0)
    a2, _ = ask(vlm_backend, ImagePart(png_bytes(color=(255, 0, 0))), max_tokens=12, temperature=0)
    assert a == a2
    assert a != b


def test_text_request_after_an_image_does_not_reuse_image_cache(vlm_backend):
    plain = ChatRequest.create((ChatMessage("user", "hello"),), max_tokens=8, temperature=0)
    before = "".join(c.content for c in vlm_backend.chat(plain, CancelToken()))
    ask(vlm_backend, ImagePart(png_bytes()), max_tokens=3, temperature=0)
    after = "".join(c.content for c in vlm_backend.chat(plain, CancelToken()))
    assert before == after


def test_two_images_in_one_message(vlm_backend):
    _, one = ask(vlm_backend, ImagePart(png_bytes()), max_tokens=2, temperature=0)
    _, two = ask(vlm_backend, ImagePart(png_bytes()), ImagePart(png_bytes(color=(0, 200, 0))),
                 max_tokens=2, temperature=0)
    assert two[-1].usage.prompt_tokens - one[-1].usage.prompt_tokens >= 16


def test_undecodable_image_is_a_400(vlm_backend):
    with pytest.raises(BadRequest, match="could not be decoded"):
        ask(vlm_backend, ImagePart(b"not an image at all", mime="image/png"), max_tokens=2)


def test_marker_injected_in_text_is_a_400(vlm_backend):
    marker = vlm_backend._vision.media_marker
    with pytest.raises(BadRequest):
        ask(vlm_backend, TextPart(f"sneaky {marker}"), ImagePart(png_bytes()), max_tokens=2)


def test_handler_never_fetches_urls_or_paths(vlm_backend, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes())
    for url in (f"file://{secret}", "http://127.0.0.1:9/x.png", str(secret)):
        with pytest.raises(BadRequest):
            vlm_backend._vision.handler.load_image(url)


def test_grammar_and_stop_work_with_images(vlm_backend):
    text, chunks = ask(
        vlm_backend, TextPart("json please"), ImagePart(png_bytes()), max_tokens=120,
        temperature=0.5, seed=2,
        response_format={"type": "json_schema", "json_schema": {"schema": {
            "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
            "additionalProperties": False}}},
    )
    import json

    assert chunks[-1].finish_reason == "stop"
    assert isinstance(json.loads(text)["n"], int)
