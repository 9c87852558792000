"""Benchmark: installing a large generative bundle the way a node does, against plain sha256
of the same file (the line rate) and a plain copy of it.

    python bench/llm_install.py [--mib 1024] [--runs 3]

The bundle holds the tiny decoder's folder plus a weight file of ``--mib`` MiB (random bytes:
hashing and copying do not care what the weights mean), made by the release engineer's
``create_generative_bundle`` (streaming, golden ids recorded).  Two figures per run, each in a
child process so that its peak RSS and its bytes written to storage (``write_bytes`` of
/proc/self/io) are its own.  Peak RSS counts from the child's RSS once its modules are
imported (the peak is reset there through /proc/self/clear_refs), so "above idle" is what
the work itself added:

- unpack: ``extract_bundle_hashed``, every member hashed while it streams into place, and the
  whole file hashed in the same read;
- install: ``ModelRepository.install`` as ``appliance bundle install`` and the agent run it:
  the unpack, the golden check on the loaded model, the install record, the rename into
  place and the activation.

Prints medians.
"""

from __future__ import annotations

import argparse
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

from agent.fsutil import file_sha256  # noqa: E402
from provisioning.demo.llm_models import write_decoder  # noqa: E402
from provisioning.genbundle import create_generative_bundle  # noqa: E402

CHILD = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from agent.config import InferenceSection
from agent.inference.repository import ModelRepository
from agent.llm.bundle import extract_bundle_hashed

def status(key):
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
    return int(line.split()[1])

how, bundle, dest = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
Path("/proc/self/clear_refs").write_text("5")  # peak RSS starts again from here, after the imports
idle = status("VmRSS:")
start = time.perf_counter()
if how == "unpack":
    dest.mkdir()
    extract_bundle_hashed(bundle, dest)
elif how == "install":
    ModelRepository.for_state_dir(dest, InferenceSection()).install(bundle)
seconds = time.perf_counter() - start
io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
print(seconds, idle, status("VmHWM:"), io["write_bytes"])
"""


def make_bundle(base: Path, mib: int) -> Path:
    folder = write_decoder(base / "model")
    with (folder / "extra-weights.bin").open("wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    out = base / "bench.bundle"
    create_generative_bundle(folder, out, kind="llm", name="bench", version="1.0.0", context_length=256,
                             max_tokens=64, kv_budget_tokens=1024, golden_tokens=8)
    shutil.rmtree(folder)  # only the bundle is needed from here on; the disk is not twice as big
    return out


def child(how: str, bundle: Path, dest: Path) -> tuple[float, int, int]:
    """(seconds, peak RSS above the RSS it had before starting in KiB, bytes written to
    storage) of one child."""
    done = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), how, bundle, dest],
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{how} child failed:\n{done.stderr}")
    seconds, before_kib, peak_kib, written = done.stdout.split()
    return float(seconds), int(peak_kib) - int(before_kib), int(written)


def sha256_seconds(path: Path) -> float:
    start = time.perf_counter()
    file_sha256(path, 1 << 20)  # the block size the install reads with
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        base = Path(tmp)
        bundle = make_bundle(base, args.mib)
        size = bundle.stat().st_size
        hashing, copying = [], []
        unpacks: list[tuple[float, int, int]] = []
        installs: list[tuple[float, int, int]] = []
        for i in range(args.runs):  # interleaved, so that drift on a shared machine hits all four
            hashing.append(sha256_seconds(bundle))
            start = time.perf_counter()
            shutil.copyfile(bundle, base / "copy")
            os.sync()  # as much of the copy on disk as the install's writes may be
            copying.append(time.perf_counter() - start)
            (base / "copy").unlink()
            unpacks.append(child("unpack", bundle, base / f"x{i}"))
            shutil.rmtree(base / f"x{i}")
            installs.append(child("install", bundle, base / f"state{i}"))
            shutil.rmtree(base / f"state{i}")
    mb = size / 1e6
    t_hash, t_copy = statistics.median(hashing), statistics.median(copying)
    print(f"bundle {mb:.0f} MB; {args.runs} runs; medians")
    print(f"sha256 of the file (line rate)  {t_hash:7.2f} s  {mb / t_hash:8.0f} MB/s")
    print(f"plain copy of the file + sync   {t_copy:7.2f} s  {mb / t_copy:8.0f} MB/s")
    for label, runs in (("unpack (hash + write)", unpacks), ("install (repository.install)", installs)):
        t = statistics.median(r[0] for r in runs)
        rss = statistics.median(r[1] for r in runs)
        written = statistics.median(r[2] for r in runs)
        print(f"{label:31} {t:7.2f} s  {mb / t:8.0f} MB/s   ratio {t_hash / t:.2f}x of sha256's rate, "
              f"{t_copy / t:.2f}x of the copy's")
        print(f"  peak RSS above idle           {rss / 1024:7.1f} MiB")
        print(f"  bytes written to storage      {written / 1e6:7.0f} MB ({written / size:.3f}x the bundle)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
