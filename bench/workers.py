#!/usr/bin/env python3
"""1 vs 2 serving processes (``[server] workers``) on the tiny model, and RSS per model for the two
multi-core designs.  A real agent over mTLS driven by perf_analyzer; prints figures; asserts nothing.

    PYTHONPATH=. python bench/workers.py [--seconds S] [--rounds N] [--json]

For workers = 1 and 2 (in turn, every round), tiny at concurrency 1 and 16:
- req/s, p50, p99 as perf_analyzer measures them; perf_analyzer gets one connection per
  concurrent request (TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT=1), as many clients would
  have: the kernel spreads connections, not requests, over the workers;
- server CPU per request: CPU seconds of every agent process (supervisor and workers) over
  the run / requests answered (the agent's statistics, which are totals over its workers);
- RSS of each agent process and their total.

RSS per model: an agent serving nothing, tiny, or mlp (workers = 1) gives the gRPC process's
base and each model's share; a bare Python process holding only ONNX Runtime and one session
gives what a model worker of the other design (one front process, model workers behind it)
would cost.  On a 2-core machine perf_analyzer needs CPU too: the 2-worker figures there show
the cost of the design more than its gain.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from request_cpu import MLP_DEPTH, MLP_W, Pki, answered, perf_analyzer_bin  # noqa: E402

from provisioning.demo.models import affine_model, matmul_chain_model  # noqa: E402
from testsupport.inference_support import Agent, install, make_bundle  # noqa: E402

CONCURRENCY = (1, 16)
WORKERS = (1, 2)
MODEL_WORKER = """
import sys, psutil, numpy as np
from agent.ort import make_session
me = psutil.Process()
base = me.memory_info().rss
session = make_session(open(sys.argv[1], "rb").read())
x = np.ones(tuple(int(d) for d in sys.argv[2].split(",")), np.float32)
for _ in range(100):
    session.run(None, {"x": x})
