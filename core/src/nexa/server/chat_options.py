"""The chat fields beyond messages and sampling, resolved at the edge: the reasoning
switches, log-probabilities and the logit bias. (The unknown-field policy's refusals are
in the schema: ``n``, ``audio``, ``modalities``, ``prediction``, ``web_search_options``
admit only their defaults.)

Reasoning switches, most specific last: the server's ``--reasoning-format`` and
``--reasoning-budget``; then a request's ``reasoning_effort`` (OpenAI: ``none`` off, any
other value on and handed to the template), ``chat_template_kwargs.enable_thinking`` /
``.thinking`` / ``.reasoning_effort`` (vLLM, llama.cpp), ``think`` (Ollama: a bool, or an
effort) and nexa's ``reasoning_format`` / ``reasoning_budget``. A request's switches
override the server's; request switches that disagree are a 400 naming the later one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nexa.config import ServerConfig
from nexa.errors import BadRequest
from nexa.reasoning import RESERVED_TEMPLATE_KWARGS
from nexa.server import schemas as wire
from nexa.types import REASONING_EFFORTS, Reasoning

# Template variables the reasoning switches own: read into ``Reasoning`` and handed back
# to the template by ``nexa.reasoning.template_kwargs``.
_SWITCH_KWARGS = ("enable_thinking", "thinking", "reasoning_effort")


def reasoning(body: wire.ChatCompletionRequest, config: ServerConfig) -> Reasoning:
    """The request's thinking switches and the server's settings, as one value."""
    votes: list[tuple[str, bool, str | None]] = []  # (field, on, effort)
    if body.reasoning_effort is not None:
        effort = body.reasoning_effort
        votes.append(("reasoning_effort", effort != "none", None if effort == "none" else effort))
    kwargs = body.chat_template_kwargs or {}
    for key in ("enable_thinking", "thinking"):
        if key in kwargs:
            value = kwargs[key]
            if not isinstance(value, bool):
                raise BadRequest(f"chat_template_kwargs.{key} must be true or false",
                                 param=f"chat_template_kwargs.{key}")
            votes.append((f"chat_template_kwargs.{key}", value, None))
    if "reasoning_effort" in kwargs:
        value = kwargs["reasoning_effort"]
        if value not in REASONING_EFFORTS:
            raise BadRequest(f"chat_template_kwargs.reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}",
                             param="chat_template_kwargs.reasoning_effort")
        votes.append(("chat_template_kwargs.reasoning_effort", value != "none", None if value == "none" else value))
    if body.think is not None:
        if isinstance(body.think, bool):
            votes.append(("think", body.think, None))
        else:
            votes.append(("think", True, body.think))
    if body.reasoning_budget is not None and body.reasoning_budget >= 0:
        votes.append(("reasoning_budget", body.reasoning_budget > 0, None))
    enabled: bool | None = None
    effort: str | None = None
    for i, (field, on, wanted) in enumerate(votes):
        if enabled is not None and on != enabled:
            raise BadRequest(
                f"{field} turns thinking {'on' if on else 'off'}, but {votes[i - 1][0]} turned it "
                f"{'on' if enabled else 'off'}", param=field)
        enabled = on
        if wanted is not None:
            if effort is not None and wanted != effort:
                raise BadRequest(f"{field} asks for effort {wanted!r}, but another switch asked for {effort!r}",
                                 param=field)
            effort = wanted
    if body.reasoning_budget is not None:
        budget = body.reasoning_budget
    elif enabled and config.reasoning_budget == 0:
        budget = -1  # the request turned on what the server turned off
    else:
        budget = config.reasoning_budget
    return Reasoning(enabled=enabled, effort=effort, budget=budget,
                     format=body.reasoning_format or config.reasoning_format)


def template_kwargs(body: wire.ChatCompletionRequest) -> dict[str, Any]:
    """The client's extra chat-template variables, without the ones the server renders."""
    out = {}
    for key, value in (body.chat_template_kwargs or {}).items():
        if key in RESERVED_TEMPLATE_KWARGS:
            raise BadRequest(f"chat_template_kwargs.{key} is set by the server, not the client",
                             param=f"chat_template_kwargs.{key}")
        if key not in _SWITCH_KWARGS:
            out[key] = value
    return out


def reasoning_fields(body: wire.ChatCompletionRequest) -> list[str]:
    """The request's fields that only a backend rendering its own chat template honours."""
    fields = [name for name in ("reasoning_effort", "think", "reasoning_budget")
              if getattr(body, name) is not None]
    if body.chat_template_kwargs:
        fields.append("chat_template_kwargs")
    return fields


def refuse_for_backend(body: wire.ChatCompletionRequest, name: str, capabilities: frozenset[str]) -> None:
    """A 400 naming a thinking switch the chosen backend can't pass to its template."""
    if "reasoning" in capabilities:
        return
    fields = reasoning_fields(body)
    if fields:
        raise BadRequest(f"the {name} backend does not switch a model's thinking ({fields[0]})", param=fields[0])


def logprobs(body: wire.ChatCompletionRequest) -> int | None:
    """How many alternatives per token the answer carries; None: no log-probabilities."""
    if not body.logprobs:
        if body.top_logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        return None
    return body.top_logprobs or 0


def logit_bias(raw: Mapping[str, float] | None) -> dict[int, float]:
    """OpenAI's token-id-string keys as ints (the schema already checked their form)."""
    return {int(k): float(v) for k, v in (raw or {}).items()}


__all__ = ["logit_bias", "logprobs", "reasoning", "refuse_for_backend", "template_kwargs"]
