#!/usr/bin/env bash
# #8's CUDA-provider run, as one script for a lent NVIDIA machine that reaches no registry.
# The agent runs from the project's wheel (not this checkout) with onnxruntime-gpu and the
# machine's own CUDA libraries (the nvidia-* wheels its Python has).  Carry:
#   .ortcN/part        onnxruntime-gpu's wheel contents as one tar.xz in parts of 61 MiB (the
#                      carry limit is 64 MiB a call).  Carried paths do not outlive a call, so
#                      each call on the warm machine first moves its part to /tmp/ortpartN:
#                        run(carry=[".ortc0"], command="cp .ortc0/part /tmp/ortpart0"), ...
#                      and the last one runs this script.  ORT_SHA256: the whole's sha256.
#   .devicekit/wheels  sovereign_appliance-*.whl and its runtime wheels for that Python
# Writes its findings under $OUT (or /tmp/gpu-out).  Takes about three minutes.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-provider.log") 2>&1
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
echo "== machine"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -V
for i in 0 1 2 3; do [ -f .ortc$i/part ] && cp .ortc$i/part /tmp/ortpart$i; done
PARTS=(/tmp/ortpart0 /tmp/ortpart1 /tmp/ortpart2 /tmp/ortpart3)
got=$(cat "${PARTS[@]}" | sha256sum | cut -d' ' -f1)
[ "$got" = "${ORT_SHA256:-}" ] || { echo "onnxruntime-gpu parts: sha256 $got, expected ${ORT_SHA256:-?}"; exit 1; }
SITE=/tmp/site; rm -rf "$SITE"; mkdir -p "$SITE"
cat "${PARTS[@]}" | python3 -c \
  "import sys, tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall('$SITE', filter='data')"
python3 -m pip install -q --no-deps --no-index --no-compile --target "$SITE" .devicekit/wheels/*.whl \
  2>&1 | grep -v "^WARNING" | tail -3
export PYTHONPATH=$SITE
# The CUDA 13 libraries of this machine's Python, as an image's agent venv would hold them.
NV=$(python3 -c "import os, nvidia; print(':'.join(sorted({r for p in nvidia.__path__ for r, _, fs in os.walk(p) if any('.so.' in f for f in fs)})))")
[ -d /usr/local/cuda/lib64 ] && NV=${NV:+$NV:}/usr/local/cuda/lib64
export LD_LIBRARY_PATH=$NV${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
echo "CUDA libraries from: $LD_LIBRARY_PATH"
cd /tmp  # so `python -m provisioning.cli` finds the wheel's package, not the checkout's
python3 - <<'PY'
import onnxruntime as o, agent, provisioning
from agent.ort import usable_providers, cuda_libraries
from onnxruntime.capi import build_and_package_info as info
print("onnxruntime", o.__version__, "built for CUDA", info.cuda_version, o.get_available_providers())
print("agent from", agent.__file__, "| provisioning from", provisioning.__file__)
print("libraries checked:", cuda_libraries(info.cuda_version))
print("usable providers (agent.ort):", usable_providers())
PY
# name, then bench/gpu_provider.py's arguments; each writes $OUT/gpu-provider-NAME.json
run() {
  local name=$1; shift
  echo "== $name: the agent on CUDA against the agent on CPU ($*)"
  python3 "$REPO/bench/gpu_provider.py" --json --keep "/tmp/gp-$name" "$@" > "$OUT/gpu-provider-$name.json"
  local rc=$?; cat "$OUT/gpu-provider-$name.json"; echo "rc=$rc"
  [ $rc -eq 0 ] || tail -20 "/tmp/gp-$name/agent-tested.log"
}
run 1024x16-b64
run 1024x16-b512 --batch 512 --requests 40
run 1024x16-b512-tf32 --batch 512 --requests 40 --tf32 --atol 1e-2 --rtol 1e-2
run 256x4-b1 --width 256 --depth 4 --batch 1 --requests 300
cp /tmp/gp-1024x16-b512/agent-tested.log "$OUT/agent-cuda.log" 2>/dev/null
echo "== done"
