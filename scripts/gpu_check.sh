#!/usr/bin/env bash
# The prepared GPU check: what only a GPU can measure, in one call of under 5 minutes.
#
# Sections (each a script under scripts/gpu_check/, each with its own time budget):
#   convert  the calibrated conversion at Llama-2-7B width on the GPU: seconds per layer, peak device
#            memory; SmolLM2-shaped quality on the GPU against the CPU          (issue: calibrated path)
#   uptrain  a ~1B Llama in bf16 against the HF Trainer (tokens/s, MFU); LoRA and QLoRA at 7B width;
#            FSDP on one GPU with a kill and --resume                           (issue: uptraining speed)
#   decode   static-cache compiled decode, GQA against MHA at context 4096 by batch; the largest
#            batch in a memory budget                                           (issue: decode)
# Every section writes one JSON object of figures; this script gathers them, with the device, the
# library versions and each section's status and time, into ONE file (JSON, and a Markdown table
# beside it), by default results/gpu/gpu_check-DATE.json. A failed section is recorded with the
# end of its log and makes the exit code non-zero, but does not stop the others.
#
# On the GPU machine (Python 3.12, torch CUDA, transformers, accelerate, peft; no network, no gguf,
# datasets or bitsandbytes), first run `bash scripts/gpu_wheels.sh` HERE, then carry .gpu-wheels:
#   device run, carry [".gpu-wheels"]:  bash scripts/gpu_check.sh --out "$OUT/gpu_check.json"
# and commit the returned files under results/gpu/.
# In CI, `bash scripts/gpu_check.sh --tiny` runs every section end to end on the CPU at a tiny scale,
# so the script cannot rot between the sessions that have a GPU.
#
# Options: --tiny            tiny models on whatever device there is (CI)
#          --out FILE        where the gathered JSON goes (the .md lands beside it)
#          --only a,b        run only these sections (default: convert,uptrain,decode)
# Environment: PYTHON (the interpreter; default .venv/bin/python when present, else python3),
#              GQA_GPU_CHECK_TIMEOUT_SCALE (multiplies every section's time limit; default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
fail() { echo "gpu_check: $*" >&2; exit 2; }

TINY=0
OUT_FILE=""
ONLY="convert,uptrain,decode"
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) TINY=1; shift ;;
    --out) [ $# -ge 2 ] || fail "--out needs a file name"; OUT_FILE=$2; shift 2 ;;
    --only) [ $# -ge 2 ] || fail "--only needs a comma-separated list of sections"; ONLY=$2; shift 2 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) fail "unknown argument '$1' (use --tiny, --out FILE, --only a,b)" ;;
  esac
done

# Time limits in seconds per section: on a GPU they add up to under 5 minutes with the start-up; the
# tiny CPU run gets more room per section because the CI machine is shared and slow.
declare -A LIMIT_GPU=([convert]=85 [uptrain]=120 [decode]=60)
declare -A LIMIT_TINY=([convert]=150 [uptrain]=150 [decode]=150)
IFS=',' read -r -a SECTIONS <<< "$ONLY"
for s in "${SECTIONS[@]}"; do
  [ -n "${LIMIT_GPU[$s]:-}" ] || fail "unknown section '$s' (known: convert, uptrain, decode)"
done
for s in "${SECTIONS[@]}"; do
  [ -f "scripts/gpu_check/$s.py" ] || fail "scripts/gpu_check/$s.py is missing from this checkout"
done

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
command -v "$PY" >/dev/null || [ -x "$PY" ] || fail "no Python interpreter '$PY' (set PYTHON=...)"

# Wheels carried for what the GPU image lacks (scripts/gpu_wheels.sh): those the interpreter cannot
# import already are installed once into a private folder put first on the path, never into the
# image's own environment (CI's locked .venv has them all, so nothing is installed there).
# The tiny run uses the interpreter's own packages: it is CI's check of the scripts, not of the image.
missing=()
WHEELS=()
if [ "$TINY" = 0 ] || [ "${GQA_GPU_WHEELS:-0}" = 1 ]; then WHEELS=(.gpu-wheels/*.whl); fi
for whl in "${WHEELS[@]}"; do
  [ -e "$whl" ] || continue
  name=$(basename "$whl"); name=${name%%-*}
  "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$name') is None)" 2>/dev/null \
    || missing+=("$whl")
done
if [ ${#missing[@]} -gt 0 ]; then
  SITE=${TMPDIR:-/tmp}/gqa-gpu-site
  echo "gpu_check: installing carried wheels into $SITE: ${missing[*]##*/}"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "${missing[@]}" || fail "could not install the carried wheels from .gpu-wheels/"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

if [ -z "$OUT_FILE" ]; then
  if [ "$TINY" = 1 ]; then OUT_FILE=.ci-out/gpu_check-tiny.json
  else OUT_FILE=results/gpu/gpu_check-$(date -u +%Y-%m-%d).json; fi
fi
mkdir -p "$(dirname "$OUT_FILE")"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SCALE=${GQA_GPU_CHECK_TIMEOUT_SCALE:-1}

status=0
for s in "${SECTIONS[@]}"; do
  if [ "$TINY" = 1 ]; then limit=${LIMIT_TINY[$s]}; else limit=${LIMIT_GPU[$s]}; fi
  limit=$(awk -v l="$limit" -v f="$SCALE" 'BEGIN { printf "%d", l * f }')
  args=(--out "$WORK/$s.json")
  [ "$TINY" = 1 ] && args+=(--tiny)
  echo "gpu_check: section $s (limit ${limit} s)"
  start=$(date +%s.%N)
  rc=0
  timeout -k 10 "$limit" "$PY" "scripts/gpu_check/$s.py" "${args[@]}" 2>&1 | tee "$WORK/$s.log" || rc=${PIPESTATUS[0]}
  end=$(date +%s.%N)
  echo "$rc $(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }') $limit" > "$WORK/$s.status"
  if [ "$rc" != 0 ]; then
    status=1
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then echo "gpu_check: section $s ran past its ${limit} s limit" >&2
    else echo "gpu_check: section $s failed (exit $rc)" >&2; fi
  fi
done

"$PY" - "$WORK" "$OUT_FILE" "$TINY" "${SECTIONS[@]}" <<'PYEOF' || { echo "gpu_check: could not gather the figures" >&2; exit 1; }
"""Gather the sections' figures into one JSON file and a Markdown table beside it."""
import datetime
import importlib.metadata as md
import json
import platform
import sys
from pathlib import Path

work, out, tiny, sections = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", sys.argv[4:]


def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


try:
    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})"
