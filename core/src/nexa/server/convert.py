"""Conversions between the OpenAI wire schemas and the task-level types.

Request checks that msgspec can't express (list shapes, ``size`` limits, the configurable
caps of ``nexa.server.limits``) run here, before any work, so every handler gets a valid
task request or a clear 4xx.
"""

from __future__ import annotations

import base64
import math
import re
import struct
from collections.abc import Sequence

from nexa.config import ServerConfig
from nexa.errors import BadRequest
from nexa.server import chat_options
from nexa.server import schemas as wire
from nexa.server.limits import check_chat, check_count, check_embed_inputs
from nexa.server.media import fetch_image
from nexa.types import (
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    ContentPart,
    EmbedRequest,
    ImagePart,
    ImageRequest,
    Sampling,
    TextPart,
    ToolCall,
)

_DURATION_PART = r"(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|μs|ms|s|m|h)"
_DURATION = re.compile(rf"(?:{_DURATION_PART})+")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_seconds(value: float | str | None, param: str = "keep_alive") -> float | None:
    """Ollama's ``keep_alive`` in seconds: a number of seconds, or a Go duration string
    (``"5m"``, ``"1h30m"``, ``"-1s"``); negative keeps the model loaded for good, 0 unloads
    it after the request. None when the field is absent."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text[1:] if text[:1] in "+-" else text
        if re.fullmatch(r"\d+(?:\.\d*)?|\.\d+", body):
            return sign * float(body)
        if not _DURATION.fullmatch(body):
            raise BadRequest(
                f"{param} must be seconds or a duration such as \"5m\" or \"1h30m\", not {value[:40]!r}",
                param=param,
            )
        parts = re.findall(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)", body)
        return sign * sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)
    if not math.isfinite(value):
        raise BadRequest(f"{param} must be a finite number of seconds", param=param)
    return float(value)


def chat_request(body: wire.ChatCompletionRequest, config: ServerConfig) -> ChatRequest:
    """The task request for a chat body; fetches images (blocking: call off the loop)."""
    # Counted before any message is looked at (or any image fetched); the rest of the
    # caps (schemas) once the task is built, in check_chat.
    check_count(body.messages, config.max_messages, "messages", "messages", "max_messages")
    if body.n != 1:
        raise BadRequest("only n=1 is supported for chat completions", param="n")
    max_tokens = body.max_completion_tokens or body.max_tokens
    image_count = 0
    messages: list[ChatMessage] = []
    for message in body.messages:
        content: str | tuple[ContentPart, ...] | None
        if isinstance(message.content, list):
            parts: list[ContentPart] = []
            for part in message.content:
                if isinstance(part, wire.TextContentPart):
                    parts.append(TextPart(part.text))
                else:
                    image_count += 1
                    if image_count > config.max_images_per_request:
                        raise BadRequest(
                            f"at most {config.max_images_per_request} images per request",
                            param="messages",
                        )
                    parts.append(fetch_image(part.image_url.url, config))
            if any(isinstance(p, ImagePart) for p in parts) and message.role != "user":
                raise BadRequest("images are only accepted in user messages", param="messages")
            content = tuple(parts)
        else:
            content = message.content
        messages.append(
            ChatMessage(
                role="system" if message.role == "developer" else message.role,
                content=content,
                name=message.name,
                tool_calls=tuple(
                    ToolCall(c.id, c.function.name, c.function.arguments)
                    for c in message.tool_calls or ()
                ) or _legacy_call(message),
                tool_call_id=message.tool_call_id,
                reasoning=message.reasoning_content,
            )
        )
    response_format = None
    if body.response_format is not None and body.response_format.type != "text":
        if body.response_format.type == "json_schema":
            spec = body.response_format.json_schema
            # No schema (json_schema absent or null, or without "schema"): any JSON
            # object, as the document says.
            schema = spec.schema if spec is not None and spec.schema is not None else {"type": "object"}
            name = spec.name if spec is not None else "response"
            response_format = {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
        else:
            response_format = {"type": "json_object"}
    body_tools, tool_choice = _tools_and_choice(body)
    if isinstance(tool_choice, wire.NamedToolChoice):
        names = {t.function.name for t in body_tools}
        if tool_choice.function.name not in names:
            raise BadRequest(
                f"tool_choice names {tool_choice.function.name!r}, which is not in tools",
                param="tool_choice",
            )
        tool_choice = {"type": "function", "function": {"name": tool_choice.function.name}}
    elif tool_choice == "required" and not body_tools:
        raise BadRequest("tool_choice 'required' needs tools", param="tool_choice")
    tools = tuple(
        {
            "type": "function",
            "function": {
                "name": t.function.name,
                "description": t.function.description or "",
                "parameters": t.function.parameters or {"type": "object", "properties": {}},
            },
        }
        for t in body_tools
    )
    chat = ChatRequest(
        messages=messages,
        sampling=_sampling(body, max_tokens),
        tools=tools,
        tool_choice=tool_choice,
        response_format=response_format,
        reasoning=chat_options.reasoning(body, config),
        template_kwargs=chat_options.template_kwargs(body),
        logprobs=chat_options.logprobs(body),
        # The deprecated functions style has no parallel calls.
        max_tool_calls=1 if body.parallel_tool_calls is False or body.functions is not None else None,
        model=body.model,
    )
    check_chat(chat, config)
    return chat


def _sampling(body: wire.ChatCompletionRequest | wire.CompletionRequest, max_tokens: int | None) -> Sampling:
    """The one sampling value of a chat or completion body."""
    return Sampling(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        min_p=body.min_p or 0.0,
        seed=body.seed,
        stop=(body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repeat_penalty=_repeat_penalty(body),
        logit_bias=chat_options.logit_bias(body.logit_bias),
    )


def completion_requests(body: wire.CompletionRequest, config: ServerConfig) -> list[CompletionRequest]:
    """One task request per prompt of a legacy completion body."""
    if body.echo and body.logprobs is not None:
        # The prompt's own log-probabilities would need a scoring pass no backend offers.
        raise BadRequest("echo with logprobs is not supported", param="echo")
    if body.echo and body.suffix is not None:
        raise BadRequest("echo with suffix is not supported", param="echo")
    prompts = texts_or_tokens(body.prompt, "prompt")
    if len(prompts) > wire.MAX_PROMPTS:
        raise BadRequest(f"prompt has {len(prompts)} prompts; at most {wire.MAX_PROMPTS} in one request",
                         param="prompt", code="too_many_items")
    # Each prompt is a generation of its own: as many as messages in a chat, at most.
    check_count(prompts, config.max_messages, "prompt", "prompts", "max_messages")
    if body.suffix is not None and any(not isinstance(p, str) for p in prompts):
        raise BadRequest("suffix needs a text prompt", param="suffix")
    sampling = _sampling(body, body.max_tokens)
    return [
        CompletionRequest(prompt=p, sampling=sampling, suffix=body.suffix, logprobs=body.logprobs, model=body.model)
        for p in prompts
    ]


def _legacy_call(message: wire.Message) -> tuple[ToolCall, ...]:
    """An assistant turn's deprecated ``function_call`` as a tool call."""
    call = message.function_call
    return (ToolCall("call_0", call.name, call.arguments),) if call is not None else ()


