"""``AnswerChunker.take_all``: the events that arrive together (a guessed step's tokens)
become one chunk of text, and never more than a stop string lets through or counts."""

from __future__ import annotations

from nexa.reasoning import ReasoningSplitter, ThinkFormat
from nexa.types import Reasoning, TokenLogprob
from nexa_llama_cpp.chunker import AnswerChunker
from nexa_llama_cpp.engine.records import Finished, TextPiece


def pieces(*texts: str) -> list[TextPiece]:
    return [TextPiece(t) for t in texts]


def test_text_that_arrives_together_is_one_chunk_with_every_record():
    chunker = AnswerChunker(5, (), ())
    records = tuple(TokenLogprob(t, -0.5) for t in ("Hel", "lo", " there"))
    events = [TextPiece(t, 1, (r,)) for t, r in zip(("Hel", "lo", " there"), records, strict=True)]
    chunks = chunker.take_all(events)
    assert [c.content for c in chunks] == ["Hello there"]
    assert chunks[0].logprobs == records
    last = chunker.finish()[-1]
    assert last.usage.completion_tokens == 3


def test_a_stop_string_inside_a_batch_cuts_the_text_and_the_count_as_one_by_one_would():
    one_by_one = AnswerChunker(5, (), ("wor",))
    single = []
    for event in pieces("Hel", "lo ", "wor", "ld", "!"):
        single += one_by_one.take(event)
        if one_by_one.stopped:
            break
    together = AnswerChunker(5, (), ("wor",))
    joined = together.take_all(pieces("Hel", "lo ", "wor", "ld", "!"))
    assert together.stopped and one_by_one.stopped
    assert "".join(c.content for c in joined) == "".join(c.content for c in single) == "Hello "
    want, got = one_by_one.finish()[-1], together.finish()[-1]
    assert got.usage.completion_tokens == want.usage.completion_tokens == 3
    assert got.stop_sequence == "wor" and got.finish_reason == "stop"


def test_thought_and_answer_in_one_batch_stay_apart_in_order():
    splitter = ReasoningSplitter(ThinkFormat("<think>", "</think>", False))
    chunker = AnswerChunker(5, (), (), splitter=splitter, reasoning=Reasoning(format="separate"))
    chunks = chunker.take_all(pieces("<think>", "hm", "m", "</think>", "Hi", " you"))
    assert [(c.reasoning, c.content) for c in chunks] == [("hmm", ""), ("", "Hi you")]


def test_a_finish_in_the_batch_adds_no_chunk_and_sets_the_reason():
    chunker = AnswerChunker(5, (), ())
    chunks = chunker.take_all([*pieces("a", "b"), Finished("length", 5, 2)])
    assert [c.content for c in chunks] == ["ab"]
    assert chunker.finish()[-1].finish_reason == "length"
