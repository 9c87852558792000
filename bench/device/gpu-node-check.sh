#!/usr/bin/env bash
# The GPU checks of the health (#4) and GPU-layer (#8) issues, as one short script for a lent
# NVIDIA machine that reaches no package registry.  Carry .devicekit/wheels (our runtime
# wheels for that machine's Python) and agent/proto (the generated modules).  Writes what it
# finds under $OUT (or /tmp/gpu-out).  Takes about two minutes.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-node-check.log") 2>&1
cd "$(dirname "$0")/../.."
echo "== machine"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -V
python3 -m pip install -q --no-deps --no-index --find-links .devicekit/wheels --target /tmp/deps \
  grpcio grpcio-health-checking grpcio-reflection protobuf tuf securesystemslib cryptography \
  cffi pycparser prometheus-client urllib3 grpcio-tools 2>&1 | grep -v "^WARNING" | tail -3
export PYTHONPATH=$PWD:/tmp/deps
python3 - <<'PY'
import onnxruntime as o, pynvml
print("onnxruntime", o.__version__, o.get_available_providers())
from agent.ort import usable_providers; print("usable providers (agent.ort):", usable_providers())
PY
echo "== sampler against real NVML (bench/gpu_check.py)"
python3 bench/gpu_check.py --seconds 3 > "$OUT/gpu_check.txt" 2>&1; echo "rc=$?"
head -c 6000 "$OUT/gpu_check.txt"; echo; grep -E "^DCGM_FI_DEV_(GPU_TEMP|POWER_USAGE|FB_USED|XID)" "$OUT/gpu_check.txt" | head -8
echo "== agent with real NVML; appliance node health / inventory"
ST=$(mktemp -d); python3 -m provisioning.cli agent serve --state-dir "$ST" --port 18001 --metrics-port 18002 > "$OUT/agent.log" 2>&1 &
AGENT=$!
for i in $(seq 1 120); do grep -q "agent: serving on" "$OUT/agent.log" && break; sleep 0.5; done
python3 -m provisioning.cli node health --target 127.0.0.1:18001 | tee "$OUT/node-health.txt"
python3 -m provisioning.cli node inventory --target 127.0.0.1:18001 --json > "$OUT/node-inventory.json"; head -c 2500 "$OUT/node-inventory.json"; echo
python3 - <<'PY' | tee "$OUT/metrics.txt"
import urllib.request
text = urllib.request.urlopen("http://127.0.0.1:18002/metrics", timeout=10).read().decode()
print("\n".join(l for l in text.splitlines() if l.startswith(("DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_XID", "DCGM_FI_DEV_ECC_DBE_VOL", "appliance_node_health"))))
PY
python3 - "$AGENT" <<'PY'
import psutil, sys, time
p = psutil.Process(int(sys.argv[1])); c0 = p.cpu_times(); time.sleep(30); c1 = p.cpu_times()
busy = (c1.user - c0.user) + (c1.system - c0.system)
print(f"idle agent CPU over 30 s with real NVML: {busy / 30 * 100:.3f} % of a core")
PY
kill -TERM $AGENT; wait $AGENT; echo "agent exit $?"
echo "== CUDA provider vs CPU (only if this onnxruntime has CUDA)"
python3 - <<'PY'
import time, tempfile, numpy as np, onnxruntime as o
from pathlib import Path
from agent.ort import usable_providers
if "CUDAExecutionProvider" not in usable_providers():
    print("onnxruntime", o.__version__, "here cannot use CUDA (providers usable:", usable_providers(), "): comparison not run"); raise SystemExit(0)
from provisioning.demo.models import matmul_chain_model
m = matmul_chain_model(Path(tempfile.mkdtemp()) / "m.onnx", width=1024, depth=16)
x = np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32)
res = {}
for prov in ("CPUExecutionProvider", "CUDAExecutionProvider"):
    s = o.InferenceSession(str(m), providers=[prov]); y = s.run(None, {"x": x})[0]
    assert s.get_providers()[0] == prov, s.get_providers()
    for _ in range(3): s.run(None, {"x": x})
    ts = []
    for _ in range(20):
        t = time.perf_counter(); s.run(None, {"x": x}); ts.append(time.perf_counter() - t)
    res[prov] = (y, float(np.median(ts)))
    print(prov, s.get_providers()[0], f"median {res[prov][1]*1e3:.3f} ms")
d = float(np.max(np.abs(res["CPUExecutionProvider"][0] - res["CUDAExecutionProvider"][0])))
print(f"max |CPU-CUDA| = {d:.3g}; within atol 1e-3: {d <= 1e-3}; speed-up {res['CPUExecutionProvider'][1]/res['CUDAExecutionProvider'][1]:.1f}x")
PY
echo "== done"
