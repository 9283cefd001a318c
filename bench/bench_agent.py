"""Agent-loop benchmark: time to first token of turn 1 vs turns 2 and 3 of an agent-shaped
conversation, through each API (chat completions, Anthropic Messages, OpenAI Responses).

An agent's first request carries a long system prompt and a dozen tool definitions, and
every later turn resends all of it plus a little more (the model's last answer and a new
message or tool result). With a working prefix cache a later turn costs only its new
tokens: the target is turn 2 and turn 3 TTFT <= 15% of turn 1's.

Each API gets its own conversation (a session line opens its system prompt), so each
turn 1 is a cold prefill; turns 2 and 3 add ~``--turn-tokens`` tokens each. Responses
turns continue with ``previous_response_id`` (the stored conversation), the other two
resend the whole conversation, as their clients do. TTFT is measured from sending the
request to the first streamed piece of answer (text, reasoning or tool call), read as
raw Server-Sent Events with httpx (no SDK overhead in the figure). Not a timed test:
figures go to docs/benchmarks.md.

    python bench/bench_agent.py                         # Qwen2.5-Coder-0.5B (PyPI parts), ~10k-token prefix
    python bench/bench_agent.py --model smollm2 --prefix-tokens 800 --ctx 4096   # a short check
    python bench/bench_agent.py --model PATH.gguf --threads 4   # the default context (``--ctx`` to fix one)

The server runs as a subprocess (`python -m nexa.cli serve`) with its own NEXA_HOME.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from common import load_average, machine, resolve_model, start_nexa, stop  # bench/ is on sys.path

TOOL_NAMES = ["read_file", "write_file", "edit_file", "list_dir", "grep", "glob", "run_shell", "run_tests",
              "git_diff", "git_commit", "web_fetch", "ask_user"]
TOPICS = ["the build", "the tests", "error handling", "the public API", "logging", "configuration",
          "the database layer", "caching", "concurrency", "the command line", "packaging", "documentation"]


# --- the conversation ------------------------------------------------------------------


def system_prompt(session: str, tokens: int) -> str:
    """A coding agent's system prompt of about ``tokens`` tokens (~0.75 words a token)."""
    lines = [f"Session {session}. You are a coding agent working in a user's repository.",
             "Follow the rules below exactly. Use the tools to read before you write."]
    i = 0
    while sum(len(line.split()) for line in lines) < tokens * 0.72:
        topic = TOPICS[i % len(TOPICS)]
        lines.append(f"Rule {i + 1}: when a change touches {topic}, first read the files that define it, "
                     f"then explain the plan in one short paragraph, keep the diff small, and run the "
                     f"tests that cover {topic} before reporting back; never invent file names.")
        i += 1
    return "\n".join(lines)


def tools() -> list[dict[str, Any]]:
    """Twelve tools as an agent declares them (name, description, JSON schema)."""
    out = []
    for i, name in enumerate(TOOL_NAMES):
        out.append({
            "name": name,
            "description": f"{name.replace('_', ' ').capitalize()}: one of the agent's tools. "
                           f"Use it for work on {TOPICS[i]}; it returns plain text.",
            "parameters": {"type": "object", "properties": {
                "path": {"type": "string", "description": "A path relative to the repository root"},
                "argument": {"type": "string", "description": "What the tool works on"},
            }, "required": ["path"]},
        })
    return out


def user_turn(turn: int, tokens: int) -> str:
    words = [f"Turn {turn}: here is what the last step returned."]
    i = 0
    while sum(len(w.split()) for w in words) < tokens * 0.72:
        words.append(f"line {i}: the module for {TOPICS[(turn + i) % len(TOPICS)]} passed its checks.")
        i += 1
    words.append("What should we do next? Answer in one sentence.")
    return " ".join(words)


# --- one request per API, streamed ----------------------------------------------------------


def events(response: httpx.Response):
    """(event name or None, JSON data) per Server-Sent Event."""
    name = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
            if data == "[DONE]":
                return
            yield name, json.loads(data)
            name = None


