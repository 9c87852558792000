"""Benchmark: download-and-verify a 1 GiB target from a registry directory.

Prints the median wall time of RegistryClient.download (read, sha256 and length enforced while
streaming, written to disk) and of plain hashlib.sha256 over the same file in the same run,
their throughput ratio (goal >= 0.9), and the peak RSS of the download above the interpreter's
(measured in a child process after imports; goal < 64 MiB).

    python bench/registry_verify.py [--size-mib 1024] [--runs 3] [--workdir /tmp]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from agent.updates.client import RegistryClient
state, source, dest = map(Path, sys.argv[1:4])
client = RegistryClient(state, str(source))
client.refresh()
info = client.targets()[0]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
client.download(info, dest)
elapsed = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
from agent.updates import _session
signed = client._targets[info.path]
t0 = time.perf_counter()
assert _session.file_matches(dest / info.filename, signed)
in_place = time.perf_counter() - t0
print(json.dumps({"seconds": elapsed, "in_place": in_place, "base_kib": base, "peak_kib": peak}))
"""


def sha256_file(path: Path) -> float:
    t0 = time.perf_counter()
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    h.hexdigest()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    args = ap.parse_args()

    from agent.updates.client import RegistryClient
    from provisioning.registry import add_target, init_registry, publish, trusted_root

    work = Path(tempfile.mkdtemp(prefix="bench-registry-", dir=args.workdir))
    try:
        size = args.size_mib << 20
        src = work / "big.img"
        with src.open("wb") as fh:
            block = os.urandom(1 << 20)
            for _ in range(args.size_mib):
                fh.write(block)
        reg = work / "registry"
        init_registry(reg)
        add_target(reg, src, kind="os", name="big", version="1.0")
        publish(reg)
        src.unlink()
        stored = next((reg / "published" / "targets").rglob("*.big-1.0.img"))
        state = work / "node"
        RegistryClient.initialize(state, trusted_root(reg))
        path = [str(ROOT), os.environ.get("PYTHONPATH", "")]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
        sha256_file(stored)  # warm the page cache for both contenders
        ours, in_place, base, rss = [], [], [], []
        for _ in range(args.runs):
            dest = work / "dl"
            shutil.rmtree(dest, ignore_errors=True)
            out = subprocess.run([sys.executable, "-c", CHILD, str(state), str(reg / "published"), str(dest)],
                                 capture_output=True, text=True, env=env, check=True)
            doc = json.loads(out.stdout.strip().splitlines()[-1])
            ours.append(doc["seconds"])
            in_place.append(doc["in_place"])
            rss.append((doc["peak_kib"] - doc["base_kib"]) / 1024)
            base.append(sha256_file(stored))
        m_ours, m_base = statistics.median(ours), statistics.median(base)
        mib = size / (1 << 20)
        print(f"target size                     {mib:.0f} MiB")
        print(f"hashlib.sha256 (baseline)       median {m_base:.3f} s  {mib / m_base:.0f} MiB/s")
        print(f"RegistryClient.download+verify  median {m_ours:.3f} s  {mib / m_ours:.0f} MiB/s")
        print(f"throughput ratio (ours/baseline) {m_base / m_ours:.2f}   (goal >= 0.9)")
        m_in = statistics.median(in_place)
        print(f"verify in place (length+sha256) median {m_in:.3f} s  ratio {m_base / m_in:.2f}")
        print(f"peak RSS above interpreter      median {statistics.median(rss):.1f} MiB (goal < 64 MiB)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
