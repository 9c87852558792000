#!/usr/bin/env python3
"""Agent (gRPC, tritonclient and perf_analyzer) vs ONNX Runtime in-process: same models,
same machine, same run.  Prints medians and ratios; asserts nothing.

    PYTHONPATH=. python bench/inference.py [--quick]

1. small model, concurrency 1: added p50 latency (goal <= 250 us) and p99;
2. compute-heavy model (>= 2 ms per call): throughput agent / in-process (goal >= 0.85);
3. batchable model at concurrency 16 (perf_analyzer): dynamic batching / none (goal >= 2x),
   and batching / in-process one request at a time;
4. agent RSS idle with no model, and per loaded model over the session's own size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.bundle import Batching  # noqa: E402
from agent.ort import make_session  # noqa: E402
from provisioning.demo.models import affine_model, matmul_chain_model  # noqa: E402
from testsupport.inference_support import Agent, install, make_bundle  # noqa: E402

HEAVY_W, HEAVY_ROWS = 512, 128
MLP_W = 1024


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def timed(fn: Any, n: int, warm: int = 20) -> np.ndarray:
    for _ in range(warm):
        fn()
    out = np.empty(n)
    for i in range(n):
        t = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t
    return out


def inprocess(model: Path, x: np.ndarray, n: int) -> np.ndarray:
    session = make_session(model.read_bytes())
    return timed(lambda: session.run(None, {"x": x}), n)


def interleaved(model: Path, url: str, name: str, x: np.ndarray, n: int,
                rounds: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """In-process and agent timings taken in alternating blocks, so that load from other
    processes on the machine falls on both alike."""
    import tritonclient.grpc as tc

    session = make_session(model.read_bytes())
    client = tc.InferenceServerClient(url)
    inp = tc.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    ref, got = [], []
    try:
        for _ in range(rounds):
            ref.append(timed(lambda: session.run(None, {"x": x}), max(1, n // rounds), warm=3))
            got.append(timed(lambda: client.infer(name, [inp]), max(1, n // rounds), warm=3))
    finally:
        client.close()
    return np.concatenate(ref), np.concatenate(got)


def perf_analyzer(url: str, name: str, concurrency: int, seconds: float, shape: str = "") -> dict[str, float]:
    pa = ROOT / ".tools" / "perf_analyzer"
    if not pa.exists():
        subprocess.run([str(ROOT / "bench" / "tools" / "get-perf-analyzer")], check=True,
                       env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}, capture_output=True)
    with tempfile.NamedTemporaryFile(suffix=".csv") as csv:
        argv = [str(pa), "-i", "grpc", "-u", url, "-m", name, "--concurrency-range",
                f"{concurrency}:{concurrency}", "--measurement-interval", str(int(seconds * 1000)),
                "--percentile", "50", "-f", csv.name, "--max-trials", "3", "--stability-percentage", "999"]
        if shape:
            argv += ["--shape", shape]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
        header, row = Path(csv.name).read_text().splitlines()[:2]
    data = dict(zip(header.split(","), row.split(","), strict=True))
    return {"throughput": float(data["Inferences/Second"]),
            "p50_us": float(data["p50 latency"]), "p99_us": float(data["p99 latency"])}


def us(a: np.ndarray, q: float) -> float:
    return float(np.percentile(a, q) * 1e6)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    args = parser.parse_args()
    n = 300 if args.quick else 2000
    secs = 1.0 if args.quick else 3.0
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        small_m = affine_model(tmp / "small.onnx")
        heavy_m = matmul_chain_model(tmp / "heavy.onnx", width=HEAVY_W, depth=8)
        mlp_m = matmul_chain_model(tmp / "mlp.onnx", width=MLP_W, depth=8)
        x_small = np.ones((1, 4), np.float32)
        x_heavy = np.random.default_rng(0).standard_normal((HEAVY_ROWS, HEAVY_W)).astype(np.float32)
        x_mlp = np.ones((1, MLP_W), np.float32)
        state = tmp / "state"
        install(state,
                make_bundle(tmp, small_m, "small", "1", {"x": x_small}),
                make_bundle(tmp, heavy_m, "heavy", "1", {"x": x_heavy[:1]}),
                make_bundle(tmp, mlp_m, "mlp", "1", {"x": x_mlp}, Batching(16, 1000, ())))

        # 4 (first, before anything is loaded): RSS idle
        empty = tmp / "empty"
        empty.mkdir()
        idle = Agent(empty)
        time.sleep(1)
        results["rss_idle_mib"] = rss_kib(idle.proc.pid) / 1024
        idle.stop()

        agent = Agent(state)
        unbatched = Agent(state, "--no-dynamic-batching")
        try:
            time.sleep(1)
            loaded_rss = rss_kib(agent.proc.pid) / 1024
            # 1: small model, concurrency 1
            ref, got = interleaved(small_m, agent.url, "small", x_small, n)
            pa_small = perf_analyzer(agent.url, "small", 1, secs, "x:1,4")
            results["small"] = {
                "inprocess_p50_us": us(ref, 50), "inprocess_p99_us": us(ref, 99),
                "tritonclient_p50_us": us(got, 50), "tritonclient_p99_us": us(got, 99),
                "added_p50_us_tritonclient": us(got, 50) - us(ref, 50),
                "added_p99_us_tritonclient": us(got, 99) - us(ref, 99),
                "perf_analyzer_p50_us": pa_small["p50_us"], "perf_analyzer_p99_us": pa_small["p99_us"],
                "added_p50_us_perf_analyzer": pa_small["p50_us"] - us(ref, 50),
                "added_p99_us_perf_analyzer": pa_small["p99_us"] - us(ref, 99),
            }
            # 2: compute-heavy model, concurrency 1
            m = max(30, n // 20)
            ref, got = interleaved(heavy_m, agent.url, "heavy", x_heavy, m)
            results["heavy"] = {
                "inprocess_ms_per_call": float(np.median(ref) * 1e3),
                "agent_ms_per_call": float(np.median(got) * 1e3),
                "throughput_ratio_agent_over_inprocess": float(np.median(ref) / np.median(got)),
            }
            # 3: batchable model, concurrency 16
            ref = inprocess(mlp_m, x_mlp, n)
            batched = perf_analyzer(agent.url, "mlp", 16, secs)
            plain = perf_analyzer(unbatched.url, "mlp", 16, secs)
            results["batchable"] = {
                "inprocess_one_at_a_time_per_s": float(1 / np.median(ref)),
                "agent_batching_per_s": batched["throughput"],
                "agent_no_batching_per_s": plain["throughput"],
                "ratio_batching_over_none": batched["throughput"] / plain["throughput"],
                "ratio_batching_over_inprocess": batched["throughput"] * float(np.median(ref)),
            }
            # 4: RSS per loaded model over the session's own size
            probe = ("import sys;from agent.ort import make_session;from pathlib import Path;"
                     "r=lambda:int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0]"
                     ".split()[1]);a=r();s=[make_session(Path(p).read_bytes()) for p in sys.argv[1:]];"
                     "print(r()-a)")
            argv = [sys.executable, "-c", probe, str(small_m), str(heavy_m), str(mlp_m)]
            proc = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=ROOT)
            session_kib = int(proc.stdout)
            per_model = (loaded_rss - results["rss_idle_mib"]) / 3
            results["rss"] = {"idle_mib": results.pop("rss_idle_mib"), "three_models_mib": loaded_rss,
                              "per_model_mib": per_model,
                              "sessions_alone_per_model_mib": session_kib / 1024 / 3,
                              "overhead_per_model_mib": per_model - session_kib / 1024 / 3}
        finally:
            agent.stop()
            unbatched.stop()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
