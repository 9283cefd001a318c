"""Property-based fuzzing of every endpoint from the app's own OpenAPI document.

schemathesis reads the document the app serves at ``/schema/openapi.json`` and sends
schema-valid and schema-breaking requests to a real server on loopback (echo test double
as the backend). Every response must pass schemathesis' own checks (no 5xx, status codes,
content types and bodies as documented, valid data accepted, invalid data rejected),
every error must be in the OpenAI error shape and leak no server path or traceback, every
stream must be complete, and the server must be healthy afterwards.

``NEXA_FUZZ_CASES`` sets the cases per endpoint (default 50; the ``fuzz`` nox session
runs 1000). ``NEXA_FUZZ_REPORT=path.json`` writes the per-endpoint status counts.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
import time
import urllib.parse
import zlib
from pathlib import Path

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.config import SchemathesisConfig

import relkit
from nexa.config import ServerConfig
from nexa.plugins import load_plugins
from nexa.server.app import create_app
from nexa.testing import EchoBackend, StaticPlugin, echo_manifest, serve
from nexa.testing.hubserver import HubServer

CASES = int(os.environ.get("NEXA_FUZZ_CASES", "50"))
MODEL = "test/echo"
PNG_URI = relkit.data_uri(relkit.tiny_png())
WAV = relkit.tiny_wav()
pytestmark = pytest.mark.fuzz


def _app_document() -> dict:
    """The app's OpenAPI document, built as the server builds it (compared with the served one below)."""
    with tempfile.TemporaryDirectory() as home:
        plugins = load_plugins(load_entry_points=False, extra_plugins=[StaticPlugin([EchoBackend])])
        app = create_app(ServerConfig(home=Path(home)), plugins=plugins)
        return json.loads(json.dumps(app.openapi_schema.to_schema()))


DOCUMENT = _app_document()
# schemathesis stops reading an event stream after 20 events by default (and says so only
# in ``response.stream_cut_short``): a long echoed stream was then checked as if it had
# ended there, without its terminator. Every stream is read to its end (the request
# timeout still bounds one that never ends), so "every stream must be complete" is
# checked on whole streams.
STREAM_EVENTS_READ = 1_000_000
schema = schemathesis.openapi.from_dict(
    DOCUMENT, config=SchemathesisConfig.from_dict({"max-stream-events": STREAM_EVENTS_READ}))
COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


@pytest.fixture(scope="module")
def fuzz_home():
    with tempfile.TemporaryDirectory(prefix="nexa-fuzz-") as home:
        yield Path(home)


@pytest.fixture(scope="module")
def fuzz_server(fuzz_home):
    # A huge context so that schema-valid prompts are never a context overflow.
    models = [echo_manifest(MODEL, context_length=10**9)]
    # Pulls (POST /v1/admin/pull) go to an empty loopback Hub, never to the network.
    with HubServer({}) as hub, pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_ENDPOINT", hub.url)
        mp.delenv("HF_HUB_OFFLINE", raising=False)
        with serve([EchoBackend], home=fuzz_home, models=models) as handle:
            yield handle


@pytest.fixture(scope="module")
def http(fuzz_server):
    with requests.Session() as session:
        yield session


def _pick(body: object, salt: str, out_of: int) -> bool:
    """A deterministic 1-in-``out_of`` choice per body (reproducible, shrinks with it)."""
    return zlib.crc32((salt + json.dumps(body, sort_keys=True, default=str)).encode()) % out_of != 0


