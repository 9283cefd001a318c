"""Thinking models on llama.cpp: the model's thought format, and its budget in the engine.

- ``find_format``: the thought markers a model writes, from its manifest's options (a
  declared format wins) or its chat template's source (``nexa.reasoning.detect_format``).
- ``BudgetCloser``: the engine's ``steer`` hook of one request: fed each generated token,
  it forces the close marker's tokens once the thought has used its budget (core's
  ``nexa.reasoning.ThinkingBudget`` decides when), after which the model writes its answer.
- ``budget_closer``: that hook for one chat request, when its budget applies.

The order of the answer's processing (thought first, then stop strings and tool calls on
the answer only) is ``chunker``'s. No llama_cpp import here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from nexa.reasoning import Position, ThinkFormat, ThinkingBudget, declared_format, detect_format
from nexa.types import Reasoning


def find_format(options: Mapping[str, Any], template_source: str | None) -> ThinkFormat | None:
    """The thought format: declared in the manifest's options, else shown by the chat
    template (None for the ChatML fallback of a model without a template)."""
    return declared_format(options) or detect_format(template_source)


class BudgetCloser:
    """Closes one request's thought after ``budget`` thinking tokens by forcing the close
    marker (its tokens in order, one per step), then lets the model go on with its answer.

    ``token_text`` is a token's text (control tokens rendered: a marker may be one);
    ``encode`` tokenizes text the server writes (markers parsed as tokens)."""

    def __init__(self, budget: ThinkingBudget, token_text: Callable[[int], str],
                 encode: Callable[[str], list[int]]) -> None:
        self.budget = budget
        self.token_text = token_text
        self.encode = encode

    def __call__(self, token: int) -> list[int]:
        forced = self.budget.step(self.token_text(token))
        return self.encode(forced) if forced else []


def budget_closer(
    reasoning: Reasoning,
    fmt: ThinkFormat | None,
    position: Position,
    token_text: Callable[[int], str],
    encode: Callable[[str], list[int]],
) -> BudgetCloser | None:
    """The engine hook that enforces one chat's thinking budget: None when unlimited,
    when the model does not think, or when the prompt already closed the thought."""
    budget = reasoning.token_budget
    if fmt is None or budget < 0 or position == "closed":
        return None
    return BudgetCloser(ThinkingBudget(fmt, budget, inside=position == "inside"), token_text, encode)
