"""Engine commands: ``serve`` (the OpenAI HTTP API) and ``run`` (chat in the terminal)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nexa import __version__
from nexa.cli.common import open_store
from nexa.config import DEFAULT_HOST, DEFAULT_PORT

DEFAULT_MODEL = "nexa/smollm2-135m-instruct"


def aliases(values: list[str] | None) -> tuple[tuple[str, str], ...]:
    """``--alias NAME=MODEL`` values as pairs; a malformed one stops ``nexa serve``."""
    pairs = []
    for value in values or ():
        name, sep, model = value.partition("=")
        if not sep or not name.strip() or not model.strip():
            raise SystemExit(f"--alias {value!r}: use NAME=MODEL (NAME '*' maps every unknown model name)")
        pairs.append((name.strip(), model.strip()))
    return tuple(pairs)


def server_config(args: argparse.Namespace):
    from nexa.config import ServerConfig
    from nexa.server.app import bind_is_loopback

    api_key = args.api_key or os.environ.get("NEXA_API_KEY") or None
    if not bind_is_loopback(args.host) and not api_key and not args.insecure:
        raise SystemExit(
            f"refusing to listen on {args.host} without an API key: anyone on the network "
            "could use it. Pass --api-key (or set NEXA_API_KEY), or --insecure if you really mean it."
        )
    return ServerConfig(
        host=args.host,
        port=args.port,
        home=Path(args.home) if args.home else None,
        device=args.device,
        backend=args.backend,
        default_model=args.model,
        keepalive=args.keepalive,
        parallel=args.parallel,
        context_length=args.ctx,
        aliases=aliases(args.alias),
        responses_ttl=args.responses_ttl,
        responses_max=args.responses_max,
        threads=args.threads,
        queue_size=args.queue_size,
        api_key=api_key,
        origins=tuple(args.origins or ()),
        allow_insecure_bind=args.insecure,
        media_dirs=tuple(Path(d) for d in args.media_dir or ()),
        allow_remote_images=args.allow_remote_images,
        max_loaded=args.max_loaded,
        memory_budget=int(args.memory_budget * (1 << 30)) if args.memory_budget else None,
        shutdown_timeout=args.shutdown_timeout,
        engine=args.engine,
        engine_options=_engine_options(args),
        reasoning_format=args.reasoning_format,
        reasoning_budget=_budget(args.reasoning_budget),
        **_limits(args.limit or ()),
    )


def _budget(value: int) -> int:
    if value < -1:
        raise SystemExit(f"--reasoning-budget must be -1 (unlimited), 0 (no thinking) or more; got {value}")
    return value


def _limits(pairs) -> dict[str, int]:
    """``--limit NAME=VALUE`` pairs as ServerConfig fields (the caps in docs/reliability.md)."""
    from nexa.config import LIMITS, LOWER_ONLY, ServerConfig

    limits: dict[str, int] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in LIMITS:
            raise SystemExit(f"--limit {pair!r}: use NAME=VALUE with NAME one of: {', '.join(LIMITS)}")
        try:
            number = int(value.strip().replace("_", ""))
        except ValueError:
            raise SystemExit(f"--limit {pair!r}: the value must be a whole number") from None
        if number < 1:
            raise SystemExit(f"--limit {pair!r}: the value must be at least 1")
        default = getattr(ServerConfig(), name)
        if name in LOWER_ONLY and number > default:
            raise SystemExit(f"--limit {pair!r}: {name} can only be lowered (at most {default})")
        limits[name] = number
    return limits


def _per_model(values: list[str] | None, flag: str, parse) -> dict[str, object]:
    """``[MODEL=]VALUE`` flags to ``{MODEL or "": parsed VALUE}`` ("" is every model)."""
    out: dict[str, object] = {}
    for value in values or ():
        model, sep, rest = value.partition("=")
        if not sep or model.lstrip().startswith("{"):
            model, rest = "", value
        try:
            out[model.strip()] = parse(rest.strip())
        except ValueError as exc:
            raise SystemExit(f"{flag} {value!r}: {exc}") from None
    return out


def _replica_count(text: str) -> int:
    n = int(text)
    if n < 1:
        raise ValueError("a model needs at least 1 replica")
    return n


def _engine_options(args: argparse.Namespace) -> dict[str, object]:
    """The engine flags of ``nexa serve``; refused without an engine that reads them."""
    options: dict[str, object] = {}
    if args.replicas:
        options["replicas"] = _per_model(args.replicas, "--replicas", _replica_count)
    if args.placement:
        options["placement"] = _per_model(args.placement, "--placement", str)
    if args.ray_address:
        options["address"] = args.ray_address
    if options and args.engine in (None, "local"):
        raise SystemExit("--replicas, --placement and --ray-address need an engine that runs replicas "
                         "(e.g. --engine ray)")
    return options


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from nexa.server.app import create_app

    config = server_config(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(config)
    print(f"nexa {__version__} serving on http://{config.host}:{config.port} "
          f"(default model: {config.default_model or 'none'})", flush=True)
    import signal

    # uvicorn re-raises the SIGTERM it handled once it has shut down; with the default
    # action that kills the process (status -15) after a graceful shutdown. A no-op
    # handler of our own turns it into a normal exit with status 0.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.run(
            app,
            host=config.host,
            port=config.port,
            log_level="info" if args.verbose else "warning",
            timeout_graceful_shutdown=int(config.shutdown_timeout),
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Interactive chat in the terminal, in-process (no HTTP)."""
    import asyncio

    from nexa.config import ServerConfig
    from nexa.device import detect_device
    from nexa.manager import ModelManager
    from nexa.registry import BackendRegistry
    from nexa.types import ChatMessage, ChatRequest, Sampling, Task

    store, plugins = open_store(args)
    config = ServerConfig(home=Path(args.home) if args.home else None, backend=args.backend,
                          context_length=args.ctx, threads=args.threads)
    manager = ModelManager(store, BackendRegistry(plugins, pin=args.backend),
                           detect_device(args.device), config)

    async def main() -> None:
        history: list[ChatMessage] = []
        if args.system:
            history.append(ChatMessage("system", args.system))
        interactive = sys.stdin.isatty()
        try:
            while True:
                if interactive:
                    print(">>> ", end="", flush=True)
                line = await asyncio.to_thread(sys.stdin.readline)
                if not line:
                    break
                line = line.strip()
                if not line:
                    continue
                if line in ("/bye", "/exit", "/quit"):
                    break
                history.append(ChatMessage("user", line))
                request = ChatRequest(messages=history, sampling=Sampling(
                    max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed))
                answer = []
                thinking = False
                async with manager.acquire(args.model, Task.CHAT) as backend:
                    async for chunk in backend.stream_answer(request):
                        if chunk.reasoning:
                            # A thinking model's thought, dimmed on a terminal, before the answer.
                            if not thinking and interactive:
                                print("\033[2m", end="")
                            thinking = True
                            print(chunk.reasoning, end="", flush=True)
                        if chunk.content:
                            if thinking:
                                print("\033[0m\n" if interactive else "\n", end="")
                                thinking = False
                            print(chunk.content, end="", flush=True)
                            answer.append(chunk.content)
                print("\033[0m" if thinking and interactive else "", flush=True)
                history.append(ChatMessage("assistant", "".join(answer)))
        finally:
            await manager.shutdown()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        print()
    return 0


def engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cuda", "metal", "mps", "cpu"], default=None)
    p.add_argument("--backend", default=None, help="force this backend for every model (e.g. mlx)")
    p.add_argument("--ctx", type=int, default=None, help="context length for every model")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per model")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"model to load at start (default: {DEFAULT_MODEL})")
    p.add_argument("--host", default=os.environ.get("NEXA_HOST", DEFAULT_HOST))
    p.add_argument("--port", type=int, default=int(os.environ.get("NEXA_PORT", DEFAULT_PORT)))
    engine_args(p)
    p.add_argument("--keepalive", type=float, default=300.0, help="seconds an idle model stays loaded")
    p.add_argument("--parallel", type=int, default=None, help="requests each model runs at once")
    p.add_argument("--queue-size", type=int, default=64, help="requests that may wait per model")
    p.add_argument("--max-loaded", type=int, default=4, help="models resident at once")
    p.add_argument("--memory-budget", type=float, default=None, help="GiB of models resident at once")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY (or NEXA_API_KEY)")
    p.add_argument("--origins", nargs="*", help="CORS origins to allow (default: CORS off)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback bind without an API key")
    p.add_argument("--media-dir", action="append", help="folder local image paths may come from (repeatable)")
    p.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs (public hosts only)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM")
    p.add_argument("--limit", action="append", metavar="NAME=VALUE",
                   help="change a per-request cap, e.g. max_messages=10000 (repeatable; names in docs/reliability.md)")
    p.add_argument("--alias", action="append", metavar="NAME=MODEL",
                   help="serve MODEL when a client asks for NAME (repeatable; NAME '*' catches every unknown name)")
    p.add_argument("--responses-ttl", type=float, default=30 * 24 * 3600.0,
                   help="seconds a stored /v1/responses answer is kept (default 30 days)")
    p.add_argument("--responses-max", type=int, default=10_000, help="stored /v1/responses answers kept at most")
    p.add_argument("--reasoning-format", choices=["separate", "inline", "hidden"], default="separate",
                   help="a thinking model's reasoning: in reasoning_content (separate), left in content "
                        "(inline) or dropped (hidden); a request's reasoning_format overrides it")
    p.add_argument("--reasoning-budget", type=int, default=-1,
                   help="thinking tokens before the thought is closed (-1: unlimited, 0: no thinking); "
                        "a request's switches override it")
    p.add_argument("--verbose", action="store_true", help="log every request")
    p.add_argument("--engine", default=None,
                   help="where models run: local (this process, the default) or an engine plugin (ray)")
    p.add_argument("--replicas", action="append", metavar="[MODEL=]N",
                   help="replicas of every model, or of MODEL (repeatable); with --engine ray")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="the Ray cluster to use with --engine ray (default: RAY_ADDRESS, else a new "
                        "local one on 127.0.0.1)")
    p.add_argument("--placement", action="append", metavar="[MODEL=]JSON",
                   help="what each replica of every model, or of MODEL, asks the cluster for "
                        "(repeatable); with --engine ray, Ray actor options: num_cpus, num_gpus, "
                        "memory, resources, label_selector")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("run", help="chat with a model in the terminal")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    engine_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=cmd_run)
