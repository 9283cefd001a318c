"""The Litestar application: OpenAI-compatible routes over the model manager.

``create_app`` builds one app from a ``ServerConfig`` and the loaded plugins; resources
(store, registry, manager, metrics, image files) live on ``app.state`` for the app's
lifespan. One controller per endpoint group; domain errors become HTTP in one place
(``nexa.server.errors``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import ipaddress
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
from litestar import Controller, Litestar, Request, Response, get, post
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Operation, Reference, Schema
from litestar.response import File, Stream
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import nexa
from nexa.config import ServerConfig
from nexa.device import detect_device
from nexa.errors import BadRequest, Forbidden, NexaError, Unauthorized
from nexa.manager import ModelManager
from nexa.metrics import Metrics
from nexa.plugins import PluginSet, load_plugins
from nexa.registry import BackendRegistry
from nexa.server import convert
from nexa.server import schemas as wire
from nexa.server.errors import EXCEPTION_HANDLERS, GUARDED, INFERENCE, error_payload, error_responses
from nexa.server.images import ImageFiles
from nexa.store import ModelStore
from nexa.types import ChatChunk, Task

log = logging.getLogger("nexa.server")

_ENDPOINTS = (
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/images/generations",
    "/v1/images/files",
    "/v1/models",
    "/v1/plugins",
    "/health",
    "/metrics",
)
_OPEN_PATHS = ("/health",)
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def _now() -> int:
    return int(time.time())


def _sse(payload: Any) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


async def until_disconnected(request: Request, awaitable: Any) -> Any:
    """Await ``awaitable``; cancel it if the client goes away first."""
    work = asyncio.ensure_future(awaitable)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result()
        work.cancel()
        with contextlib.suppress(BaseException):
            await work
        raise asyncio.CancelledError("client disconnected")
    finally:
        watcher.cancel()
        if not work.done():
            # We are being cancelled (server shutdown past its grace period): let the
            # work unwind before the caller closes what it was using (an async
            # generator closed while still running raises RuntimeError, sent as a 500).
            work.cancel()
            with contextlib.suppress(BaseException):
                await work


def _tool_calls_wire(chunk: ChatChunk) -> list[wire.ToolCallWire]:
    return [
        wire.ToolCallWire(id=c.id, function=wire.FunctionCall(name=c.name, arguments=c.arguments))
        for c in chunk.tool_calls
    ]


class EventStream(Stream):
    """A Server-Sent Events stream. The handler's JSON media type must not override it."""

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["media_type"] = "text/event-stream"
        return super().to_asgi_response(*args, **kwargs)


@dataclasses.dataclass
class ChatOperation(Operation):
    """The chat 200 answer is JSON or, with ``stream: true``, an event stream; say both.

    Litestar documents the ``ChatCompletion | EventStream`` annotation as a JSON oneOf
    with an empty schema, which every body matches twice (so no body is valid).
    """

    def __post_init__(self) -> None:
        ok = (self.responses or {}).get("200")
        if ok is None or not ok.content:
            return
        schema = ok.content["application/json"].schema
        ref = next((s for s in getattr(schema, "one_of", None) or () if isinstance(s, Reference)), schema)
        ok.content = {
            "application/json": OpenAPIMediaType(schema=ref),
            # OpenAPI 3.1: the schema of an event stream describes one event.
            "text/event-stream": OpenAPIMediaType(
                schema=Schema(
                    type=OpenAPIType.OBJECT,
                    required=["data"],
                    properties={"data": Schema(type=OpenAPIType.STRING)},
                    description="Each event's data is a chat.completion.chunk (or an error) as JSON; "
                    "the last is `[DONE]`",
                )
            ),
        }