def ground(case) -> None:
    """Give a schema-valid body the resources it names, as a real client would.

    The document can't say which models exist, which image files exist, the model's
    vector size, rules across fields (images only in user messages and at most 8 per
    request, ``tool_choice`` naming a listed tool), or that a JSON schema in a body (tool
    ``parameters``, a ``response_format`` schema: "an object" in the document, with the
    caps in its description) is a JSON schema within the caps. Without
    this, schema-valid requests would mostly stop at a 404 or a 400 and never reach a
    backend. One body in four keeps its random model name.
    """
    body = case.body
    if not isinstance(body, dict):
        return
    if isinstance(body.get("model"), str) and _pick(body, "model", 4):
        body["model"] = MODEL
    # A load may ask for a context only of backends that size one; the echo double does not.
    body.pop("context", None)
    if "file" in body:
        ground_audio(body)
    if isinstance(body.get("dimensions"), (int, float)) and not isinstance(body["dimensions"], bool):
        body["dimensions"] = min(int(body["dimensions"]), 16)  # the echo model's vector size
    messages = body.get("messages")
    images = 0
    if isinstance(messages, list):
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, list):
                continue
            for i, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") == "image_url":
                    # OpenAI accepts image parts in user messages only, and the server at
                    # most max_images_per_request (8) in one request.
                    if message.get("role") == "user" and images < 8:
                        part["image_url"]["url"] = PNG_URI
                        images += 1
                    else:
                        content[i] = {"type": "text", "text": "an image was here"}
    if case.operation.path.startswith("/v1/messages"):
        _ground_messages(body)
        return
    if case.operation.path == "/v1/responses":
        _ground_responses(body)
        return
    tools = body.get("tools") or []
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        if tools:
            choice["function"]["name"] = tools[0]["function"]["name"]
        else:
            body["tool_choice"] = "auto"
    elif choice == "required" and not tools:
        body["tool_choice"] = "auto"
    # The deprecated functions: not beside tools; function_call only with them, naming one.
    functions = body.get("functions")
    if functions and "tools" in body:
        del body["functions"]
        functions = None
    call = body.get("function_call")
    if call is not None and not functions:
        del body["function_call"]
    elif isinstance(call, dict):
        call["name"] = functions[0]["name"]
    # The echo double declares no capabilities: these fields are refused with a 400 by
    # design (core/tests/test_chat_api.py checks it), so valid bodies go without them.
    for field in ("logprobs", "top_logprobs", "logit_bias", "reasoning_effort", "think", "chat_template_kwargs",
                  "reasoning_budget", "suffix"):
        body.pop(field, None)
    for tool in tools if isinstance(tools, list) else ():
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("parameters"), dict):
            function["parameters"] = _a_schema(function["parameters"])
    # json_schema null or without a schema is documented as "any JSON object" and sent as
    # generated (test_fuzz_json_schema_without_a_schema_is_accepted sends each form).
    fmt = body.get("response_format")
    spec = fmt.get("json_schema") if isinstance(fmt, dict) else None
    if isinstance(spec, dict) and isinstance(spec.get("schema"), dict):
        spec["schema"] = _a_schema(spec["schema"])


SCHEMAS = [
    {"type": "object"},
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"]},
    {"type": "array", "items": {"type": "integer", "minimum": 0}, "maxItems": 8},
    {"type": "string", "pattern": "^[a-z]{2,8}$", "enum": ["red", "green"]},
]


def _a_schema(generated: dict) -> dict:
    return SCHEMAS[zlib.crc32(json.dumps(generated, sort_keys=True, default=str).encode()) % len(SCHEMAS)]


_PNG_SOURCE = {"type": "base64", "media_type": "image/png", "data": PNG_URI.split(",", 1)[1]}


def _ground_blocks(blocks: list, role: str, images: list[int]) -> list:
    """Anthropic content blocks as a client sends them: each kind in the role that may
    carry it, images that decode (at most 8), documents as text."""
    allowed = {"assistant": {"text", "tool_use", "thinking", "redacted_thinking"},
               "user": {"text", "image", "document", "tool_result"}}[role]
    out = []
    for block in blocks:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind not in allowed:
            out.append({"type": "text", "text": "a block was here"})
            continue
        if kind == "image":
            if images[0] >= 8:
                block = {"type": "text", "text": "an image was here"}
            else:
                images[0] += 1
                block["source"] = dict(_PNG_SOURCE)
        elif kind == "document":
            block["source"] = {"type": "text", "media_type": "text/plain", "data": "a document"}
        elif kind == "tool_result" and isinstance(block.get("content"), list):
            block["content"] = _ground_blocks(block["content"], "user", images)
            block["content"] = [b for b in block["content"] if b.get("type") in ("text", "image", "document")]
        out.append(block)
    return out


def _ground_messages(body: dict) -> None:
    images = [0]
    for message in body.get("messages") or []:
        if isinstance(message, dict) and isinstance(message.get("content"), list):
            message["content"] = _ground_blocks(message["content"], message.get("role", "user"), images)
    # Tools without a schema and with a versioned type run on Anthropic's side: not offered.
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict)
             and (t.get("input_schema") is not None or t.get("type") in (None, "custom"))]
    for tool in tools:
        if isinstance(tool.get("input_schema"), dict):
            tool["input_schema"] = _a_schema(tool["input_schema"])
    for holder in (body.get("output_format"), (body.get("output_config") or {}).get("format")):
        if isinstance(holder, dict) and isinstance(holder.get("schema"), dict):
            holder["schema"] = _a_schema(holder["schema"])
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") in ("tool", "any"):
        if not tools:
            body["tool_choice"] = {"type": "auto"}
        elif choice["type"] == "tool":
            choice["name"] = tools[0]["name"]


