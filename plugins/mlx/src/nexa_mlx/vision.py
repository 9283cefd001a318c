"""The MLX vision backend: image+text chat on MLX vision models with mlx-vlm.

Owns loading a vision model folder with ``mlx_vlm.load`` (model + processor), turning a
request's messages and images into the processor's inputs (the model's own chat
template through mlx-vlm's prompt utilities; images decoded from the bytes the server
already fetched, never a URL or a path; a client's special-token text kept plain, see
``model_inputs``), and driving mlx-vlm's ``generate_step`` through
the same answer loop as the text backend (sampling, penalties, seed, stop strings, tool
calls, length, cancellation). ``mlx`` and ``mlx_vlm`` are imported only inside
``load``/``chat``.

A vision model is served by this class for text-only requests too: the server keeps one
loaded instance per (model, backend name), and both classes are called ``mlx``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import attrs

from nexa.backend import CancelToken
from nexa.errors import BadRequest, ModelLoadError
from nexa.reasoning import Position, empty_thought, prompt_position, template_kwargs
from nexa.text import Shielded, template_message
from nexa.types import ChatChunk, ChatMessage, ChatRequest, Device, ImagePart, Manifest, Sampling, Task
from nexa_mlx.answer import AnswerLoop, ThoughtCloser
from nexa_mlx.backend import (
    APPLE_SILICON,
    PENALTY_WINDOW,
    MlxBackend,
    check_request,
    missing_mlx,
    plain_tokens,
    seeded_sampler,
)


def missing_vision_runtime() -> str | None:
    """Why mlx-vlm can't run here, or None. Cheap: no import of mlx or mlx_vlm."""
    if importlib.util.find_spec("mlx_vlm") is None:
        return "images on MLX models need mlx-vlm, which is not installed (pip install nexa-mlx)"
    missing = missing_mlx()
    return f"images on MLX models need mlx-vlm, and {missing}" if missing else None


