"""Writes a tiny Qwen3 model in the MLX layout whose greedy output the test chooses.

Random weights prove nothing about parsing, so the weights are set by hand: the token
embedding is one-hot (hidden size >= vocabulary), every attention output and MLP down
projection is zero (each layer adds nothing to the residual), so the last hidden state is
the current token's own one-hot vector, and the output matrix is a next-token map. The
model then writes, deterministically (a margin of ~50 logits even at temperature 1), the
continuation a test scripted after a given prompt ending, e.g. ``<think> hello world</think>
paris`` after ``<|im_start|>assistant\\n``. Tokens nobody scripted lead to the end of turn.

The chat templates are the families' own thinking parts: Qwen3's (reasoning of earlier
turns dropped before the last user message, ``enable_thinking=false`` closing an empty
thought, Hermes tool calls) and a DeepSeek-R1-style one whose generation prompt opens
the thought.
"""

from __future__ import annotations

from pathlib import Path

import tiny_model
from tiny_model import CORPUS, SPECIAL_TOKENS

QWEN3_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}{{- "\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}{%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}{%- set content = message.content %}{%- else %}{%- set content = '' %}{%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}{{- '\n' }}{%- endif %}
                {%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}
                {{- '<tool_call>\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}{{- tool_call.arguments }}{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\n<tool_response>\n' }}{{- content }}{{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}"""

# DeepSeek-R1's shape on ChatML markers: thoughts of earlier turns are cut from the
# history, and the generation prompt opens the thought, so the model writes only its end.
R1_TEMPLATE = r"""{%- for message in messages %}
    {%- if message.role == 'assistant' %}
        {%- set content = message.content.split('</think>')[-1] if message.content is string else '' %}
        {{- '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n<think>\n' }}{%- endif %}"""

# Added (not special) tokens, as in Qwen3's vocabulary: they show in decoded text.
ADDED_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
# Qwen2.5-Coder's fill-in-the-middle tokens, for models that have them.
FIM_TOKENS = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]
END = "<|im_end|>"

# Prompt endings the scripts start from (the last token of each is what counts).
THINKING_ON = "<|im_start|>assistant\n"
THINKING_OFF = "</think>\n\n"
R1_OPEN = "<think>\n"


def write_tokenizer(folder: Path, template: str, extra_tokens: list[str], vocab_size: int) -> None:
    # Blank lines and the scripts' words in the corpus, so that "\n\n", " hello",
    # " paris"... are one token each (as in Qwen's vocabulary).
    corpus = CORPUS + ["hello world\n\nparis is the answer\n\nI think so, say hello world to paris\n\n"] * 40
    tiny_model.write_tokenizer(folder, vocab_size, SPECIAL_TOKENS, corpus=corpus,
                               added_tokens=ADDED_TOKENS + list(extra_tokens), template=template)


def write_model(
    folder: Path,
    scripts: list[tuple[str, str] | tuple[str, str, bool]],
    *,
    template: str = QWEN3_TEMPLATE,
    extra_tokens: list[str] = (),
    vocab_size: int = 640,
) -> Path:
    """Write the model into ``folder``: after each ``(prompt ending, continuation)`` of
    ``scripts`` the model writes the continuation, then ends its turn; a third item
    False leaves the turn open (the last token goes on as scripted elsewhere: a loop)."""
    import mlx.core as mx
    from mlx_lm.models import qwen3
    from mlx_lm.utils import save_config, save_model
    from tokenizers import Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder, template, list(extra_tokens), vocab_size)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    vocab = tokenizer.get_vocab_size()
    hidden = vocab + (-vocab % 8)
    end = tokenizer.token_to_id(END)
    following: dict[int, int] = {}
    for ending, continuation, *ends in scripts:
        ids = tokenizer.encode(continuation).ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == continuation, continuation
        chain = [tokenizer.encode(ending).ids[-1], *ids] + ([end] if ends in ([], [True]) else [])
        for current, after in zip(chain, chain[1:], strict=False):
            if current == end:
                break
            earlier = following.setdefault(current, after)
            assert earlier == after, f"token {tokenizer.id_to_token(current)!r} is scripted twice"
    config = {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": 1,
        "intermediate_size": 32,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "eos_token_id": end,
    }
    model = qwen3.Model(qwen3.ModelArgs.from_dict(config))
    embed = mx.zeros((vocab, hidden))
    embed[mx.arange(vocab), mx.arange(vocab)] = 1.0
    # Unscripted tokens end the turn; scripted ones lead to their successor. The final
    # norm scales the one-hot state to sqrt(hidden), so 3.0 here is a margin of ~50.
    successor = mx.array([following.get(i, end) for i in range(vocab)])
    head = mx.zeros((vocab, hidden))
    head[successor, mx.arange(vocab)] = 3.0
    model.model.embed_tokens.weight = embed
    model.lm_head.weight = head
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight = mx.zeros_like(layer.self_attn.o_proj.weight)
        layer.mlp.down_proj.weight = mx.zeros_like(layer.mlp.down_proj.weight)
    mx.eval(model.parameters())
    save_model(folder, model)
    save_config(dict(config), folder / "config.json")
    return folder
