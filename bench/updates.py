#!/usr/bin/env python3
"""Updates under load: inference latency during a hot swap vs steady state, and the time
from ApplyUpdate to the new version serving, for a ~100 MB bundle.  Same agent, same run.
Prints medians and ratios; asserts nothing.

    PYTHONPATH=. python bench/updates.py [--quick] [--json]

The model is a chain of dense layers (``matmul_chain_model``) whose initializers weigh
about 100 MB (``--quick``: about 16 MB).  One client thread runs closed-loop inference on
the agent the whole time; the phases are:

1. steady state (version 1.0.1);
2. ApplyUpdate to 1.0.2 from a directory registry: stage, TUF verification, unpack,
   session, golden vectors, swap; latency of the requests that ran meanwhile, and the time
   from the call to the first response served by 1.0.2;
3. Rollback to 1.0.1 (kept: no download), measured the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from provisioning.bundle import create_bundle  # noqa: E402
from provisioning.demo.models import matmul_chain_model, save_golden  # noqa: E402
from testsupport.inference_support import Agent  # noqa: E402
from testsupport.updates_support import node_state, registry_with  # noqa: E402


def bundle(tmp: Path, version: str, width: int, depth: int, seed: int) -> Path:
    model = matmul_chain_model(tmp / f"big-{version}.onnx", width=width, depth=depth, seed=seed)
    golden = save_golden(tmp / f"big-{version}.npz", {"x": np.ones((1, width), np.float32)})
    return create_bundle(model, name="big", version=version, golden=[golden],
                         out=tmp / f"big-{version}.bundle").path


class Load:
    """One closed-loop tritonclient caller recording (start, end, version) per request."""

    def __init__(self, url: str, width: int) -> None:
        from tritonclient.grpc import InferenceServerClient, InferInput

        self.client = InferenceServerClient(url)
        self.x = np.random.default_rng(0).standard_normal((1, width)).astype(np.float32)
        self.inp = InferInput("x", [1, width], "FP32")
        self.inp.set_data_from_numpy(self.x)
        self.records: list[tuple[float, float, str]] = []
        self.failures = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.perf_counter()
            try:
                result = self.client.infer("big", [self.inp])
            except Exception:  # noqa: BLE001 - counted, the benchmark goes on
                self.failures += 1
                continue
            self.records.append((t0, time.perf_counter(), result.get_response().model_version))

    def between(self, a: float, b: float) -> np.ndarray:
        return np.array([e - s for s, e, _ in self.records if s < b and e > a])  # overlapping [a, b]

    def first_served_by(self, version: str, after: float) -> float:
        return min((e for s, e, v in self.records if v == version and s >= after), default=float("nan"))


def pct(a: np.ndarray, q: float) -> float:
    return float(np.percentile(a, q) * 1e3) if len(a) else float("nan")


def phase(load: Load, node: Any, call: Any, version: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    reply = call()
    t1 = time.perf_counter()
    time.sleep(0.5)  # let requests on the new version arrive
    lat = load.between(t0, t1)
    return {"rpc_s": round(t1 - t0, 3), "to_serving_s": round(load.first_served_by(version, t0) - t0, 3),
            "requests": len(lat), "p50_ms": round(pct(lat, 50), 3), "p99_ms": round(pct(lat, 99), 3),
            "outcome": reply}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a ~16 MB model instead of ~100 MB")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    width, depth = (1024, 4) if args.quick else (2560, 4)
    import grpc

    from agent.proto import node_pb2, node_pb2_grpc

    with tempfile.TemporaryDirectory(prefix="bench-updates-") as tmp_name:
        tmp = Path(tmp_name)
        b1, b2 = bundle(tmp, "1.0.1", width, depth, 0), bundle(tmp, "1.0.2", width, depth, 1)
        size_mb = b2.stat().st_size / 1e6
        reg = registry_with(tmp, [b1, b2])
        state = node_state(tmp / "node" / "state", reg, b1)
        config = tmp / "agent.toml"
        config.write_text(f'[updates]\nsources = ["{reg / "published"}"]\nmount_glob = ""\n')
        agent = Agent(state, "--config", str(config))
        try:
            node = node_pb2_grpc.NodeStub(grpc.insecure_channel(agent.url))  # type: ignore[no-untyped-call]
            load = Load(agent.url, width)
            load.thread.start()
            time.sleep(1.0)  # warm-up
            s0 = time.perf_counter()
            time.sleep(3.0)
            steady = load.between(s0, time.perf_counter())
            apply = phase(load, node, lambda: node.ApplyUpdate(
                node_pb2.ApplyUpdateRequest(targets=["big@1.0.2"]), timeout=600).results[0].outcome, "1.0.2")
            rollback = phase(load, node, lambda: node.Rollback(
                node_pb2.RollbackRequest(name="big", version="1.0.1", reason="bench"),
                timeout=600).result.outcome, "1.0.1")
            load.stop.set()
            load.thread.join(30)
        finally:
            agent.stop()
    result = {
        "bundle_mb": round(size_mb, 1),
        "steady": {"requests": len(steady), "p50_ms": round(pct(steady, 50), 3),
                   "p99_ms": round(pct(steady, 99), 3)},
        "apply": apply, "rollback": rollback, "failed_requests": load.failures,
    }
    for name in ("apply", "rollback"):
        ph = result[name]
        assert isinstance(ph, dict)
        ph["p50_ratio_vs_steady"] = round(ph["p50_ms"] / result["steady"]["p50_ms"], 2)  # type: ignore[index]
        ph["p99_ratio_vs_steady"] = round(ph["p99_ms"] / result["steady"]["p99_ms"], 2)  # type: ignore[index]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        st = result["steady"]
        print(f"bundle {result['bundle_mb']} MB; one closed-loop client; failed requests: {load.failures}")
        print(f"steady state      : p50 {st['p50_ms']:.2f} ms  p99 {st['p99_ms']:.2f} ms  "
              f"({st['requests']} requests)")
        for name in ("apply", "rollback"):
            ph = result[name]
            print(f"during {name:<10} : p50 {ph['p50_ms']:.2f} ms ({ph['p50_ratio_vs_steady']}x)  "
                  f"p99 {ph['p99_ms']:.2f} ms ({ph['p99_ratio_vs_steady']}x)  ({ph['requests']} requests); "
                  f"call {ph['rpc_s']:.2f} s, new version serving after {ph['to_serving_s']:.2f} s "
                  f"[{ph['outcome']}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
