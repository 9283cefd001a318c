"""The MLX chat backend: MLX-format models (``mlx-community/...``) on mlx-lm.

Owns loading a model folder with ``mlx_lm.load``, rendering the model's own chat
template (client text never parsed as control tokens: ``nexa.text.SpecialTextGuard``),
the per-token generation loop (sampling, penalties, seed, stop strings, tool
calls, length, cancellation) and the refusal reasons selection shows. ``mlx`` and
``mlx_lm`` are imported only inside ``load``/``chat``: importing this module is cheap,
so ``nexa --help`` and plugin discovery never pay for them.

Vision: mlx-lm serves text only; MLX vision models are served by
``nexa_mlx.vision.MlxVisionBackend`` on mlx-vlm.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

import attrs

from nexa.backend import Backend, CancelToken, LoadOptions
from nexa.errors import (
    BadRequest,
    ContextLengthExceeded,
    ModelLoadError,
    UnsupportedTask,
)
from nexa.text import Shielded, SpecialTextGuard, template_message
from nexa.types import (
    ChatChunk,
    ChatRequest,
    Device,
    Manifest,
    Task,
    ToolCall,
    Usage,
)
from nexa_mlx.text import AnswerParser, Stop, Text, ToolSpan

APPLE_SILICON = sys.platform == "darwin" and platform.machine() == "arm64"

# Tokens the repetition/presence/frequency penalties look back over. llama.cpp's default
# `repeat_last_n` is 64; using the same window keeps answers comparable across backends.
PENALTY_WINDOW = 64

# Without max_tokens and without a known context length, stop somewhere finite.
FALLBACK_MAX_TOKENS = 4096


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def missing_runtime() -> str | None:
    """Why MLX can't run in this environment, or None. Cheap: no import of mlx."""
    if importlib.util.find_spec("mlx_lm") is None:
        return "mlx-lm is not installed (pip install nexa-mlx)"
    return missing_mlx()


def missing_mlx() -> str | None:
    """Why mlx itself can't run on this platform, or None. Cheap: no import of mlx."""
    if sys.platform == "darwin":
        if platform.machine() != "arm64":
            return "MLX needs Apple Silicon; this Mac is Intel"
        if not _installed("mlx"):
            return "mlx is not installed (pip install nexa-mlx)"
        return None
    if sys.platform.startswith("linux"):
        # Plain mlx-lm on Linux installs no mlx at all; the CPU build is the `cpu` extra.
        if not _installed("mlx-cpu"):
            return "MLX on Linux needs its CPU build: pip install 'mlx-lm[cpu]' (nexa-mlx does)"
        return None
    return f"MLX does not run on {sys.platform}"