except Exception as exc:  # the record says why rather than failing the gathering
    cuda, device = False, f"unknown ({type(exc).__name__}: {exc})"

report = {
    "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "tiny": tiny,
    "device": device,
    "cuda": cuda,
    "python": platform.python_version(),
    "versions": {n: version(n) for n in ("torch", "transformers", "accelerate", "peft", "bitsandbytes")},
    "sections": {},
}
for s in sections:
    rc, seconds, limit = (work / f"{s}.status").read_text().split()
    entry = {"ok": rc == "0", "exit_code": int(rc), "seconds": float(seconds), "limit_s": int(limit)}
    fig = work / f"{s}.json"
    if fig.is_file():
        try:
            entry["figures"] = json.loads(fig.read_text())
        except json.JSONDecodeError as exc:
            entry["ok"] = False
            entry["error"] = f"figures are not JSON: {exc}"
    elif entry["ok"]:
        entry["ok"] = False
        entry["error"] = "the section exited 0 but wrote no figures"
    if not entry["ok"]:
        log = (work / f"{s}.log").read_text(errors="replace").splitlines()
        entry["log_tail"] = log[-25:]
    report["sections"][s] = entry

tmp = out.with_name(out.name + ".tmp")
tmp.write_text(json.dumps(report, indent=2) + "\n")
tmp.replace(out)


def flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


lines = [
    f"# GPU check, {report['date_utc']}",
    "",
    f"Device: {device}; Python {report['python']}; "
    + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v)
    + ("; **tiny CPU run (CI), not a measurement**" if tiny else ""),
    "",
]
for s, e in report["sections"].items():
    lines += [f"## {s}: {'ok' if e['ok'] else 'FAILED'} ({e['seconds']:.0f} s of {e['limit_s']} s)", ""]
    if "figures" in e:
        lines += ["| figure | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in flat(e["figures"])]
    if not e["ok"]:
        lines += ["```", *e.get("log_tail", [e.get("error", "")]), "```"]
    lines.append("")
out.with_suffix(".md").write_text("\n".join(lines))
print(f"gpu_check: figures in {out} and {out.with_suffix('.md')}")
PYEOF
exit $status