def _tools_and_choice(body: wire.ChatCompletionRequest) -> tuple[list[wire.Tool], object]:
    """``tools``/``tool_choice``, or the deprecated ``functions``/``function_call`` as them."""
    if body.functions is None:
        if body.function_call is not None:
            raise BadRequest("function_call needs functions", param="function_call")
        return list(body.tools or ()), body.tool_choice
    if body.tools is not None:
        raise BadRequest("send tools or the deprecated functions, not both", param="functions")
    tools = [wire.Tool(function=f) for f in body.functions]
    choice = body.function_call
    if isinstance(choice, wire.NamedFunction):
        return tools, wire.NamedToolChoice(function=choice)
    return tools, choice


def _repeat_penalty(body: wire.ChatCompletionRequest | wire.CompletionRequest) -> float:
    value = body.repeat_penalty if body.repeat_penalty is not None else body.repetition_penalty
    # Above 0 (the wire schema says so: 0 would divide by zero in llama.cpp and MLX alike).
    return 1.0 if value is None else value


def texts_or_tokens(raw: object, param: str) -> list[str | tuple[int, ...]]:
    """OpenAI's four shapes of ``input``/``prompt`` (msgspec decodes one list type, so a
    mixed list gets here): a string, strings, a token array, token arrays."""
    if isinstance(raw, str):
        return [raw]
    assert isinstance(raw, list)
    if all(isinstance(x, str) for x in raw):
        return list(raw)
    if all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
        return [tuple(raw)]
    if all(isinstance(x, list) for x in raw):
        if any(not x for x in raw):
            raise BadRequest("token arrays must not be empty", param=param)
        return [tuple(x) for x in raw]
    raise BadRequest(f"{param} must be a string, a list of strings, a token array or a list of token arrays",
                     param=param)


def embed_request(body: wire.EmbeddingRequest, config: ServerConfig) -> EmbedRequest:
    inputs = texts_or_tokens(body.input, "input")
    check_count(inputs, config.max_embed_batch, "input", "items", "max_embed_batch")
    check_embed_inputs(inputs, config)
    for item in inputs:
        if isinstance(item, str):
            if not item:
                raise BadRequest("input strings must not be empty", param="input")
        elif any(t < 0 for t in item):
            raise BadRequest("token ids must be non-negative", param="input")
    return EmbedRequest(inputs=inputs, model=body.model)


def shape_vector(vector: Sequence[float], dimensions: int | None) -> list[float]:
    """Truncate to ``dimensions`` and renormalise (Matryoshka-style), as OpenAI does."""
    values = [float(v) for v in vector]
    if dimensions is None:
        return values
    if dimensions > len(values):
        raise BadRequest(
            f"dimensions is {dimensions}, but this model's vectors have {len(values)}",
            param="dimensions",
        )
    values = values[:dimensions]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def encode_vector(values: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        # Little-endian float32, as the openai client decodes with numpy.frombuffer.
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")
    return values


def image_request(body: wire.ImageGenerationRequest, config: ServerConfig) -> ImageRequest:
    if body.n > config.max_image_n:
        raise BadRequest(f"n is {body.n}; this server allows at most {config.max_image_n}", param="n")
    width = height = None
    if body.size is not None:
        w, _, h = body.size.partition("x")
        width, height = int(w), int(h)
        if not (8 <= width <= config.max_image_side and 8 <= height <= config.max_image_side):
            raise BadRequest(
                f"size {body.size} is out of range; each side must be between 8 and "
                f"{config.max_image_side}",
                param="size",
            )
    return ImageRequest(
        prompt=body.prompt,
        n=body.n,
        width=width,
        height=height,
        seed=body.seed,
        steps=body.num_inference_steps,
        guidance_scale=body.guidance_scale,
        negative_prompt=body.negative_prompt,
        model=body.model,
    )
