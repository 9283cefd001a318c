"""The hook specifications: the whole contract between the core and its plugins.

Every hook is a *registration* hook called once when the plugin manager starts: a plugin
hands the core backend classes and ready models; inference itself is plain Python on
backend objects, never a hook call. Hooks are synchronous (pluggy has no async support).
Each hook is documented in ``docs/hooks.md``; a test fails when one is missing there.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

PROJECT = "nexa"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_chat_backends(register: Callable[[type], None]) -> None:
    """Register backend classes that serve text chat (``/v1/chat/completions``).

    Call ``register(BackendClass)`` once per class; the class subclasses
    :class:`nexa.backend.Backend` with ``Task.CHAT`` in its ``tasks``.
    """


@hookspec
def register_vlm_backends(register: Callable[[type], None]) -> None:
    """Register backend classes that serve chat about images (``image_url`` content parts).

    The class has ``Task.VLM`` in its ``tasks``; images reach it as bytes
    (:class:`nexa.types.ImagePart`), already fetched and checked by the server.
    """


@hookspec
def register_image_backends(register: Callable[[type], None]) -> None:
    """Register backend classes that generate images (``/v1/images/generations``).

    The class has ``Task.IMAGE`` in its ``tasks`` and implements ``generate_images``.
    """


@hookspec
def register_embed_backends(register: Callable[[type], None]) -> None:
    """Register backend classes that compute embeddings (``/v1/embeddings``).

    The class has ``Task.EMBED`` in its ``tasks`` and implements ``embed``.
    """


@hookspec
def register_rerank_backends(register: Callable[[type], None]) -> None:
    """Register backend classes that rerank documents against a query (``/v1/rerank``).

    The class has ``Task.RERANK`` in its ``tasks`` and implements ``rerank``, scoring
    all documents in batches. Embedding models rerank without one (cosine similarity
    through their embedding backend).
    """


@hookspec
def register_transcribe_backends(register: Callable[[type], None]) -> None:
    """Register backend classes that turn speech into text (``/v1/audio/transcriptions``
    and ``/v1/audio/translations``).

    The class has ``Task.TRANSCRIBE`` in its ``tasks`` and implements ``transcribe``; the
    audio reaches it decoded (:class:`nexa.types.Audio`, 16 kHz mono float PCM).
    """


@hookspec
def register_models(register: Callable[..., None]) -> None:
    """Offer ready models that an installed package carries, usable with no pull.

    Call ``register(manifest)`` with a :class:`nexa.types.Manifest` whose ``root`` is the
    folder holding its files (inside the package). Must be cheap: locate files, don't
    import heavy libraries or hash large files.
    """


@hookspec
def register_engines(register: Callable[[type], None]) -> None:
    """Register engine classes: other places than this process where backends can run.

    Call ``register(EngineClass)`` once per class; the class subclasses
    :class:`nexa.engine.Engine` and has a unique ``name`` (``nexa serve --engine NAME``).
    Must be cheap: the engine's library (Ray...) is imported only when it starts.
    """
