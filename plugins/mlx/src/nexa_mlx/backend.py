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
import os
import platform
import sys
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
from nexa.fim import fim_tokens
from nexa.reasoning import (
    Position,
    ThinkFormat,
    ThinkingBudget,
    declared_format,
    detect_format,
    empty_thought,
    prompt_position,
    reasoning_for,
    template_kwargs,
)
from nexa.text import Shielded, SpecialTextGuard, template_message
from nexa.types import (
    ChatChunk,
    ChatRequest,
    CompletionRequest,
    Device,
    Manifest,
    Sampling,
    Task,
)
from nexa_mlx.answer import AnswerLoop, ThoughtCloser

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
    capabilities: ClassVar[frozenset[str]] = frozenset({"reasoning", "logprobs", "logit_bias"})
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
        self.think_format: ThinkFormat | None = None
        """How the model marks its thought (from its chat template); None: it does not think."""

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
        self.think_format = self.find_think_format()

    def find_think_format(self) -> ThinkFormat | None:
        """The thought format: declared in the manifest, else shown by the chat template,
        else the tokenizer's own thinking tokens (mlx-lm reads them from the vocabulary)."""
        declared = declared_format(self.manifest.options)
        if declared is not None:
            return declared
        template = getattr(self.tokenizer, "chat_template", None)
        if isinstance(template, Mapping):  # several named templates
            template = template.get("default") or next(iter(template.values()), None)
        found = detect_format(template if isinstance(template, str) else None)
        if found is None and getattr(self.tokenizer, "has_thinking", False):
            found = ThinkFormat(self.tokenizer.think_start, self.tokenizer.think_end)
        return found

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
        """The chat prompt's token ids (thinking closed at once when switched off)."""
        return self.chat_prompt(request, tools)[0]

    def chat_prompt(self, request: ChatRequest, tools: list[Mapping[str, Any]]) -> tuple[list[int], Position]:
        """The prompt's token ids and where it leaves the model's thought."""
        ids = self.template_tokens(request, tools)
        fmt = self.think_format
        if fmt is None:
            return ids, "before"
        position = prompt_position(fmt, self.tokenizer.decode(ids[-16:]))
        if request.reasoning.off and position != "closed":
            # A template that can't switch thinking off: the thought is closed for it.
            ids += self.encode_plain(empty_thought(fmt, position))
            position = "closed"
        return ids, position

    def template_tokens(self, request: ChatRequest, tools: list[Mapping[str, Any]]) -> list[int]:
        """The chat template's rendering of the request, tokenized, with the reasoning
        switches and the client's template variables."""
        shielded = self.shield(request, tools)
        messages = [template_message(m) for m in shielded.messages]
        kwargs: dict[str, Any] = {"add_generation_prompt": True, **template_kwargs(request)}
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

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of text the server wrote (markers included), no BOS added."""
        return [int(i) for i in self.tokenizer.encode(text, add_special_tokens=False)]

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    # --- generation -------------------------------------------------------------------

    def chat(self, request: ChatRequest, cancel: CancelToken) -> Iterator[ChatChunk]:
        if self.model is None:
            raise ModelLoadError(f"model {self.manifest.name!r} is not loaded")
        if request.has_images:
            raise UnsupportedTask(
                f"the mlx backend serves text only; model {self.manifest.name!r} got images"
            )
        check_request(request)
        tools = self._tools(request)
        prompt, position = self.chat_prompt(request, tools)
        yield from self.generate(
            {"input_ids": prompt}, request.sampling, cancel,
            self.answer_loop(request, cancel, len(prompt), position, tools),
            self.thought_closer(request, position),
        )

    def complete(self, request: CompletionRequest, cancel: CancelToken) -> Iterator[ChatChunk]:
        if self.model is None:
            raise ModelLoadError(f"model {self.manifest.name!r} is not loaded")
        prompt = self.completion_prompt(request)
        loop = AnswerLoop(cancel=cancel, prompt_tokens=len(prompt), is_eos=self.is_eos,
                          detokenizer=keep_leading_space(self.new_detokenizer()), token_text=self.token_text,
                          stops=request.sampling.stop, logprobs=request.logprobs)
        yield from self.generate({"input_ids": prompt}, request.sampling, cancel, loop, None)

    def completion_prompt(self, request: CompletionRequest) -> list[int]:
        """A completion's token ids: the client's text never parsed as control tokens;
        with a suffix, the model's fill-in-the-middle layout."""
        if isinstance(request.prompt, tuple):
            vocab = self.vocab_size
            if any(t >= vocab for t in request.prompt):
                raise BadRequest(f"token ids must be below the vocabulary size {vocab}", param="prompt")
            return list(request.prompt)
        text = plain_tokens(self.tokenizer, request.prompt)
        if request.suffix is None:
            return text
        fim = fim_tokens(self.tokenizer.get_vocab())
        if fim is None:
            raise BadRequest(f"model {self.manifest.name!r} has no fill-in-the-middle tokens", param="suffix")
        return [fim.prefix, *text, fim.suffix, *plain_tokens(self.tokenizer, request.suffix), fim.middle]

    @property
    def vocab_size(self) -> int:
        """Rows of the model's output: the token ids a logit bias or a prompt may name."""
        for config in (getattr(self.model, "args", None), getattr(self.model, "config", None)):
            for holder in (config, getattr(config, "text_config", None)):
                size = holder.get("vocab_size") if isinstance(holder, Mapping) else getattr(holder, "vocab_size", None)
                if isinstance(size, int) and size > 0:
                    return size
        return len(self.tokenizer.get_vocab())

    def is_eos(self, token: int) -> bool:
        return token in self.tokenizer.eos_token_ids

    def new_detokenizer(self) -> Any:
        detokenizer = self.tokenizer.detokenizer
        detokenizer.reset()
        return detokenizer

    def answer_loop(self, request: ChatRequest, cancel: CancelToken, prompt_tokens: int, position: Position,
                    tools: list[Mapping[str, Any]]) -> AnswerLoop:
        """The answer loop of a chat request: reasoning split, stops, tool calls, logprobs."""
        return AnswerLoop(
            cancel=cancel,
            prompt_tokens=prompt_tokens,
            is_eos=self.is_eos,
            detokenizer=self.new_detokenizer(),
            token_text=self.token_text,
            splitter=reasoning_for(request.reasoning, self.think_format, position),
            reasoning=request.reasoning,
            stops=request.sampling.stop,
            tool_markers=self.tool_markers(),
            tool_parser=self.tool_parser() if tools else None,
            tools=tools,
            logprobs=request.logprobs,
        )

    def thought_closer(self, request: ChatRequest, position: Position) -> ThoughtCloser | None:
        """The logits processor that closes a thought at its budget (None when unlimited)."""
        budget = request.reasoning.token_budget
        if self.think_format is None or budget < 0 or position == "closed":
            return None
        return ThoughtCloser(ThinkingBudget(self.think_format, budget, inside=position == "inside"),
                             self.token_text, self.encode_plain)

    def check_bias(self, sampling: Sampling) -> dict[int, float] | None:
        if not sampling.logit_bias:
            return None
        vocab = self.vocab_size
        bad = [t for t in sampling.logit_bias if t >= vocab]
        if bad:
            raise BadRequest(f"logit_bias names token {bad[0]}; this model's tokens are 0..{vocab - 1}",
                             param="logit_bias")
        return dict(sampling.logit_bias)

    def generate(self, inputs: dict[str, Any], sampling: Sampling, cancel: CancelToken, loop: AnswerLoop,
                 closer: ThoughtCloser | None) -> Iterator[ChatChunk]:
        """Run mlx-lm's generation on ``inputs["input_ids"]`` through ``loop``."""
        import mlx.core as mx
        from mlx_lm.generate import generate_step, wired_limit
        from mlx_lm.sample_utils import make_logits_processors

        prompt = inputs["input_ids"]
        max_tokens = self.token_budget(sampling, len(prompt))
        bias = self.check_bias(sampling)
        cancel.raise_if_cancelled()
        sampler = seeded_sampler(sampling)
        repeat = sampling.repeat_penalty if sampling.repeat_penalty != 1.0 else None
        processors = make_logits_processors(
            logit_bias=bias,
            repetition_penalty=repeat,
            repetition_context_size=PENALTY_WINDOW,
            presence_penalty=sampling.presence_penalty or None,
            presence_context_size=PENALTY_WINDOW,
            frequency_penalty=sampling.frequency_penalty or None,
            frequency_context_size=PENALTY_WINDOW,
        )
        if closer is not None:
            processors.append(closer)

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
            yield from loop.run((int(token), logprobs) for token, logprobs in steps)

    @property
    def prefill_step_size(self) -> int:
        return 2048 if self.device.kind == "metal" else 512

    def token_budget(self, sampling: Sampling, prompt_tokens: int) -> int:
        """How many tokens may be generated: max_tokens within what the context leaves."""
        context = self.context_length
        if context is not None and prompt_tokens >= context:
            raise ContextLengthExceeded(
                f"the prompt is {prompt_tokens} tokens; model {self.manifest.name!r} has a "
                f"context of {context} tokens",
                param="messages",
            )
        budget = context - prompt_tokens if context is not None else FALLBACK_MAX_TOKENS
        return min(sampling.max_tokens, budget) if sampling.max_tokens else budget

    def tool_markers(self) -> tuple[str, str]:
        """The model's tool-call start and end markers ("" where it has none)."""
        return self.tokenizer.tool_call_start or "", self.tokenizer.tool_call_end or ""

    def tool_parser(self) -> Callable[[str, Any], Any] | None:
        """The model's tool-call parser (mlx-lm infers it from the chat template)."""
        return self.tokenizer.tool_parser if self.tokenizer.has_tool_calling else None


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


def keep_leading_space(detokenizer: Any) -> Any:
    """``detokenizer``, made to keep a space at the start of the output.

    mlx-lm's streaming detokenizers drop it (right for a chat answer); a completion
    continues the client's text, where that space belongs (``x =`` -> `` 1``). The BPE
    one drops it only while its text is empty, so it is started with a character that
    ``last_segment`` never shows.
    """
    if hasattr(detokenizer, "trim_space"):
        detokenizer.trim_space = False
    elif hasattr(detokenizer, "_maybe_trim_space"):
        detokenizer.text = "\x00"
        detokenizer.offset = 1
    return detokenizer


def seeded_sampler(sampling: Sampling) -> Callable[[Any], Any]:
    """The request's sampler, with MLX's global RNG seeded for it."""
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler

    # Unseeded requests reseed from the OS so they never replay an earlier seeded one.
    seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(8), "little")
    mx.random.seed(seed % 2**64)
    return make_sampler(
        temp=max(float(sampling.temperature), 0.0),
        top_p=float(sampling.top_p),
        min_p=float(sampling.min_p or 0.0),
        top_k=int(sampling.top_k or 0),
    )
