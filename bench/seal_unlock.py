"""Benchmark: what a TPM-sealed data partition costs a boot (issue #17).

The small seal test image (testsupport.seal_testroot) is built twice from one root and one site
PCR key: plain data (the disk carries an ext4 data partition) and sealed data (the node makes it
as LUKS2 sealed to its TPM at first boot, and opens it in the initrd on every boot). Each run
boots, on a swtpm, in this order: the plain image; the sealed image fresh (it makes the volume:
LUKS2 format, TPM enrolment, mkfs, the copy of /var, the recovery key's enrolment and escrow);
the sealed image again (a power cycle: it only opens the volume). The baseline is the plain boot
of the same run.

Figures, medians over the runs: power-on to the console marker (wall), and the initrd's share
(the kernel's timestamp of the root's systemd start, read from the console), for each kind, with
the ratios to plain. KVM is used when qemu starts under it, else TCG (say which you quote).

Run as root on the build host:  PYTHONPATH=. python bench/seal_unlock.py [--runs 3] [--cache DIR]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from provisioning.image import boot as vm
from provisioning.image.disk import disk
from provisioning.image.pcrsign import new_pcr_key
from provisioning.image.seal import seal
from provisioning.image.stage import DiskSizes, StageContext
from testsupport.seal_testroot import EPOCH, MARKER, cache_dir, make_rootfs

SIZES = DiskSizes(esp_mib=160, root_mib=512, data_mib=64)
# systemd prints this line once in the initrd and once more when the root's systemd starts
# (after the terminal resets each systemd writes first)
_SYSTEMD_START = re.compile(r"\[\s*(\d+\.\d+)\] systemd\[1\]: systemd \d+.* running in system mode")
KINDS = ("plain", "sealed, first boot", "sealed, power cycle")


def initrd_seconds(console: Path) -> float | None:
    """Kernel time at which the root's systemd started (the initrd handed over), from the console."""
    starts = [float(m.group(1)) for line in console.read_text(errors="replace").splitlines()
              if (m := _SYSTEMD_START.search(line))]
    return starts[1] if len(starts) >= 2 else None


def boot(image: Path, state: Path, kvm: bool, keep: bool, timeout: float) -> tuple[float, float | None, str]:
    """Power-on to the marker (s), the initrd's share (s) and the accelerator of one boot with a TPM."""
    plan = vm.BootPlan(image, state, kvm, 1024, 2, {}, tpm_socket=state / "swtpm.sock",
                       disk_size=2048 * 1024 * 1024, keep_disk=keep)
    began = time.monotonic()
    machine = vm.start(plan, fallback_tcg=kvm)
    try:
        vm.wait_for(machine, MARKER, timeout=timeout)
        wall = time.monotonic() - began
    finally:
        vm.stop(machine, grace=10)
    return wall, initrd_seconds(plan.console), "KVM" if machine.plan.kvm else "TCG"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=Path("/var/tmp/appliance-bench-cache"))
    ap.add_argument("--timeout", type=float, default=1500, help="seconds a boot may take (TCG)")
    args = ap.parse_args()
    kvm = vm.kvm_usable()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        base = Path(tmp)
        root = make_rootfs(cache_dir(args.cache), base / "root", "A")
        new_pcr_key(base / "pcr.key")
        site = rsa.generate_private_key(65537, 3072)  # the site's recovery key: only its public half here
        (base / "recovery.pub").write_bytes(site.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        images = {}
        for sealed in (False, True):
            ctx = StageContext(rootfs=root, out=base / f"out-{sealed}", work=base / f"work-{sealed}",
                               source_date_epoch=EPOCH, version="1.0", sizes=SIZES,
                               pcr_key=base / "pcr.key", seal_data=sealed, recovery_key=base / "recovery.pub")
            seal(ctx)
            images[sealed] = disk(ctx)
        walls: dict[str, list[float]] = {k: [] for k in KINDS}
        initrds: dict[str, list[float]] = {k: [] for k in KINDS}
        accels: set[str] = set()
        for i in range(args.runs):
            for kind, image, state, keep in (
                    (KINDS[0], images[False], base / f"plain-{i}", False),
                    (KINDS[1], images[True], base / f"sealed-{i}", False),
                    (KINDS[2], images[True], base / f"sealed-{i}", True)):
                wall, initrd, accel = boot(image, state, kvm, keep, args.timeout)
                accels.add(accel)
                walls[kind].append(wall)
                if initrd is not None:
                    initrds[kind].append(initrd)
                print(f"run {i + 1}: {kind:20} {accel} power-on to marker {wall:6.1f} s, initrd "
                      f"{'?' if initrd is None else f'{initrd:.1f}'} s", flush=True)
        print(f"\n{'/'.join(sorted(accels))}, medians over {args.runs} runs:")
        plain_wall = statistics.median(walls[KINDS[0]])
        plain_initrd = statistics.median(initrds[KINDS[0]]) if initrds[KINDS[0]] else None
        for kind in KINDS:
            wall = statistics.median(walls[kind])
            line = f"  {kind:20} power-on to marker {wall:6.1f} s (x{wall / plain_wall:.2f} plain)"
            if initrds[kind] and plain_initrd:
                initrd = statistics.median(initrds[kind])
                line += f", initrd {initrd:5.1f} s (+{initrd - plain_initrd:.1f} s over plain)"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
