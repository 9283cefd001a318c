"""OpenAI Responses <-> task-level types: a thin translation at the edge.

Input items become the ``ChatMessage`` list chat completions would send for the same
conversation (so both render the same prompt and share the prefix cache); an answer
(``Collected``) becomes output items. Mapping choices:

- ``instructions`` and the leading ``system``/``developer`` messages make one system
  message (several system turns break many chat templates).
- ``function_call`` items join the assistant message before them as its tool calls;
  ``function_call_output`` items become ``tool`` messages (images in an output follow as
  a user message). ``reasoning`` items sent back are dropped, as chat templates render
  past turns without their reasoning.
- Tools: ``function`` tools are offered as they are; the tools of a ``namespace`` tool
  are offered flattened as ``NAMESPACE__NAME``, and their calls come back with ``name``
  and ``namespace`` apart; ``custom`` tools are offered as a function taking one string
  ``input`` (a ``grammar`` format is shown to the model in the description, not
  enforced) and their calls come back as ``custom_tool_call`` items. Hosted tools
  (``web_search``, ``file_search``, ``mcp``, ``local_shell``...) run on OpenAI's side:
  skipped. ``defer_loading`` tools are offered from the start (there is no tool search).
- ``reasoning.effort`` ``none`` turns thinking off; other efforts turn it on with that
  effort (``Reasoning``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import msgspec

from nexa.config import ServerConfig
from nexa.errors import BadRequest
from nexa.server import responses_wire as wire
from nexa.server.answer import Collected
from nexa.server.limits import check_chat, check_count
from nexa.server.media import fetch_image
from nexa.types import ChatMessage, ChatRequest, ContentPart, ImagePart, Reasoning, Sampling, TextPart, ToolCall

NAMESPACE_SEPARATOR = "__"


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@attrs.frozen
class OfferedTool:
    """One tool as the model sees it, and what its calls are on the wire."""

    kind: str
    """``function`` or ``custom``."""
    name: str
    namespace: str | None = None


@attrs.frozen
class ResponsesTask:
    chat: ChatRequest
    offered: Mapping[str, OfferedTool]
    """Flat name (as the model calls it) -> the tool it stands for."""
    items: tuple[dict[str, Any], ...]
    """This request's input items, normalised, as they are stored for a continuation."""


def input_items(body: wire.ResponsesRequest) -> list[dict[str, Any]]:
    """The request's ``input`` as item objects, each checked against its kind."""
    if body.input is None:
        return []
    if isinstance(body.input, str):
        return [{"type": "message", "role": "user", "content": body.input}]
    items = []
    for i, raw in enumerate(body.input):
        kind = raw.get("type") or ("message" if "role" in raw else None)
        struct = wire.ITEM_TYPES.get(kind) if isinstance(kind, str) else None
        if struct is None:
            raise BadRequest(f"input[{i}]: items of type {kind!r} are not supported here "
                             f"(supported: {', '.join(wire.ITEM_TYPES)})", param=f"input[{i}].type")
        try:
            item = msgspec.convert({**raw, "type": kind}, struct)
        except msgspec.ValidationError as exc:
            raise BadRequest(f"input[{i}]: {exc}", param=f"input[{i}]") from None
        items.append(msgspec.to_builtins(item))
    return items


def responses_task(
    body: wire.ResponsesRequest, config: ServerConfig, history: Sequence[dict[str, Any]] = ()
) -> ResponsesTask:
    """The task for a Responses body after ``history`` (the items of the conversation it
    continues); fetches images (blocking: call off the loop)."""
    _refuse_unsupported(body)
    items = input_items(body)
    if not items and not history:
        raise BadRequest("input is required (a string or a list of items)", param="input")
    check_count(items, config.max_messages, "input", "items", "max_messages")
    check_count(body.tools, config.max_tools, "tools", "tools", "max_tools")
    offered, tools = _tools(body.tools or [])
    tool_choice, tools = _tool_choice(body.tool_choice, offered, tools)
    max_tool_calls = body.max_tool_calls
    if body.parallel_tool_calls is False:
        max_tool_calls = 1
    messages = _messages(body.instructions, [*history, *items], offered, config)
    effort = body.reasoning.effort if body.reasoning is not None else None
    if effort is None:
        reasoning = Reasoning()
    elif effort == "none":
        reasoning = Reasoning(enabled=False, budget=0)
    else:
        reasoning = Reasoning(enabled=True, effort=effort)
    chat = ChatRequest(
        messages=messages,
        sampling=Sampling(
            max_tokens=body.max_output_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
        ),
        tools=tools,
        tool_choice=tool_choice,
        response_format=_response_format(body.text),
        reasoning=reasoning,
        max_tool_calls=max_tool_calls,
        model=body.model,
    )
    check_chat(chat, config, tool_schema="tools[{i}].parameters", response_schema="text.format.schema")
    return ResponsesTask(chat, offered, tuple(items))


