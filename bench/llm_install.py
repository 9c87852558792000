"""Benchmark: unpacking a large generative bundle the way a node installs it (every member
hashed while it streams into place, and the whole file hashed in the same read), against
plain sha256 of the same file as the line rate.

    python bench/llm_install.py [--mib 1024] [--runs 3]

The bundle holds the tiny decoder's folder plus a weight file of ``--mib`` MiB (random bytes:
hashing and copying do not care what the weights mean; the golden check, which loads the
model, is not part of this figure).  Each install runs in a child process, so its peak RSS
(``ru_maxrss``) is its own; the idle figure is a child that only imports the same modules.
Prints medians: seconds, MB/s, ratios to sha256's rate and to a plain copy of the file,
peak RSS above idle, bytes written.
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
from agent.llm.bundle import GenManifest, GoldenPrompt, LlmLimits, folder_files, write_bundle  # noqa: E402
from provisioning.demo.llm_models import write_decoder  # noqa: E402

CHILD = """
import resource, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from agent.llm.bundle import extract_bundle
bundle, dest = Path(sys.argv[1]), Path(sys.argv[2])
if dest.name != "idle":
    dest.mkdir()
    start = time.perf_counter()
    extract_bundle(bundle, dest)
    print(time.perf_counter() - start)
else:
    print(0.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def make_bundle(base: Path, mib: int) -> Path:
    folder = write_decoder(base / "model")
    with (folder / "extra-weights.bin").open("wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    files = folder_files(folder)
    manifest = GenManifest("llm", "bench", "1.0.0", files, "model.onnx", LlmLimits(256, 64, 1024),
                           golden_prompts=(GoldenPrompt("unused here", (0,)),))
    out = base / "bench.bundle"
    with out.open("wb") as handle:
        write_bundle(handle, manifest, folder)
    return out


def child(bundle: Path, dest: Path) -> tuple[float, int]:
    done = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), bundle, dest],
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"install child failed:\n{done.stderr}")
    seconds, rss_kib = done.stdout.split()
    return float(seconds), int(rss_kib)


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
        _, idle_kib = child(bundle, base / "idle")
        hashing, copying, installs, rss = [], [], [], []
        for i in range(args.runs):
            hashing.append(sha256_seconds(bundle))
            start = time.perf_counter()
            shutil.copyfile(bundle, base / "copy")
            os.sync()  # as much of the copy on disk as the install's writes may be
            copying.append(time.perf_counter() - start)
            (base / "copy").unlink()
            seconds, kib = child(bundle, base / f"x{i}")
            installs.append(seconds)
            rss.append(kib)
            written = sum(p.stat().st_size for p in (base / f"x{i}").iterdir())
            for p in (base / f"x{i}").iterdir():
                p.unlink()
    mb = size / 1e6
    t_hash, t_inst = statistics.median(hashing), statistics.median(installs)
    print(f"bundle {mb:.0f} MB; {args.runs} runs; medians")
    print(f"sha256 of the file (line rate)  {t_hash:7.2f} s  {mb / t_hash:8.0f} MB/s")
    t_copy = statistics.median(copying)
    print(f"plain copy of the file + sync   {t_copy:7.2f} s  {mb / t_copy:8.0f} MB/s")
    print(f"install unpack (hash + write)   {t_inst:7.2f} s  {mb / t_inst:8.0f} MB/s   "
          f"ratio {t_hash / t_inst:.2f}x of sha256's rate, {t_copy / t_inst:.2f}x of the copy's")
    print(f"peak RSS above idle             {(statistics.median(rss) - idle_kib) / 1024:7.1f} MiB "
          f"(idle {idle_kib / 1024:.0f} MiB)")
    print(f"bytes written                   {written / 1e6:7.0f} MB ({written / size:.3f}x the bundle)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
