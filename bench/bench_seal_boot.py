"""Benchmark: seal + disk time and image size; power-on to the console marker under KVM and TCG.

Run as root on the build host:  python bench/bench_seal_boot.py [--runs N] [--cache DIR]
Prints medians; the baseline for seal is `mksquashfs` of the same root alone (same run).
KVM is measured only when qemu+OVMF actually starts under it (nested KVM may refuse OVMF).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from provisioning.errors import ImageError
from provisioning.image import boot as vm
from provisioning.image.disk import disk
from provisioning.image.seal import seal, squashfs_argv
from provisioning.image.stage import DiskSizes, StageContext
from provisioning.tools import run
from testsupport.seal_testroot import EPOCH, MARKER, cache_dir, make_rootfs


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--boot-runs", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=Path("/var/tmp/appliance-bench-cache"))
    ap.add_argument("--tcg-timeout", type=float, default=1500)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        base = Path(tmp)
        root = make_rootfs(cache_dir(args.cache), base / "root", "A")
        squash, sealdisk = [], []
        for i in range(args.runs):
            t = time.monotonic()
            run(squashfs_argv(root, base / f"baseline{i}.sqfs", EPOCH, [], False))
            squash.append(time.monotonic() - t)
            ctx = StageContext(rootfs=root, out=base / f"out{i}", work=base / f"work{i}",
                               source_date_epoch=EPOCH, version="1.0",
                               sizes=DiskSizes(esp_mib=64, root_mib=512, data_mib=64))
            t = time.monotonic()
            seal(ctx)
            image = disk(ctx)
            sealdisk.append(time.monotonic() - t)
        out = base / "out0"
        print(f"mksquashfs alone (baseline): median {statistics.median(squash):.1f} s over {args.runs}")
        print(f"seal+disk:                   median {statistics.median(sealdisk):.1f} s "
              f"(x{statistics.median(sealdisk) / statistics.median(squash):.1f} baseline)")
        for name in ("root.squashfs", "root.verity", "appliance-1.0.efi", "disk.raw"):
            p = out / name
            print(f"  {name:20} {p.stat().st_size / 2**20:8.1f} MiB apparent, "
                  f"{p.stat().st_blocks * 512 / 2**20:8.1f} MiB allocated")
        image = out / "disk.raw"
        for label, kvm in (("KVM", True), ("TCG", False)):
            if kvm and not vm.kvm_usable():
                print("KVM: /dev/kvm does not open; skipped")
                continue
            times = []
            for j in range(args.boot_runs):
                t = time.monotonic()
                try:
                    machine = vm.start(vm.BootPlan(image, base / f"vm-{label}-{j}", kvm, 1024, 2, {}))
                except ImageError as exc:
                    print(f"{label}: not measured: {exc}")
                    break
                try:
                    vm.wait_for(machine, MARKER, timeout=120 if kvm else args.tcg_timeout)
                    times.append(time.monotonic() - t)
                except ImageError as exc:
                    print(f"{label}: no marker ({str(exc).splitlines()[0]})")
                    break
                finally:
                    vm.stop(machine, grace=10)
            if times:
                med = statistics.median(times)
                print(f"power-on to marker, {label}: median {med:.1f} s over {len(times)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