def _ground_responses(body: dict) -> None:
    """The cross-field rules of a Responses body (items and tools are free-form objects in
    the document: each kind is checked by the server), as a client would follow them."""
    if isinstance(body.get("input"), list):
        body["input"] = [{"role": "user", "content": f"item {i}"} for i, _ in enumerate(body["input"])]
    if not body.get("input"):
        body["input"] = "hello"
    body["tools"] = [{"type": "function", "name": f"f{i}"} for i, _ in enumerate(body.get("tools") or [])]
    if body.get("tool_choice") not in (None, "auto", "none") and not (body["tools"] and body["tool_choice"] == "required"):
        body["tool_choice"] = "auto"
    for field, value in (("previous_response_id", None), ("background", None), ("conversation", None),
                         ("top_logprobs", None), ("truncation", "disabled")):
        if field in body:
            body[field] = value
    # A json_schema format without a schema (absent or null) asks for any JSON object.
    fmt = (body.get("text") or {}).get("format")
    if isinstance(fmt, dict) and isinstance(fmt.get("schema"), dict):
        fmt["schema"] = _a_schema(fmt["schema"])


def ground_audio(body: dict) -> None:
    """An audio upload (multipart): a real WAV, and the cross-field rules of OpenAI's form
    (timestamp_granularities only with verbose_json; stream only with json or text)."""
    body["file"] = WAV
    for name in [k for k, v in body.items() if v is None]:
        del body[name]  # a form has no null; a client leaves the field out
    if body.get("timestamp_granularities") or body.get("timestamp_granularities[]"):
        body["response_format"] = "verbose_json"
    if body.get("stream") in (True, "true") and body.get("response_format", "json") not in ("json", "text"):
        body["stream"] = False


def openai_errors(ctx, response, case) -> None:
    """Errors in the API's shape (OpenAI's; Anthropic's on /v1/messages) without paths or
    tracebacks; streams complete."""
    content_type = response.headers.get("content-type", [""])
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    if response.status_code >= 400:
        assert content_type.startswith("application/json"), f"error with content-type {content_type!r}"
        relkit.check_error_body_for(case.operation.path, response.json(), case.operation.schema.location)
    elif content_type.startswith("text/event-stream"):
        limit = case.operation.schema.config.max_stream_events_for(operation=case.operation)
        assert not response.stream_cut_short, (
            f"schemathesis stopped reading this stream before its end (at the request timeout or {limit} "
            "events), so it can't be checked whole: a stream that never ends, or one longer than expected")
        relkit.parse_event_stream(case.operation.path, response.text)


@schema.parametrize()
@settings(
    max_examples=CASES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate, Phase.target],
)
def test_fuzz_endpoint(case, fuzz_server, http, fuzz_home):
    if case.meta is not None and case.meta.generation.mode.is_positive:
        ground(case)
    response = case.call_and_validate(
        base_url=fuzz_server.base_url,
        session=http,
        additional_checks=[openai_errors],
        timeout=60,
    )
    text = response.text
    assert not relkit.leaks(text, fuzz_home) or response.status_code < 400
    COUNTS[case.operation.label][response.status_code] += 1


# --- beyond the schema: any method, query, content type and body on every path --------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_BODY_KEYS = st.sampled_from(["model", "messages", "input", "prompt", "stream", "max_tokens", "n", "size", "role",
                              "content", "image_url", "tools", "dimensions", "encoding_format"])
