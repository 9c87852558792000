"""Run the health sampler once against the real NVML of this machine; no gRPC server needed.

    pip install nvidia-ml-py psutil      # prometheus-client too, if you want its scrape
    PYTHONPATH=. python3 bench/gpu_check.py [--state-dir DIR] [--seconds S]

Prints, in order: the HealthReport as JSON, the rule verdicts as a table, the events the
sample produced (XID events arrive through the NVML event set while the sampler runs for
``--seconds``), a DCGM-style metrics scrape (through prometheus-client when installed, else
the same fields rendered directly) and how long one sample took.  Takes a few seconds.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--state-dir", type=Path, default=None, help="data partition to judge (default: a temp dir)"
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="how long the XID watcher runs")
    args = parser.parse_args()

    import pynvml

    from agent.config import HealthSection
    from agent.events import EventLog
    from agent.health.sampler import Sampler

    state = args.state_dir or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    events = EventLog(None)
    sampler = Sampler(HealthSection(interval_s=1.0), state, nvml=pynvml, events=events)
    t0 = time.perf_counter()
    first = sampler.start()  # NVML init, first sample, sampler and XID threads
    started = time.perf_counter() - t0
    try:
        time.sleep(args.seconds)
        timings = []
        for _ in range(5):
            t = time.perf_counter()
            sampler.take_sample()
            timings.append(time.perf_counter() - t)
        report = sampler.sample_once()
    finally:
        sampler.stop()

    print("== HealthReport (JSON)")
    print(json.dumps(report.to_json(), indent=2, sort_keys=True, default=str))
    print(f"\n== rules: overall {report.overall.name}")
    for r in sorted(report.rules, key=lambda r: (-r.verdict, r.subject, r.rule)):
        print(f"{r.verdict.name:<5} {r.rule:<22} {r.subject:<12} {r.reason}")
    print("\n== events")
    for e in events.recent(limit=0):
        print(f"{e.seq:>3} {e.severity:<7} {e.kind:<20} {e.subject:<8} {e.message}")
    print("\n== DCGM-style scrape")
    try:
        from prometheus_client import CollectorRegistry, generate_latest

        from agent.health.metrics import NodeCollector
    except ImportError:
        from agent.health.dcgm import render_dcgm

        print("\n".join(render_dcgm(report, socket.gethostname())))
    else:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(NodeCollector(lambda: report))
        print(generate_latest(registry).decode(), end="")
    timings.sort()
    print(
        f"\n== timing: start (NVML init + first sample) {started * 1000:.1f} ms; one sample: "
        f"median {timings[2] * 1000:.2f} ms, max {timings[-1] * 1000:.2f} ms "
        f"({len(report.sample.gpus)} GPU(s), NVML {'yes' if report.sample.nvml_available else 'no'}); "
        f"first report overall {first.overall.name}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
