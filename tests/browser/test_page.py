"""The web page at `/`, end to end in headless Chromium against a real `nexa serve`.

Chat with the embedded SmolLM2 (streamed text, speed figures, Stop that frees the slot on
the server), a thought shown folded apart from the answer, an image from the tiny Stable Diffusion pipeline, the MiniLM similarity heat
map, unloading and pinning from the Models tab, a pull from the loopback Hub with its
progress bar, the API key dialog, keyboard use and a phone-width layout. Every check reads
the page or the server's own HTTP API; waits are on observable state.
"""

from __future__ import annotations

import base64
import io
import re

import httpx
from pagekit import (
    MINILM,
    PULL_FILE,
    PULL_REPO,
    PULL_SIZE,
    SMOLLM2,
    TINY_SD,
    TINY_VLM,
    resident,
    start_server,
    stop_server,
    until,
)
from playwright.sync_api import expect

LONG = 120_000  # ms: a busy 2-core machine loads torch models slowly


def shot(page, artifacts, name: str) -> None:
    page.screenshot(path=str(artifacts / f"{name}.png"), full_page=True)


def cancelled_requests(base: str) -> float:
    """The batching engine's count of cancelled sequences for SmolLM2 (from /metrics)."""
    text = httpx.get(base + "/metrics", timeout=30).text
    for line in text.splitlines():
        if line.startswith("nexa_backend_engine_requests_cancelled_total{") and f'model="{SMOLLM2}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def choose(page, select: str, value: str) -> None:
    expect(page.locator(f"{select} option[value='{value}']")).to_have_count(1, timeout=LONG)
    page.select_option(select, value)


