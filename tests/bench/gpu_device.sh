#!/usr/bin/env bash
# The one command to run on a lent GPU machine: install the carried wheels, then the full-size benchmark.
#
#   here, first:    bash tests/bench/device_prep.sh --check      (wheels into .device/, stubs, carry size)
#   on the device:  bash tests/bench/gpu_device.sh [benchmark args]   with carry [".device", "client/paletta/v1"]
#
# Results go to $OUT (the device tool's folder; bench-out/gpu otherwise) as the run goes:
# results.json (see tests/bench/gpu.py), summary.md, bench.log, device.txt (versions), install.log.
#
# DEADLINE_S (default 540): seconds this whole script may take, set-up included; give the device call a
# timeout_s a little above it. The benchmark gets what the set-up leaves: it is interrupted (SIGINT, so
# it still writes summary.md and removes its weights) 30 s before the deadline, and plans its stages for
# 60 s less (`--budget-s`, unless given). Exit 3: the deadline cut the run short.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${OUT:-$ROOT/bench-out/gpu}
mkdir -p "$OUT"
SITE=$ROOT/.device/site
WHEELS=$ROOT/.device/wheels
DEADLINE_S=${DEADLINE_S:-540}
t0=$(date +%s)
# A run cut off before its clean-up leaves tens of GB in the tmpfs; the next would build on disk.
rm -rf /dev/shm/paletta-gpu-bench-* 2>/dev/null || true

PY=${PYTHON:-}
for candidate in python3.12 python3 python; do
  if [[ -z $PY ]] && command -v "$candidate" >/dev/null && "$candidate" -c "import torch" 2>/dev/null; then
    PY=$candidate
  fi
done
[[ -n $PY ]] || { echo "no Python with torch found" | tee "$OUT/error.txt"; exit 1; }
[[ -f client/paletta/v1/job_pb2.py ]] || { echo "generated stubs missing: carry client/paletta/v1" | tee "$OUT/error.txt"; exit 1; }
ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "no wheels: carry .device (tests/bench/device_prep.sh)" | tee "$OUT/error.txt"; exit 1; }

# What the device has, before anything is installed (so the figures can be read against it).
"$PY" - >"$OUT/device.txt" 2>&1 <<'PY'
import importlib.metadata as m, platform, sys
print("python", sys.version.split()[0], platform.platform())
for name in ("torch", "transformers", "accelerate", "peft", "huggingface-hub", "safetensors", "tokenizers",
             "grpcio", "protobuf", "numpy", "Pillow", "nvidia-ml-py", "diffusers", "bitsandbytes", "torchao"):
    try:
        print(f"{name} {m.version(name)}")
    except m.PackageNotFoundError:
        print(f"{name} -")
import torch
print("cuda", torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
cat "$OUT/device.txt"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv >>"$OUT/device.txt" 2>&1 || true
df -h /dev/shm /tmp . >>"$OUT/device.txt" 2>&1 || true
free -g >>"$OUT/device.txt" 2>&1 || true

# Install the carried wheels into .device/site (ahead of site-packages on PYTHONPATH). The fallbacks
# (huggingface-hub, safetensors) only where the device's own copy is older than diffusers needs.
wheels=("$WHEELS"/*.whl)
while read -r name; do
  [[ -n $name ]] && wheels+=("$WHEELS"/fallback/"$name"-*.whl)
done < <("$PY" - <<'PY'
import importlib.metadata as m
from packaging.version import Version
for name, dist, low in (("huggingface_hub", "huggingface-hub", "1.32.0"), ("safetensors", "safetensors", "0.8.0")):
    try:
        ok = Version(m.version(dist)) >= Version(low)
    except m.PackageNotFoundError:
        ok = False
    if not ok:
        print(name)
PY
)
rm -rf "$SITE"
if ! "$PY" -m pip install -q --no-deps --no-index --disable-pip-version-check --target "$SITE" "${wheels[@]}" \
    >"$OUT/install.log" 2>&1; then
  echo "pip install failed (see install.log); unpacking the wheels instead"
  "$PY" - "$SITE" "${wheels[@]}" <<'PY'
import sys, zipfile
for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(sys.argv[1])
PY
fi
echo "installed ${#wheels[@]} wheels in $(( $(date +%s) - t0 )) s"

export PYTHONPATH=$ROOT/server:$ROOT/client:$ROOT/webui:$ROOT:$SITE
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if ! "$PY" -c "import diffusers, bitsandbytes, sqlalchemy, grpc, pynvml, paletta_server.server, paletta.v1.job_pb2; \
print('imports ok: diffusers', diffusers.__version__, 'bitsandbytes', bitsandbytes.__version__, 'grpc', grpc.__version__)" \
  > >(grep -v "kernels" | tee -a "$OUT/device.txt") 2>&1; then
  echo "the server does not import (see device.txt)" | tee "$OUT/error.txt"; exit 1
fi
# Optional: turbo's float8 (without it turbo runs bf16), identity's face models (without them it is skipped).
"$PY" - 2>&1 <<'PY' | grep -v "kernels" | tee -a "$OUT/device.txt"
import importlib
for name in ("torchao.quantization", "insightface.app", "facexlib", "onnx", "timm"):
    try:
        importlib.import_module(name)
        print(f"import {name}: ok")
    except Exception as exc:
        print(f"import {name}: {type(exc).__name__}: {str(exc)[:200]}")
PY

left=$(( DEADLINE_S - ($(date +%s) - t0) - 30 ))
(( left > 60 )) || { echo "only ${left} s left after the set-up" | tee "$OUT/error.txt"; exit 1; }
echo "set-up took $(( $(date +%s) - t0 )) s; the benchmark gets ${left} s"
timeout -s INT -k 20 "$left" "$PY" -m tests.bench.gpu --out "$OUT" --budget-s $(( left - 60 )) "$@" 2>&1 \
  | grep --line-buffered -v "Failed to load CPU gemm_4bit" | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
if (( rc == 124 || rc == 137 )); then
  echo "DEADLINE_S reached: the benchmark was cut off (its figures so far are in results.json)"; rc=3
fi
echo "benchmark exit $rc after $(( $(date +%s) - t0 )) s; results in $OUT:"
ls -la "$OUT"
exit "$rc"
