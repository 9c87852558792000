"""Benchmarks of the health component: GetHealth latency under load, sampler CPU when idle.

    PYTHONPATH=. python bench/health_bench.py [--seconds 10] [--idle-seconds 60] [--cli]

1. Latency: an agent-like server (grpc.aio, a real grpc.health.v1 servicer, the health
   component attached through ``attach``, real NVML when present) runs in its own process.
   One client measures ``GetHealth`` round trips, first alone, then while load threads hammer
   the server with other RPCs (GetInventory, GetEvents, grpc.health.v1 Check, WatchHealth
   streams); no model is served, so the figures are the health component's own.  The
   baseline is grpc.health.v1 ``Check`` (a trivial RPC) measured the same way in the same run.
2. Idle CPU: the same server left alone for ``--idle-seconds`` at the default sampling
   interval, its process CPU time read with psutil, against a baseline server with no health
   component over the same time.
``--cli`` first prints ``appliance node health|inventory|events`` against the server.
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------- the server process


async def _serve(port: int, state_dir: Path, with_health: bool, interval: float | None) -> None:
    import dataclasses

    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    from agent.config import AgentConfig, HealthSection
    from agent.context import AgentContext

    cfg = AgentConfig()
    if interval is not None:
        cfg = dataclasses.replace(cfg, health=HealthSection(interval_s=interval))
    cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, state_dir=state_dir))
    server = grpc.aio.server()
    ctx = AgentContext(config=cfg)
    ctx.health = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(ctx.health, server)
    if with_health:
        from agent.health.service import attach, close

        await attach(server, ctx)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"PORT {bound}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until stdin closes
    if with_health:
        await close(ctx)
    await server.stop(0)


def start_server(state_dir: Path, with_health: bool = True, interval: float | None = None) -> tuple[Any, int]:
    argv = [sys.executable, str(Path(__file__)), "serve", "--state-dir", str(state_dir)]
    if not with_health:
        argv.append("--no-health")
    if interval is not None:
        argv += ["--interval", str(interval)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, int(line.split()[1])


def stop_server(proc: Any) -> None:
    proc.stdin.close()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


# ---------------------------------------------------------------------- clients


def _channel(port: int) -> Any:
    import grpc

    return grpc.insecure_channel(f"127.0.0.1:{port}")


def _measure(call: Any, seconds: float) -> list[float]:
    out = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        call()
        out.append(time.perf_counter() - t)
    return out


def _load(port: int, stop: threading.Event, counter: list[int], kind: int) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from agent.proto import node_pb2, node_pb2_grpc

    channel = _channel(port)
    node = node_pb2_grpc.NodeStub(channel)
    hc = health_pb2_grpc.HealthStub(channel)
    calls = [
        lambda: node.GetInventory(node_pb2.GetInventoryRequest()),
        lambda: node.GetEvents(node_pb2.GetEventsRequest(limit=100)),
        lambda: hc.Check(health_pb2.HealthCheckRequest(service="")),
    ]
    if kind == 3:  # a watcher that keeps a stream open and reads reports
        stream = node.WatchHealth(node_pb2.WatchHealthRequest(interval_ms=100))
        for _ in stream:
            counter[0] += 1
            if stop.is_set():
                stream.cancel()
                break
        return
    while not stop.is_set():
        calls[kind]()
        counter[0] += 1


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1e6


def latency(port: int, seconds: float, load_threads: int) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from agent.proto import node_pb2, node_pb2_grpc

    channel = _channel(port)
    node = node_pb2_grpc.NodeStub(channel)
    hc = health_pb2_grpc.HealthStub(channel)
    get_health = lambda: node.GetHealth(node_pb2.GetHealthRequest())  # noqa: E731
    check = lambda: hc.Check(health_pb2.HealthCheckRequest(service=""))  # noqa: E731
    _measure(get_health, 1.0)  # warm up
    rows = []
    idle_gh = _measure(get_health, seconds)
    idle_ck = _measure(check, seconds)
    rows += [("GetHealth", "no load", idle_gh), ("health.Check (baseline)", "no load", idle_ck)]
    stop = threading.Event()
    counter = [0]
    threads = [
        threading.Thread(target=_load, args=(port, stop, counter, i % 4), daemon=True)
        for i in range(load_threads)
    ]
    for t in threads:
        t.start()
    time.sleep(0.5)
    start_count = counter[0]
    loaded_gh = _measure(get_health, seconds)
    loaded_ck = _measure(check, seconds)
    load_rate = (counter[0] - start_count) / (2 * seconds)
    stop.set()
    for t in threads:
        t.join(timeout=5)
    rows += [
        ("GetHealth", f"{load_threads} load threads", loaded_gh),
        ("health.Check (baseline)", f"{load_threads} load threads", loaded_ck),
    ]
    print(f"\n== GetHealth latency (µs), {seconds:.0f} s each, load {load_rate:.0f} other RPC/s")
    print(f"{'rpc':<26}{'condition':<18}{'n':>7}{'p50':>9}{'p99':>9}")
    for name, cond, vals in rows:
        print(f"{name:<26}{cond:<18}{len(vals):>7}{_pct(vals, 0.5):>9.0f}{_pct(vals, 0.99):>9.0f}")
    print(
        f"ratio GetHealth/Check p50: no load {_pct(idle_gh, 0.5) / _pct(idle_ck, 0.5):.2f}, "
        f"loaded {_pct(loaded_gh, 0.5) / _pct(loaded_ck, 0.5):.2f}; "
        f"GetHealth p50 loaded/unloaded {_pct(loaded_gh, 0.5) / _pct(idle_gh, 0.5):.2f}"
    )


def idle_cpu(state_dir: Path, seconds: float) -> None:
    import psutil

    results = {}
    for label, with_health in (("with health (default interval)", True), ("baseline: no health", False)):
        proc, _ = start_server(state_dir, with_health=with_health)
        try:
            time.sleep(2.0)  # past start-up
            p = psutil.Process(proc.pid)
            before = p.cpu_times()
            t0 = time.monotonic()
            time.sleep(seconds)
            after = p.cpu_times()
            wall = time.monotonic() - t0
        finally:
            stop_server(proc)
        used = (after.user - before.user) + (after.system - before.system)
        results[label] = 100.0 * used / wall
    print(f"\n== idle agent CPU over {seconds:.0f} s (percent of one core)")
    for label, pct in results.items():
        print(f"{label:<34}{pct:>8.3f} %")
    base = results["baseline: no health"]
    print(
        f"attributable to the health component: {results['with health (default interval)'] - base:.3f} % "
        "of a core (goal < 1 %)"
    )


def cli(port: int) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for verb in (["health"], ["inventory"], ["events"]):
        argv = [sys.executable, "-m", "provisioning.cli", "node", *verb, "--target", f"127.0.0.1:{port}"]
        print(f"\n$ appliance node {' '.join(verb)} --target 127.0.0.1:{port}", flush=True)
        subprocess.run(argv, env=env, cwd=ROOT, check=False, timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd")
    serve = sub.add_parser("serve")
    serve.add_argument("--state-dir", type=Path, required=True)
    serve.add_argument("--no-health", action="store_true")
    serve.add_argument("--interval", type=float, default=None)
    parser.add_argument("--seconds", type=float, default=10.0, help="per latency measurement")
    parser.add_argument("--load-threads", type=int, default=8)
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="0 skips the idle CPU run")
    parser.add_argument("--cli", action="store_true", help="print the node CLI's output first")
    args = parser.parse_args()
    if args.cmd == "serve":
        asyncio.run(_serve(0, args.state_dir, not args.no_health, args.interval))
        return 0
    import agent.proto  # noqa: F401 - generate the modules before the server processes race to

    print(f"machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory(prefix="health-bench-") as tmp:
        state = Path(tmp)
        proc, port = start_server(state, interval=1.0)  # samples often, to load the sampler too
        try:
            if args.cli:
                cli(port)
            latency(port, args.seconds, args.load_threads)
        finally:
            stop_server(proc)
        if args.idle_seconds > 0:
            idle_cpu(state, args.idle_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