class ChatController(Controller):
    path = "/v1/chat/completions"
    tags = ["chat"]

    @post(status_code=200, summary="Create a chat completion (text or image+text)", responses=error_responses(*INFERENCE),
          operation_class=ChatOperation)
    async def create(
        self, data: wire.ChatCompletionRequest, state: State, request: Request
    ) -> wire.ChatCompletion | EventStream:
        config: ServerConfig = state.config
        manager: ModelManager = state.manager
        if any(isinstance(m.content, list) for m in data.messages):
            chat = await asyncio.to_thread(convert.chat_request, data, config)
        else:
            chat = convert.chat_request(data, config)
        task = Task.VLM if chat.has_images else Task.CHAT
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            backend = await until_disconnected(request, stack.enter_async_context(manager.acquire(data.model, task)))
            started = time.monotonic()
            chunks = backend.stream_chat(chat)
            stack.push_async_callback(chunks.aclose)
            if data.stream:
                # The first chunk is awaited here so that errors found before any output
                # (context overflow, bad template) are real HTTP errors, not stream events.
                first = await until_disconnected(request, anext(chunks, None))
                include_usage = bool(data.stream_options and data.stream_options.include_usage)
                gen = self._stream(state, data.model, chunks, first, include_usage, stack, started)
                stack = None  # the stream owns it now
                return EventStream(gen, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            return await until_disconnected(
                request, asyncio.wait_for(self._collect(state, data.model, chunks, started), config.request_timeout)
            )
        finally:
            if stack is not None:
                await stack.aclose()

    async def _collect(self, state: State, model: str, chunks: AsyncIterator[ChatChunk], started: float) -> wire.ChatCompletion:
        text: list[str] = []
        tool_calls: list[wire.ToolCallWire] = []
        finish = "stop"
        usage = None
        first_at = None
        async for chunk in chunks:
            if first_at is None and (chunk.content or chunk.tool_calls):
                first_at = time.monotonic()
            text.append(chunk.content)
            tool_calls.extend(_tool_calls_wire(chunk))
            if chunk.finish_reason:
                finish = chunk.finish_reason
            if chunk.usage:
                usage = chunk.usage
        _record(state, model, usage, started, first_at)
        content = "".join(text)
        return wire.ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=_now(),
            model=model,
            choices=[
                wire.Choice(
                    index=0,
                    message=wire.ChoiceMessage(
                        content=content if content or not tool_calls else None,
                        tool_calls=tool_calls or None,
                    ),
                    finish_reason=finish,
                )
            ],
            usage=wire.UsageWire(
                prompt_tokens=usage.prompt_tokens if usage else 0,
                completion_tokens=usage.completion_tokens if usage else 0,
                total_tokens=usage.total_tokens if usage else 0,
            ),
        )

    async def _stream(
        self,
        state: State,
        model: str,
        chunks: AsyncIterator[ChatChunk],
        first: ChatChunk | None,
        include_usage: bool,
        stack: contextlib.AsyncExitStack,
        started: float,
    ) -> AsyncIterator[bytes]:
        config: ServerConfig = state.config
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        created = _now()
        usage = None
        first_at = None
        tool_index = 0

        def frame(delta: dict[str, Any], finish: str | None) -> bytes:
            body: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            }
            if include_usage:
                body["usage"] = None
            return _sse(body)

        # The role frame leaves in one write with the first piece of the answer (already
        # awaited before the response began): the client wakes once for both, not twice.
        head = frame({"role": "assistant", "content": ""}, None)
        try:

            async def pieces() -> AsyncIterator[ChatChunk]:
                if first is not None:
                    yield first
                async for chunk in chunks:
                    yield chunk

            async with asyncio.timeout(config.request_timeout):
                async for chunk in pieces():
                    delta: dict[str, Any] = {}
                    if chunk.content:
                        delta["content"] = chunk.content
                    if chunk.tool_calls:
                        delta["tool_calls"] = []
                        for call in chunk.tool_calls:
                            delta["tool_calls"].append(
                                {
                                    "index": tool_index,
                                    "id": call.id,
                                    "type": "function",
                                    "function": {"name": call.name, "arguments": call.arguments},
                                }
                            )
                            tool_index += 1
                    if first_at is None and delta:
                        first_at = time.monotonic()
                    if chunk.usage:
                        usage = chunk.usage
                    if delta or chunk.finish_reason:
                        out = frame(delta, chunk.finish_reason)
                        if head:
                            out, head = head + out, b""
                        yield out
            tail = [head]
            head = b""
            if include_usage:
                tail.append(_sse(
                    {
                        "id": cid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": {
                            "prompt_tokens": usage.prompt_tokens if usage else 0,
                            "completion_tokens": usage.completion_tokens if usage else 0,
                            "total_tokens": usage.total_tokens if usage else 0,
                        },
                    }
                ))
            tail.append(b"data: [DONE]\n\n")
            yield b"".join(tail)
            _record(state, model, usage, started, first_at)
        except (NexaError, TimeoutError) as exc:
            # Headers are gone already: the error travels as a stream event, as OpenAI does.
            if isinstance(exc, TimeoutError):
                exc = NexaError("the request ran past the server's request timeout", code="timeout")
            yield head + _sse(error_payload(exc))
        except Exception as exc:
            log.exception("chat stream failed")
            yield head + _sse(error_payload(NexaError(f"internal error ({type(exc).__name__})")))
        finally:
            await stack.aclose()


