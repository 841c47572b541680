#!/usr/bin/env bash
# Prepare, on this (development) machine, what a lent GPU machine needs to run the benchmark
# `python -m tests.bench.gpu` from source (see /work/shared/notes/gpu.md and tests/bench/gpu_device.sh).
#
# The device has Python 3.12 with torch, transformers, accelerate, peft, grpcio, protobuf, Pillow and
# numpy, no internet, and lacks diffusers, bitsandbytes, torchao, SQLAlchemy and the gRPC extras. This script
# downloads cp312 manylinux wheels for what is missing into .device/wheels (git-ignored), pinned to the
# versions in .venv (grpcio and protobuf too: the generated stubs check the versions they were made
# with), repacks bitsandbytes with only its CUDA 13 library, makes sure the generated stubs in
# client/paletta/v1 are current, and prints the carry size (the device tool carries at most 64 MiB).
#
#   bash tests/bench/device_prep.sh            # download + repack + stubs + size
#   bash tests/bench/device_prep.sh --check    # also install into a temp folder with python3.12 and
#                                              # import / start the server there (no torch needed)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
VENV_PY=${VENV_PY:-$ROOT/.venv/bin/python}
DEST=$ROOT/.device/wheels
FALLBACK=$DEST/fallback   # installed on the device only where its own copy is too old or missing
rm -rf "$FALLBACK"   # small; re-downloaded so no stale version lingers
rm -rf "$ROOT/.device/site"   # made on the device by gpu_device.sh; never carried
mkdir -p "$DEST" "$FALLBACK"

version() { "$VENV_PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

# Required on the device, at .venv's versions.
REQUIRED=(
  "diffusers==$(version diffusers)"
  "bitsandbytes==$(version bitsandbytes)"
  "SQLAlchemy==$(version SQLAlchemy)"
  "greenlet"
  "grpcio==$(version grpcio)"
  "grpcio-status==$(version grpcio-status)"
  "grpcio-health-checking==$(version grpcio-health-checking)"
  "grpcio-reflection==$(version grpcio-reflection)"
  "protobuf==$(version protobuf)"
  "googleapis-common-protos==$(version googleapis-common-protos)"
  "nvidia-ml-py==$(version nvidia-ml-py)"   # device detection goes through NVML (models/device.py)
  "isal==$(version isal)"                   # storage/png.py
  "alembic==$(version alembic)"             # jobs/store.py migrates the schema at start
  "Mako==$(version Mako)"
  "MarkupSafe==$(version MarkupSafe)"
  "torchao==$(version torchao)"             # the turbo profile's float8 (engines/flux.py)
)
# What diffusers needs in versions the device's transformers stack may predate; installed there only
# when the device's own copy does not satisfy diffusers (see gpu_device.sh).
# The oldest releases diffusers accepts: newer huggingface-hub (2.x) needs httpx2, which the device lacks.
FALLBACKS=(
  "huggingface-hub==1.32.0"
  "safetensors==0.8.0"
)
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
          --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --no-deps)