def _refuse_unsupported(body: wire.ResponsesRequest) -> None:
    if body.background:
        raise BadRequest("background responses are not supported here; send the request and wait, "
                         "or stream it", param="background")
    if body.conversation is not None:
        raise BadRequest("conversations are not supported here; continue with previous_response_id",
                         param="conversation")
    if body.top_logprobs:
        raise BadRequest("top_logprobs is not supported here", param="top_logprobs")
    if body.truncation == "auto":
        raise BadRequest("truncation 'auto' is not supported here (a prompt over the context is refused, "
                         "never cut); send 'disabled'", param="truncation")


# --- tools --------------------------------------------------------------------------


def _offer(raw: dict[str, Any], namespace: str | None, where: str) -> tuple[OfferedTool, dict[str, Any]] | None:
    kind = raw.get("type")
    try:
        if kind == "function":
            tool = msgspec.convert(raw, wire.FunctionTool)
            parameters = tool.parameters or {"type": "object", "properties": {}}
            description = tool.description or ""
        elif kind == "custom":
            custom = msgspec.convert(raw, wire.CustomTool)
            tool = custom  # type: ignore[assignment]
            description = custom.description or ""
            fmt = custom.format or {}
            if fmt.get("type") == "grammar" and fmt.get("definition"):
                description += (f"\nThe input must follow this {fmt.get('syntax', '')} grammar:\n"
                                f"{fmt['definition']}")
            parameters = {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}
        else:
            return None  # a hosted tool: it runs on OpenAI's side
    except msgspec.ValidationError as exc:
        raise BadRequest(f"{where}: {exc}", param=where) from None
    flat = f"{namespace}{NAMESPACE_SEPARATOR}{tool.name}" if namespace else tool.name
    return OfferedTool(kind, tool.name, namespace), {
        "type": "function",
        "function": {"name": flat, "description": description.strip(), "parameters": parameters},
    }


def _tools(raw_tools: list[dict[str, Any]]) -> tuple[dict[str, OfferedTool], tuple[dict[str, Any], ...]]:
    offered: dict[str, OfferedTool] = {}
    tools: list[dict[str, Any]] = []

    def add(found: tuple[OfferedTool, dict[str, Any]] | None, where: str) -> None:
        if found is None:
            return
        flat = found[1]["function"]["name"]
        if flat in offered:
            raise BadRequest(f"{where}: the tool name {flat!r} is offered twice", param=where)
        offered[flat] = found[0]
        tools.append(found[1])

    for i, raw in enumerate(raw_tools):
        if raw.get("type") == "namespace":
            try:
                space = msgspec.convert(raw, wire.NamespaceTool)
            except msgspec.ValidationError as exc:
                raise BadRequest(f"tools[{i}]: {exc}", param=f"tools[{i}]") from None
            for j, inner in enumerate(space.tools):
                add(_offer(inner, space.name, f"tools[{i}].tools[{j}]"), f"tools[{i}].tools[{j}]")
        else:
            add(_offer(raw, None, f"tools[{i}]"), f"tools[{i}]")
    return offered, tuple(tools)


