"""The seal stage: a configured root directory becomes a read-only, verifiable boot target.

1. squashfs of the root (reproducible: fixed times from SOURCE_DATE_EPOCH, no xattrs unless
   asked, sorted by mksquashfs); a few boot-time files are added as pseudo files so the input
   directory is never modified;
2. dm-verity over it (``veritysetup format`` with a salt and UUID derived from the squashfs,
   so the same root gives the same bytes and the same root hash);
3. an initrd made by dracut *inside* the root (its systemd 257, its kernel modules), while
   steps 1 and 2 run (it does not need the root hash; only the UKI's command line does): systemd's
   veritysetup generator opens the root from ``roothash=`` alone, because the disk stage gives
   the root and verity partitions the UUIDs systemd derives from the root hash;
4. a Unified Kernel Image made by ukify inside the root, its command line carrying the root
   hash and the mounts of the data partition (/var) and the ESP (/efi, for boot blessing);
5. signed with sbsign when a Secure Boot key is configured (the UKI and systemd-boot); with a
   site PCR key, ukify also signs the UKI's PCR 11 policy of the initrd phase, which is what a
   TPM-sealed data partition unlocks with (provisioning.image.pcrsign; checked before recording).

Outputs in ``ctx.out``: ``root.squashfs``, ``root.verity``, ``root.roothash``,
``NAME-VERSION.efi`` (the UKI), ``systemd-bootx64.efi`` and ``seal.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from agent.fsutil import atomic_write_bytes, atomic_write_text, file_sha256
from agent.osrelease import SEALED_DATA_MOUNT
from provisioning.errors import ImageError
from provisioning.image.disk import Sealed, data_uuid, esp_uuid
from provisioning.image.measure import pcr11_record
from provisioning.image.pcrsign import SIGNED_PHASES, check_pcr_signature, load_pcr_key, public_pem
from provisioning.image.profile import SEAL_OWNED_ARGS
from provisioning.image.recovery import ESCROW_PATH, load_recovery_public_key
from provisioning.image.sealed_mode import SEALED_MODE_DRIVERS, SEALED_MODE_UNIT, sealed_mode_initrd_files
from provisioning.image.stage import RunFn, StageContext, check_paths

__all__ = ["PACKAGES", "REQUIRED_IN_ROOTFS", "build_initrd", "build_uki", "chroot_argv", "kernel_cmdline",
           "kernel_version", "recovery_script", "repart_data_conf", "seal", "sealed_crypttab",
           "sealed_initrd_files", "squashfs_argv", "verity_format", "verity_params"]

log = logging.getLogger(__name__)

# Paths inside the root that the seal stage runs or copies, and the Debian packages that
# provide them (trixie): the image profile must install these packages.
REQUIRED_IN_ROOTFS = {
    "usr/bin/dracut": "dracut",
    "usr/bin/ukify": "systemd-ukify",
    "usr/lib/systemd/boot/efi/linuxx64.efi.stub": "systemd-boot-efi",
    "usr/lib/systemd/boot/efi/systemd-bootx64.efi": "systemd-boot-efi",
    "usr/lib/systemd/systemd-veritysetup": "systemd-cryptsetup",
    "usr/lib/systemd/system-generators/systemd-veritysetup-generator": "systemd-cryptsetup",
    "usr/lib/systemd/systemd-bless-boot": "systemd-boot",
    "usr/lib/systemd/system/systemd-repart.service": "systemd-repart",
    # the initrd's PCR 11 phase words (enter-initrd, leave-initrd) need systemd's pcrextend and
    # the tss2 libraries it loads; dracut's tpm2-tss module wants tpm2-tools' `tpm2`
    "usr/lib/systemd/systemd-pcrextend": "systemd",
    "usr/bin/tpm2": "tpm2-tools",
}
# What the pipeline adds to the image's package set for this stage (pipeline.stage_packages()).
PACKAGES = ("dracut", "linux-image-amd64", "systemd-boot", "systemd-boot-efi", "systemd-cryptsetup",
            "systemd-repart", "systemd-ukify", "tpm2-tools", "zstd")
# systemd-pcrphase: the initrd measures its phases into PCR 11 as systemd-measure expects (without
# it a booted node's PCR 11 is none of the values the build records, and it cannot attest)
DRACUT_MODULES = ("systemd", "systemd-veritysetup", "dm", "systemd-pcrphase", "tpm2-tss")
DRACUT_DRIVERS = ("squashfs", "dm-verity", "virtio_blk", "virtio_scsi", "virtio_pci", "nvme", "ahci",
                  "sd_mod", "usb_storage", "xhci_pci", "ext4", "vfat")
# dracut's own "zstd" is `zstd -15 -q -T0`, zstd's multi-threaded mode: the one step of the UKI
# build that runs on threads. CI once sealed one root twice and got two different UKIs (2026-11-30,
# the part unknown; 20 runs here, loaded or not, were identical). zstd documents its threaded
# output as deterministic, but its jobs reference the previous job's data where it lies in memory
# (cf. ZSTD_c_deterministicRefPrefix), so single-threaded it is: about 2 s more on 2 cores.
# tests/test_seal_system.py names the differing sections and initrd files if it happens again.
# Level 6, not dracut's 15: on the bench image's initrd (87 MB, a third of it kernel modules that
# are xz-compressed already) 15 took 14.6 s for 43.2 MB, 6 takes 1.5 s for 43.9 MB; zstd
# decompresses both at the same speed (0.13 s), so the boot does not notice (issue #14).
ZSTD_DETERMINISTIC = "zstd -6 -q --single-thread"
# mksquashfs's zstd level.  Its default, 15, took 69 s of a 250 s image build for the bench's
# 856 MB root (317 MB); level 6 takes 6.8 s for 337 MB (+6 %), and reads back as fast
# (issue #14: the build within 1.5x of a bare mmdebstrap).
SQUASHFS_ZSTD_LEVEL = 6
# The data partition grows into the space behind it on first boot.
REPART_DATA_CONF = "[Partition]\nType=linux-generic\n"
# A sealed data partition (StageContext.seal_data) is made by the node, in the initrd of its
# first boot: systemd-repart creates it in the space the disk stage left, as LUKS2 with a fresh
# volume key that it seals to the TPM2 under PCR 7 (the Secure Boot state) and the site's signed
# PCR 11 policy (systemd-stub hands the UKI's .pcrpkey to the initrd in /.extra), formats ext4
# and copies the image's /var in. On every boot systemd-cryptsetup opens it in the initrd, where
# the signed policy of the enter-initrd phase holds; once the initrd is left, PCR 11 is past
# every signed value and nothing in the booted system can have the TPM unseal the key again.
# repart never formats a partition that exists: later boots, and other slots, find it and open it.
SEALED_DATA_MODULES = ("systemd-repart", "systemd-cryptsetup")
# programs the initrd needs for it beyond dracut's modules: repart's mkfs, the recovery key's escrow
SEALED_DATA_TOOLS = ("mkfs.ext4", "mke2fs", "systemd-cryptenroll", "openssl", "grep",
                     # sealed mode's RAM /var (provisioning.image.sealed_mode)
                     "dmsetup", "cp", "mv", "cat", "udevadm")
# ... and the packages that put them in the root (the pipeline adds them to a sealing profile's)
SEALED_DATA_REQUIRED = {"usr/bin/openssl": "openssl", "usr/bin/systemd-cryptenroll": "systemd-cryptsetup",
                        # Node/Unseal's helper checks the recovery key and reads the TPM token
                        "usr/sbin/cryptsetup": "cryptsetup-bin"}
SEALED_DATA_PACKAGES = tuple(sorted(set(SEALED_DATA_REQUIRED.values())))
SEALED_DATA_MAPPER = "data"
_SEALED_REPART_DROPIN = """[Unit]
# the image's /var is copied from the root, so the root must be mounted first
After=sysroot.mount
Requires=sysroot.mount