def test_chat_streams_an_answer_with_speed_figures(page, server, artifacts):
    choose(page, "#chat-model", SMOLLM2)
    expect(page.locator("#chat-model-tasks")).to_contain_text("chat")
    page.fill("#chat-system", "You are a helpful assistant.")
    page.fill("#chat-temperature", "0")
    page.fill("#chat-max-tokens", "48")
    # Count how often the answer's text changes: a streamed answer arrives in pieces.
    page.evaluate("""() => {
        window.answerUpdates = 0;
        new MutationObserver(() => { window.answerUpdates += 1; })
            .observe(document.getElementById('chat-log'), {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#chat-input", "Write one sentence about the sea.")
    page.keyboard.press("Enter")  # Enter sends
    answer = page.locator(".message.assistant .answer").last
    stats = page.locator(".message.assistant .stats").last
    expect(stats).to_contain_text("tokens/s", timeout=LONG)
    expect(stats).to_contain_text("first token")
    assert answer.inner_text().strip(), "no answer text"
    assert page.evaluate("window.answerUpdates") > 3, "the answer did not arrive in pieces"
    assert re.search(r"\d+ tokens", stats.inner_text())
    expect(page.locator("#chat-send")).to_be_enabled()
    shot(page, artifacts, "chat")


def test_stop_cancels_the_answer_on_the_server(page, server, artifacts):
    before = cancelled_requests(server)
    choose(page, "#chat-model", SMOLLM2)
    page.fill("#chat-temperature", "0")
    page.fill("#chat-max-tokens", "4000")
    # At temperature 0 SmolLM2 keeps repeating for hundreds of tokens (checked: it runs
    # into any max_tokens up to 300 at least), so Stop lands mid-answer.
    page.fill("#chat-input", "Repeat the word hello 500 times.")
    page.click("#chat-send")
    answer = page.locator(".message.assistant .answer").last
    expect(answer).to_contain_text("hello", timeout=LONG)
    # Mid-answer: the server shows the slot busy.
    until(lambda: resident(server)[SMOLLM2]["slots_busy"] == 1, "SmolLM2's slot to be busy")
    expect(page.locator("#chat-stop")).to_be_enabled()
    page.click("#chat-stop")
    expect(page.locator(".message.assistant .stats").last).to_contain_text("stopped")
    # The server frees the slot and counts a cancelled generation.
    until(lambda: resident(server)[SMOLLM2]["slots_busy"] == 0, "the slot to be freed")
    until(lambda: cancelled_requests(server) == before + 1, "the engine to count the cancellation")
    shot(page, artifacts, "chat-stopped")


def test_an_image_is_attached_for_a_vision_model(page, server, home, artifacts):
    choose(page, "#chat-model", SMOLLM2)
    expect(page.locator("#chat-image")).to_be_disabled()  # a text model takes no image
    choose(page, "#chat-model", TINY_VLM)
    expect(page.locator("#chat-model-tasks")).to_contain_text("vlm")
    page.set_input_files("#chat-image", str(home.parent / "picture.png"))
    preview = page.locator("#chat-image-preview img")
    expect(preview).to_have_attribute("src", re.compile(r"^data:image/png;base64,"))
    page.fill("#chat-max-tokens", "8")
    page.fill("#chat-input", "What colour is this picture?")
    page.click("#chat-send")
    stats = page.locator(".message.assistant .stats").last
    # The random model's words are noise; what counts is that the server took the image
    # (a data URI through the vision path) and answered without an error.
    expect(stats).to_contain_text("tokens", timeout=LONG)
    expect(stats).not_to_contain_text("error")
    expect(page.locator(".message.user img").last).to_have_attribute("src", re.compile(r"^data:image/png"))
    shot(page, artifacts, "chat-vision")


def test_a_thought_is_shown_folded_apart_from_the_answer(browser, tmp_path, artifacts):
    """The page's side of thinking models: ``delta.reasoning_content`` goes into a folded
    "Reasoning" box, the answer stays clean. No small thinking model is packaged, so the
    test kit's declared echo double says "<think>...</think>answer" and the server splits
    the thought off as it does for any backend without the reasoning capability."""
    from nexa.testing import EchoBackend, echo_manifest, serve

    with serve([EchoBackend], home=tmp_path, models=[echo_manifest()]) as handle:
        context = browser.new_context()
        page = context.new_page()
        page.goto(handle.base_url + "/")
        choose(page, "#chat-model", "test/echo")
        page.fill("#chat-input", "<think>weighing the options</think>The answer is four.")
        page.click("#chat-send")
        message = page.locator(".message.assistant").last
        expect(message.locator(".stats")).to_contain_text("tokens", timeout=LONG)
        reasoning = message.locator("details.reasoning")
        expect(reasoning).to_be_visible()
        assert reasoning.get_attribute("open") is None, "the thought should start folded"
        expect(message.locator(".answer")).to_have_text("The answer is four.")
        expect(message.locator(".reasoning-text")).to_be_hidden()
        reasoning.locator("summary").click()
        expect(message.locator(".reasoning-text")).to_have_text("weighing the options")
        shot(page, artifacts, "chat-reasoning")
        context.close()


def test_image_generation_shows_the_png(page, server, artifacts):
    page.click("#tab-images")
    choose(page, "#image-model", TINY_SD)
    page.fill("#image-prompt", "a red cat")
    page.fill("#image-width", "64")
    page.fill("#image-height", "64")
    page.fill("#image-steps", "2")
    page.fill("#image-seed", "7")
    page.click("#image-generate")
    image = page.locator("#image-results img").first
    expect(image).to_be_visible(timeout=LONG)
    src = image.get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    from PIL import Image

    png = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert png.format == "PNG" and png.size == (64, 64)
    assert page.evaluate("document.querySelector('#image-results img').naturalWidth") == 64
    expect(page.locator("#image-results figcaption").first).to_contain_text("seed 7")
    shot(page, artifacts, "images")


def test_embeddings_heat_map(page, server, artifacts):
    page.click("#tab-embeddings")
    choose(page, "#embed-model", MINILM)
    page.fill("#embed-texts", "The cat sits on the mat.\nA kitten is sitting on a rug.\nStock markets fell sharply today.")
    page.click("#embed-compare")
    cells = page.locator("table.heatmap tbody td")
    expect(cells).to_have_count(9, timeout=LONG)
    values = [[float(cells.nth(i * 3 + j).get_attribute("data-value")) for j in range(3)] for i in range(3)]
    for i in range(3):
        assert abs(values[i][i] - 1) < 1e-3
        for j in range(3):
            assert abs(values[i][j] - values[j][i]) < 1e-4
    # A real model: the two sentences about a cat are closer than either is to the markets.
    assert values[0][1] > values[0][2] + 0.2 and values[0][1] > values[1][2] + 0.2
    colours = {cells.nth(k).evaluate("c => getComputedStyle(c).backgroundColor") for k in range(9)}
    assert len(colours) >= 3, "the cells are not coloured by their values"
    expect(page.locator("#embed-status")).to_contain_text("384 dimensions")
    shot(page, artifacts, "embeddings")


def test_models_tab_lists_unloads_and_pins(page, server, artifacts):
    httpx.post(server + "/v1/embeddings", json={"model": MINILM, "input": "warm"}, timeout=120).raise_for_status()
    page.click("#tab-models")
    row = page.locator(f"#resident-body tr[data-model='{MINILM}']")
    expect(row).to_be_visible(timeout=LONG)
    expect(row).to_contain_text("sentence-transformers")
    smol = page.locator(f"#resident-body tr[data-model='{SMOLLM2}']")
    expect(smol.locator("td[data-label='KV cache']")).to_contain_text("MB")
    shot(page, artifacts, "models")

    smol.get_by_role("button", name=f"Pin {SMOLLM2}", exact=True).click()
    expect(smol.get_by_role("button", name=f"Unpin {SMOLLM2}", exact=True)).to_have_attribute("aria-pressed", "true")
    assert resident(server)[SMOLLM2]["pinned"] is True

    row.get_by_role("button", name=f"Unload {MINILM}", exact=True).click()
    expect(row).to_have_count(0, timeout=LONG)
    assert MINILM not in resident(server)
    expect(page.locator("#models-status")).to_contain_text("done")

    # Load it back from the page, with its own keep-alive.
    choose(page, "#load-model", MINILM)
    page.fill("#load-keep-alive", "1h")
    page.click("#load-submit")
    expect(page.locator("#models-status")).to_contain_text(f"Loading {MINILM}: done", timeout=LONG)
    expect(row).to_be_visible(timeout=LONG)
    assert resident(server)[MINILM]["keep_alive"] == 3600


def test_keep_alive_countdowns_read_as_minutes_and_seconds(page, server):
    cases = [None, 0.4, 59.4, 59.6, 60, 299.6, 3599.4, 5400]
    shown = page.evaluate("async (cases) => { const m = await import('/ui/models.js'); "
                          "return cases.map((c) => m.duration(c)); }", cases)
    assert shown == ["–", "0 s", "59 s", "1 min 0 s", "1 min 0 s", "5 min 0 s", "59 min 59 s", "1.5 h"]


def test_pull_shows_progress_and_the_model_appears(page, server, hub, artifacts):
    page.click("#tab-models")
    # A slow link that stalls half way: the bar must show the bytes so far.
    hub.chunk_delay[(PULL_REPO, PULL_FILE)] = 0.02
    hub.stall_at[(PULL_REPO, PULL_FILE)] = PULL_SIZE // 2
    page.fill("#pull-name", PULL_REPO)
    page.click("#pull-submit")
    assert hub.stalled.wait(LONG / 1000)
    bar = page.locator("#pull-progress")
    page.wait_for_function("() => { const b = document.getElementById('pull-progress'); "
                           "return !b.hidden && b.value > 0 && b.value < b.max; }", timeout=LONG)
    value, top = bar.evaluate("b => [b.value, b.max]")
    assert 0 < value <= PULL_SIZE // 2 + 64 * 1024 and top >= PULL_SIZE
    expect(page.locator("#pull-status")).to_contain_text(PULL_FILE)
    shot(page, artifacts, "pull-progress")
    del hub.stall_at[(PULL_REPO, PULL_FILE)]
    hub.chunk_delay.clear()
    hub.release()
    expect(page.locator("#pull-status")).to_contain_text(f"Pulled {PULL_REPO}", timeout=LONG)
    assert bar.evaluate("b => b.value === b.max")
    expect(page.locator("#store-body")).to_contain_text(PULL_REPO)
    listed = {m["id"] for m in httpx.get(server + "/v1/models", timeout=30).json()["data"]}
    assert PULL_REPO in listed
    shot(page, artifacts, "pull-done")


def test_keyboard_and_phone_width(page, server, artifacts):
    page.focus("#tab-chat")
    page.keyboard.press("ArrowRight")
    expect(page.locator("#tab-images")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#tab-images")).to_be_focused()
    page.keyboard.press("End")
    expect(page.locator("#panel-models")).to_be_visible()
    page.keyboard.press("Home")
    expect(page.locator("#panel-chat")).to_be_visible()
    # Every form control has a label a screen reader can read.
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
        .filter(e => !e.labels || e.labels.length === 0).map(e => e.id)""")
    assert unlabelled == []
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390, "the page scrolls sideways on a phone"
    shot(page, artifacts, "phone-chat")
    page.click("#tab-models")
    expect(page.locator(f"#resident-body tr[data-model='{SMOLLM2}']")).to_be_visible(timeout=LONG)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    shot(page, artifacts, "phone-models")


def test_the_page_asks_for_the_api_key_and_keeps_it_for_the_session(browser, home, hub, artifacts):
    proc, base = start_server(home, hub, "--api-key", "page-key")
    try:
        context = browser.new_context()
        page = context.new_page()
        page.goto(base + "/")
        dialog = page.locator("#key-dialog")
        expect(dialog).to_be_visible(timeout=LONG)
        shot(page, artifacts, "api-key")
        page.fill("#key-input", "page-key")
        page.click("#key-save")
        expect(dialog).to_be_hidden()
        expect(page.locator(f"#chat-model option[value='{SMOLLM2}']")).to_have_count(1, timeout=LONG)
        # Kept for this tab's session: a reload needs no key...
        page.reload()
        expect(page.locator(f"#chat-model option[value='{SMOLLM2}']")).to_have_count(1, timeout=LONG)
        expect(dialog).to_be_hidden()
        context.close()
        # ...and a new session (a fresh browser context) asks again.
        context = browser.new_context()
        page = context.new_page()
        page.goto(base + "/")
        expect(page.locator("#key-dialog")).to_be_visible(timeout=LONG)
        context.close()
    finally:
        stop_server(proc)