_LIKELY = st.fixed_dictionaries(
    {"model": st.sampled_from([MODEL, "", "../../etc/passwd", "nope/nope", MODEL + ":Q4"])},
    optional={"messages": _JSON, "input": _JSON, "prompt": _JSON, "stream": _JSON, "n": _JSON, "size": _JSON},
).flatmap(lambda d: st.dictionaries(_BODY_KEYS, _JSON, max_size=3).map(lambda extra: {**extra, **d}))
_BODIES = st.one_of(
    st.none(),
    st.binary(max_size=512),
    _JSON.map(lambda v: json.dumps(v).encode()),
    _LIKELY.map(lambda v: json.dumps(v).encode()),
    st.text(max_size=64).map(lambda t: t.encode("utf-8", "surrogatepass")),
)
_CONTENT_TYPES = st.sampled_from([None, "application/json", "application/json; charset=utf-8", "text/plain",
                                  "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                  "application/octet-stream", "image/png", ";;;", "application/json; charset=latin-1"])
_PATHS = sorted({p.split("{")[0] + ("x" if "{" in p else "") for p in DOCUMENT["paths"]})


@pytest.mark.parametrize("path", _PATHS)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
    suffix=st.sampled_from(["", "/", "/x", "/%2e%2e/%2e%2e", "/../..", "?a=1", "?model=test%2Fecho", "//"]),
    query=st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=16), max_size=3),
    content_type=_CONTENT_TYPES,
    body=_BODIES,
)
@settings(max_examples=CASES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_fuzz_raw_requests(fuzz_server, http, fuzz_home, path, method, suffix, query, content_type, body):
    headers = {"Content-Type": content_type} if content_type else {}
    r = http.request(method, fuzz_server.base_url + path + suffix, params=query or None, data=body,
                     headers=headers, timeout=60)
    assert r.status_code < 500, f"{method} {path}{suffix}: {r.status_code} {r.text[:300]}"
    if r.status_code >= 400 and method != "HEAD":
        # The path as sent (the client drops dot segments; the server sees it so).
        sent = urllib.parse.unquote(urllib.parse.urlsplit(r.request.url).path)
        relkit.check_error_body_for(sent, r.json(), fuzz_home)
    COUNTS[f"raw {path}"][r.status_code] += 1


# --- hostile bodies: deep JSON, other media types, images cut short ---------------------

_POSTS = sorted(p for p, ops in DOCUMENT["paths"].items() if "post" in ops)
_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def _deep(depth: int, opener: str, where: str) -> bytes:
    nested = "[" * depth + "]" * depth if opener == "[" else '{"a":' * depth + "1" + "}" * depth
    if where == "body":
        return nested.encode()
    slot = {
        "tools": '"tools": [{"type": "function", "function": {"name": "f", "parameters": {"x": NESTED}}}]',
        "response_format": '"response_format": {"type": "json_schema", "json_schema": {"schema": {"x": NESTED}}}',
        "unknown": '"zzz": NESTED',
        "input": '"input": NESTED',
    }[where].replace("NESTED", nested)
    head = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "prompt": "p"})
    return (head[:-1] + ", " + slot + "}").encode()


_DEEP = st.builds(_deep, st.integers(2, 3000), st.sampled_from(["[", "{"]),
                  st.sampled_from(["body", "tools", "response_format", "unknown", "input"]))


def _multipart(fields: dict[str, str]) -> bytes:
    parts = [f'--x\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in fields.items()]
    return ("".join(parts) + "--x--\r\n").encode("utf-8", "surrogatepass")


def _real_images() -> list[bytes]:
    import io

    from PIL import Image

    out = []
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "ICO"):
        buffer = io.BytesIO()
        Image.new("RGB", (24, 24), (10, 200, 30)).save(buffer, format=fmt)
        out.append(buffer.getvalue())
    return out


IMAGES = _real_images()


def _image_chat(image: bytes, cut: float, flips: list[int]) -> bytes:
    damaged = bytearray(image[: max(1, int(len(image) * cut))])
    for position in flips:
        damaged[position % len(damaged)] ^= 0x5A
    parts = [{"type": "image_url", "image_url": {"url": relkit.data_uri(bytes(damaged))}}]
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": parts}]}).encode()


_HOSTILE = st.one_of(
    _DEEP.map(lambda body: ("application/json", body)),
    st.dictionaries(_BODY_KEYS, st.text(max_size=16), max_size=4).map(
        lambda fields: ("multipart/form-data; boundary=x", _multipart(fields))),
    st.just(json.dumps(_CHAT).encode()).map(lambda body: ("text/plain", body)),
    st.builds(_image_chat, st.sampled_from(IMAGES), st.floats(0.05, 1.0), st.lists(st.integers(0, 10**6), max_size=3))
    .map(lambda body: ("application/json", body)),
)