def _tool_choice(
    choice: str | dict[str, Any] | None, offered: Mapping[str, OfferedTool], tools: tuple[dict[str, Any], ...]
) -> tuple[Any, tuple[dict[str, Any], ...]]:
    if choice is None or choice == "auto" or choice == "none":
        return choice, tools
    if choice == "required":
        if not tools:
            raise BadRequest("tool_choice 'required' needs function or custom tools", param="tool_choice")
        return choice, tools
    if isinstance(choice, str):
        raise BadRequest(f"tool_choice {choice!r} is not one of auto, none, required", param="tool_choice")

    def flat(ref: dict[str, Any]) -> str:
        name = ref.get("name")
        namespace = ref.get("namespace")
        key = f"{namespace}{NAMESPACE_SEPARATOR}{name}" if namespace else name
        if ref.get("type") not in ("function", "custom") or key not in offered:
            raise BadRequest(f"tool_choice names {ref.get('type')!r} tool {name!r}, which is not among the "
                             "function or custom tools offered (hosted tools do not run here)",
                             param="tool_choice")
        return str(key)

    if choice.get("type") == "allowed_tools":
        names = {flat(ref) for ref in choice.get("tools") or []}
        mode = choice.get("mode", "auto")
        if mode not in ("auto", "required"):
            raise BadRequest("tool_choice.mode must be auto or required", param="tool_choice.mode")
        return mode, tuple(t for t in tools if t["function"]["name"] in names)
    return {"type": "function", "function": {"name": flat(choice)}}, tools


def _response_format(text: wire.TextConfig | None) -> dict[str, Any] | None:
    fmt = text.format if text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    # No schema: any JSON object, as chat completions' response_format (and the document).
    schema = fmt.schema if fmt.schema is not None else {"type": "object"}
    return {"type": "json_schema", "json_schema": {"name": fmt.name or "response", "schema": schema}}


# --- input items to messages ----------------------------------------------------------


def _parts(content: str | list[dict[str, Any]], config: ServerConfig, where: str) -> list[ContentPart]:
    if isinstance(content, str):
        return [TextPart(content)]
    parts: list[ContentPart] = []
    for part in content:
        kind = part.get("type")
        if kind in ("input_text", "output_text"):
            parts.append(TextPart(part["text"]))
        elif kind == "refusal":
            parts.append(TextPart(part["refusal"]))
        elif kind == "input_image" and part.get("image_url"):
            parts.append(fetch_image(part["image_url"], config))
        else:
            what = "input_image with a file_id" if kind == "input_image" else kind
            raise BadRequest(f"{where}: {what} content is not supported here (send text, or images as "
                             "image_url)", param=where, code="unsupported_content")
    return parts


def _text(parts: list[ContentPart]) -> str:
    return "".join(p.text for p in parts if isinstance(p, TextPart))


def _content(parts: list[ContentPart]) -> str | tuple[ContentPart, ...]:
    if all(isinstance(p, TextPart) for p in parts):
        return _text(parts)
    return tuple(parts)


def _messages(
    instructions: str | None, items: Sequence[dict[str, Any]], offered: Mapping[str, OfferedTool],
    config: ServerConfig,
) -> list[ChatMessage]:
    system = [instructions] if instructions else []
    start = 0
    while start < len(items) and items[start]["type"] == "message" and items[start]["role"] in ("system", "developer"):
        system.append(_text(_parts(items[start]["content"], config, f"input[{start}]")))
        start += 1
    messages: list[ChatMessage] = [ChatMessage("system", "\n\n".join(system))] if system else []
    images = 0
    for i, item in enumerate(items[start:], start):
        where = f"input[{i}]"
        kind = item["type"]
        if kind == "reasoning":
            continue
        if kind == "message":
            parts = _parts(item["content"], config, where)
            role = "system" if item["role"] == "developer" else item["role"]
            if role != "user" and any(isinstance(p, ImagePart) for p in parts):
                raise BadRequest(f"{where}: images are only accepted in user messages", param=where)
            images += sum(isinstance(p, ImagePart) for p in parts)
            messages.append(ChatMessage(role, _content(parts)))
        elif kind in ("function_call", "custom_tool_call"):
            flat = f"{item['namespace']}{NAMESPACE_SEPARATOR}{item['name']}" if item.get("namespace") else item["name"]
            arguments = item["arguments"] if kind == "function_call" else json.dumps({"input": item["input"]})
            call = ToolCall(item["call_id"], flat, arguments)
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant":
                messages[-1] = attrs.evolve(last, tool_calls=(*last.tool_calls, call))
            else:
                messages.append(ChatMessage("assistant", None, tool_calls=(call,)))
        else:  # function_call_output, custom_tool_call_output
            parts = _parts(item["output"], config, where)
            messages.append(ChatMessage("tool", _text(parts), tool_call_id=item["call_id"]))
            shown = [p for p in parts if isinstance(p, ImagePart)]
            if shown:
                images += len(shown)
                messages.append(ChatMessage("user", (TextPart("(images from the tool output above)"), *shown)))
        if images > config.max_images_per_request:
            raise BadRequest(f"at most {config.max_images_per_request} images per request", param="input")
    return messages