print(base, me.memory_info().rss)
"""


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def rss_mib(procs: list[psutil.Process]) -> list[float]:
    out = []
    for p in procs:
        try:
            out.append(p.memory_info().rss / 2**20)
        except psutil.Error:
            continue
    return out


def load(pki: Pki, agent: Agent, concurrency: int, seconds: float) -> dict[str, float]:
    """perf_analyzer against tiny; CPU of the whole agent tree around the run."""
    client = pki.client(agent.url)
    procs = tree(agent.proc.pid)
    try:
        ok0, _ = answered(client, "tiny")
        cpu0 = cpu_seconds(procs)
        with tempfile.NamedTemporaryFile(suffix=".csv") as csv:
            argv = [perf_analyzer_bin(), "-i", "grpc", "-u", agent.url, "-m", "tiny",
                    "--concurrency-range", f"{concurrency}:{concurrency}",
                    "--measurement-interval", str(int(seconds * 1000)), "--percentile", "50",
                    "--max-trials", "3", "--stability-percentage", "999", "-f", csv.name,
                    "--shape", "x:1,4", *pki.perf_analyzer_args()]
            env = dict(os.environ, TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT="1")
            proc = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
            cpu1 = cpu_seconds(procs)
            if proc.returncode != 0:
                raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
            header, row = Path(csv.name).read_text().splitlines()[:2]
        ok1, _ = answered(client, "tiny")
    finally:
        client.close()
    data = dict(zip(header.split(","), row.split(","), strict=True))
    rss = rss_mib(procs)
    return {"throughput_per_s": float(data["Inferences/Second"]),
            "p50_us": float(data["p50 latency"]), "p99_us": float(data["p99 latency"]),
            "cpu_us_per_request": (cpu1 - cpu0) / max(1, ok1 - ok0) * 1e6,
            "rss_total_mib": sum(rss), "rss_max_process_mib": max(rss), "processes": len(rss)}


def start(pki: Pki, tmp: Path, state: Path, workers: int) -> Agent:
    toml = pki.agent_toml(tmp / f"agent-{workers}.toml")
    toml.write_text(toml.read_text().replace("[server]\n", f"[server]\nworkers = {workers}\n"))
    return Agent(state, "--config", str(toml), entry=("agent",))  # the node's entry point


def serving_rounds(pki: Pki, tmp: Path, state: Path, rounds: int, seconds: float,
                   ) -> dict[str, dict[str, float]]:
    runs: dict[str, list[dict[str, float]]] = collections.defaultdict(list)
    for _ in range(rounds):
        for workers in WORKERS:
            agent = start(pki, tmp, state, workers)
            try:
                for conc in CONCURRENCY:
                    runs[f"w{workers} c{conc}"].append(load(pki, agent, conc, seconds))
            finally:
                agent.stop()
    return {k: {m: float(statistics.median(r[m] for r in v)) for m in v[0]} for k, v in runs.items()}


def agent_rss(pki: Pki, tmp: Path, state: Path) -> float:
    """RSS (MiB) of a one-process agent serving what ``state`` holds, after a little traffic."""
    agent = start(pki, tmp, state, 1)
    try:
        time.sleep(1.0)
        return rss_mib([psutil.Process(agent.proc.pid)])[0]
    finally:
        agent.stop()


def model_worker_rss(model: Path, shape: str) -> tuple[float, float]:
    """(bare Python + ONNX Runtime, the same with the session) RSS in MiB, one process."""
    out = subprocess.run([sys.executable, "-c", MODEL_WORKER, str(model), shape], check=True,
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    base, loaded = (int(v) / 2**20 for v in out.stdout.split())
    return base, loaded


def memory(pki: Pki, tmp: Path, models: dict[str, tuple[Path, Path, str]]) -> dict[str, Any]:
    empty = tmp / "state-empty"
    empty.mkdir()
    out: dict[str, Any] = {"agent_no_model_mib": agent_rss(pki, tmp, empty)}
    for name, (model, bundle, shape) in models.items():
        state = tmp / f"state-{name}"
        install(state, bundle)
        out[f"agent_{name}_mib"] = agent_rss(pki, tmp, state)
        base, loaded = model_worker_rss(model, shape)
        out["model_worker_base_mib"] = base
        out[f"model_worker_{name}_mib"] = loaded
    return out


def print_memory(mem: dict[str, Any], names: list[str]) -> None:
    base = mem["agent_no_model_mib"]
    mw = mem["model_worker_base_mib"]
    print(f"\nRSS: agent process serving nothing {base:.0f} MiB; bare model-worker process "
          f"(Python + ONNX Runtime) {mw:.0f} MiB")
    print(f"{'model':6} {'in agent':>9} {'in model worker':>16} | per model, N processes: "
          f"{'reuseport N=2':>13} {'N=16':>6} | {'front+workers':>13}")
    for name in names:
        share = mem[f"agent_{name}_mib"] - base
        worker = mem[f"model_worker_{name}_mib"]
        print(f"{name:6} {share:>8.1f}M {worker - mw:>15.1f}M | {'':>24}{2 * share:>12.1f}M "
              f"{16 * share:>5.0f}M | {worker:>12.1f}M")
    print("reuseport: every worker holds every session (N x the model's share) plus N x the "
          f"agent's base ({base:.0f} MiB); front+workers: one front process (the base) plus one "
          "model-worker process per model (its whole RSS), but every request crosses a process "
          "boundary twice.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="perf_analyzer measurement window")
    parser.add_argument("--rounds", type=int, default=3, help="repeat, print medians")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        pki = Pki(tmp / "pki")
        tiny = affine_model(tmp / "tiny.onnx")
        mlp = matmul_chain_model(tmp / "mlp.onnx", width=MLP_W, depth=MLP_DEPTH)
        tiny_b = make_bundle(tmp, tiny, "tiny", "1", {"x": np.ones((1, 4), np.float32)})
        mlp_b = make_bundle(tmp, mlp, "mlp", "1", {"x": np.ones((1, MLP_W), np.float32)})
        state = tmp / "state"
        install(state, tiny_b)
        results = serving_rounds(pki, tmp, state, args.rounds, args.seconds)
        mem = memory(pki, tmp, {"tiny": (tiny, tiny_b, "1,4"), "mlp": (mlp, mlp_b, f"1,{MLP_W}")})
    if args.json:
        print(json.dumps({"serving": results, "memory": mem}, indent=2))
        return 0
    print(f"tiny over mTLS, perf_analyzer (one connection per concurrent request), {args.seconds:g} s "
          f"windows, median of {args.rounds} round(s); {os.cpu_count()} CPUs, shared with the client")
    heads = ("req/s", "CPU us/req", "p50 us", "p99 us", "RSS total", "RSS max", "procs")
    print(f"{'workers':>7} {'conc':>4} " + " ".join(f"{h:>10}" for h in heads))
    for workers in WORKERS:
        for conc in CONCURRENCY:
            r = results[f"w{workers} c{conc}"]
            print(f"{workers:>7} {conc:>4} {r['throughput_per_s']:>10.0f} {r['cpu_us_per_request']:>10.0f} "
                  f"{r['p50_us']:>10.0f} {r['p99_us']:>10.0f} {r['rss_total_mib']:>9.0f}M "
                  f"{r['rss_max_process_mib']:>9.0f}M {r['processes']:>10.0f}")
    for conc in CONCURRENCY:
        one, two = results[f"w1 c{conc}"], results[f"w2 c{conc}"]
        print(f"concurrency {conc}: 2 workers / 1 worker: throughput "
              f"{two['throughput_per_s'] / one['throughput_per_s']:.2f}x, CPU per request "
              f"{two['cpu_us_per_request'] / one['cpu_us_per_request']:.2f}x")
    print_memory(mem, ["tiny", "mlp"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