def _record(state: State, model: str, usage: Any, started: float, first_at: float | None) -> None:
    metrics: Metrics = state.metrics
    if usage is not None:
        metrics.prompt_tokens.labels(model).inc(usage.prompt_tokens)
        metrics.generated_tokens.labels(model).inc(usage.completion_tokens)
    if first_at is not None:
        metrics.ttft.labels(model).observe(first_at - started)
        elapsed = time.monotonic() - first_at
        if usage is not None and usage.completion_tokens > 1 and elapsed > 0:
            metrics.tokens_per_second.labels(model).observe((usage.completion_tokens - 1) / elapsed)


async def run_task(state: State, request: Request, model: str, task: Task, call: Any) -> Any:
    """One non-streaming request on a model slot, cancelled on disconnect or timeout."""
    manager: ModelManager = state.manager

    async def work() -> Any:
        async with manager.acquire(model, task) as backend:
            return await call(backend)

    return await until_disconnected(request, asyncio.wait_for(work(), state.config.request_timeout))


class EmbeddingsController(Controller):
    path = "/v1/embeddings"
    tags = ["embeddings"]

    @post(status_code=200, summary="Create embeddings", responses=error_responses(*INFERENCE))
    async def create(
        self, data: wire.EmbeddingRequest, state: State, request: Request
    ) -> wire.EmbeddingResponse:
        embed = convert.embed_request(data, state.config)
        result = await run_task(state, request, data.model, Task.EMBED, lambda backend: backend.run_embed(embed))
        if len(result.vectors) != len(embed.inputs):
            raise NexaError("the backend returned a wrong number of vectors")
        items = []
        for index, vector in enumerate(result.vectors):
            values = convert.shape_vector(vector, data.dimensions)
            items.append(
                wire.EmbeddingData(index=index, embedding=convert.encode_vector(values, data.encoding_format))
            )
        return wire.EmbeddingResponse(
            data=items,
            model=data.model,
            usage=wire.EmbeddingUsage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens),
        )


class ImagesController(Controller):
    path = "/v1/images"
    tags = ["images"]

    @post("/generations", status_code=200, summary="Create images from a prompt", responses=error_responses(*INFERENCE))
    async def create(
        self, data: wire.ImageGenerationRequest, state: State, request: Request
    ) -> wire.ImagesResponse:
        spec = convert.image_request(data, state.config)
        result = await run_task(state, request, data.model, Task.IMAGE, lambda backend: backend.run_images(spec))
        files: ImageFiles = state.images
        out = []
        for png in result.images:
            if data.response_format == "b64_json":
                import base64

                out.append(wire.ImageData(b64_json=base64.b64encode(png).decode("ascii")))
            else:
                name = await asyncio.to_thread(files.save, png)
                out.append(wire.ImageData(url=str(request.url.with_replacements(path=f"/v1/images/files/{name}", query=""))))
        return wire.ImagesResponse(created=_now(), data=out)

    @get("/files/{name:str}", summary="Fetch a generated image", responses=error_responses(400, 404, *GUARDED))
    async def file(self, name: str, state: State) -> File:
        files: ImageFiles = state.images
        path = files.path(name)
        if path is None:
            raise HTTPException(status_code=404, detail="image not found or expired")
        return File(path, media_type="image/png", filename=name, content_disposition_type="inline")