@pytest.mark.parametrize("path", _POSTS)
@given(hostile=_HOSTILE)
@settings(max_examples=CASES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_fuzz_hostile_bodies(fuzz_server, http, fuzz_home, path, hostile):
    content_type, body = hostile
    r = http.post(fuzz_server.base_url + path, data=body, headers={"Content-Type": content_type}, timeout=60)
    assert r.status_code < 500, f"POST {path} ({content_type}): {r.status_code} {r.text[:300]}"
    if r.status_code >= 400:
        relkit.check_error_body_for(path, r.json(), fuzz_home)
    # A media type the path does not take (JSON to a form upload, a form to a JSON route) is a 415.
    takes = DOCUMENT["paths"][path]["post"]["requestBody"]["content"]
    if content_type.split(";")[0] not in takes:
        assert r.status_code == 415, r.text
    COUNTS[f"hostile {path}"][r.status_code] += 1


def _validate_one(fuzz_server, http, path: str, body: dict):
    """``body`` sent once to ``path`` as a schemathesis case, through all its checks and
    ours; the response."""
    responses = []

    @given(case=schema[path]["POST"].as_strategy(body=body))
    @settings(max_examples=1, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              phases=[Phase.generate])
    def run(case):
        assert case.body == body
        responses.append(case.call_and_validate(base_url=fuzz_server.base_url, session=http,
                                                additional_checks=[openai_errors], timeout=60))

    run()
    return responses[-1]


@pytest.mark.parametrize(("path", "body"), [
    *(("/v1/chat/completions", {**_CHAT, "response_format": fmt}) for fmt in (
        {"type": "json_schema", "json_schema": None},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"name": "answer"}},
        {"type": "json_schema", "json_schema": {"name": "answer", "schema": None}},
    )),
    *(("/v1/responses", {"model": MODEL, "input": "hi", "text": {"format": fmt}}) for fmt in (
        {"type": "json_schema", "name": "answer", "schema": None},
        {"type": "json_schema", "name": "answer"},
    )),
])
def test_fuzz_json_schema_without_a_schema_is_accepted(fuzz_server, http, path, body):
    """The document calls these valid (any JSON object is asked for): schemathesis'
    positive-data check, with all its other checks, on each."""
    response = _validate_one(fuzz_server, http, path, body)
    assert response.status_code == 200, response.text


_LONG = " ".join(f"word{i}" for i in range(60))


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/messages", {"model": MODEL, "max_tokens": 4096, "stream": True,
                      "messages": [{"role": "user", "content": _LONG}]}),
    ("/v1/completions", {"model": MODEL, "max_tokens": 4096, "stream": True, "prompt": [_LONG, _LONG, _LONG]}),
])
def test_fuzz_checks_a_long_stream_to_its_end(fuzz_server, http, path, body):
    """A stream of far more events than schemathesis reads by default (20) is read whole,
    passes the completeness check and reaches its terminator (the fuzz run used to check
    such streams cut at event 20, and fail when the cases it drew had one)."""
    response = _validate_one(fuzz_server, http, path, body)
    assert response.status_code == 200, response.text
    events = relkit.parse_event_stream(path, response.text)
    assert len(events) > 60, len(events)  # one event per echoed word at least


def test_fuzz_document_is_the_served_one(fuzz_server):
    served = httpx.get(fuzz_server.base_url + "/schema/openapi.json", timeout=30)
    assert served.status_code == 200
    assert served.json() == DOCUMENT


def test_fuzz_left_the_server_healthy(fuzz_server):
    """After the fuzzing: healthy, a normal request works at once, nothing stuck in a slot."""
    base = fuzz_server.base_url
    started = time.monotonic()
    health = httpx.get(base + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    r = httpx.post(base + "/v1/chat/completions", timeout=10, json={
        "model": MODEL, "messages": [{"role": "user", "content": "still here"}]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "still here"
    assert time.monotonic() - started < 5
    manager = fuzz_server.app.state.manager
    for entry in manager.loaded():
        assert entry.active == 0 and entry.waiting == 0, (entry.manifest.name, entry.active, entry.waiting)
    total = sum(sum(c.values()) for c in COUNTS.values())
    summary = {op: dict(sorted(c.items())) for op, c in sorted(COUNTS.items())}
    print(f"\nfuzzed {total} cases over {len(COUNTS)} operations: {json.dumps(summary)}")
    if os.environ.get("NEXA_FUZZ_REPORT"):
        Path(os.environ["NEXA_FUZZ_REPORT"]).write_text(
            json.dumps({"cases_per_endpoint_setting": CASES, "total": total, "statuses": summary}, indent=1)
        )
    if COUNTS:
        # Every documented operation was fuzzed (this test runs after the fuzz test).
        documented = {f"{m.upper()} {p}" for p, ops in DOCUMENT["paths"].items() for m in ops}
        documented |= {f"raw {p}" for p in _PATHS} | {f"hostile {p}" for p in _POSTS}
        assert documented <= set(COUNTS), documented - set(COUNTS)
