"""``appliance boot IMAGE`` (try an image under qemu) and ``appliance flash IMAGE DEVICE``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from provisioning.errors import ImageError
from provisioning.image import boot as vm
from provisioning.image.flash import check_image, flash
from provisioning.output import emit_json, examples, progress

__all__ = ["register"]


def _port_map(text: str) -> tuple[int, int]:
    try:
        guest, host = (int(x) for x in text.split("=", 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected GUEST=HOST, e.g. 8001=18001") from None
    if not (0 < guest < 65536 and 0 <= host < 65536):
        raise argparse.ArgumentTypeError(f"{text!r}: ports are 1..65535 (host 0: any free port)")
    return guest, host


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    b = sub.add_parser("boot", **examples(
            "appliance boot out/disk.raw --detach",
            "appliance boot out/disk.raw --wait-for 'agent: serving' --timeout 900",
            "appliance boot --stop out/disk.raw.vm"),
        parents=[common], help="boot a disk image under qemu (UEFI, image untouched)",
                       description="Boot IMAGE under qemu with OVMF through a copy-on-write overlay. "
                       "The serial console goes to STATE/console.log; the agent's ports are forwarded "
                       "to 127.0.0.1.")
    b.add_argument("image", type=Path, nargs="?", help="raw disk image (disk.raw)")
    b.add_argument("--state", type=Path, help="folder for the overlay, console log, pid (default IMAGE.vm/)")
    b.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                   help="auto: KVM when /dev/kvm opens, TCG otherwise (or when KVM cannot run OVMF)")
    b.add_argument("--memory", type=int, default=2048, help="MiB (default 2048)")
    b.add_argument("--cpus", type=int, default=2, help="virtual CPUs (default 2)")
    b.add_argument("--cpu", metavar="MODEL",
                   help="qemu CPU model (default: host under KVM, max under TCG); a model below the "
                   "image's x86-64 level (image-manifest.json's cpu_level, else x86-64-v2) is "
                   "refused, e.g. qemu64")
    b.add_argument("--port", type=_port_map, action="append", default=[], metavar="GUEST=HOST",
                   help="forward a guest TCP port to 127.0.0.1:HOST (default "
                   + ", ".join(f"{g}={h}" for g, h in vm.LOOPBACK_FORWARDS.items()) + ")")
    b.add_argument("--pcap", type=Path, metavar="FILE",
                   help="record every frame on the guest's network to FILE (pcap; qemu filter-dump)")
    b.add_argument("--restrict-net", action="store_true",
                   help="the guest reaches nothing on or beyond this host but the forwards "
                   "(qemu user network restrict=on; DHCP still answers)")
    b.add_argument("--guest-forward", type=_port_map, action="append", default=[],
                   metavar="GUEST=HOST",
                   help=f"the guest's connections to {vm.GUEST_FORWARD_ADDR}:GUEST reach "
                   "127.0.0.1:HOST on this host (works with --restrict-net)")
    b.add_argument("--hang-after", type=float, metavar="SECONDS",
                   help="with --wait-for: fail early when the console prints nothing for SECONDS "
                   "(a hung guest); keeps the console and UEFI variables")
    b.add_argument("--reset-after", type=float, metavar="SECONDS",
                   help="with --wait-for: a console silent for SECONDS right after the kernel's "
                   "'reboot: Restarting system' or the firmware's 'BdsDxe: starting Boot...' is a "
                   "machine stuck in its reset or firmware (seen under TCG with a TPM): power it off "
                   "and on again on the same disk, UEFI variables and TPM, at most 3 times, keeping "
                   "the evidence in STATE/reset-hang-*")
    b.add_argument("--tpm", action="store_true", help="attach a software TPM 2.0 (swtpm)")
    b.add_argument("--secure-boot", action="store_true",
                   help="Secure Boot firmware (OVMF secboot build) enforcing the keys in the variable "
                   "store (see --vars)")
    b.add_argument("--vars", type=Path, metavar="FILE",
                   help="UEFI variable store to start from (default: OVMF's empty one; with --secure-boot: "
                   "Debian's store with its snakeoil test keys enrolled)")
    b.add_argument("--disk-size", type=int, metavar="MIB",
                   help="disk size the guest sees, larger than the image (the data partition grows into it)")
    b.add_argument("--keep-disk", action="store_true",
                   help="reuse STATE's disk overlay and UEFI variables if there (power the same "
                        "machine on again: what the guest wrote survives)")
    b.add_argument("--keep-console", action="store_true",
                   help="with --keep-disk: append to STATE/console.log instead of starting it afresh")
    b.add_argument("--wait-for", metavar="REGEX",
                   help="block until the console prints a line matching REGEX, then power off "
                   "(with --detach: leave it running); exit 1 on timeout")
    b.add_argument("--timeout", type=float, default=600, help="seconds for --wait-for (default 600)")
    b.add_argument("--detach", action="store_true",
                   help="leave the machine running and return (stop it with --stop STATE)")
    b.add_argument("--stop", type=Path, metavar="STATE", help="stop the machine started in STATE")
    b.set_defaults(handler=_boot)

    f = sub.add_parser("flash", **examples(
            "appliance flash out/disk.raw /dev/sdX --yes"),
        parents=[common], help="write a disk image to a device, verified",
                       description="Check IMAGE against image-manifest.json beside it, refuse mounted or "
                       "system disks, write it, read it back and compare hashes.")
    f.add_argument("image", type=Path, help="the disk image (disk.raw)")
    f.add_argument("device", type=Path, help="block device (or a file)")
    f.add_argument("--manifest", type=Path, help="default: image-manifest.json next to IMAGE")
    f.add_argument("--yes", action="store_true", help="really overwrite DEVICE")
    f.set_defaults(handler=_flash)


def _check_boot_args(args: argparse.Namespace) -> None:
    if args.image is None:
        raise ImageError("appliance boot: give IMAGE (or --stop STATE)")
    if args.keep_console and not args.keep_disk:
        raise ImageError("appliance boot: --keep-console appends to the last power-on's console: "
                         "it needs --keep-disk")
    if args.reset_after is not None and (not args.wait_for or args.reset_after <= 0):
        raise ImageError(f"appliance boot: --reset-after {args.reset_after:g}: needs --wait-for, and a "
                         "number of seconds above 0")


def _boot(args: argparse.Namespace) -> int:
    if args.stop is not None:
        machine = vm.load(args.stop)
        how = vm.stop(machine)
        if args.json:
            emit_json(machine.to_json() | {"stopped": how})
        else:
            print(f"machine {machine.pid}: {how}")
        return 0
    _check_boot_args(args)
    if args.cpu:  # before anything starts: a CPU below the image's level ends in SIGILL
        vm.check_cpu_model(args.cpu, vm.image_cpu_level(args.image))
    kvm = {"kvm": True, "tcg": False}.get(args.accel, vm.kvm_usable())
    ports = dict(args.port) or dict(vm.LOOPBACK_FORWARDS)
    state = args.state or args.image.with_name(args.image.name + ".vm")
    firmware, template = ((vm.OVMF_CODE_SECBOOT, vm.OVMF_VARS_SNAKEOIL) if args.secure_boot
                          else (vm.OVMF_CODE, vm.OVMF_VARS))
    plan = vm.BootPlan(args.image, state, kvm, args.memory, args.cpus, ports,
                       firmware=firmware, vars_template=args.vars or template, secure_boot=args.secure_boot,
                       tpm_socket=state / "swtpm.sock" if args.tpm else None,
                       disk_size=args.disk_size * 1024 * 1024 if args.disk_size else None,
                       keep_disk=args.keep_disk, keep_console=args.keep_console,
                       cpu_model=args.cpu,
                       pcap=args.pcap.resolve() if args.pcap else None,
                       restrict_net=args.restrict_net, guest_forwards=dict(args.guest_forward))
    machine = vm.start(plan, fallback_tcg=args.accel == "auto")
    kvm = machine.plan.kvm
    info = machine.to_json()
    if not args.json:
        print(f"started pid {machine.pid} ({'KVM' if kvm else 'TCG'}); console {plan.console}; "
              + ", ".join(f"guest {g} -> 127.0.0.1:{h}" for g, h in sorted(ports.items())), file=sys.stderr)
    watch = _reset_watch(machine, args)
    try:
        if args.wait_for:
            began = time.monotonic()
            line = vm.wait_for(machine, args.wait_for, args.timeout, stall=args.hang_after, watch=watch)
            info |= {"matched": line, "seconds": round(time.monotonic() - began, 1)}
            if not args.json:
                print(line)
        elif not args.detach:
            _follow(machine)
            info |= {"exited": True}
    except BaseException:
        vm.stop(watch.machine if watch is not None else machine, grace=5)
        raise
    if watch is not None and watch.resets:  # the machine that runs now is the last power-on's
        machine = watch.machine
        info |= machine.to_json() | {"power_cycles": [str(p) for p in watch.resets]}
    if not args.detach and args.wait_for:
        info |= {"stopped": vm.stop(machine)}
    if args.json:
        emit_json(info)
    return 0


def _reset_watch(machine: vm.Machine, args: argparse.Namespace) -> vm.ConsoleWatch | None:
    """With ``--wait-for --reset-after``: the watch that power-cycles ``machine`` when it is stuck
    in its reset or firmware (and, with ``--hang-after``, reports a hang)."""
    if not (args.wait_for and args.reset_after):
        return None
    watch = vm.ConsoleWatch(machine, args.hang_after or args.timeout, reset_after=args.reset_after,
                            power_cycle=lambda: vm.power_cycle(watch.machine))
    return watch


def _follow(machine: vm.Machine) -> None:
    """Copy the console to stdout until qemu exits (Ctrl-C stops the machine)."""
    offset = 0
    while True:
        with machine.plan.console.open("rb") as f:
            f.seek(offset)
            chunk = f.read()
        offset += len(chunk)
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        if not chunk and not machine.alive():
            return
        time.sleep(0.2)


def _flash(args: argparse.Namespace) -> int:
    check_image(args.image, args.manifest)  # before asking anything
    length = args.image.stat().st_size
    with progress(f"writing {args.device}", length) as wbar, progress("verifying", length) as vbar:
        result = flash(args.image, args.device, confirm=args.yes, manifest=args.manifest,
                       progress=wbar.advance, verify_progress=vbar.advance)
    if args.json:
        emit_json({"image": str(result.image), "target": str(result.target), "bytes": result.bytes,
                   "sha256": result.sha256, "seconds": round(result.seconds, 2), "verified": True})
    else:
        print(f"{result.target}: wrote {result.bytes} bytes in {result.seconds:.1f} s; "
              f"read back sha256 {result.sha256} matches the manifest")
    return 0