[Service]
ExecStart=
ExecStart=systemd-repart --dry-run=no --copy-source=/sysroot --tpm2-device=auto --tpm2-pcrs=7 \\
    --tpm2-public-key=/.extra/tpm2-pcr-public-key.pem --tpm2-public-key-pcrs=11
"""


def repart_data_conf(name: str, label: str, sealed: bool) -> str:
    """The repart.d definition of the data partition: grown (plain), or made sealed at first boot."""
    if not sealed:
        return REPART_DATA_CONF
    return (f"[Partition]\nType=linux-generic\nLabel={label}\nUUID={data_uuid(name)}\n"
            "Format=ext4\nEncrypt=tpm2\nCopyFiles=/var:/\n")


# When the volume is opened: after repart (which makes it on first boot, and runs once the root
# is mounted), before the initrd hands over. Not as part of cryptsetup.target, as crypttab entries
# are by default: dracut mounts the root only after that target, and repart needs the root.
# Wants, not Requires: repart is stopped when the initrd hands over, and Requires would stop
# (close) the volume with it.
_SEALED_CRYPTSETUP_DROPIN = """[Unit]
After=systemd-repart.service
Wants=systemd-repart.service
Before=initrd.target
"""
_SEALED_INITRD_DROPIN = f"""[Unit]
Wants=systemd-cryptsetup@{SEALED_DATA_MAPPER}.service appliance-recovery-key.service {SEALED_MODE_UNIT}
"""
# The recovery key (provisioning.image.recovery): enrolled once, in the initrd where the TPM
# policy holds, encrypted at once to the site's key; only the ciphertext is written, to the ESP.
_RECOVERY_UNIT = f"""[Unit]
Description=Escrow the sealed data partition's recovery key to the site
DefaultDependencies=no
After=systemd-cryptsetup@{SEALED_DATA_MAPPER}.service
Requisite=systemd-cryptsetup@{SEALED_DATA_MAPPER}.service
Before=initrd.target