class Conversation:
    """One API's conversation: sends a turn, returns (TTFT s, prompt tokens, cached tokens)."""

    def __init__(self, api: str, base: str, model: str, system: str, max_tokens: int) -> None:
        self.api, self.base, self.model, self.system, self.max_tokens = api, base, model, system, max_tokens
        self.history: list[dict[str, Any]] = []
        self.previous: str | None = None

    def turn(self, client: httpx.Client, text: str) -> tuple[float, int, int]:
        body, path = getattr(self, "_" + self.api)(text)
        started = time.perf_counter()
        first = None
        answer: list[str] = []
        prompt = cached = 0
        with client.stream("POST", self.base + path, json=body) as response:
            if response.status_code != 200:
                raise SystemExit(f"{self.api}: HTTP {response.status_code}: {response.read()[:500]!r}")
            for name, data in events(response):
                piece = self._piece(name, data)
                if piece is not None:
                    first = first or time.perf_counter()
                    answer.append(piece)
                prompt, cached = self._usage(name, data, prompt, cached)
                if name == "response.completed" or name == "response.incomplete":
                    self.previous = data["response"]["id"]
                if name == "error" or (name is None and "error" in data):
                    raise SystemExit(f"{self.api}: the stream failed: {data}")
        if first is None:
            raise SystemExit(f"{self.api}: no answer came")
        self.history.append({"role": "user", "content": text})
        self.history.append({"role": "assistant", "content": "".join(answer) or "OK."})
        return first - started, prompt, cached

    def _chat(self, text: str) -> tuple[dict[str, Any], str]:
        return {"model": self.model, "stream": True, "stream_options": {"include_usage": True},
                "max_tokens": self.max_tokens, "temperature": 0,
                "tools": [{"type": "function", "function": t} for t in tools()],
                "messages": [{"role": "system", "content": self.system}, *self.history,
                             {"role": "user", "content": text}]}, "/v1/chat/completions"

    def _messages(self, text: str) -> tuple[dict[str, Any], str]:
        return {"model": self.model, "stream": True, "max_tokens": self.max_tokens, "temperature": 0,
                "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=bench; nonce="
                            + str(time.time_ns())}, {"type": "text", "text": self.system}],
                "tools": [{"name": t["name"], "description": t["description"], "input_schema": t["parameters"]}
                          for t in tools()],
                "messages": [*self.history, {"role": "user", "content": text}]}, "/v1/messages"

    def _responses(self, text: str) -> tuple[dict[str, Any], str]:
        body: dict[str, Any] = {"model": self.model, "stream": True, "max_output_tokens": self.max_tokens,
                                "temperature": 0, "instructions": self.system,
                                "tools": [{"type": "function", **t} for t in tools()], "input": text}
        if self.previous:
            body["previous_response_id"] = self.previous
        return body, "/v1/responses"

    @staticmethod
    def _piece(name: str | None, data: dict[str, Any]) -> str | None:
        if name is None:  # chat completions
            for choice in data.get("choices") or []:
                delta = choice.get("delta") or {}
                if delta.get("content") or delta.get("tool_calls"):
                    return delta.get("content") or ""
            return None
        if name == "content_block_delta":
            delta = data["delta"]
            return delta.get("text") or delta.get("thinking") or delta.get("partial_json") or ""
        if name in ("response.output_text.delta", "response.reasoning_text.delta",
                    "response.function_call_arguments.delta"):
            return data["delta"] if name == "response.output_text.delta" else ""
        return None

    @staticmethod
    def _usage(name: str | None, data: dict[str, Any], prompt: int, cached: int) -> tuple[int, int]:
        if name is None and data.get("usage"):
            details = data["usage"].get("prompt_tokens_details") or {}
            return data["usage"]["prompt_tokens"], details.get("cached_tokens", 0)
        if name == "message_delta":
            usage = data["usage"]
            return usage["input_tokens"] + usage.get("cache_read_input_tokens", 0), usage.get(
                "cache_read_input_tokens", 0)
        if name in ("response.completed", "response.incomplete"):
            usage = data["response"]["usage"]
            return usage["input_tokens"], usage["input_tokens_details"]["cached_tokens"]
        return prompt, cached


