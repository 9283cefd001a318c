"""The reasoning splitter on every format, with the text cut at every position."""

from __future__ import annotations

import pytest

from nexa.reasoning import (
    DEEPSEEK_R1,
    KNOWN_FORMATS,
    QWEN3,
    ReasoningSplitter,
    Split,
    ThinkFormat,
    ThinkingBudget,
    declared_format,
    detect_format,
    empty_thought,
    prompt_position,
    reasoning_for,
    shown,
    template_kwargs,
)
from nexa.types import ChatMessage, ChatRequest, Reasoning

GEMMA_LIKE = ThinkFormat("<|channel>thought", "<channel|>")
FORMATS = [*KNOWN_FORMATS, GEMMA_LIKE]


def run(splitter: ReasoningSplitter, pieces: list[str]) -> tuple[str, str, list[Split]]:
    out = [splitter.feed(p) for p in pieces]
    out.append(splitter.finish())
    return "".join(s.reasoning for s in out), "".join(s.answer for s in out), out


def cases(fmt: ThinkFormat) -> list[tuple[str, bool, str, str]]:
    """(model output, prompt opened the thought, reasoning, answer)."""
    o, c = fmt.open, fmt.close
    return [
        (f"{o}\nI think.\nYes.\n{c}\n\nParis is the capital.", False, "I think.\nYes.", "Paris is the capital."),
        (f"  {o} a {c} b", False, "a", "b"),
        (f"{o}{c}Answer {o}not a thought{c}.", False, "", f"Answer {o}not a thought{c}."),
        ("No thought here, only the answer.", False, "", "No thought here, only the answer."),
        (f"Answer first {o}x{c}", False, "", f"Answer first {o}x{c}"),
        (f"\nLet me see... {c[:-1]} is not the end.\n{c}\n\n42", True, f"Let me see... {c[:-1]} is not the end.", "42"),
        (f"cut off while thinking {c[:3]}", True, f"cut off while thinking {c[:3]}", ""),
        (f"{o} unfinished thought  ", False, "unfinished thought", ""),
        (f"{o[:-1]}", False, "", f"{o[:-1]}"),
        ("", False, "", ""),
    ]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.open)
def test_every_cut_gives_the_same_split(fmt):
    """However the output is cut into two pieces, or fed a character at a time, the
    reasoning and the answer are the same, and no piece shows part of a marker."""
    for text, inside, reasoning, answer in cases(fmt):
        splits = [[text[:cut], text[cut:]] for cut in range(len(text) + 1)] + [list(text)]
        for pieces in splits:
            got_reasoning, got_answer, out = run(ReasoningSplitter(fmt, inside=inside), pieces)
            assert (got_reasoning, got_answer) == (reasoning, answer), (text, pieces)
            for split in out:
                for marker in (fmt.open, fmt.close):
                    for k in range(2, len(marker) + 1):
                        # A piece shows a marker's first characters only where they are
                        # the model's own text (a cut-off thought, an answer quoting one).
                        if marker[:k] in split.reasoning:
                            assert marker[:k] in reasoning, (text, pieces, split)
                        if marker[:k] in split.answer:
                            assert marker[:k] in answer, (text, pieces, split)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.open)
def test_raw_mode_gives_back_the_text_as_written(fmt):
    """``inline``: the reasoning pieces and answer pieces joined are the model's text
    exactly, with the opening marker the prompt wrote put in front."""
    for text, inside, _reasoning, _answer in cases(fmt):
        expected = (fmt.open + text) if inside and text else text
        for cut in range(len(text) + 1):
            got_reasoning, got_answer, out = run(ReasoningSplitter(fmt, inside=inside, raw=True),
                                                 [text[:cut], text[cut:]])
            joined = "".join(s.reasoning + s.answer for s in out)
            assert joined == expected, (text, cut)


def test_deepseek_r1_starts_inside_without_a_prompt():
    splitter = ReasoningSplitter(DEEPSEEK_R1)
    reasoning, answer, _ = run(splitter, ["Okay, ", "so. </th", "ink>\n\nHi"])
    assert (reasoning, answer) == ("Okay, so.", "Hi")
    assert splitter.reasoning_tokens == 3


def test_no_format_passes_everything_as_answer():
    reasoning, answer, _ = run(ReasoningSplitter(None), ["<think>x", "</think> y"])
    assert (reasoning, answer) == ("", "<think>x</think> y")