class MlxVisionBackend(MlxBackend):
    """Image+text chat on MLX vision models (config.json with ``vision_config``) with mlx-vlm."""

    tasks: ClassVar[frozenset[Task]] = frozenset({Task.CHAT, Task.VLM})
    # Above MlxBackend, so that text chat on a vision model also lands here (see the
    # module docstring); supports() refuses every model without a vision tower.
    priority: ClassVar[int] = MlxBackend.priority + 1

    @classmethod
    def supports(cls, manifest: Manifest, device: Device) -> str | None:
        missing = missing_vision_runtime()
        if missing:
            return missing
        if Task.VLM not in manifest.tasks:
            return "the model has no vision tower (its config.json has no vision_config)"
        if device.kind == "metal" and not APPLE_SILICON:
            return "the metal device exists only on Apple Silicon Macs"
        if device.kind == "cpu" and APPLE_SILICON:
            # mlx-vlm runs on its own stream on MLX's default device (the GPU on a Mac).
            return "on a Mac, mlx-vlm runs on Metal only; use the metal device for images"
        if not manifest.has_role("weights"):
            return "the model has no weights file (*.safetensors)"
        return None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.processor: Any = None
        self._tool_module: Any = None

    def load(self) -> None:
        if self.manifest.root is None:
            raise ModelLoadError(f"model {self.manifest.name!r} has no folder")
        try:
            import mlx.core as mx
            from mlx_vlm.tools import _infer_tool_parser_from_processor, load_tool_module
            from mlx_vlm.utils import load as vlm_load
        except ImportError as exc:
            raise ModelLoadError(f"mlx-vlm is not usable here: {exc}") from exc
        if self.device.kind == "metal" and not mx.metal.is_available():
            raise ModelLoadError("the metal device was asked for but MLX sees no Metal GPU")
        try:
            self.model, self.processor = vlm_load(str(self.manifest.root))
        except Exception as exc:
            raise ModelLoadError(
                f"cannot load MLX vision model {self.manifest.name!r}: {type(exc).__name__}: {exc}"
            ) from exc
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.think_format = self.find_think_format()
        # The tool-call format follows the chat template (Hermes <tool_call>, Mistral, ...).
        with contextlib.suppress(Exception):
            name = _infer_tool_parser_from_processor(self.processor)
            self._tool_module = load_tool_module(name) if name else None

    def close(self) -> None:
        self.processor = None
        self._tool_module = None
        super().close()

    def tool_markers(self) -> tuple[str, str]:
        module = self._tool_module
        if module is None:
            return "", ""
        return getattr(module, "tool_call_start", "") or "", getattr(module, "tool_call_end", "") or ""

    # --- prompt -----------------------------------------------------------------------

    def prompt_text(self, request: ChatRequest, tools: list[Mapping[str, Any]]) -> str:
        """The rendered prompt: the model's template, one image marker per image part."""
        return self.chat_prompt_text(request, tools)[0]

    def chat_prompt_text(self, request: ChatRequest, tools: list[Mapping[str, Any]]) -> tuple[str, Position]:
        """The rendered prompt (thinking closed at once when switched off) and where it
        leaves the model's thought."""
        prompt = self._render(request, tools)
        fmt = self.think_format
        if fmt is None:
            return prompt, "before"
        position = prompt_position(fmt, prompt)
        if request.reasoning.off and position != "closed":
            prompt += empty_thought(fmt, position)
            position = "closed"
        return prompt, position

    def _render(self, request: ChatRequest, tools: list[Mapping[str, Any]]) -> str:
        from mlx_vlm.prompt_utils import apply_chat_template

        messages = [_vision_message(m) for m in request.messages]
        images = sum(len(m.images) for m in request.messages)
        kwargs: dict[str, Any] = template_kwargs(request)
        if self.think_format is not None:
            # mlx-vlm switches thinking off unless told; a thinking template's own
            # default is on, as mlx-lm leaves it.
            kwargs.setdefault("enable_thinking", True)
        if tools:
            kwargs["tools"] = tools
        try:
            prompt = apply_chat_template(
                self.processor, self.model.config, messages, num_images=images, **kwargs
            )
        except Exception as exc:
            # Templates reject conversations they can't render; single-image models
            # refuse several images: the client's request, not a crash.
            raise BadRequest(
                f"the model's chat template rejected the messages: {type(exc).__name__}: {exc}",
                param="messages",
            ) from exc
        if isinstance(prompt, Mapping):
            # Prompt-only models (PaliGemma, Florence-2) get the last message's text.
            prompt = prompt.get("content", "")
        return prompt if isinstance(prompt, str) else str(prompt)

    def model_inputs(self, request: ChatRequest, tools: list[Mapping[str, Any]]) -> dict[str, Any]:
        """Token ids, pixel values and the model's extra inputs (e.g. image grid sizes)."""
        return self.inputs_and_position(request, tools)[0]

    def inputs_and_position(self, request: ChatRequest,
                            tools: list[Mapping[str, Any]]) -> tuple[dict[str, Any], Position]:
        """The model's inputs, and where the prompt leaves the model's thought.

        The processor tokenizes the whole prompt with special-token parsing (it must: the
        image markers are special tokens it expands). So a client's special text reaches
        it as a stand-in special token the prompt does not otherwise hold, and each
        stand-in is then replaced in the token ids by the plain-text tokens of what it
        stands for.
        """
        from mlx_vlm.utils import prepare_inputs, should_add_special_tokens

        shielded = self.shield(request, tools)
        images = [_decode(image) for m in request.messages for image in m.images]
        prompt, position = self.chat_prompt_text(attrs.evolve(request, messages=shielded.messages),
                                                 list(shielded.tools))
        stand_in, literals = None, []
        if shielded.active:
            stand_in, prompt, literals = self._stand_in(prompt, shielded)
        config = self.model.config
        try:
            inputs = dict(prepare_inputs(
                self.processor,
                images=images or None,
                prompts=prompt,
                image_token_index=getattr(config, "image_token_index", None)
                or getattr(config, "image_token_id", None),
                add_special_tokens=should_add_special_tokens(config.model_type, self.processor),
            ))
        except BadRequest:
            raise
        except Exception as exc:
            raise BadRequest(
                f"the model's processor could not take these images: {type(exc).__name__}: {exc}",
                param="messages",
            ) from exc
        if stand_in is not None:
            inputs = self._unstand(inputs, stand_in, literals)
        return inputs, position

    def _stand_in(self, prompt: str, shielded: Shielded) -> tuple[int, str, list[str]]:
        """A special token the processor leaves alone and the prompt does not hold, the
        prompt with it in place of every client special text, and those texts in order."""
        tokenizer = self.tokenizer
        media = {str(getattr(self.processor, name, "") or "") for name in ("image_token", "video_token", "audio_token")}
        for token_id, token in sorted((getattr(tokenizer, "added_tokens_decoder", None) or {}).items()):
            text = str(token.content)
            if (
                getattr(token, "special", False)
                and not getattr(token, "lstrip", False)
                and not getattr(token, "rstrip", False)
                and text not in media
                and not any(word in text for word in ("image", "video", "vision", "audio"))
                and text not in shielded.originals
                and text not in prompt
            ):
                pieces = shielded.pieces(prompt)
                literals = [piece for piece, literal in pieces if literal]
                return int(token_id), "".join(text if literal else piece for piece, literal in pieces), literals
        raise BadRequest(
            "the messages hold special-token text that this model's processor cannot take as plain text",
            param="messages",
        )

    def _unstand(self, inputs: dict[str, Any], stand_in: int, literals: list[str]) -> dict[str, Any]:
        """``inputs`` with each stand-in token replaced by the plain tokens of its text
        (and every other per-token input repeated at its place)."""
        import mlx.core as mx
        import numpy as np

        ids = np.array(inputs["input_ids"]).reshape(-1)
        at = [int(i) for i in np.flatnonzero(ids == stand_in)]
        if len(at) != len(literals):
            raise BadRequest("the model's processor changed the messages' special-token text", param="messages")
        replacements = [plain_tokens(self.tokenizer, text) for text in literals]
        shape = np.array(inputs["input_ids"]).shape
        out = dict(inputs)
        for key, value in inputs.items():
            if value is None or isinstance(value, (str, list)):
                continue
            arr = np.array(value)
            if arr.shape != shape:
                continue
            flat = arr.reshape(-1)
            parts, start = [], 0
            for pos, tokens in zip(at, replacements, strict=True):
                parts.append(flat[start:pos])
                fill = np.array(tokens, dtype=flat.dtype) if key == "input_ids" else np.repeat(flat[pos], len(tokens))
                parts.append(fill)
                start = pos + 1
            parts.append(flat[start:])
            out[key] = mx.array(np.concatenate(parts).reshape(1, -1))
        return out

    # --- generation -------------------------------------------------------------------

    def chat(self, request: ChatRequest, cancel: CancelToken) -> Iterator[ChatChunk]:
        if self.model is None:
            raise ModelLoadError(f"model {self.manifest.name!r} is not loaded")
        check_request(request)
        for message in request.messages:
            if message.images and message.role != "user":
                raise BadRequest(
                    f"images are accepted in user messages only, not in a {message.role!r} message",
                    param="messages",
                )
        tools = self._tools(request)
        inputs, position = self.inputs_and_position(request, tools)
        loop = self.answer_loop(request, cancel, int(inputs["input_ids"].size), position, tools)
        yield from self.generate(inputs, request.sampling, cancel, loop, self.thought_closer(request, position))

    def new_detokenizer(self) -> Any:
        from mlx_vlm.tokenizer_utils import make_streaming_detokenizer

        return make_streaming_detokenizer(self.processor)

    def is_eos(self, token: int) -> bool:
        return bool(self.tokenizer.stopping_criteria(token))

    def tool_parser(self) -> Any:
        return self._tool_module.parse_tool_call if self._tool_module is not None else None

    def generate(self, inputs: dict[str, Any], sampling: Sampling, cancel: CancelToken, loop: AnswerLoop,
                 closer: ThoughtCloser | None) -> Iterator[ChatChunk]:
        """Run mlx-vlm's generation on the prepared inputs through ``loop``."""
        import mlx.core as mx
        from mlx_vlm.generate import generate_step, generation_stream, wired_limit

        inputs = dict(inputs)
        input_ids = inputs.pop("input_ids")
        if not isinstance(input_ids, mx.array):
            input_ids = mx.array([input_ids])
        pixel_values = inputs.pop("pixel_values", None)
        mask = inputs.pop("attention_mask", None)
        prompt_tokens = int(input_ids.size)
        max_tokens = self.token_budget(sampling, prompt_tokens)
        bias = self.check_bias(sampling)
        cancel.raise_if_cancelled()
        sampler = seeded_sampler(sampling)
        repeat = sampling.repeat_penalty if sampling.repeat_penalty != 1.0 else None

        step = self.prefill_step_size

        def check_prefill(_done: int, _cache: Any) -> None:
            # mlx-vlm calls this at the given prompt lengths between prefill chunks (a
            # hook meant for prompt caching): a long prompt is cancellable too.
            cancel.raise_if_cancelled()

        steps = generate_step(
            input_ids,
            self.model,
            pixel_values,
            mask,
            max_tokens=max_tokens,
            temperature=max(float(sampling.temperature), 0.0),
            sampler=sampler,
            repetition_penalty=repeat,
            repetition_context_size=PENALTY_WINDOW,
            presence_penalty=sampling.presence_penalty or None,
            presence_context_size=PENALTY_WINDOW,
            frequency_penalty=sampling.frequency_penalty or None,
            frequency_context_size=PENALTY_WINDOW,
            logit_bias=bias,
            logits_processors=[closer] if closer is not None else None,
            prefill_step_size=step,
            prompt_cache_checkpoint=check_prefill,
            prompt_cache_checkpoint_lengths=list(range(step, prompt_tokens, step)),
            **inputs,
        )
        with wired_limit(self.model, [generation_stream]), contextlib.closing(steps):
            yield from loop.run((int(token), logprobs) for token, logprobs in steps)


# --- helpers --------------------------------------------------------------------------


def _vision_message(message: ChatMessage) -> dict[str, Any]:
    """A message as mlx-vlm's prompt utilities take it: content parts in order."""
    out = template_message(message)
    if message.images:
        out["content"] = [
            {"type": "image"} if isinstance(part, ImagePart) else {"type": "text", "text": part.text}
            for part in message.content
        ]
    return out


def _decode(image: ImagePart) -> Any:
    """A Pillow RGB image from the request's bytes (upright, as EXIF says)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(image.data)) as opened:
            return ImageOps.exif_transpose(opened).convert("RGB")
    except Exception as exc:
        raise BadRequest(
            f"an image could not be decoded ({image.mime}): {type(exc).__name__}",
            param="messages",
        ) from exc