# --- the server -------------------------------------------------------------------------


def model_file(choice: str, home: Path) -> tuple[Path, str, str]:
    """(GGUF path, its name in nexa, a label) for ``--model``."""
    if choice == "qwen":
        from nexa_llama_cpp.testing import qwen_coder_gguf

        path, name = resolve_model(str(qwen_coder_gguf()), home)
        return path, name, "Qwen2.5-Coder-0.5B-Instruct Q4_K_M (trained for 32k tokens)"
    if choice == "smollm2":
        path, name = resolve_model(None, home)
        return path, name, "SmolLM2-135M-Instruct Q4_1 (trained for 8k tokens)"
    path, name = resolve_model(choice, home)
    return path, name, path.name


def wait_loaded(base: str, model: str, timeout: float = 300) -> None:
    """Until the model is resident, so that no turn's time includes its load."""
    deadline = time.monotonic() + timeout
    while model not in httpx.get(base + "/health", timeout=10).json()["models_loaded"]:
        if time.monotonic() > deadline:
            raise SystemExit(f"{model} was not loaded within {timeout:.0f} s")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen", help="qwen (default), smollm2, or a GGUF file")
    parser.add_argument("--prefix-tokens", type=int, default=10_000, help="system prompt size (tools come on top)")
    parser.add_argument("--turn-tokens", type=int, default=200, help="tokens each later turn adds")
    parser.add_argument("--ctx", type=int, default=None,
                        help="context length (default: the server's, the model's trained length within memory)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "metal"])
    parser.add_argument("--max-tokens", type=int, default=16, help="answer tokens per turn")
    parser.add_argument("--apis", default="chat,messages,responses")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="nexa-bench-agent-"))
    path, name, label = model_file(args.model, home)
    print(f"machine: {machine()}, load average at start {load_average()}")
    print(f"model:   {label}, {path.stat().st_size / 1e6:.0f} MB; ctx {args.ctx or 'default'}, threads {args.threads}, "
          f"device {args.device}; system prompt ~{args.prefix_tokens} tokens + 12 tools, "
          f"+~{args.turn_tokens} tokens a turn, {args.max_tokens} answer tokens, temperature 0")
    proc, base = start_nexa(name, home, threads=args.threads, ctx=args.ctx,
                            gpu=None if args.device == "cpu" else args.device)
    rows = []
    try:
        wait_loaded(base, name)
        card = httpx.get(f"{base}/v1/models/{name}", timeout=10).json()
        print(f"context: {card.get('context_length')} tokens ({card.get('context_reason')})")
        with httpx.Client(timeout=httpx.Timeout(1800, connect=10)) as client:
            for api in args.apis.split(","):
                talk = Conversation(api, base, name, system_prompt(api, args.prefix_tokens), args.max_tokens)
                figures = [talk.turn(client, user_turn(t, args.turn_tokens if t > 1 else 40)) for t in (1, 2, 3)]
                rows.append((api, figures))
                print(f"  {api}: " + " | ".join(
                    f"turn {i + 1} {ttft * 1000:8.1f} ms ({prompt} prompt tokens, {cached} cached)"
                    for i, (ttft, prompt, cached) in enumerate(figures)), flush=True)
    finally:
        stop(proc)

    print()
    print("| API | turn 1 TTFT (ms) | turn 2 TTFT (ms, % of turn 1) | turn 3 TTFT (ms, % of turn 1) | "
          "prompt tokens (turn 1 / 3) | target (turns 2, 3 <= 15%) |")
    print("|---|---|---|---|---|---|")
    for api, ((t1, p1, _), (t2, _, _), (t3, p3, _)) in rows:
        ok = "met" if max(t2, t3) <= 0.15 * t1 else "MISSED"
        print(f"| {api} | {t1 * 1000:.0f} | {t2 * 1000:.0f} ({100 * t2 / t1:.1f}%) | "
              f"{t3 * 1000:.0f} ({100 * t3 / t1:.1f}%) | {p1} / {p3} | {ok} |")


if __name__ == "__main__":
    main()