class MlxBackend(Backend):
    """Text chat on MLX-format models with mlx-lm, on Metal (Apple Silicon) or CPU."""

    name: ClassVar[str] = "mlx"
    tasks: ClassVar[frozenset[Task]] = frozenset({Task.CHAT})
    formats: ClassVar[frozenset[str]] = frozenset({"mlx"})
    devices: ClassVar[frozenset[str]] = frozenset({"metal", "cpu"})
    # MLX drives one model from one stream; sampling uses MLX's global RNG (that is how
    # `seed` is honoured), so one request at a time per loaded model.
    parallel = 1
    # AnswerParser ends the answer at stop strings inside the generation loop.
    stops_natively = True
    # Prompts beyond `context_length` (the override, else the trained one) are refused.
    honours_context_length = True
    # The backend made for MLX models: wins over any generic backend that also accepts
    # the format (e.g. a transformers backend reading safetensors).
    priority: ClassVar[int] = 50

    @classmethod
    def supports(cls, manifest: Manifest, device: Device) -> str | None:
        missing = missing_runtime()
        if missing:
            return missing
        if device.kind == "metal" and not APPLE_SILICON:
            return "the metal device exists only on Apple Silicon Macs"
        if not manifest.has_role("weights"):
            return "the model has no weights file (*.safetensors)"
        return None

    def __init__(self, manifest: Manifest, device: Device, options: LoadOptions | None = None):
        options = options or LoadOptions()
        if options.parallel not in (None, 1):
            # See `parallel` above: the global RNG and one stream per model.
            options = attrs.evolve(options, parallel=1)
        super().__init__(manifest, device, options)
        self.model: Any = None
        self.tokenizer: Any = None
        self._stream: Any = None
        self._guard: SpecialTextGuard | None = None

    # --- load -------------------------------------------------------------------------

    @property
    def context_length(self) -> int | None:
        return self.options.context_length or self.manifest.context_length

    def load(self) -> None:
        if self.manifest.root is None:
            raise ModelLoadError(f"model {self.manifest.name!r} has no folder")
        try:
            import mlx.core as mx
            from mlx_lm import load as mlx_load
        except ImportError as exc:
            raise ModelLoadError(f"MLX is not usable here: {exc}") from exc
        if self.device.kind == "metal":
            if not mx.metal.is_available():
                raise ModelLoadError("the metal device was asked for but MLX sees no Metal GPU")
            device = mx.gpu
        else:
            device = mx.cpu
        # A thread-local stream: requests may run on another worker thread than the load.
        self._stream = mx.new_thread_local_stream(device)
        try:
            with mx.stream(self._stream):
                self.model, self.tokenizer = mlx_load(str(self.manifest.root))
        except Exception as exc:
            raise ModelLoadError(
                f"cannot load MLX model {self.manifest.name!r}: {type(exc).__name__}: {exc}"
            ) from exc

    def close(self) -> None:
        self.model = None
        self.tokenizer = None
        self._stream = None
        self._guard = None
        try:
            import mlx.core as mx

            mx.clear_cache()
        except Exception:
            pass

    # --- prompt -----------------------------------------------------------------------

    def _tools(self, request: ChatRequest) -> list[Mapping[str, Any]]:
        """The tool definitions the template sees, after ``tool_choice``."""
        if not request.tools or request.tool_choice == "none":
            return []
        choice = request.tool_choice
        if isinstance(choice, Mapping):
            wanted = (choice.get("function") or {}).get("name")
            chosen = [t for t in request.tools if (t.get("function") or {}).get("name") == wanted]
            if not chosen:
                raise BadRequest(
                    f"tool_choice names function {wanted!r}, which is not in tools",
                    param="tool_choice",
                )
            # Without grammar-constrained decoding, offering only that tool is how the
            # model is steered to it.
            return chosen
        return list(request.tools)

    def shield(self, request: ChatRequest, tools: list[Mapping[str, Any]]) -> Shielded:
        """The request's messages and tools with the tokenizer's special texts behind
        sentinels (``nexa.text.SpecialTextGuard``)."""
        if self._guard is None:
            self._guard = SpecialTextGuard(special_texts(self.tokenizer))
        return self._guard.shield(request.messages, tools)

    def prompt_tokens(self, request: ChatRequest, tools: list[Mapping[str, Any]]) -> list[int]:
        shielded = self.shield(request, tools)
        messages = [template_message(m) for m in shielded.messages]
        kwargs: dict[str, Any] = {"add_generation_prompt": True}
        if tools:
            kwargs["tools"] = list(shielded.tools)
        tokenizer = self.tokenizer

        def plain(text: str, _first: bool) -> list[int]:
            return plain_tokens(tokenizer, text)

        if not getattr(tokenizer, "has_chat_template", False):
            # A base model with no template: a plain transcript, as mlx-lm's server does.
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            return shielded.tokenize(text, lambda t, first: list(tokenizer.encode(t, add_special_tokens=first)), plain)
        try:
            # Rendered and tokenized as mlx-lm does (the markup's special tokens parsed);
            # a client's special text, when there is one, as plain text.
            ids = tokenizer.apply_chat_template(messages, tokenize=not shielded.active, **kwargs)
        except Exception as exc:
            # Jinja templates reject conversations they can't render (roles out of order,
            # a system message where none is allowed): the client's request, not a crash.
            raise BadRequest(
                f"the model's chat template rejected the messages: {type(exc).__name__}: {exc}",
                param="messages",
            ) from exc
        if shielded.active:
            return shielded.tokenize(ids, lambda t, _first: list(tokenizer.encode(t, add_special_tokens=False)), plain)
        if isinstance(ids, Mapping):  # some tokenizers return a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    # --- generation -------------------------------------------------------------------

    def chat(self, request: ChatRequest, cancel: CancelToken) -> Iterator[ChatChunk]:
        if self.model is None:
            raise ModelLoadError(f"model {self.manifest.name!r} is not loaded")
        if request.has_images:
            raise UnsupportedTask(
                f"the mlx backend serves text only; model {self.manifest.name!r} got images"
            )
        check_request(request)

        import mlx.core as mx
        from mlx_lm.generate import generate_step, wired_limit
        from mlx_lm.sample_utils import make_logits_processors

        tools = self._tools(request)
        prompt = self.prompt_tokens(request, tools)
        max_tokens = self.token_budget(request, len(prompt))
        cancel.raise_if_cancelled()
        sampler = seeded_sampler(request)
        repeat = request.sampling.repeat_penalty if request.sampling.repeat_penalty != 1.0 else None
        processors = make_logits_processors(
            repetition_penalty=repeat,
            repetition_context_size=PENALTY_WINDOW,
            presence_penalty=request.sampling.presence_penalty or None,
            presence_context_size=PENALTY_WINDOW,
            frequency_penalty=request.sampling.frequency_penalty or None,
            frequency_context_size=PENALTY_WINDOW,
        )

        tokenizer = self.tokenizer
        parse_tools = bool(tools) and tokenizer.has_tool_calling
        eos = tokenizer.eos_token_ids

        def check_prefill(_done: int, _total: int) -> None:
            # Called between prefill chunks: a long prompt is cancellable too.
            cancel.raise_if_cancelled()

        steps = generate_step(
            mx.array(prompt),
            self.model,
            self._stream,
            max_tokens=max_tokens,
            sampler=sampler,
            logits_processors=processors or None,
            prompt_progress_callback=check_prefill,
            prefill_step_size=self.prefill_step_size,
        )
        # On Metal, pin the weights in memory for the duration (as mlx-lm's own
        # stream_generate does); a no-op on CPU.
        with wired_limit(self.model, [self._stream]), contextlib.closing(steps):
            yield from self.answer(
                (token for token, _logprobs in steps),
                request=request,
                cancel=cancel,
                prompt_tokens=len(prompt),
                is_eos=lambda token: token in eos,
                detokenizer=tokenizer.detokenizer,
                tools=tools,
                tool_parser=tokenizer.tool_parser if parse_tools else None,
            )

    @property
    def prefill_step_size(self) -> int:
        return 2048 if self.device.kind == "metal" else 512

    def token_budget(self, request: ChatRequest, prompt_tokens: int) -> int:
        """How many tokens may be generated: max_tokens within what the context leaves."""
        context = self.context_length
        if context is not None and prompt_tokens >= context:
            raise ContextLengthExceeded(
                f"the prompt is {prompt_tokens} tokens; model {self.manifest.name!r} has a "
                f"context of {context} tokens",
                param="messages",
            )
        budget = context - prompt_tokens if context is not None else FALLBACK_MAX_TOKENS
        return min(request.sampling.max_tokens, budget) if request.sampling.max_tokens else budget

    def answer(
        self,
        tokens: Iterator[int],
        *,
        request: ChatRequest,
        cancel: CancelToken,
        prompt_tokens: int,
        is_eos: Callable[[int], bool],
        detokenizer: Any,
        tools: list[Mapping[str, Any]],
        tool_parser: Any,
    ) -> Iterator[ChatChunk]:
        """Turn generated token ids into chunks: text, stop strings, tool calls, finish."""
        start, end = self.tool_markers()
        parser = AnswerParser(
            request.sampling.stop,
            tool_start=start if tool_parser else None,
            tool_end=end if tool_parser else None,
        )
        generated = 0
        finish = "length"
        made_tool_call = False
        for token in tokens:
            # The generators already run the next token while we handle this one, so
            # a cancel lands within about one token.
            cancel.raise_if_cancelled()
            if is_eos(token):
                finish = "stop"
                break
            generated += 1
            detokenizer.add_token(token)
            for chunk in self._chunks(parser.feed(detokenizer.last_segment), tool_parser, tools):
                made_tool_call |= bool(chunk.tool_calls)
                yield chunk
            if parser.stopped:
                finish = "stop"
                break
        if not parser.stopped:
            detokenizer.finalize()
            events = parser.feed(_remaining_text(detokenizer))
            if parser.stopped:
                finish = "stop"
            events += parser.finish()
            for chunk in self._chunks(events, tool_parser, tools):
                made_tool_call |= bool(chunk.tool_calls)
                yield chunk
        if made_tool_call and finish == "stop":
            finish = "tool_calls"
        yield ChatChunk(finish_reason=finish, usage=Usage(prompt_tokens, generated))

    def tool_markers(self) -> tuple[str, str]:
        """The model's tool-call start and end markers ("" where it has none)."""
        return self.tokenizer.tool_call_start or "", self.tokenizer.tool_call_end or ""

    def _chunks(self, events: list, tool_parser: Any, tools: list) -> Iterator[ChatChunk]:
        for event in events:
            if isinstance(event, Text) and event.text:
                yield ChatChunk(content=event.text)
            elif isinstance(event, ToolSpan):
                calls = _parse_tool_calls(tool_parser, event.text, tools)
                if calls:
                    yield ChatChunk(tool_calls=calls)
                else:
                    # Not a call the parser understands (or cut off by max_tokens): the
                    # client still gets the text the model wrote, markers included.
                    start, end = self.tool_markers()
                    end = end if event.closed else ""
                    yield ChatChunk(content=f"{start}{event.text}{end}")
            elif isinstance(event, Stop):
                return