[Service]
Type=oneshot
ExecStart=/usr/lib/appliance/escrow-recovery-key
"""
_RECOVERY_SCRIPT = """#!/bin/sh
# Enrol the sealed data partition's recovery key once and escrow it to the site (see
# provisioning/image/recovery.py). The key lives in this shell's memory only; if anything after
# the enrolment fails, its keyslot is wiped and the next boot tries again.
set -u
data=/dev/disk/by-partuuid/@DATA@
esp=/dev/disk/by-partuuid/@ESP@
mnt=/run/appliance-esp
if systemd-cryptenroll "$data" | grep -qw recovery; then
    exit 0  # enrolled and escrowed on an earlier boot
fi
undo() {
    echo "appliance: recovery key: $1; its keyslot is wiped, the next boot tries again" >&2
    systemd-cryptenroll --unlock-tpm2-device=auto --wipe-slot=recovery "$data" >/dev/null 2>&1
    umount "$mnt" 2>/dev/null
    exit 1
}
key=$(systemd-cryptenroll --unlock-tpm2-device=auto --recovery-key "$data" 2>/dev/null) || {
    echo "appliance: recovery key: systemd-cryptenroll could not enrol one" >&2
    exit 1
}
case "$key" in
    ""|*[!a-z-]*) undo "systemd-cryptenroll printed no recovery key" ;;
esac
mkdir -p "$mnt" && mount -t vfat -o umask=0077 "$esp" "$mnt" || undo "cannot mount the ESP"
mkdir -p "$mnt/appliance" || undo "cannot write to the ESP"
printf '%s' "$key" | openssl pkeyutl -encrypt -pubin -inkey /etc/appliance/recovery.pub \\
    -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256 -pkeyopt rsa_mgf1_md:sha256 \\
    -out "$mnt/@ESCROW@.new" || undo "cannot encrypt it to the site key"
