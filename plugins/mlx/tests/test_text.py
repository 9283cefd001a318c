"""AnswerParser: stop strings and tool-call spans over text that arrives in pieces."""

from __future__ import annotations

from nexa_mlx.text import AnswerParser, Stop, Text, ToolSpan


def run(parser: AnswerParser, pieces: list[str]) -> list:
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    return events + parser.finish()


def text_of(events: list) -> str:
    return "".join(e.text for e in events if isinstance(e, Text))


def test_no_markers_passes_text_through_immediately():
    parser = AnswerParser()
    assert parser.feed("Hel") == [Text("Hel")]
    assert parser.feed("lo") == [Text("lo")]
    assert parser.finish() == []


def test_stop_split_across_pieces_is_never_emitted_partially():
    parser = AnswerParser(["END"])
    assert parser.feed("abc E") == [Text("abc ")]  # "E" may begin "END": held back
    assert parser.feed("N") == []
    assert parser.feed("Dxyz") == [Stop("END")]
    assert parser.stopped
    assert parser.feed("more") == []
    assert parser.finish() == []


def test_held_back_prefix_is_released_when_it_turns_out_not_to_be_a_stop():
    parser = AnswerParser(["END"])
    events = run(parser, ["abc EN", "d", " EN"])
    assert text_of(events) == "abc ENd EN"
    assert not parser.stopped


def test_earliest_of_several_stops_wins():
    events = run(AnswerParser(["world", "lo"]), ["hello world"])
    assert text_of(events) == "hel"
    assert events[-1] == Stop("lo")


def test_stop_at_start_gives_no_content():
    events = run(AnswerParser(["\n"]), ["\nrest"])
    assert events == [Stop("\n")]


def test_tool_span_is_cut_out_of_content():
    parser = AnswerParser(tool_start="<tool_call>", tool_end="</tool_call>")
    events = run(parser, ["Sure. <tool", "_call>{\"name\": \"f\"", ", \"arguments\": {}}</tool_", "call> done"])
    assert events == [
        Text("Sure. "),
        ToolSpan('{"name": "f", "arguments": {}}'),
        Text(" done"),
    ]


def test_stop_strings_do_not_cut_inside_a_tool_call():
    parser = AnswerParser(["}"], tool_start="<t>", tool_end="</t>")
    events = run(parser, ["<t>{}</t>a}b"])
    assert events == [ToolSpan("{}"), Text("a"), Stop("}")]


def test_unclosed_tool_span_is_flushed_at_the_end():
    parser = AnswerParser(tool_start="<t>", tool_end="</t>")
    assert run(parser, ["x<t>{\"a\""]) == [Text("x"), ToolSpan('{"a"', closed=False)]


def test_tool_format_without_end_marker_runs_to_the_end():
    parser = AnswerParser(tool_start="[TOOL_CALLS]", tool_end="")
    assert run(parser, ["[TOOL_CALLS]", "f[ARGS]{}"]) == [ToolSpan("f[ARGS]{}", closed=False)]