download() {  # download DIR SPEC...: skip specs whose wheel is already there
  local dir=$1; shift
  local missing=()
  for spec in "$@"; do
    local name=${spec%%==*}; name=${name,,}; name=${name//-/_}
    local ver=${spec#*==}; [[ $ver == "$spec" ]] && ver=""
    if ! compgen -G "$dir/${name}-${ver}*.whl" >/dev/null; then missing+=("$spec"); fi
  done
  if ((${#missing[@]})); then
    "$VENV_PY" -m pip download -q "${PLATFORM[@]}" -d "$dir" "${missing[@]}" 2> >(grep -v "is ignored: it is neither" >&2)
  fi
}
download "$DEST" "${REQUIRED[@]}"
download "$FALLBACK" "${FALLBACKS[@]}"

# bitsandbytes ships every CUDA / ROCm / XPU build (about 43 MB); the device runs torch cu130, so keep
# the CUDA 13 libraries (and the CPU one, which bitsandbytes may load when no GPU is visible).
"$VENV_PY" - "$DEST" <<'PY'
import base64, hashlib, re, sys, zipfile
from pathlib import Path

dest = Path(sys.argv[1])
for wheel in dest.glob("bitsandbytes-*.whl"):
    with zipfile.ZipFile(wheel) as zin:
        names = zin.namelist()
        libs = [n for n in names if re.search(r"libbitsandbytes_[^/]*\.(so|dll|dylib)$", n)]
        keep = [n for n in libs if re.search(r"_cuda13\d*\.so$|_cpu\.so$", n)]
        drop = set(libs) - set(keep)
        if not drop:
            print(f"{wheel.name}: already repacked ({wheel.stat().st_size / 1e6:.1f} MB), keeps {keep}")
            continue
        if not any("cuda13" in n for n in keep):
            sys.exit(f"{wheel.name}: no CUDA 13 library in {libs}")
        tmp = wheel.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
            record_name = next(n for n in names if n.endswith(".dist-info/RECORD"))
            for name in names:
                if name in drop or name == record_name:
                    continue
                zout.writestr(zin.getinfo(name), zin.read(name))
            lines = [line for line in zin.read(record_name).decode().splitlines()
                     if line and line.split(",")[0] not in drop]
            zout.writestr(record_name, "\n".join(lines) + "\n")
    before = wheel.stat().st_size
    tmp.replace(wheel)
    print(f"{wheel.name}: {before / 1e6:.1f} MB -> {wheel.stat().st_size / 1e6:.1f} MB, keeps {keep}")
PY

# The generated stubs are git-ignored, so the device gets them by carry; regenerate them when a
# .proto is newer than the stubs (hatch_build.generate_stubs, without hatchling itself).
STUBS=$ROOT/client/paletta/v1
newest_proto=$(find "$ROOT/proto" -name '*.proto' -newer "$STUBS/job_pb2.py" 2>/dev/null | head -1 || true)
if [[ ! -f $STUBS/job_pb2.py || -n $newest_proto ]]; then
  echo "regenerating stubs in client/paletta/v1"
  "$VENV_PY" - "$ROOT" <<'PY'
import sys, types
from pathlib import Path

for name in ("hatchling", "hatchling.builders", "hatchling.builders.hooks", "hatchling.builders.hooks.plugin",
             "hatchling.builders.hooks.plugin.interface"):
    sys.modules.setdefault(name, types.ModuleType(name))
sys.modules["hatchling.builders.hooks.plugin.interface"].BuildHookInterface = object
sys.path.insert(0, sys.argv[1])
from hatch_build import generate_stubs

print(len(generate_stubs(Path(sys.argv[1]))), "stub files")
PY
fi

echo "wheels in .device/wheels:"
ls -la "$DEST"/*.whl "$FALLBACK"/*.whl | awk '{printf "  %8.2f MB  %s\n", $5 / 1e6, $NF}'
total=$(du -cb "$ROOT/.device" "$STUBS" | tail -1 | cut -f1)
printf 'carry [".device", "client/paletta/v1"]: %.1f MiB (limit 64 MiB)\n' "$(echo "$total / 1048576" | bc -l)"
if ((total > 60 * 1048576)); then echo "carry too large" >&2; exit 1; fi

if [[ ${1:-} == --check ]]; then
  # Install the wheels as the device will and import what needs no torch, with Python 3.12.
  PY312=${PY312:-}
  for candidate in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    if [[ -z $PY312 ]] && "$candidate" -c "" 2>/dev/null; then PY312=$candidate; fi
  done
  [[ -n $PY312 ]] || { echo "no python3.12 here; skipping --check" >&2; exit 0; }
  CHECK=$(mktemp -d)
  trap 'rm -rf "$CHECK"' EXIT
  "$PY312" -m pip install -q --no-deps --target "$CHECK/site" "$DEST"/*.whl "$FALLBACK"/*.whl
  # The device has these already; the check Python 3.12 here does not.
  "$PY312" -m pip install -q --target "$CHECK/base" numpy Pillow typing-extensions filelock requests regex tqdm \
    pyyaml packaging "huggingface-hub==1.32.0" 2> >(grep -v "is ignored: it is neither" >&2)
  PYTHONPATH=server:client:webui:.:$CHECK/site:$CHECK/base "$PY312" - <<'PY'
import asyncio, importlib, sys, tempfile
from pathlib import Path

for name in ("grpc", "google.protobuf", "google.rpc.status_pb2", "grpc_status.rpc_status", "grpc_health.v1.health",
             "grpc_reflection.v1alpha.reflection", "sqlalchemy", "greenlet", "pynvml", "diffusers",
             "huggingface_hub", "safetensors", "isal.isal_zlib", "paletta_server.storage.png", "paletta", "paletta.v1.job_pb2", "paletta.v1.generate_service_pb2_grpc",
             "paletta_server.server"):
    module = importlib.import_module(name)
    print(f"  ok {name} {getattr(module, '__version__', '')}")

async def main():
    import paletta
    from paletta_server.config import load_config
    from paletta_server.server import PalettaServer

    server = PalettaServer(load_config(Path(tempfile.mkdtemp()), env={}, profile="fast", port=0))
    port = await server.start()
    async with paletta.AsyncClient(f"127.0.0.1:{port}") as client:
        status = await client.status()
        print(f"  server on Python {sys.version.split()[0]} without torch: device {status.device!r}, "
              f"quantization {status.quantization!r}, {len(await client.list_models())} models")
    await server.stop(0)

asyncio.run(main())
PY
  echo "check passed"
fi