mv "$mnt/@ESCROW@.new" "$mnt/@ESCROW@" || undo "cannot write the escrow to the ESP"
umount "$mnt" || undo "cannot unmount the ESP"
echo "appliance: recovery key enrolled; escrowed to the site's key on the ESP (@ESCROW@)"
"""


def sealed_crypttab(name: str) -> str:
    """The initrd's /etc/crypttab: open the data partition with the TPM2 alone (headless: never
    ask for a passphrase, a node whose measurements changed stays sealed); ``noauto,nofail``
    keep it out of cryptsetup.target (see _SEALED_CRYPTSETUP_DROPIN), ``x-initrd.attach`` keeps
    it open when the initrd hands over to the root."""
    return (f"{SEALED_DATA_MAPPER} PARTUUID={data_uuid(name)} - "
            "tpm2-device=auto,headless=true,x-initrd.attach,noauto,nofail,"
            "x-systemd.device-timeout=5min\n")


def recovery_script(name: str) -> str:
    """The initrd's script that enrols and escrows the recovery key of image ``name``'s data."""
    return (_RECOVERY_SCRIPT.replace("@DATA@", data_uuid(name)).replace("@ESP@", esp_uuid(name))
            .replace("@ESCROW@", ESCROW_PATH))


def sealed_initrd_files(name: str, label: str, tree: Path, recovery_public: bytes) -> None:
    """Write what a sealed data partition adds to the initrd under ``tree`` (dracut --include);
    ``recovery_public`` is the site's recovery public key (PEM)."""
    units = "etc/systemd/system"
    script = tree / "usr/lib/appliance/escrow-recovery-key"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(recovery_script(name))
    script.chmod(0o755)
    for rel, text in (("etc/crypttab", sealed_crypttab(name)),
                      ("etc/appliance/recovery.pub", recovery_public.decode()),
                      (f"{units}/appliance-recovery-key.service", _RECOVERY_UNIT),
                      ("usr/lib/repart.d/50-appliance-data.conf", repart_data_conf(name, label, True)),
                      (f"{units}/systemd-repart.service.d/50-appliance-sealed-data.conf",
                       _SEALED_REPART_DROPIN),
                      (f"{units}/systemd-cryptsetup@{SEALED_DATA_MAPPER}.service.d/50-appliance-sealed-data.conf",
                       _SEALED_CRYPTSETUP_DROPIN),
                      (f"{units}/initrd.target.d/50-appliance-sealed-data.conf", _SEALED_INITRD_DROPIN)):
        path = tree / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for rel, (text, mode) in sealed_mode_initrd_files(name).items():
        path = tree / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)

_CHROOT_SCRIPT = r"""set -eu
root=$1; work=$2; shift 2
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --rbind /dev "$root/dev"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
mount -t tmpfs -o mode=1777 tmpfs "$root/var/tmp"
mkdir "$root/tmp/seal"
mount --bind "$work" "$root/tmp/seal"
exec chroot "$root" "$@"
"""


def chroot_argv(rootfs: Path, work: Path, command: list[str]) -> list[str]:
    """Run ``command`` in ``rootfs`` in a private mount namespace.

    /proc, /sys, /dev and fresh tmpfs on /tmp and /var/tmp are mounted only inside that
    namespace (they vanish with it), ``work`` appears as /tmp/seal: the root directory
    itself is left exactly as it was.
    """
    return ["unshare", "--mount", "--propagation", "private", "--fork", "--",
            "sh", "-c", _CHROOT_SCRIPT, "seal-chroot", str(rootfs), str(work), *command]


def kernel_version(rootfs: Path) -> str:
    """The one kernel version installed in ``rootfs`` (from /boot/vmlinuz-*).

    Raises:
        ImageError: none or several kernels are installed.
    """
    found = sorted(p.name.removeprefix("vmlinuz-") for p in (rootfs / "boot").glob("vmlinuz-*"))
    if len(found) != 1:
        raise ImageError(f"{rootfs}/boot: expected exactly one vmlinuz-*, found {found or 'none'} "
                         "(install one kernel package, e.g. linux-image-amd64)")
    if not any((rootfs / d / found[0]).is_dir() for d in ("usr/lib/modules", "lib/modules")):
        raise ImageError(f"{rootfs}: kernel {found[0]} has no modules directory")
    return found[0]


def squashfs_argv(rootfs: Path, image: Path, epoch: int, pseudo: list[str], keep_xattrs: bool) -> list[str]:
    """mksquashfs arguments for a reproducible image of ``rootfs``.

    Ownership is kept as in the root (a root-mode mmdebstrap gives the same uids every time;
    flattening everything to root would break /etc/shadow's group and the agent's files).
    """
    argv = ["mksquashfs", str(rootfs), str(image), "-noappend", "-comp", "zstd",
            "-Xcompression-level", str(SQUASHFS_ZSTD_LEVEL), "-b", "256K",
            "-mkfs-time", str(epoch), "-all-time", str(epoch), "-reproducible", "-no-progress",
            "-quiet", "-xattrs" if keep_xattrs else "-no-xattrs"]
    for definition in pseudo:
        argv += ["-p", definition]
    # -e takes every argument after it, so it comes last; the mounts made at run time
    # must not carry build-time leftovers
    return [*argv, "-wildcards", "-e", "proc/*", "sys/*", "dev/*", "run/*", "tmp/*", "var/tmp/*"]


