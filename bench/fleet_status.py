"""Benchmark: `appliance fleet status` against 1,000 agent endpoints on loopback, over mTLS.

Several test-agent processes (tests/secure_server.py: the agent's security stack, health,
reflection and a Node servicer with empty replies) each listen on many ports.  The CLI runs
as a separate process; its wall time and CPU (user + system, from the kernel's accounting of
children) are medians of --repeat runs.  Baseline, measured in the same run: the same command
against a single node (start-up and one query).  A second scenario makes a tenth of the nodes
silent listeners (accept, never speak) to show the deadline bounds the whole query.

    PYTHONPATH=. python bench/fleet_status.py [--nodes 1000] [--processes 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from testsupport.secure_server import loopback_site, spawn  # noqa: E402


def run_cli(inventory: Path, auth: list[str], deadline: float, concurrency: int) -> tuple[float, float, dict]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "provisioning.cli", "fleet", "status", "-i", str(inventory),
                           "--json", "--deadline", str(deadline), "--concurrency", str(concurrency), *auth],
                          capture_output=True, text=True, env=env, check=False)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"fleet status failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return wall, cpu, json.loads(proc.stdout)["summary"]


def inventory(path: Path, endpoints: list[int], silent: list[int]) -> Path:
    entry = '[[nodes]]\nname = "{}"\naddress = "127.0.0.1"\nport = {}\n'
    lines = [entry.format(f"n{i}", p) for i, p in enumerate(endpoints)]
    lines += [entry.format(f"silent{i}", p) for i, p in enumerate(silent)]
    path.write_text("\n".join(lines))
    return path


def measure(label: str, inv: Path, auth: list[str], args: argparse.Namespace, deadline: float) -> dict:
    runs = [run_cli(inv, auth, deadline, args.concurrency) for _ in range(args.repeat)]
    wall = statistics.median(r[0] for r in runs)
    cpu = statistics.median(r[1] for r in runs)
    print(f"{label:<28} wall {wall:6.2f} s  cpu {cpu:6.2f} s  {runs[-1][2]}")
    return {"wall_s": wall, "cpu_s": cpu, "summary": runs[-1][2]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=1024)
    parser.add_argument("--deadline", type=float, default=10.0)
    parser.add_argument("--silent-deadline", type=float, default=5.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        work = Path(tmp)
        _pki, config, auth = loopback_site(work)
        per = -(-args.nodes // args.processes)
        ports: list[int] = []
        t0 = time.monotonic()
        for _ in range(args.processes):
            got, _pid = stack.enter_context(spawn(config, ports=per))
            ports += got
        ports = ports[: args.nodes]
        print(f"{len(ports)} endpoints in {args.processes} processes, up in {time.monotonic() - t0:.1f} s")
        silent_socks = []
        for _ in range(args.nodes // 10):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(16)
            silent_socks.append(s)
        silent = [s.getsockname()[1] for s in silent_socks]

        base = measure("baseline: 1 node", inventory(work / "one.toml", ports[:1], []), auth, args,
                       args.deadline)
        full = measure(f"{len(ports)} nodes", inventory(work / "all.toml", ports, []), auth, args,
                       args.deadline)
        mixed = measure(f"{len(ports) - len(silent)} + {len(silent)} silent",
                        inventory(work / "mixed.toml", ports[: len(ports) - len(silent)], silent), auth, args,
                        args.silent_deadline)
        print(f"ratio {len(ports)} nodes / 1 node: wall {full['wall_s'] / base['wall_s']:.2f}x, "
              f"cpu {full['cpu_s'] / base['cpu_s']:.2f}x; silent scenario wall - deadline: "
              f"{mixed['wall_s'] - args.silent_deadline:.2f} s")
        for s in silent_socks:
            s.close()


if __name__ == "__main__":
    main()
