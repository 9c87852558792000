"""Benchmark: refresh a registry of 1,000 targets (after the first refresh).

Prints medians of: a refresh when nothing changed, and a refresh after a new publish (a new
1,000-entry targets.json to fetch and verify), over HTTP on loopback and from a directory;
and, as the baseline measured in the same run, python-tuf's bare Updater.refresh() for the
same repository and change (no scratch copy, no clock policy).  Goal: < 1 s.

    python bench/registry_refresh.py [--targets 1000] [--runs 5] [--workdir /tmp]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def median_of(runs: int, setup: Callable[[], None], fn: Callable[[], object]) -> float:
    times = []
    for _ in range(runs):
        setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    args = ap.parse_args()

    from tuf.ngclient import Updater

    from agent.updates.client import RegistryClient
    from provisioning.registry import add_target, init_registry, make_server, publish, trusted_root

    work = Path(tempfile.mkdtemp(prefix="bench-refresh-", dir=args.workdir))
    server = None
    try:
        reg = work / "registry"
        init_registry(reg)
        files = work / "files"
        files.mkdir()
        t0 = time.perf_counter()
        for i in range(args.targets):
            f = files / f"model-{i:04d}.bin"
            f.write_bytes(f"payload {i}\n".encode())
            add_target(reg, f, kind="agent", name=f"model-{i:04d}", version="1.0.0")
        publish(reg)
        build = time.perf_counter() - t0
        size = (reg / "published" / "metadata" / "targets.json").stat().st_size
        root = trusted_root(reg)

        server = make_server(reg, 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        sources = {"http": url, "directory": str(reg / "published")}

        print(f"registry: {args.targets} targets, targets.json {size / 1024:.0f} KiB "
              f"(built in {build:.1f} s)")
        for label, source in sources.items():
            state = work / f"node-{label}"
            RegistryClient.initialize(state, root)
            first = time.perf_counter()
            RegistryClient(state, source).refresh()
            first = time.perf_counter() - first
            same = median_of(args.runs, lambda: None, lambda: RegistryClient(state, source).refresh())  # noqa: B023
            changed = median_of(args.runs, lambda: publish(reg),
                                lambda: RegistryClient(state, source).refresh())  # noqa: B023
            print(f"{label:9s} first refresh {first:.3f} s | unchanged: median {same:.3f} s | "
                  f"after a publish: median {changed:.3f} s")

        # Baseline: python-tuf's Updater on its own metadata dir, same HTTP source, same changes.
        bare = work / "bare"
        bare.mkdir()
        (bare / "root.json").write_bytes(root)

        def bare_refresh() -> None:
            Updater(str(bare), f"{url}/metadata/", None, f"{url}/targets/", bootstrap=None).refresh()

        bare_refresh()
        same = median_of(args.runs, lambda: None, bare_refresh)
        changed = median_of(args.runs, lambda: publish(reg), bare_refresh)
        print(f"baseline  python-tuf Updater over http | unchanged: median {same:.3f} s | "
              f"after a publish: median {changed:.3f} s")
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