def verity_params(squashfs_sha256: str) -> tuple[str, str]:
    """(salt, uuid) for veritysetup: derived from the data, so the same root gives the same tree."""
    salt = hashlib.sha256(f"sovereign-appliance\0verity-salt\0{squashfs_sha256}".encode()).hexdigest()
    digest = hashlib.sha256(f"sovereign-appliance\0verity-uuid\0{squashfs_sha256}".encode()).digest()
    return salt, str(uuid.UUID(bytes=digest[:16], version=4))


def verity_format(run: RunFn, data: Path, hash_image: Path) -> str:
    """Write the verity hash tree of ``data`` to ``hash_image``; return the root hash (hex).

    Raises:
        ToolError: veritysetup failed. ImageError: its output had no root hash.
    """
    salt, vuuid = verity_params(file_sha256(data))
    hash_image.unlink(missing_ok=True)
    done = run(["veritysetup", "format", data, hash_image, "--hash", "sha256", "--format", "1",
                "--data-block-size", "4096", "--hash-block-size", "4096", "--salt", salt, "--uuid", vuuid])
    match = re.search(r"^Root hash:\s+([0-9a-f]{64})\s*$", done.text, re.MULTILINE)
    if not match:
        raise ImageError(f"veritysetup format {data}: no root hash in its output:\n{done.text}")
    return match.group(1)


def kernel_cmdline(name: str, roothash: str, extra: tuple[str, ...] = (), *,
                   sealed_data: bool = False) -> str:
    """The sealed kernel command line.

    ``roothash=`` alone lets systemd-veritysetup-generator (in the initrd) find the data and
    hash partitions by the UUIDs derived from the hash and map them as /dev/mapper/root.
    A sealed data partition is mounted from the mapping the initrd opened.
    """
    var = SEALED_DATA_MOUNT if sealed_data else f"systemd.mount-extra=PARTUUID={data_uuid(name)}:/var:"
    esp = f"PARTUUID={esp_uuid(name)}"
    # 5 minutes for the partitions' devices to appear, not systemd's 90 s: on a slow boot (a
    # guest starved of CPU under emulation: efi_pstore held a vCPU for 80 s, udev's coldplug came
    # after 90 s) the default sent the node to an emergency shell with every device present
    wait = "x-systemd.device-timeout=5min"
    args = [
        f"roothash={roothash}", "root=/dev/mapper/root", "rootfstype=squashfs", "ro",
        f"{var}ext4:defaults,nodev,nosuid,x-systemd.growfs,x-systemd.after=systemd-repart.service,{wait}",
        f"systemd.mount-extra={esp}:/efi:vfat:umask=0077,nodev,nosuid,noexec,{wait}",
        # the mounts above are the whole story: no guessing by partition type
        "systemd.gpt_auto=0",
        "console=tty0", "console=ttyS0,115200", "panic=10", *extra,
    ]
    return " ".join(args)


# Arguments the seal stage owns: a root's /etc/kernel/cmdline cannot override them.
_OWNED = SEAL_OWNED_ARGS


def root_cmdline(rootfs: Path) -> tuple[str, ...]:
    """Kernel arguments from the root's /etc/kernel/cmdline, without those the seal owns."""
    path = rootfs / "etc/kernel/cmdline"
    if not path.is_file():
        return ()
    kept = []
    for arg in path.read_text().split():
        if arg in {"ro", "rw"} or arg.startswith(_OWNED):
            log.warning("seal: %s: ignoring %r (the sealed command line sets it)", path, arg)
        else:
            kept.append(arg)
    return tuple(kept)


def _pseudo_files(ctx: StageContext, work: Path) -> list[str]:
    """Files the sealed root needs that the configure stage need not know about."""
    rootfs = ctx.rootfs
    defs = []
    if not (rootfs / "efi").exists():
        defs.append("efi d 755 0 0")
    repart_dir = rootfs / "usr/lib/repart.d"
    if not repart_dir.exists():
        defs.append("usr/lib/repart.d d 755 0 0")
    conf = work / "50-appliance-data.conf"
    conf.write_text(repart_data_conf(ctx.name, ctx.sizes.data_label, ctx.seal_data))
    defs.append(f"usr/lib/repart.d/50-appliance-data.conf f 644 0 0 cat {conf}")
    return defs