def test_token_counts():
    splitter = ReasoningSplitter(QWEN3)
    tokens = ["<think>", " hello", " world", "</think>", " paris"]
    for token in tokens:
        splitter.feed(token)
    assert splitter.reasoning_tokens == 4
    # Undecided leading whitespace is counted with the thought it turned out to open.
    splitter = ReasoningSplitter(QWEN3)
    for token in ["\n", "<th", "ink>", "a", "</think>", "\n\n", "b"]:
        splitter.feed(token)
    assert splitter.reasoning_tokens == 5
    # ... and not counted when the output is an answer.
    splitter = ReasoningSplitter(QWEN3)
    for token in ["\n", "<th", "is", "</think>"]:
        splitter.feed(token)
    assert splitter.reasoning_tokens == 0
    # A thought the prompt opened counts from the first token.
    splitter = ReasoningSplitter(QWEN3, inside=True)
    for token in ["x", "y", "</think>", "z"]:
        splitter.feed(token)
    assert splitter.reasoning_tokens == 3


def test_shown_by_format():
    split = Split("thought", "answer")
    assert shown(Reasoning(format="separate"), split) == ("thought", "answer")
    assert shown(Reasoning(format="inline"), split) == ("", "thoughtanswer")
    assert shown(Reasoning(format="hidden"), split) == ("", "answer")
    with pytest.raises(ValueError):
        Reasoning(format="none")


QWEN3_TEMPLATE = (
    "{%- for message in messages %}{%- if message.role == 'assistant' %}{%- set content = "
    "message.content.split('</think>')[-1] %}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- if enable_thinking is "
    "defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


def test_detect_format_from_templates():
    assert detect_format(QWEN3_TEMPLATE) == QWEN3
    assert detect_format("{{ '<｜Assistant｜><think>\\n' }}... '</think>'") == QWEN3
    assert detect_format("<seed:think> ... </seed:think>").open == "<seed:think>"
    assert detect_format("[THINK] [/THINK]").close == "[/THINK]"
    assert detect_format("{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}") is None
    assert detect_format(None) is None
    assert declared_format({"think_open": "<r>", "think_close": "</r>", "think_starts_inside": True}) == \
        ThinkFormat("<r>", "</r>", True)
    assert declared_format({}) is None


def test_prompt_position_and_empty_thought():
    assert prompt_position(QWEN3, "<|im_start|>assistant\n") == "before"
    assert prompt_position(QWEN3, "<｜Assistant｜><think>\n") == "inside"
    assert prompt_position(QWEN3, "assistant\n<think>\n\n</think>\n\n") == "closed"
    assert prompt_position(DEEPSEEK_R1, "anything") == "inside"
    assert empty_thought(QWEN3, "before") == "<think>\n\n</think>\n\n"
    assert empty_thought(QWEN3, "inside") == "\n</think>\n\n"
    assert empty_thought(QWEN3, "closed") == ""


def test_after_a_closed_thought_a_marker_is_answer_text():
    # The prompt closed the thought (thinking off): a <think> the model writes is its answer.
    split = reasoning_for(Reasoning(enabled=False), QWEN3, "closed").feed("<think> x")
    assert split == Split("", "<think> x")
    inside = reasoning_for(Reasoning(), QWEN3, "inside").feed("x</think>y")
    assert inside == Split("x", "y")


def test_template_kwargs_from_switches():
    messages = [ChatMessage("user", "hi")]
    plain = ChatRequest.create(messages)
    assert template_kwargs(plain) == {}
    off = ChatRequest.create(messages, reasoning=Reasoning(enabled=False), template_kwargs={"x": 1})
    assert template_kwargs(off) == {"x": 1, "enable_thinking": False, "thinking": False}
    budget0 = ChatRequest.create(messages, reasoning=Reasoning(budget=0, effort="high"))
    assert template_kwargs(budget0) == {"enable_thinking": False, "thinking": False}
    high = ChatRequest.create(messages, reasoning=Reasoning(enabled=True, effort="high"))
    assert template_kwargs(high) == {"enable_thinking": True, "thinking": True, "reasoning_effort": "high"}


def test_budget_closes_the_thought_once():
    budget = ThinkingBudget(QWEN3, 3)
    forced = [budget.step(t) for t in ["<think>", " a", " b", " c", " d"]]
    assert forced == [None, None, "\n</think>\n\n", None, None]
    budget = ThinkingBudget(QWEN3, 2)
    assert [budget.step(t) for t in ["<think>", "x</think>", " y", " z"]] == [None, None, None, None]
    unlimited = ThinkingBudget(QWEN3, -1)
    assert all(unlimited.step(t) is None for t in ["<think>"] + ["x"] * 50)
    inside = ThinkingBudget(QWEN3, 1, inside=True)
    assert inside.step("x") == "\n</think>\n\n"