class ModelsController(Controller):
    path = "/v1/models"
    tags = ["models"]

    def _card(self, state: State, manifest: Any) -> wire.ModelCard:
        loaded = {e.manifest.name for e in state.manager.loaded()}
        owner = manifest.name.split("/", 1)[0] if "/" in manifest.name else "local"
        created = 0
        if manifest.root is not None:
            with contextlib.suppress(OSError):
                created = int(manifest.root.stat().st_mtime)
        return wire.ModelCard(
            id=manifest.name,
            created=created,
            owned_by=owner,
            format=manifest.format,
            tasks=sorted(t.value for t in manifest.tasks),
            size=manifest.size,
            quant=manifest.quant,
            loaded=manifest.name in loaded,
        )

    @get(summary="List the models this server can serve", responses=error_responses(*GUARDED))
    async def list_models(self, state: State) -> wire.ModelList:
        store: ModelStore = state.store
        manifests = await asyncio.to_thread(store.list)
        return wire.ModelList(data=[self._card(state, m) for m in manifests])

    @get("/{model_id:path}", summary="Describe one model", responses=error_responses(400, 404, *GUARDED))
    async def get_model(self, model_id: str, state: State) -> wire.ModelCard:
        store: ModelStore = state.store
        manifest = await asyncio.to_thread(store.get, model_id.lstrip("/"))
        return self._card(state, manifest)


@get("/health", tags=["server"], summary="Liveness and loaded models", responses=error_responses(403, 500))
async def health(state: State) -> wire.Health:
    return wire.Health(
        status="ok",
        version=nexa.__version__,
        device=state.manager.device.kind,
        models_loaded=sorted({e.manifest.name for e in state.manager.loaded() if e.ready.done()}),
    )


@get("/v1/plugins", tags=["server"], summary="Installed plugins, failures and backends",
     responses=error_responses(*GUARDED))
async def plugins_report(state: State) -> wire.PluginsReport:
    plugins: PluginSet = state.plugins
    registry: BackendRegistry = state.registry
    return wire.PluginsReport(
        loaded=sorted(plugins.loaded),
        failed=[wire.PluginFailureWire(plugin=f.plugin, stage=f.stage, error=f.error) for f in plugins.failures],
        disabled=sorted(plugins.disabled),
        backends=[
            wire.BackendWire(
                name=b.name,
                plugin=b.plugin,
                tasks=sorted(t.value for t in b.tasks),
                formats=sorted(b.formats),
                devices=sorted(b.devices),
                parallel=b.parallel,
                priority=b.priority,
            )
            for b in registry.infos()
        ],
    )


@get("/metrics", tags=["server"], summary="Prometheus metrics", media_type=CONTENT_TYPE_LATEST,
     responses=error_responses(*GUARDED))
async def metrics_endpoint(state: State) -> Response[bytes]:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _is_loopback_host(host: str) -> bool:
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_is_loopback(host: str) -> bool:
    return _is_loopback_host(host)