# --- helpers --------------------------------------------------------------------------


def special_texts(tokenizer: Any) -> list[str]:
    """The texts a Hugging Face tokenizer parses as special tokens (its special added
    tokens); non-special added tokens are matched in plain text anyway."""
    texts = set(getattr(tokenizer, "all_special_tokens", None) or ())
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            texts.add(str(token.content))
    return sorted(texts)


def plain_tokens(tokenizer: Any, text: str) -> list[int]:
    """``text`` tokenized as ordinary characters, special-token texts included."""
    return [int(i) for i in tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)]


def check_request(request: ChatRequest) -> None:
    """Refuse, with a 400, request features MLX can't honour (rather than ignoring them)."""
    fmt = (request.response_format or {}).get("type", "text")
    if fmt != "text":
        raise BadRequest(
            f"response_format {fmt!r} is not supported by the mlx backend "
            "(it has no constrained decoding)",
            param="response_format",
        )


def seeded_sampler(request: ChatRequest) -> Callable[[Any], Any]:
    """The request's sampler, with MLX's global RNG seeded for it."""
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler

    # Unseeded requests reseed from the OS so they never replay an earlier seeded one.
    seed = request.sampling.seed if request.sampling.seed is not None else int.from_bytes(os.urandom(8), "little")
    mx.random.seed(seed % 2**64)
    return make_sampler(
        temp=max(float(request.sampling.temperature), 0.0),
        top_p=float(request.sampling.top_p),
        min_p=float(request.sampling.min_p or 0.0),
        top_k=int(request.sampling.top_k or 0),
    )


def _remaining_text(detokenizer: Any) -> str:
    """All text not yet read, after ``finalize``.

    mlx-vlm's ``last_segment`` holds back text that ends in U+FFFD (it may be half a
    UTF-8 character); at the end nothing more is coming, so take it all.
    """
    text = getattr(detokenizer, "text", None)
    offset = getattr(detokenizer, "offset", None)
    if not isinstance(text, str) or not isinstance(offset, int):
        return detokenizer.last_segment
    detokenizer.offset = len(text)
    return text[offset:]


def _parse_tool_calls(tool_parser: Any, text: str, tools: list) -> tuple[ToolCall, ...]:
    if tool_parser is None:
        return ()
    try:
        parsed = tool_parser(text, tools)
    except Exception:
        # Malformed JSON / unknown function: the caller falls back to plain content.
        return ()
    items = parsed if isinstance(parsed, list) else [parsed]
    calls = []
    for item in items:
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
            return ()
        arguments = item.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        calls.append(
            ToolCall(
                id=str(item.get("id") or f"call_{uuid.uuid4().hex[:24]}"),
                name=item["name"],
                arguments=arguments,
            )
        )
    return tuple(calls)
