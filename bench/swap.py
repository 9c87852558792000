#!/usr/bin/env python3
"""Latency of a small model while the agent hot-swaps a ~100 MB bundle of another model.
Prints figures and ratios measured in one run; asserts nothing.

    PYTHONPATH=. python bench/swap.py [--rounds N] [--concurrency C] [--quick] [--json]
    PYTHONPATH=. python bench/swap.py --py-spy prof.txt   # which stacks hold the GIL during swaps

A real agent (its own process, insecure loopback gRPC: the swap path does not depend on TLS)
serves ``tiny`` (y = 2x + 1) and ``big`` 1.0.1 (dense layers whose weights weigh ~100 MB;
``--quick``: ~16 MB).  C closed-loop tritonclient (asyncio) callers infer on ``tiny`` the
whole time.  Each round:

1. steady window (no swap): latency of the requests that ran in it;
2. ApplyUpdate ``big`` to the next version from a directory TUF registry: download, TUF
   and manifest hashes, unpack, model-reference gate, session, golden vectors, switch.  The
   swap window runs from the call to its reply; every request that overlapped it counts;
3. a short pause so the next steady window starts clean.

Figures are medians over rounds of each round's p50, p99 and max; failed requests are summed.
The goal (issue #14): p99 during the swap <= 2x steady p99, zero failed requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.request_cpu import top_of_profile  # noqa: E402
from provisioning.bundle import create_bundle  # noqa: E402
from provisioning.demo.models import affine_model, matmul_chain_model, save_golden  # noqa: E402
from testsupport.inference_support import Agent, make_bundle  # noqa: E402
from testsupport.updates_support import node_state, registry_with  # noqa: E402

BIG_WIDTH, BIG_DEPTH = 2560, 4  # 4 x 2560 x 2560 FP32 weights: ~105 MB
QUICK_WIDTH = 1024  # ~16 MB


def big_bundle(tmp: Path, version: str, width: int, seed: int) -> Path:
    model = matmul_chain_model(tmp / f"big-{version}.onnx", width=width, depth=BIG_DEPTH, seed=seed)
    golden = save_golden(tmp / f"big-{version}.npz", {"x": np.ones((1, width), np.float32)})
    bundle = create_bundle(model, name="big", version=version, golden=[golden],
                           out=tmp / f"big-{version}.bundle").path
    model.unlink()  # the bundle holds it; keep the temp dir small
    return bundle


class Load:
    """C closed-loop asyncio callers on ``tiny``, in a thread of their own; each request is
    recorded as (start, end, ok)."""

    def __init__(self, url: str, concurrency: int) -> None:
        self.url = url
        self.concurrency = concurrency
        self.records: list[tuple[float, float, bool]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    async def _main(self) -> None:
        from tritonclient.grpc.aio import InferenceServerClient, InferInput

        client = InferenceServerClient(self.url)
        inp = InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(np.ones((1, 4), np.float32))

        async def caller() -> None:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    await client.infer("tiny", [inp])
                    ok = True
                except Exception as exc:  # noqa: BLE001 - counted and shown; the load goes on
                    ok = False
                    if len(self.errors) < 5:
                        self.errors.append(str(exc)[:300])
                self.records.append((t0, time.perf_counter(), ok))

        try:
            await asyncio.gather(*(caller() for _ in range(self.concurrency)))
        finally:
            await client.close()

    def window(self, a: float, b: float) -> dict[str, float]:
        """Latency figures (ms) of the requests that overlapped [a, b]."""
        rows = [(e - s, ok) for s, e, ok in list(self.records) if s < b and e > a]
        lat = np.array([d for d, ok in rows if ok]) * 1e3
        return {"requests": len(rows), "failed": sum(1 for _, ok in rows if not ok),
                "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
                "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
                "max_ms": float(lat.max()) if len(lat) else float("nan")}


def apply_update(node: Any, pb: Any, version: str) -> tuple[float, float, str]:
    t0 = time.perf_counter()
    reply = node.ApplyUpdate(pb.ApplyUpdateRequest(targets=[f"big@{version}"]), timeout=600)
    t1 = time.perf_counter()
    result = reply.results[0]
    return t0, t1, f"{result.outcome}: {result.detail}" if result.outcome != "applied" else "applied"


class Spy:
    """py-spy sampling only the threads that hold the GIL (``--gil``), in raw collapsed form."""

    def __init__(self, pid: int, raw: Path) -> None:
        spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
        if spy is None:
            raise SystemExit("--py-spy needs py-spy (pip install py-spy into the venv)")
        self.proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--format", "raw", "--rate",
                                      "200", "-o", str(raw), "--nonblocking", "--gil", "--threads"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)

    def stop(self) -> None:
        self.proc.send_signal(2)  # SIGINT: py-spy writes what it has and exits
        self.proc.wait(60)


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import grpc

    from agent.proto import node_pb2, node_pb2_grpc

    width = QUICK_WIDTH if args.quick else BIG_WIDTH
    versions = [f"1.0.{i + 1}" for i in range(args.rounds + 1)]
    tiny = make_bundle(tmp, affine_model(tmp / "tiny.onnx"), "tiny", "1", {"x": np.ones((1, 4), np.float32)})
    bigs = [big_bundle(tmp, v, width, seed=i) for i, v in enumerate(versions)]
    reg = registry_with(tmp, bigs)
    for b in bigs[1:]:
        b.unlink()  # published into the registry; only the installed one is needed here
    state = node_state(tmp / "node" / "state", reg, tiny, bigs[0])
    config = tmp / "agent.toml"
    config.write_text(f'[updates]\nsources = ["{reg / "published"}"]\nmount_glob = ""\n'
                      "keep_versions = 1\n")
    agent = Agent(state, "--config", str(config))
    rounds: list[dict[str, Any]] = []
    spy: Spy | None = None
    try:
        node = node_pb2_grpc.NodeStub(grpc.insecure_channel(agent.url))  # type: ignore[no-untyped-call]
        load = Load(agent.url, args.concurrency)
        load.start()
        time.sleep(1.5)  # warm-up: the inline measurement of tiny settles
        raws: list[Path] = []
        for version in versions[1:]:
            s0 = time.perf_counter()
            time.sleep(args.steady)
            steady = load.window(s0, time.perf_counter())
            if args.py_spy is not None:  # sampled during the swap only
                raws.append(args.py_spy.with_suffix(f".{version}.raw"))
                spy = Spy(agent.proc.pid, raws[-1])
            t0, t1, outcome = apply_update(node, node_pb2, version)
            if spy is not None:
                spy.stop()
            during = load.window(t0, t1)
            rounds.append({"version": version, "call_s": t1 - t0, "outcome": outcome,
                           "steady": steady, "swap": during})
            time.sleep(0.5)
        if raws:
            raw = args.py_spy.with_suffix(".raw")
            raw.write_text("".join(r.read_text() for r in raws))
            args.py_spy.write_text(top_of_profile(raw, limit=40) + "\n")
        load.stop()
    finally:
        agent.stop()
    size = sum(f.stat().st_size for f in (reg / "published" / "targets").rglob("*big*")) / len(bigs)
    return {"bundle_mb": size / 1e6, "concurrency": args.concurrency, "rounds": rounds,
            "errors": load.errors}


def summary(result: dict[str, Any]) -> dict[str, Any]:
    rounds = result["rounds"]

    def med(phase: str, key: str) -> float:
        return float(statistics.median(r[phase][key] for r in rounds))

    out: dict[str, Any] = {"bundle_mb": round(result["bundle_mb"], 1),
                           "concurrency": result["concurrency"], "rounds": len(rounds)}
    for phase in ("steady", "swap"):
        out[phase] = {k: round(med(phase, k), 3) for k in ("p50_ms", "p99_ms", "max_ms")}
        out[phase]["requests"] = sum(r[phase]["requests"] for r in rounds)
        out[phase]["failed"] = sum(r[phase]["failed"] for r in rounds)
    out["swap_p99_vs_steady_p99"] = round(out["swap"]["p99_ms"] / out["steady"]["p99_ms"], 2)
    out["call_s"] = round(float(statistics.median(r["call_s"] for r in rounds)), 2)
    out["outcomes"] = sorted({r["outcome"] for r in rounds})
    out["errors"] = result["errors"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="swaps to measure (one bundle each)")
    ap.add_argument("--concurrency", type=int, default=4, help="closed-loop callers on tiny")
    ap.add_argument("--steady", type=float, default=2.0, help="seconds of each steady window")
    ap.add_argument("--quick", action="store_true", help="a ~16 MB bundle instead of ~100 MB")
    ap.add_argument("--json", action="store_true", help="print JSON only")
    ap.add_argument("--py-spy", type=Path, default=None, metavar="FILE",
                    help="sample the GIL holder during the rounds; write the top stacks to FILE")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-swap-") as tmp:
        result = run(args, Path(tmp))
    out = summary(result)
    if args.json:
        print(json.dumps(out | {"per_round": result["rounds"]}, indent=2))
        return 0
    print(f"hot swap of a {out['bundle_mb']} MB bundle while {out['concurrency']} closed-loop callers "
          f"infer on tiny; median of {out['rounds']} round(s); ApplyUpdate takes {out['call_s']} s")
    print(f"{'window':8} {'requests':>8} {'failed':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for phase in ("steady", "swap"):
        p = out[phase]
        print(f"{phase:8} {p['requests']:>8} {p['failed']:>6} {p['p50_ms']:>8.2f} {p['p99_ms']:>8.2f} "
              f"{p['max_ms']:>8.2f}")
    print(f"swap p99 / steady p99: {out['swap_p99_vs_steady_p99']}x (goal <= 2x); "
          f"outcomes: {', '.join(out['outcomes'])}")
    for err in out["errors"]:
        print(f"  error: {err}")
    if args.py_spy is not None:
        print(args.py_spy.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
