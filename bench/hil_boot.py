"""Benchmark: the bench image's power-on to agent SERVING over mTLS, under KVM and under TCG.

Run as root after the bench is prepared (``./dev test --hil`` or ``python -m provisioning.demo.bench
prepare``):  python bench/hil_boot.py [--runs N] [--cache DIR]

Each run powers a fresh copy-on-write overlay of the cached image on (``appliance boot``) and
polls grpc.health over mTLS once a second until SERVING, as hil/ does. The baseline, in the
same run, is power-on to OVMF starting the boot loader (``BdsDxe: starting Boot...`` on the
console), so the ratio says how much of the time is the system and the agent rather than the
machine and its firmware starting.
KVM is measured only when qemu+OVMF starts under it (nested KVM may refuse OVMF; then
``appliance boot --accel auto`` falls back to TCG, which is reported, not counted as KVM).
The OS update A -> B end to end is measured by hil/test_os_update.py, which prints it.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc

from provisioning.demo.bench import DEFAULT_CACHE, bench_paths
from provisioning.image import boot as vm
from testsupport.appliance import Appliance, free_port

BASELINE_LINE = r"BdsDxe: starting Boot"  # OVMF hands over to systemd-boot (the image is quiet)


def _watch_baseline(console: Path, began: float, found: list[float], stop: threading.Event) -> None:
    """Record the seconds from ``began`` to the firmware starting the boot loader (the baseline)."""
    while not stop.is_set():
        if console.is_file() and re.search(BASELINE_LINE, console.read_text(errors="replace")):
            found.append(time.monotonic() - began)
            return
        time.sleep(0.2)


def _kvm_runs_ovmf(image: Path) -> bool:
    """Start the image with ``--accel auto`` for a moment: did qemu+OVMF stay on KVM?"""
    import json
    import subprocess

    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        cli = [sys.executable, "-m", "provisioning.cli", "boot"]
        proc = subprocess.run([*cli, str(image), "--state", f"{tmp}/vm", "--accel", "auto", "--detach",
                               "--json", "--port", f"8001={free_port()}", "--port", f"8002={free_port()}"],
                              capture_output=True, text=True, check=True)
        subprocess.run([*cli, "--stop", f"{tmp}/vm"], capture_output=True, check=False)
    return bool(json.loads(proc.stdout)["kvm"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--bound", type=float, default=900)
    args = ap.parse_args()
    bench = bench_paths(args.cache)
    if not bench.image.is_file():
        print(f"no bench image at {bench.image}: run `python -m provisioning.demo.bench prepare` first")
        return 2
    c = bench.client
    creds = grpc.ssl_channel_credentials(c["ca"].read_bytes(), c["key"].read_bytes(), c["cert"].read_bytes())
    for accel in ("kvm", "tcg"):
        if accel == "kvm" and not vm.kvm_usable():
            print("KVM: /dev/kvm does not open; skipped")
            continue
        if accel == "kvm" and not _kvm_runs_ovmf(bench.image):
            print("KVM: /dev/kvm opens but qemu+OVMF does not run under it here (nested); skipped")
            continue
        serving, baseline = [], []
        for i in range(args.runs):
            with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
                ports = {8001: free_port(), 8002: free_port()}
                state = Path(tmp) / "vm"
                node = Appliance(f"127.0.0.1:{ports[8001]}", creds, image=bench.image, state=state,
                                 ports=ports, accel=accel)
                found: list[float] = []
                stop = threading.Event()
                watcher = threading.Thread(target=_watch_baseline,
                                           args=(state / "console.log", time.monotonic(), found, stop))
                watcher.start()
                try:
                    seconds = node.power_on(keep_disk=False, bound=args.bound)
                    got_kvm = vm.load(state).plan.kvm
                finally:
                    stop.set()
                    watcher.join()
                    node.power_off()
                if got_kvm != (accel == "kvm"):
                    print(f"{accel.upper()}: qemu ran with kvm={got_kvm}; run not counted")
                    continue
                serving.append(seconds)
                baseline.extend(found)
                print(f"{accel.upper()} run {i + 1}: power-on to SERVING {seconds:.1f} s, to the firmware "
                      f"starting the boot loader {found[0] if found else float('nan'):.1f} s")
        if serving:
            med = statistics.median(serving)
            print(f"{accel.upper()}: power-on to agent SERVING over mTLS: median {med:.1f} s over "
                  f"{len(serving)} (min {min(serving):.1f}, max {max(serving):.1f})")
            if baseline:
                base = statistics.median(baseline)
                print(f"{accel.upper()}: baseline power-on to the boot loader: median {base:.1f} s; "
                      f"SERVING is x{med / base:.1f} of it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
