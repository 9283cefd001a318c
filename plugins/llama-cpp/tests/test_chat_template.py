"""The GGUF chat template runs sandboxed: a malicious template cannot run code."""

from __future__ import annotations

import pytest

from nexa.errors import BadRequest
from nexa.types import ChatMessage, ImagePart, TextPart, ToolCall
from nexa_llama_cpp import testing as tiny
from nexa_llama_cpp.chat_template import ChatTemplate


# The published CVE-2024-34359 proof of concept (llama-cpp-python < 0.2.72 rendered GGUF
# templates unsandboxed), pointed at a marker file instead of a shell command's output.
def cve_payload(marker) -> str:
    return (
        "{% for x in ().__class__.__base__.__subclasses__() %}"
        "{% if \"warning\" in x.__name__ %}"
        "{{ x()._module.__builtins__['__import__']('os').system('touch " + str(marker) + "') }}"
        "{% endif %}{% endfor %}"
    )


def test_cve_2024_34359_payload_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    template = ChatTemplate(cve_payload(marker))
    with pytest.raises(BadRequest) as exc:
        template.render([ChatMessage("user", "hi")])
    assert "sandbox" in exc.value.message
    assert not marker.exists()


def test_globals_escape_is_blocked(tmp_path):
    marker = tmp_path / "pwned2"
    template = ChatTemplate(
        "{{ raise_exception.__globals__['__builtins__']['__import__']('os').system('touch "
        + str(marker) + "') }}"
    )
    with pytest.raises(BadRequest):
        template.render([ChatMessage("user", "hi")])
    assert not marker.exists()


def test_raise_exception_in_template_is_a_client_error():
    template = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}x"
    )
    with pytest.raises(BadRequest, match="first must be user"):
        template.render([ChatMessage("assistant", "hi")])


def test_string_only_template_gets_flattened_content_with_media_markers():
    # SmolLM2's template concatenates content as a string.
    template = ChatTemplate(
        "{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] }}{% endfor %}"
    )
    assert template.caps.string_content and not template.caps.list_content
    message = ChatMessage("user", (TextPart("look: "), ImagePart(b"png"), TextPart(" ok")))
    assert template.render([message], media_marker="<M>") == "<user>look: <M> ok"


def test_none_content_is_empty_for_string_templates():
    template = ChatTemplate("{% for m in messages %}{{ m['role'] + ':' + m['content'] }};{% endfor %}")
    assert template.render([ChatMessage("assistant", None), ChatMessage("user", "x")]) == "assistant:;user:x;"


def test_list_only_template_gets_parts():
    template = ChatTemplate(
        "{% for m in messages %}{% for p in m['content'] %}[{{ p['text'] }}]{% endfor %}{% endfor %}"
    )
    assert template.caps.list_content and not template.caps.string_content
    message = ChatMessage("user", (TextPart("a"), ImagePart(b"png"), TextPart("b")))
    assert template.render([message], media_marker="<M>") == "[a][<M>][b]"


def test_tools_and_tool_calls_reach_a_tool_aware_template():
    template = ChatTemplate(tiny.CHATML_TOOLS_TEMPLATE)
    assert template.caps.tools and template.caps.tool_call_tags
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    messages = [
        ChatMessage("user", "weather?"),
        ChatMessage("assistant", None, tool_calls=(ToolCall("call_1", "get_weather", '{"city": "Paris"}'),)),
        ChatMessage("tool", "sunny", tool_call_id="call_1"),
    ]
    text = template.render(messages, tools=tools)
    assert '"name": "get_weather"' in text
    # Arguments reach the template as an object, so `tojson` writes JSON, not a quoted string.
    assert '"arguments": {"city": "Paris"}' in text
    assert "<tool_response>\nsunny\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_missing_template_falls_back_to_chatml():
    template = ChatTemplate(None)
    assert template.is_fallback
    assert template.render([ChatMessage("user", "hi")]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