# --- answers to output items -----------------------------------------------------------


def output_items(answer: Collected, offered: Mapping[str, OfferedTool], *, ids: Mapping[str, str] | None = None
                 ) -> list[dict[str, Any]]:
    """The output items of a whole answer: reasoning, message, then the tool calls.
    ``ids`` (``reasoning``, ``message``) reuses the item ids a stream already announced."""
    ids = ids or {}
    status = "incomplete" if answer.cut_by_limit else "completed"
    out: list[dict[str, Any]] = []
    if answer.reasoning:
        out.append(reasoning_item(ids.get("reasoning") or new_id("rs"), answer.reasoning, status))
    if answer.content or not answer.tool_calls:
        out.append(message_item(ids.get("message") or new_id("msg"), answer.content, status))
    out.extend(call_item(call, offered) for call in answer.tool_calls)
    return out


def reasoning_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [{"type": "reasoning_text", "text": text}]
    return {"type": "reasoning", "id": item_id, "summary": [], "content": content, "status": status}


def message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [output_text(text)]
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(call: ToolCall, offered: Mapping[str, OfferedTool], *, item_id: str | None = None,
              status: str = "completed") -> dict[str, Any]:
    """A tool call as its ``function_call`` or ``custom_tool_call`` output item."""
    tool = offered.get(call.name) or OfferedTool("function", call.name)
    call_id = call.id or new_id("call")
    if tool.kind == "custom":
        item = {"type": "custom_tool_call", "id": item_id or new_id("ctc"), "call_id": call_id,
                "name": tool.name, "input": custom_input(call.arguments), "status": status}
    else:
        item = {"type": "function_call", "id": item_id or new_id("fc"), "call_id": call_id,
                "name": tool.name, "arguments": call.arguments, "status": status}
    if tool.namespace:
        item["namespace"] = tool.namespace
    return item


def custom_input(arguments: str) -> str:
    """The free text of a custom tool call (the model wrote ``{"input": "..."}``)."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    if isinstance(value, dict) and isinstance(value.get("input"), str):
        return value["input"]
    return arguments


def usage_out(answer: Collected) -> wire.ResponseUsage:
    usage = answer.usage
    return wire.ResponseUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=wire.InputTokensDetails(cached_tokens=usage.cached_tokens),
        output_tokens=usage.completion_tokens,
        output_tokens_details=wire.OutputTokensDetails(reasoning_tokens=usage.reasoning_tokens),
        total_tokens=usage.total_tokens,
    )


def response_object(
    body: wire.ResponsesRequest, response_id: str, created_at: int, *, status: str,
    output: list[dict[str, Any]] | None = None, usage: wire.ResponseUsage | None = None,
    error: wire.ResponseError | None = None,
) -> wire.ResponseObject:
    """The ``response`` object: the request's settings echoed, with ``output`` and usage."""
    fmt = body.text.format if body.text is not None and body.text.format is not None else None
    return wire.ResponseObject(
        id=response_id,
        created_at=created_at,
        status=status,  # type: ignore[arg-type]
        error=error,
        incomplete_details=wire.IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
        instructions=body.instructions,
        max_output_tokens=body.max_output_tokens,
        max_tool_calls=body.max_tool_calls,
        model=body.model,
        output=output or [],
        parallel_tool_calls=body.parallel_tool_calls is not False,
        previous_response_id=body.previous_response_id,
        reasoning={"effort": body.reasoning.effort if body.reasoning else None, "summary": None},
        store=body.store,
        temperature=1.0 if body.temperature is None else body.temperature,
        text={"format": msgspec.to_builtins(fmt) if fmt is not None else {"type": "text"}},
        tool_choice=body.tool_choice or "auto",
        tools=body.tools or [],
        top_p=1.0 if body.top_p is None else body.top_p,
        usage=usage,
        user=body.user,
        metadata=body.metadata or {},
        prompt_cache_key=body.prompt_cache_key,
    )


def now() -> int:
    return int(time.time())
