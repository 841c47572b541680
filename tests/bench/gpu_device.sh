#!/usr/bin/env bash
# The one command to run on a lent GPU machine: install the carried wheels, then the full-size benchmark.
#
#   here, first:    bash tests/bench/device_prep.sh --check      (wheels into .device/, stubs, carry size)
#   on the device:  bash tests/bench/gpu_device.sh [benchmark args]   with carry [".device", "client/paletta/v1"]
#
# Results go to $OUT (the device tool's folder; bench-out/gpu otherwise) as the run goes:
# results.json (see tests/bench/gpu.py), summary.md, device.txt (versions), install.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${OUT:-$ROOT/bench-out/gpu}
mkdir -p "$OUT"
SITE=$ROOT/.device/site
WHEELS=$ROOT/.device/wheels
BENCH_TIMEOUT=${BENCH_TIMEOUT:-420}
t0=$(date +%s)

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
"$PY" -c "import diffusers, bitsandbytes, sqlalchemy, grpc, pynvml, paletta_server.server, paletta.v1.job_pb2; \
print('imports ok: diffusers', diffusers.__version__, 'bitsandbytes', bitsandbytes.__version__, 'grpc', grpc.__version__)" \
  2>&1 | grep -v "kernels" | tee -a "$OUT/device.txt"

timeout -k 10 "$BENCH_TIMEOUT" "$PY" -m tests.bench.gpu --out "$OUT" "$@" 2>&1 | grep -v "Failed to load CPU gemm_4bit"
rc=${PIPESTATUS[0]}
echo "benchmark exit $rc after $(( $(date +%s) - t0 )) s; results in $OUT:"
ls -la "$OUT"
exit "$rc"