def _os_release(rootfs: Path, name: str, version: str) -> str:
    src = rootfs / "etc/os-release"
    if not src.exists():
        src = rootfs / "usr/lib/os-release"
    lines = [ln for ln in src.read_text().splitlines()
             if not ln.startswith(("IMAGE_ID=", "IMAGE_VERSION=", "PRETTY_NAME="))]
    # systemd-boot sorts and names entries by these
    lines += [f"IMAGE_ID={name}", f"IMAGE_VERSION={version}", f'PRETTY_NAME="{name} {version}"']
    return "\n".join(lines) + "\n"


def _check_rootfs(rootfs: Path, seal_data: bool = False) -> None:
    if not rootfs.is_dir():
        raise ImageError(f"root filesystem {rootfs} is not a directory")
    required = REQUIRED_IN_ROOTFS | (SEALED_DATA_REQUIRED if seal_data else {})
    missing = sorted({pkg for rel, pkg in required.items() if not (rootfs / rel).exists()})
    if missing:
        raise ImageError(f"{rootfs}: the seal stage needs these packages in the image: {', '.join(missing)}")


def sign(run: RunFn, ctx: StageContext, src: Path, dest: Path) -> None:
    """sbsign ``src`` to ``dest`` with the context's Secure Boot key (or copy it unsigned)."""
    dest.unlink(missing_ok=True)
    if not ctx.signing:
        shutil.copyfile(src, dest)
        return
    assert ctx.secure_boot_key is not None and ctx.secure_boot_cert is not None
    run(["sbsign", "--key", ctx.secure_boot_key, "--cert", ctx.secure_boot_cert, "--output", dest, src])


def build_initrd(ctx: StageContext, kver: str, work: Path, *,
                 recovery_public: bytes | None = None) -> Path:
    """dracut inside the root: the UKI's initrd, ``work``/initrd.img (returned).

    It needs the root but not its hash, so :func:`seal` runs it while mksquashfs compresses.
    Both only read the root: dracut runs in its own mount namespace and writes to ``work``.
    """
    epoch = {"SOURCE_DATE_EPOCH": str(ctx.source_date_epoch)}
    drivers = " ".join(DRACUT_DRIVERS + (SEALED_MODE_DRIVERS if ctx.seal_data else ()))
    modules: tuple[str, ...] = DRACUT_MODULES
    sealed_data: list[str] = []
    if ctx.seal_data:
        assert recovery_public is not None  # StageContext refuses seal_data without the key
        sealed_initrd_files(ctx.name, ctx.sizes.data_label, work / "initrd", recovery_public)
        modules += SEALED_DATA_MODULES
        sealed_data = ["--include", "/tmp/seal/initrd", "/", "--install", " ".join(SEALED_DATA_TOOLS)]  # noqa: S108 (in the chroot)
    ctx.run(chroot_argv(ctx.rootfs, work, [
        "dracut", "--quiet", "--force", "--no-hostonly", "--no-hostonly-cmdline", "--reproducible",
        "--compress", ZSTD_DETERMINISTIC, "--kver", kver, "--add", " ".join(modules),
        "--add-drivers", drivers, "--omit", "plymouth", *sealed_data,
        "/tmp/seal/initrd.img"]), env=epoch)  # noqa: S108 (in the chroot)
    return work / "initrd.img"


def build_uki(ctx: StageContext, kver: str, cmdline: str, work: Path,
              pcr_public: bytes | None = None) -> Path:
    """ukify inside the root, from :func:`build_initrd`'s initrd in ``work``; returns the unsigned
    UKI in ``work``.  With ``pcr_public`` (the PEM of ``ctx.pcr_key``'s public half) ukify signs
    the UKI's PCR 11 policy."""
    (work / "cmdline").write_text(cmdline + "\n")
    (work / "os-release").write_text(_os_release(ctx.rootfs, ctx.name, ctx.version))
    epoch = {"SOURCE_DATE_EPOCH": str(ctx.source_date_epoch)}
    ukify = ["ukify", "build", f"--linux=/boot/vmlinuz-{kver}", "--initrd=/tmp/seal/initrd.img",
             "--cmdline=@/tmp/seal/cmdline", "--os-release=@/tmp/seal/os-release", f"--uname={kver}",
             "--output=/tmp/seal/uki.efi"]
    if pcr_public is None:
        ctx.run(chroot_argv(ctx.rootfs, work, ukify), env=epoch)
        return work / "uki.efi"
    # the site signs the PCR 11 policy of the initrd phase (provisioning.image.pcrsign): the
    # private key is in the work folder for ukify's run only, readable by root alone
    assert ctx.pcr_key is not None
    (work / "pcr.pub").write_bytes(pcr_public)
    secret = work / "pcr.key"
    try:
        atomic_write_bytes(secret, ctx.pcr_key.read_bytes(), mode=0o600)
        ctx.run(chroot_argv(ctx.rootfs, work, [
            *ukify, "--pcr-private-key=/tmp/seal/pcr.key", "--pcr-public-key=/tmp/seal/pcr.pub",
            "--pcr-banks=sha256", f"--phases={' '.join(SIGNED_PHASES)}"]), env=epoch)
    finally:
        secret.unlink(missing_ok=True)
    return work / "uki.efi"


