"""The boot benchmark's baseline: a stock Debian disk of the bench image's own packages.

Issue #14 compares the appliance's boot with a stock Debian boot on the same machine.  A
cloud image cannot be fetched here (no internet), so the baseline is built from what the
appliance's build already has: the rootfs stage's tarball, which is mmdebstrap's Debian of the
image's package set with every package's own defaults (nothing of the configure or seal stage:
no agent, no hardening, no verity, no UKI).  On top, only what a stock installed Debian has:
a generic initrd by the root's own dracut, systemd-boot with a plain boot entry (kernel and
initrd files, Debian's ``quiet``, the same serial console as the appliance), an ext4 root
remounted read-write by fstab, DHCP on the wired link by systemd-networkd (as Debian's cloud
images do), and the serial console's login prompt, which is where the baseline's boot ends.

The disk is cached next to the rootfs tarball it came from (by that tarball's sha256).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.fsutil import file_sha256
from provisioning.image.disk import TYPE, Partition, _copy_into, build_esp, sfdisk_script
from provisioning.image.partuuid import derived_uuid
from provisioning.image.plan import BOOT_TIMES_SCRIPT, boot_times_script, boot_times_unit
from provisioning.image.seal import chroot_argv, kernel_version
from provisioning.tools import run

LOGIN_PROMPT = r"login: "  # the serial getty's prompt: the end of the baseline's boot
NAME = "stock-debian"
ESP_MIB = 256
EPOCH = 1767225600  # 2026-01-01: only the ESP's time stamps; nothing is compared by bytes
SERIAL_GETTY = "serial-getty@ttyS0.service"


def _configure(root: Path, root_uuid: str) -> None:
    """What a stock install adds to the unpacked packages: fstab, a hostname, DHCP, and the
    same boot-times report the bench image prints (for the serial getty's chain)."""
    (root / "etc/fstab").write_text(f"UUID={root_uuid} / ext4 errors=remount-ro 0 1\n")
    (root / "etc/hostname").write_text("stock\n")
    (root / "etc/machine-id").write_text("")  # a first boot, as the appliance's overlay is
    network = root / "etc/systemd/network/50-dhcp.network"
    network.parent.mkdir(parents=True, exist_ok=True)
    network.write_text("[Match]\nName=en*\n\n[Network]\nDHCP=yes\n")
    unit = root / "etc/systemd/system/appliance-boot-times.service"
    unit.write_text(boot_times_unit(after=SERIAL_GETTY))
    script = root / BOOT_TIMES_SCRIPT.lstrip("/")
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(boot_times_script(SERIAL_GETTY))
    script.chmod(0o755)


def build_stock_disk(rootfs_tar: Path, cache: Path) -> Path:
    """The stock Debian disk made from ``rootfs_tar`` (cached in ``cache``); returns its path.

    Raises:
        ToolError: tar, dracut, systemctl, mkfs or sfdisk failed in the root.
    """
    key = file_sha256(rootfs_tar)[:16]
    disk = cache / key / "disk.raw"
    if disk.is_file():
        return disk
    work = cache / key / "work"
    shutil.rmtree(work, ignore_errors=True)
    root = work / "root"
    root.mkdir(parents=True)
    print(f"stock Debian baseline: unpacking {rootfs_tar}", flush=True)
    run(["tar", "-xpf", rootfs_tar, "-C", root, "--numeric-owner"])
    kver = kernel_version(root)
    root_uuid = derived_uuid(NAME, "root")
    _configure(root, root_uuid)
    print(f"stock Debian baseline: dracut (generic initrd) for {kver} in the root", flush=True)
    run(chroot_argv(root, work, ["dracut", "--quiet", "--force", "--no-hostonly", "--kver", kver,
                                 "/tmp/seal/initrd.img"]), capture=False)
    run(chroot_argv(root, work, ["systemctl", "enable", "systemd-networkd.service",
                                 "appliance-boot-times.service"]))
    loader = work / "loader.conf"
    loader.write_text("timeout 0\n")
    entry = work / "debian.conf"
    entry.write_text(f"title Debian\nlinux /vmlinuz\ninitrd /initrd.img\n"
                     f"options root=UUID={root_uuid} ro console=tty0 console=ttyS0,115200 quiet\n")
    esp = work / "esp.vfat"
    boot_loader = root / "usr/lib/systemd/boot/efi/systemd-bootx64.efi"
    build_esp(run, esp, name=NAME, size_mib=ESP_MIB, epoch=EPOCH,
              files=[(boot_loader, "/EFI/BOOT/BOOTX64.EFI"), (loader, "/loader/loader.conf"),
                     (entry, "/loader/entries/debian.conf"), (root / f"boot/vmlinuz-{kver}", "/vmlinuz"),
                     (work / "initrd.img", "/initrd.img")])
    used = int(subprocess.run(["du", "-sm", str(root)], capture_output=True, text=True,
                              check=True).stdout.split()[0])
    root_mib = used + used // 2 + 256
    ext4 = work / "root.ext4"
    with ext4.open("wb") as f:
        f.truncate(root_mib << 20)
    print(f"stock Debian baseline: ext4 root of {root_mib} MiB", flush=True)
    run(["mkfs.ext4", "-q", "-F", "-L", "root", "-U", root_uuid, "-d", root, ext4])
    parts = (Partition("esp", TYPE["esp"], derived_uuid(NAME, "esp"), 1, ESP_MIB),
             Partition("root", TYPE["root"], derived_uuid(NAME, "root-part"), 1 + ESP_MIB, root_mib))
    partial = work / "disk.raw"
    with partial.open("wb") as f:
        f.truncate((1 + ESP_MIB + root_mib + 1) << 20)
    run(["sfdisk", "--no-reread", "--no-tell-kernel", "--quiet", partial],
        input_bytes=sfdisk_script(derived_uuid(NAME, "disk"), parts).encode())
    _copy_into(partial, parts[0], esp)
    _copy_into(partial, parts[1], ext4)
    partial.replace(disk)
    shutil.rmtree(work)
    return disk
