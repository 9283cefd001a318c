"""Value types shared by the core and every backend.

This module owns the task-level vocabulary: what a model is (``Manifest``), where it
runs (``Device``), and the requests and results of each task, independent of HTTP (those
of the tasks besides chat live in ``nexa.task_types`` and are re-exported here).
The HTTP layer has its own OpenAI wire schemas (``nexa.server.schemas``) and converts
to these types at the edge, so backends never see JSON.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from nexa.task_types import (
    SAMPLE_RATE as SAMPLE_RATE,
)
from nexa.task_types import (
    Audio as Audio,
)
from nexa.task_types import (  # re-exported: every task's values are importable from here
    EmbedRequest as EmbedRequest,
)
from nexa.task_types import (
    EmbedResult as EmbedResult,
)
from nexa.task_types import (
    ImageRequest as ImageRequest,
)
from nexa.task_types import (
    ImageResult as ImageResult,
)
from nexa.task_types import (
    RerankRequest as RerankRequest,
)
from nexa.task_types import (
    RerankResult as RerankResult,
)
from nexa.task_types import (
    TranscribeRequest as TranscribeRequest,
)
from nexa.task_types import (
    Transcript as Transcript,
)
from nexa.task_types import (
    TranscriptChunk as TranscriptChunk,
)
from nexa.task_types import (
    TranscriptSegment as TranscriptSegment,
)
from nexa.task_types import (
    Word as Word,
)

MANIFEST_VERSION = 1


class Task(enum.StrEnum):
    """A kind of work a backend can do."""

    CHAT = "chat"
    VLM = "vlm"
    IMAGE = "image"
    EMBED = "embed"
    RERANK = "rerank"
    TRANSCRIBE = "transcribe"
    """Speech to text, and speech to English text (Whisper's translate mode)."""


def _tasks(value: Any) -> frozenset[Task]:
    return frozenset(Task(v) for v in value)


@attrs.frozen
class Device:
    """Where models run."""

    kind: str
    """``cuda``, ``metal`` or ``cpu``."""
    name: str = ""
    """Human-readable name of the accelerator or CPU."""
    memory_bytes: int = 0
    """Memory usable for models on this device (0 when unknown)."""


@attrs.frozen
class ModelFile:
    """One file of a model, relative to the model's folder."""

    path: str
    """Path relative to the manifest's root, with forward slashes."""
    size: int
    """Size in bytes."""
    sha256: str | None = None
    """Hex digest when known (LFS files from the hub, imported and packaged files)."""
    role: str = "weights"
    """``weights``, ``mmproj``, ``config``, ``tokenizer`` or ``other``."""


@attrs.frozen
class Manifest:
    """Everything the server needs to know about one model, written as ``manifest.json``."""

    name: str
    """The id clients send as ``model``; ``ORG/REPO`` for pulled models."""
    format: str
    """``gguf``, ``mlx``, ``diffusers``, ``sentence-transformers``, ``safetensors``..."""
    tasks: frozenset[Task] = attrs.field(converter=_tasks)
    """The tasks the model can serve."""
    files: tuple[ModelFile, ...] = attrs.field(converter=tuple, default=())
    """The files of the model, weights first."""
    root: Path | None = attrs.field(default=None, eq=False)
    """The folder the file paths are relative to; set when read, never written."""
    quant: str | None = None
    """Quantisation label for GGUF models (``Q4_K_M``)."""
    backend: str | None = None
    """Backend hint: a backend name that should serve this model when it can."""
    source: str = "local"
    """Where it came from: ``hf:ORG/REPO@COMMIT``, ``local:NAME`` (the imported file or
    folder) or ``package:DIST``."""
    context_length: int | None = None
    """The model's trained context length when the format tells it."""
    options: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)
    """Format-specific facts and settings a backend reads (``architecture``,
    ``pooling_type``, ``chat_template``...; ``docs/manifest.md`` lists them)."""
    version: int = MANIFEST_VERSION
    """Manifest schema version."""

    @property
    def size(self) -> int:
        """Total bytes of all files."""
        return sum(f.size for f in self.files)

    def file_path(self, role: str = "weights") -> Path:
        """The absolute path of the first file with ``role``."""
        for f in self.files:
            if f.role == role:
                assert self.root is not None, "manifest has no root"
                return self.root / f.path
        raise KeyError(f"model {self.name} has no {role} file")

    def has_role(self, role: str) -> bool:
        """Whether some file has ``role`` (``mmproj``: a vision model's projector)."""
        return any(f.role == role for f in self.files)

    def to_json(self) -> str:
        """The ``manifest.json`` text: every field but ``root``, keys sorted (``docs/manifest.md``)."""
        data = attrs.asdict(self, recurse=True, filter=lambda a, _v: a.name != "root")
        data["tasks"] = sorted(t.value for t in self.tasks)
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], root: Path | None = None) -> Manifest:
        """The manifest a parsed ``manifest.json`` describes; ValueError on an unknown key."""
        data = dict(data)
        files = tuple(ModelFile(**f) for f in data.pop("files", ()))
        known = {a.name for a in attrs.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown manifest keys: {sorted(unknown)}")
        return cls(files=files, root=root, **data)

    @classmethod
    def from_file(cls, path: Path) -> Manifest:
        """Read ``manifest.json``; the model's root is the folder holding it."""
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")), root=path.parent)


@attrs.frozen
class BackendInfo:
    """What a backend declares about itself, shown by ``nexa plugins`` and over HTTP."""

    name: str
    """``Backend.name``."""
    tasks: frozenset[Task] = attrs.field(converter=_tasks)
    """``Backend.tasks``: the tasks it serves."""
    formats: frozenset[str] = attrs.field(converter=frozenset)
    """``Backend.formats``: the manifest formats it reads."""
    devices: frozenset[str] = attrs.field(converter=frozenset)
    """``Backend.devices``: the device kinds it runs on."""
    parallel: int
    """How many requests one loaded model runs at once."""
    priority: int
    """``Backend.priority``: higher wins when several backends support a model."""
    plugin: str
    """The plugin (distribution or module) that registered it."""


@attrs.frozen
class BackendMetric:
    """One figure a loaded backend reports about itself, exported on ``GET /metrics``.

    The server names it ``nexa_backend_<name>`` and labels it with the model and backend,
    so a backend author only says what the number is.
    """

    name: str
    """Lowercase ``[a-z0-9_]``; a counter's name has no ``_total`` (Prometheus adds it)."""
    value: float
    """The figure now (a counter's running total)."""
    kind: str = attrs.field(default="gauge", validator=attrs.validators.in_(("gauge", "counter")))
    """``gauge`` (a level now) or ``counter`` (only ever goes up while the model is loaded)."""
    help: str = ""
    """One line for the Prometheus ``# HELP`` text; the name when empty."""
    labels: Mapping[str, str] = attrs.field(factory=dict, converter=dict)
    """More labels beside ``model`` and ``backend``: a backend that runs the model in
    several places (an engine's replicas) reports one figure per ``replica`` and ``node``."""


@attrs.frozen
class ResidentInfo:
    """What one loaded model holds, as only its backend knows it (``Backend.resident_info``);
    listed by ``GET /v1/admin/models`` and ``nexa ps``."""

    device: str
    """Where the weights live: ``cpu``, ``cuda``, ``metal``..."""
    weights_bytes: int
    """Memory held by the weights (the model files' size when the backend cannot tell better)."""
    kv_cache_bytes: int | None = None
    """Memory held by the KV cache of every slot together; None when the backend has none or
    cannot tell."""
    context: int | None = None
    """Tokens one request's prompt and answer may span; None when not a text model or unknown."""


@attrs.frozen
class ContextPlan:
    """The context a backend gives one model, and why (``Backend.context_plan``): logged
    at load, shown by ``nexa show`` and, for a loaded model, in ``GET /v1/models``."""

    length: int
    """Tokens one request's prompt and answer share."""
    reason: str
    """Why this length, for people (the trained length, ``--ctx``, the memory its KV
    cache takes for the sequences run at once...)."""


# --- chat ---------------------------------------------------------------------------


@attrs.frozen
class ImagePart:
    """An image already fetched and checked by the server: raw bytes, never a URL."""

    data: bytes = attrs.field(repr=lambda d: f"<{len(d)} bytes>")
    """The encoded image: PNG, JPEG, WebP or GIF as sent, any other format re-encoded as
    PNG; already decoded once and checked against the server's pixel cap."""
    mime: str = "image/png"
    """Its MIME type, from the decoded format (never from what the client claimed)."""

    def data_uri(self) -> str:
        """The image as a ``data:`` URI, for libraries that take image URLs."""
        import base64

        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"


@attrs.frozen
class TextPart:
    """The text of one ``{"type": "text"}`` part of a message's content list."""

    text: str
    """The text, as the client sent it."""


ContentPart = TextPart | ImagePart


@attrs.frozen
class ToolCall:
    """A function call the model made, whole or one piece of it.

    A backend may send a call whole, or stream it as it is generated: the first piece
    carries the ``id``, the ``name`` and the start of the ``arguments``; each later piece
    repeats the ``id`` with an empty ``name`` and carries the next fragment of the
    arguments. The pieces' arguments joined are the call's arguments (``merge_tool_calls``).
    """

    id: str
    """The call's id (``call_...``); a ``tool`` message answers it by ``tool_call_id``."""
    name: str
    """The function's name, one of the request's ``tools``."""
    arguments: str
    """JSON text, as OpenAI sends it (or the next fragment of it, in a later piece)."""


def merge_tool_calls(calls: Any) -> list[ToolCall]:
    """Whole calls from calls and pieces of calls in the order they came."""
    merged: dict[str, ToolCall] = {}
    for call in calls:
        before = merged.get(call.id)
        if before is None:
            merged[call.id] = call
        else:
            merged[call.id] = attrs.evolve(before, arguments=before.arguments + call.arguments)
    return list(merged.values())


@attrs.frozen
class ChatMessage:
    """One message of the conversation, in the order the client sent them."""

    role: str
    """``system``, ``user``, ``assistant`` or ``tool`` (``developer`` arrives as ``system``)."""
    content: str | tuple[ContentPart, ...] | None = None
    """A string, or ``TextPart``/``ImagePart`` items when the client sent a content list;
    None for an assistant message that only made tool calls."""
    name: str | None = None
    """An optional participant name the client gave."""
    tool_calls: tuple[ToolCall, ...] = ()
    """The calls an earlier assistant message made (conversation history)."""
    tool_call_id: str | None = None
    """On a ``tool`` message: the id of the call it answers."""
    reasoning: str | None = None
    """An earlier assistant turn's reasoning sent back by the client (``reasoning_content``);
    handed to the chat template, which decides whether it belongs in the prompt."""

    @property
    def images(self) -> tuple[ImagePart, ...]:
        """The message's images, in order (empty for string content)."""
        if isinstance(self.content, tuple):
            return tuple(p for p in self.content if isinstance(p, ImagePart))
        return ()

    @property
    def text(self) -> str:
        """The message's text: the string content, or its text parts joined; images left out."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))


def _bias(value: Any) -> dict[int, float]:
    return {int(k): float(v) for k, v in (value or {}).items()}


def _stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


@attrs.frozen
class Sampling:
    """How the next tokens are chosen and when generation ends: the one sampling value.

    Built once at the API edge (``nexa.server.convert``), where every field is checked
    against the server's caps, and carried unchanged down to the backend. Neutral values
    mean "off", so a backend never needs ``None`` checks: ``top_k=0``, ``min_p=0``,
    ``repeat_penalty=1``, penalties 0, ``temperature=0`` is greedy decoding.
    """

    max_tokens: int | None = None
    """Most tokens to generate; None: until the model stops or its context is full. A
    backend caps it at the room its context leaves (finish reason ``length``)."""
    temperature: float = 1.0
    """0 means greedy (the most likely token every time)."""
    top_p: float = 1.0
    """Nucleus sampling: choose among the most likely tokens that make up this much
    probability; 1.0: off."""
    top_k: int = 0
    """0: no top-k cut."""
    min_p: float = 0.0
    """Drop tokens less likely than ``min_p`` times the most likely one; 0: off."""
    seed: int | None = None
    """None: a fresh random seed per request. The same seed and prompt give the same text."""
    presence_penalty: float = 0.0
    """OpenAI's: subtracted once from the logit of every token already generated; 0: off."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtracted from a token's logit per time it was generated; 0: off."""
    repeat_penalty: float = 1.0
    """1.0: off (llama.cpp's multiplicative repetition penalty)."""
    stop: tuple[str, ...] = attrs.field(converter=_stops, default=())
    """Strings that end the answer; never emitted, not even in part (``nexa.text.StopHoldBack``).
    They apply to the answer only, never to the reasoning of a thinking model."""
    logit_bias: Mapping[int, float] = attrs.field(factory=dict, converter=_bias)
    """Token id -> a number added to that token's logit before sampling (-100 bans it,
    100 all but forces it). Ids are checked against the vocabulary by the backend."""

    @property
    def greedy(self) -> bool:
        """Whether decoding is greedy (``temperature`` 0)."""
        return self.temperature <= 0.0


REASONING_FORMATS = ("separate", "inline", "hidden")
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
"""The values of ``reasoning_effort`` the official openai SDK allows; ``none`` is off."""


@attrs.frozen
class Reasoning:
    """How a thinking model (Qwen3, DeepSeek-R1...) reasons for one request.

    The server resolves the request's switches (``reasoning_effort``,
    ``chat_template_kwargs.enable_thinking``, ``think``, Anthropic's ``thinking``) and its
    own settings (``--reasoning-format``, ``--reasoning-budget``) into this one value.
    """

    enabled: bool | None = None
    """None: the model's own default; False: thinking off where the template allows it."""
    effort: str | None = None
    """``minimal``...``max``, handed to the chat template as ``reasoning_effort``."""
    budget: int = -1
    """Thinking tokens at most before the thought is closed and the answer starts;
    -1: unlimited, 0: no thinking."""
    format: str = attrs.field(default="separate", validator=attrs.validators.in_(REASONING_FORMATS))
    """``separate``: reasoning in ``ChatChunk.reasoning``; ``inline``: left in the content
    as the model wrote it; ``hidden``: dropped."""

    @property
    def off(self) -> bool:
        """Thinking switched off (by a switch or a budget of 0)."""
        return self.enabled is False or self.budget == 0

    @property
    def token_budget(self) -> int:
        """Thinking tokens allowed: -1 unlimited, 0 when thinking is off."""
        return 0 if self.off else self.budget


@attrs.frozen
class ChatRequest:
    """One chat completion, as a backend sees it."""

    messages: tuple[ChatMessage, ...] = attrs.field(converter=tuple)
    """The conversation, oldest first; never empty."""
    sampling: Sampling = Sampling()
    """Token choice and limits, already validated (``Sampling``)."""
    tools: tuple[Mapping[str, Any], ...] = attrs.field(converter=tuple, default=())
    """OpenAI tool definitions (``{"type": "function", "function": {...}}``)."""
    tool_choice: str | Mapping[str, Any] | None = None
    """``auto``, ``none``, ``required`` or ``{"type": "function", "function": {"name": ...}}``;
    already checked against ``tools`` (a named function is one of them; ``required`` has tools)."""
    response_format: Mapping[str, Any] | None = None
    """``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {...}}``."""
    reasoning: Reasoning = Reasoning()
    """Thinking on or off, its effort, budget and how it is returned."""
    template_kwargs: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)
    """Extra variables for the chat template from the client (``chat_template_kwargs``),
    already checked; a template-rendering backend passes ``nexa.reasoning.template_kwargs``
    (these plus the reasoning switches) to the template."""
    logprobs: int | None = None
    """None: no log-probabilities; n >= 0: each answer token's log-probability and its n
    most likely alternatives (``ChatChunk.logprobs``)."""
    max_tool_calls: int | None = None
    """At most this many tool calls (``parallel_tool_calls: false`` and Anthropic's
    ``disable_parallel_tool_use`` are 1); the server drops later ones. None: no limit."""
    model: str = ""
    """The ``model`` string the client sent (for logs; the backend already holds its model)."""

    @classmethod
    def create(cls, messages: Any, **fields: Any) -> ChatRequest:
        """A request from flat keyword fields (``max_tokens=8, temperature=0, tools=[...]``):
        the ``Sampling`` ones are gathered into ``sampling``. For tests and scripts."""
        names = {a.name for a in attrs.fields(Sampling)}
        sampling = {k: fields.pop(k) for k in list(fields) if k in names}
        return cls(messages=messages, sampling=Sampling(**sampling), **fields)

    @property
    def has_images(self) -> bool:
        """Whether some message carries an image (the request is then a ``vlm`` task)."""
        return any(m.images for m in self.messages)


@attrs.frozen
class Usage:
    """Tokens one answer took, as counted by the backend (``docs/plugin-guide.md`` says how
    to count without a tokenizer)."""

    prompt_tokens: int = 0
    """The whole rendered prompt: every message, the template's markup, tool definitions."""
    completion_tokens: int = 0
    """Every generated token, reasoning included (as OpenAI counts)."""
    reasoning_tokens: int = 0
    """The part of ``completion_tokens`` spent thinking."""
    cached_tokens: int = 0
    """Prompt tokens served from a cache instead of computed."""

    @property
    def total_tokens(self) -> int:
        """``prompt_tokens + completion_tokens``."""
        return self.prompt_tokens + self.completion_tokens


@attrs.frozen
class TokenLogprob:
    """One generated token's log-probability, with the most likely alternatives there."""

    token: str
    """The token's text."""
    logprob: float
    """Its natural-log probability (0 is certain)."""
    top: tuple[tuple[str, float], ...] = ()
    """(text, logprob) of the most likely tokens at that position, most likely first."""
    bytes: bytes | None = None
    """The token's raw bytes when they are not whole UTF-8 (None: ``token`` encoded)."""


@attrs.frozen
class ChatChunk:
    """One piece of a chat answer. The last chunk carries ``finish_reason`` and ``usage``."""

    content: str = ""
    """The next piece of the answer's text (may be empty)."""
    reasoning: str = ""
    """Thinking text of this piece, kept apart from ``content`` (``reasoning_content``)."""
    tool_calls: tuple[ToolCall, ...] = ()
    """Tool calls made in this piece: whole, or pieces of calls (see ``ToolCall``)."""
    logprobs: tuple[TokenLogprob, ...] = ()
    """Log-probabilities of the answer tokens this chunk completes, when the request asked
    for them (``ChatRequest.logprobs``)."""
    finish_reason: str | None = None
    """``stop``, ``length`` or ``tool_calls`` on the last chunk."""
    usage: Usage | None = None
    """On the last chunk: the tokens the answer took."""
    stop_sequence: str | None = None
    """On the last chunk: the stop string (``Sampling.stop``) that ended the answer, when
    one did (``finish_reason`` is then ``stop``); Anthropic's ``stop_sequence`` reports it."""


@attrs.frozen
class CompletionRequest:
    """One legacy text completion (``POST /v1/completions``): raw text continued, no chat
    template, no reasoning split, no tools. Answered with ``ChatChunk`` values (``content``)."""

    prompt: str | tuple[int, ...]
    """The text to continue, or token ids where the backend accepts them."""
    sampling: Sampling = Sampling()
    """Token choice and limits, already validated (``Sampling``)."""
    suffix: str | None = None
    """Text after the gap: fill-in-the-middle with the model's FIM tokens."""
    logprobs: int | None = None
    """As ``ChatRequest.logprobs``."""
    model: str = ""
    """The ``model`` string the client sent."""
