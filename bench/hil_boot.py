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

Side by side with each run (``--no-stock`` leaves it out): a stock Debian of the image's own
packages (bench/_stock_debian.py, built once from the bench's rootfs stage), power-on to its
serial login prompt, on the same qemu settings; the ratio is issue #14's boot goal (<= 1.5x).
Both images print systemd-analyze's view of their boot (time, critical chain, the slowest
units) once it has finished; the last run's of each is printed at the end.

A first boot is not every boot: Debian compiles every AppArmor profile on its first boot and
caches them.  ``--second-boot`` powers each machine off after its first boot (ACPI) and on
again on the same disk, and prints the ratio of those second boots too.

``--cpu MODEL`` gives both machines that qemu CPU model.  Under TCG the appliance's switch from
its initrd to the real root takes about a minute, PID 1 in the kernel's clear_page_erms: with
``init_on_free=1`` (the image's hardening) the kernel zeroes every page it frees, with the ``rep
stosb`` of a CPU with ERMS (``-cpu max``), which TCG runs far slower than ``rep stosq``.  ``--cpu
max,-erms`` cut both boots by a third and left the ratio as it was (the stock kernel zeroes every
page it allocates): a quicker run of the same comparison.  The issue's figure is the default's.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc

from bench._stock_debian import LOGIN_PROMPT, build_stock_disk
from provisioning.demo.bench import DEFAULT_CACHE, bench_paths
from provisioning.errors import ImageError
from provisioning.image import boot as vm
from provisioning.image.booted import boot_times_report
from testsupport.appliance import Appliance, free_port

BASELINE_LINE = r"BdsDxe: starting Boot"  # OVMF hands over to systemd-boot (the image is quiet)


def _watch_baseline(console: Path, began: float, found: list[float], stop: threading.Event) -> None:
    """Record the seconds from ``began`` to the firmware starting the boot loader (the baseline)."""
    while not stop.is_set():
        if console.is_file() and re.search(BASELINE_LINE, console.read_text(errors="replace")):
            found.append(time.monotonic() - began)
            return
        time.sleep(0.2)


def _await_report(console: Path, bound: float) -> str:
    """The console once its boot-times report is complete, or once ``bound`` seconds have
    passed or the report's unit failed to start; returns the console's text."""
    deadline = time.monotonic() + bound
    while True:
        text = console.read_text(errors="replace")
        if (boot_times_report(text) is not None or "Failed to start appliance-boot-times" in text
                or time.monotonic() > deadline):
            return text
        time.sleep(1)


def _stock_boot(disk: Path, accel: str, bound: float, state: Path, *,
                keep_disk: bool = False, cpu: str | None = None) -> tuple[float, bool, str]:
    """Power the stock Debian disk on (a fresh overlay in ``state``, or with ``keep_disk`` the
    one its last boot left: a power cycle) on the same qemu settings as the bench's node, and
    wait for its login prompt: (seconds, whether it ran under KVM, its console).  It is powered
    off (ACPI) before this returns."""
    cli = [sys.executable, "-m", "provisioning.cli", "boot"]
    began = time.monotonic()
    proc = subprocess.run([*cli, str(disk), "--state", str(state), "--accel", accel, "--memory", "2048",
                           "--detach", "--json", "--wait-for", LOGIN_PROMPT, "--timeout", str(bound),
                           "--port", f"22={free_port()}", *(("--keep-disk",) if keep_disk else ()),
                           *(("--cpu", cpu) if cpu is not None else ())],
                          capture_output=True, text=True, check=False)
    seconds = time.monotonic() - began
    try:
        if proc.returncode != 0:
            raise ImageError(f"the stock Debian boot failed:\n{proc.stderr[-3000:]}")
        kvm = bool(json.loads(proc.stdout)["kvm"])
        return seconds, kvm, _await_report(state / "console.log", 300)  # it follows the prompt
    finally:
        subprocess.run([*cli, "--stop", str(state)], capture_output=True, check=False)


def _keep(folder: Path | None, name: str, console: str) -> None:
    """Write a boot's console log as ``folder/name`` (--consoles), if a folder was given."""
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(console)


def _print_report(what: str, console: str) -> None:
    try:
        report = boot_times_report(console)
    except ImageError as e:
        print(f"{what}: {e}")
        return
    if report is None:
        print(f"{what}: no boot-times report on its console")
        return
    print(f"{what}, where the boot's time went (systemd-analyze, in the guest):")
    for kind in ("time", "chain", "blame", "initrd", "gap"):
        print("\n".join(f"  {kind}: {line}" for line in report[kind]))


def _kvm_runs_ovmf(image: Path) -> bool:
    """Start the image with ``--accel auto`` for a moment: did qemu+OVMF stay on KVM?"""
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
    ap.add_argument("--no-stock", action="store_true", help="leave out the stock Debian baseline")
    ap.add_argument("--consoles", type=Path, help="keep each run's serial console log in this folder")
    ap.add_argument("--cpu", metavar="MODEL",
                    help="qemu's CPU model for both machines (appliance boot --cpu; default: host under "
                         "KVM, max under TCG). Under TCG, 'max,-erms' runs the same comparison a third "
                         "quicker (the kernel clears pages without rep stosb); the ratio stays")
    ap.add_argument("--second-boot", action="store_true",
                    help="power each machine off after its first boot and on again on the same disk, "
                         "and time that boot too (caches such as AppArmor's warm, as on every later boot)")
    args = ap.parse_args()
    bench = bench_paths(args.cache)
    if not bench.image.is_file():
        print(f"no bench image at {bench.image}: run `python -m provisioning.demo.bench prepare` first")
        return 2
    stock = None if args.no_stock else build_stock_disk(bench.out / "stages/rootfs/rootfs.tar",
                                                        args.cache / "stock-debian")
    print(f"qemu CPU model: {args.cpu or 'appliance boot default (host under KVM, max under TCG)'}")
    c = bench.client
    creds = grpc.ssl_channel_credentials(c["ca"].read_bytes(), c["key"].read_bytes(), c["cert"].read_bytes())
    for accel in ("kvm", "tcg"):
        if accel == "kvm" and not vm.kvm_usable():
            print("KVM: /dev/kvm does not open; skipped")
            continue
        if accel == "kvm" and not _kvm_runs_ovmf(bench.image):
            print("KVM: /dev/kvm opens but qemu+OVMF does not run under it here (nested); skipped")
            continue
        serving: list[float] = []
        baseline: list[float] = []
        stock_login: list[float] = []
        serving_again: list[float] = []
        stock_again: list[float] = []
        consoles = {"the bench image": "", "stock Debian": ""}
        boots = (False, True) if args.second_boot else (False,)
        for i in range(args.runs):
            if stock is not None:
                with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
                    for second in boots:
                        seconds, kvm, console = _stock_boot(stock, accel, args.bound, Path(tmp) / "vm",
                                                            keep_disk=second, cpu=args.cpu)
                        which = "second boot" if second else "power-on"
                        if kvm == (accel == "kvm"):
                            (stock_again if second else stock_login).append(seconds)
                            print(f"{accel.upper()} run {i + 1}: stock Debian, {which} to its login prompt "
                                  f"{seconds:.1f} s")
                        consoles["stock Debian, second boot" if second else "stock Debian"] = console
                        name = f"{accel}-{i + 1}-stock{'-again' if second else ''}.log"
                        _keep(args.consoles, name, console)
            with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
                ports = {8001: free_port(), 8002: free_port()}
                state = Path(tmp) / "vm"
                node = Appliance(f"127.0.0.1:{ports[8001]}", creds, image=bench.image, state=state,
                                 ports=ports, accel=accel, cpu=args.cpu)
                found: list[float] = []
                stop = threading.Event()
                watcher = threading.Thread(target=_watch_baseline,
                                           args=(state / "console.log", time.monotonic(), found, stop))
                watcher.start()
                again: float | None = None
                try:
                    seconds = node.power_on(keep_disk=False, bound=args.bound)
                    got_kvm = vm.load(state).plan.kvm
                    # its boot-times report follows SERVING
                    consoles["the bench image"] = _await_report(state / "console.log", 300)
                    _keep(args.consoles, f"{accel}-{i + 1}-bench.log", consoles["the bench image"])
                    if args.second_boot:
                        node.power_off()
                        again = node.power_on(keep_disk=True, bound=args.bound)
                        console = _await_report(state / "console.log", 300)
                        consoles["the bench image, second boot"] = console
                        _keep(args.consoles, f"{accel}-{i + 1}-bench-again.log", console)
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
                if again is not None:
                    serving_again.append(again)
                    print(f"{accel.upper()} run {i + 1}: second boot to SERVING {again:.1f} s")
        if serving:
            med = statistics.median(serving)
            print(f"{accel.upper()}: power-on to agent SERVING over mTLS: median {med:.1f} s over "
                  f"{len(serving)} (min {min(serving):.1f}, max {max(serving):.1f})")
            if baseline:
                base = statistics.median(baseline)
                print(f"{accel.upper()}: baseline power-on to the boot loader: median {base:.1f} s; "
                      f"SERVING is x{med / base:.1f} of it")
            if stock_login:
                login = statistics.median(stock_login)
                print(f"{accel.upper()}: stock Debian, power-on to its login prompt: median {login:.1f} s "
                      f"over {len(stock_login)} (min {min(stock_login):.1f}, max {max(stock_login):.1f}); "
                      f"the bench image's SERVING is {med / login:.2f}x of it (goal <= 1.5x)")
            if serving_again and stock_again:
                a, b = statistics.median(serving_again), statistics.median(stock_again)
                print(f"{accel.upper()}: second boots (caches warm): the bench image to SERVING median "
                      f"{a:.1f} s, stock Debian to its login prompt median {b:.1f} s: {a / b:.2f}x")
        for what, console in consoles.items():
            if console:
                _print_report(f"{accel.upper()} {what}", console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