def seal(ctx: StageContext) -> Sealed:
    """Run the seal stage (see the module docstring); return what it made.

    Arguments in the root's /etc/kernel/cmdline (the configure stage's, e.g. ``apparmor=1``)
    join the sealed command line.

    Raises:
        ImageError: the root lacks a needed package, has no single kernel, or a signing key
            is missing. ToolError: mksquashfs, veritysetup, dracut, ukify or sbsign failed.
    """
    _check_rootfs(ctx.rootfs, ctx.seal_data)
    check_paths([("Secure Boot key", ctx.secure_boot_key), ("Secure Boot certificate", ctx.secure_boot_cert),
                 ("PCR signing key", ctx.pcr_key), ("recovery public key", ctx.recovery_key)])
    # a bad key is refused before the long steps, not after them
    pcr_public = public_pem(load_pcr_key(ctx.pcr_key)) if ctx.pcr_key is not None else None
    recovery_public = (load_recovery_public_key(ctx.recovery_key) if ctx.recovery_key is not None
                       else None)
    kver = kernel_version(ctx.rootfs)
    work = ctx.work / "seal"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ctx.out.mkdir(parents=True, exist_ok=True)

    root_image = ctx.out / "root.squashfs"
    root_image.unlink(missing_ok=True)
    verity_image = ctx.out / "root.verity"
    uki_work = work / "uki"
    uki_work.mkdir()
    log.info("seal: squashfs of %s, and beside it the initrd (kernel %s)", ctx.rootfs, kver)
    # dracut is mostly one process at a time and mksquashfs one thread per core: side by side the
    # stage took 12.9 s instead of 15.8 on 2 cores (medians of 3, the same root, the same bytes;
    # issue #14). Whatever fails, the pool's exit waits for dracut: no tool outlives the stage.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="seal-initrd") as pool:
        initrd = pool.submit(build_initrd, ctx, kver, uki_work, recovery_public=recovery_public)
        ctx.run(squashfs_argv(ctx.rootfs, root_image, ctx.source_date_epoch,
                              _pseudo_files(ctx, work), ctx.keep_xattrs))
        log.info("seal: dm-verity hash tree")
        roothash = verity_format(ctx.run, root_image, verity_image)
        initrd.result()  # dracut's error, if it failed
    atomic_write_text(ctx.out / "root.roothash", roothash + "\n")

    log.info("seal: UKI (kernel %s)", kver)
    cmdline = kernel_cmdline(ctx.name, roothash, (*root_cmdline(ctx.rootfs), *ctx.extra_cmdline),
                             sealed_data=ctx.seal_data)
    unsigned = build_uki(ctx, kver, cmdline, uki_work, pcr_public)
    uki = ctx.out / f"{ctx.name}-{ctx.version}.efi"
    sign(ctx.run, ctx, unsigned, uki)
    sign(ctx.run, ctx, ctx.rootfs / "usr/lib/systemd/boot/efi/systemd-bootx64.efi",
         ctx.out / "systemd-bootx64.efi")
    sealed = Sealed(ctx.name, ctx.version, roothash, root_image, verity_image, uki, ctx.seal_data)
    doc = sealed.to_json() | {"kernel": kver, "signed": ctx.signing,
                              "cmdline": cmdline, "pcr11": pcr11_record(uki)}
    if pcr_public is not None:  # what ukify signed is what unlocks: checked, then recorded
        doc["pcr_signature"] = check_pcr_signature(uki, pcr_public)
    atomic_write_text(ctx.out / "seal.json", json.dumps(doc, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return sealed
