#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels that scripts/gpu_check.sh needs on a GPU machine whose
# image lacks them (Python 3.12, x86-64, no network there): they land in .gpu-wheels/ (ignored by git),
# which travels with the repository and which gpu_check.sh installs with `pip --no-index --target`.
# The GPU image has torch (CUDA), transformers, accelerate, peft, pyarrow, pandas, xxhash and fsspec;
# it lacks gguf, datasets (with dill and multiprocess) and bitsandbytes (QLoRA's 4-bit base).
# Versions are the ones requirements/lock.txt pins, so the GPU run uses what CI tests.
#
#   bash scripts/gpu_wheels.sh            # then: bash scripts/gpu_check.sh on the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${GQA_GPU_WHEELS:-.gpu-wheels}
PYVER=${GQA_GPU_PYTHON:-3.12}
fail() { echo "gpu_wheels: $*" >&2; exit 1; }

locked() {  # the version requirements/lock.txt pins for package $1 (empty when it pins none)
  grep -iE "^$1==" requirements/lock.txt | head -n 1 | sed -E 's/^[^=]+==([^ ]+).*/\1/'
}
specs=()
for name in gguf datasets dill multiprocess; do
  v=$(locked "$name")
  [ -n "$v" ] || fail "requirements/lock.txt pins no $name (refresh it with: bash scripts/lock.sh)"
  specs+=("$name==$v")
done
# bitsandbytes is not in the CPU lock (its 4-bit kernels need a GPU); take the pinned GPU version.
specs+=("bitsandbytes==${GQA_BITSANDBYTES:-0.50.2}")

# A fresh folder each time: two versions of one package would stop the install on the GPU machine.
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$TMP" "${specs[@]}" 2>&1 | grep -v "is ignored" || true
for s in "${specs[@]}"; do
  n=${s%%==*}; v=${s##*==}
  ls "$TMP"/"${n//-/_}"-"$v"-*.whl >/dev/null 2>&1 || fail "pip download gave no wheel for $s"
done
rm -rf "$DEST" && mkdir -p "$DEST" && mv "$TMP"/*.whl "$DEST"/
du -sh "$DEST" | awk '{print "gpu_wheels: " $1 " in '"$DEST"' (the device tool carries at most 64 MiB)"}'