def _make_guard(config: ServerConfig):
    loopback_bind = bind_is_loopback(config.host)
    key = config.api_key.encode() if config.api_key else None

    async def guard(request: Request) -> None:
        if loopback_bind:
            # DNS rebinding: a web page on evil.example whose name resolves to 127.0.0.1
            # must not reach a loopback-only server.
            host = request.headers.get("host", "")
            if host and not _is_loopback_host(host):
                raise Forbidden("requests to this loopback server must use a loopback Host name")
        if key is not None and request.url.path not in _OPEN_PATHS and request.method != "OPTIONS":
            auth = request.headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
                raise Unauthorized("missing or invalid API key (send Authorization: Bearer <key>)")

    return guard


def _metrics_middleware(metrics: Metrics):
    def factory(app: Any) -> Any:
        async def middleware(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            path = scope.get("path", "")
            endpoint = next((e for e in _ENDPOINTS if path.startswith(e)), "other")
            status = {"code": 500, "sent": False}
            started = time.monotonic()

            async def send_wrapper(message: Any) -> None:
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                    status["sent"] = True
                await send(message)

            try:
                await app(scope, receive, send_wrapper)
            except asyncio.CancelledError:
                # The request was cancelled: its client left, or uvicorn cut it off past
                # the shutdown grace period. A client still there gets an OpenAI-shaped
                # 503 instead of uvicorn's plain-text 500 (and no traceback in the log).
                if status["sent"]:
                    raise
                status["code"] = 503
                body = msgspec.json.encode(error_payload(NexaError(
                    "the server is shutting down or the request was cancelled; try again",
                    code="shutting_down")))
                with contextlib.suppress(Exception):
                    await send({"type": "http.response.start", "status": 503, "headers": [
                        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                        (b"retry-after", b"1"), (b"connection", b"close")]})
                    await send({"type": "http.response.body", "body": body})
            finally:
                metrics.requests.labels(endpoint, str(status["code"])).inc()
                metrics.latency.labels(endpoint).observe(time.monotonic() - started)

        return middleware

    return factory


def create_app(
    config: ServerConfig | None = None,
    *,
    plugins: PluginSet | None = None,
    store: ModelStore | None = None,
) -> Litestar:
    """The nexa ASGI app. ``plugins`` defaults to every installed plugin."""
    config = config or ServerConfig()
    plugins = plugins if plugins is not None else load_plugins()
    for failure in plugins.failures:
        log.warning("plugin %s failed at %s: %s", failure.plugin, failure.stage, failure.error)
    if store is None:
        store = ModelStore(config.home) if config.home else ModelStore()
    store.packaged = list(plugins.models)
    device = detect_device(config.device)
    registry = BackendRegistry(plugins, pin=config.backend)
    metrics = Metrics()
    manager = ModelManager(store, registry, device, config, metrics)
    images = ImageFiles(store.home / "images", config.image_ttl, config.image_store_bytes)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await manager.start()
        preload = None
        if config.default_model:
            async def load_default() -> None:
                try:
                    await manager.preload(config.default_model)
                except Exception as exc:
                    log.error("could not load %s: %s", config.default_model, exc)

            preload = asyncio.get_running_loop().create_task(load_default())
        try:
            yield
        finally:
            if preload is not None:
                preload.cancel()
            await manager.shutdown()

    cors = CORSConfig(allow_origins=list(config.origins), allow_headers=["*"]) if config.origins else None
    return Litestar(
        route_handlers=[
            ChatController,
            EmbeddingsController,
            ImagesController,
            ModelsController,
            health,
            plugins_report,
            metrics_endpoint,
        ],
        state=State(
            {
                "config": config,
                "store": store,
                "plugins": plugins,
                "registry": registry,
                "manager": manager,
                "metrics": metrics,
                "images": images,
            }
        ),
        lifespan=[lifespan],
        before_request=_make_guard(config),
        exception_handlers=EXCEPTION_HANDLERS,
        cors_config=cors,
        middleware=[_metrics_middleware(metrics)],
        request_max_body_size=config.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="nexa",
            version=nexa.__version__,
            description="A local server for AI models that speaks the OpenAI HTTP API.",
            path="/schema",
        ),
        debug=False,
    )


__all__ = ["create_app", "bind_is_loopback", "BadRequest"]
