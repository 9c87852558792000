"""A small trixie root for the seal/disk/boot system tests, made without the image pipeline so
that those stages are tested on their own.

Built once with mmdebstrap from Debian's archive (test-only; the product builds from a mirror)
and cached: under $APPLIANCE_TEST_CACHE when set, else in the test session's temp dir.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from agent.sealed import SEALED_MARKER, UNSEAL_REQUEST
from provisioning.demo.models import matmul_chain_model
from provisioning.image.sealed_mode import UNSEAL_PATH_UNIT, unseal_files
from provisioning.tools import run

EPOCH = 1700000000
SUITE = "trixie"
PACKAGES = (
    "linux-image-amd64", "systemd", "systemd-sysv", "udev", "kmod", "e2fsprogs", "zstd",
    # what the seal stage needs inside the root (provisioning.image.seal.REQUIRED_IN_ROOTFS)
    "dracut", "systemd-boot", "systemd-boot-efi", "systemd-ukify", "systemd-cryptsetup", "systemd-repart",
    "tpm2-tools",
    # a sealed data partition's initrd escrows its recovery key with openssl, and the unseal helper
    # checks the recovery key with cryptsetup (seal.SEALED_DATA_REQUIRED)
    "openssl", "cryptsetup-bin",
)
MARKER = "dm-verity root OK"
# A file of the image's /var whose bytes must never be found on a sealed data partition read from
# outside (the start of each line is what the console marker shows)
CANARY_PATH = "var/lib/seal-test/canary"
CANARY = "sealed-data canary 5f0c2b7e9d41a386\n" * 256
# A model file where the agent keeps its models (random weights, seeded: the same bytes each build):
# read from outside, the sealed partition must not hold any of it in plaintext either
MODEL_PATH = "var/lib/appliance/models/seal-test/model.onnx"
# The unit that proves on the serial console which device / and /var came from, how many boots
# this /var has seen, and that the image's /var came with it.
MARKER_UNIT = f"""[Unit]
Description=Report the verity root on the console
After=local-fs.target systemd-growfs@var.service systemd-pcrphase.service

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo boot >> /var/lib/seal-test/boots; \\
echo "{MARKER}: $(findmnt -no SOURCE /) var=$(findmnt -no SOURCE /var) \\
boots=$(wc -l < /var/lib/seal-test/boots) canary=$(head -c 18 /var/lib/seal-test/canary | tr " " _) \\
varsize=$(findmnt -bno SIZE /var) efi=$(findmnt -no SOURCE /efi) \\
slot=$(cat /etc/appliance-slot) tpm=$(test -e /dev/tpmrm0 && echo yes || echo no) \\
sb=$(dmesg | grep -c Secure.boot.enabled) \\
pcr11=$(cat /sys/class/tpm/tpm0/pcr-sha256/11 2>/dev/null || echo none) \\
sealed=$(test -e /run/appliance/sealed.json && echo yes || echo no) \\
why=$(grep -o -e "no TPM" -e "measurements changed" -e "no data partition" /run/appliance/sealed.json \\
2>/dev/null | head -1 | tr " " _)" > /dev/console'

[Install]
WantedBy=multi-user.target
"""
# The agent's part of Node/Unseal, played for the seal tests: in sealed mode, the recovery key a
# test put on the ESP goes where the agent would leave it for the root's unseal helper.
UNSEAL_KEY_ON_ESP = "appliance/test-unseal-key"
UNSEAL_STAND_IN_UNIT = f"""[Unit]
Description=Hand the test's recovery key to the unseal helper (the agent's Node/Unseal, played)
ConditionPathExists={SEALED_MARKER}
RequiresMountsFor=/efi

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'test -f /efi/{UNSEAL_KEY_ON_ESP} || exit 0; mkdir -p {UNSEAL_REQUEST.parent} && \\
head -c 71 /efi/{UNSEAL_KEY_ON_ESP} > {UNSEAL_REQUEST.parent}/.key && \\
mv {UNSEAL_REQUEST.parent}/.key {UNSEAL_REQUEST}'

[Install]
WantedBy=multi-user.target
"""
# Slot B of the fallback test: reaches userspace, never reaches boot-complete.target, reboots.
BROKEN_UNIT = """[Unit]
Description=Fail before boot-complete.target (test of boot counting)
DefaultDependencies=no
Before=boot-complete.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo "broken slot: rebooting without blessing" > /dev/console; exit 1'
FailureAction=reboot-force

[Install]
RequiredBy=boot-complete.target
WantedBy=multi-user.target
"""


def _base(cache: Path) -> Path:
    key = hashlib.sha256(" ".join((SUITE, *PACKAGES)).encode()).hexdigest()[:12]
    base = cache / f"base-{key}"
    if (base / ".complete").exists():
        return base
    shutil.rmtree(base, ignore_errors=True)
    run(["mmdebstrap", "--mode=root", "--variant=minbase", f"--include={','.join(PACKAGES)}",
         "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
         "--dpkgopt=path-exclude=/usr/share/locale/*", SUITE, base, "http://deb.debian.org/debian"],
        env={"SOURCE_DATE_EPOCH": str(EPOCH)}, timeout=1800)
    for leftover in ("etc/resolv.conf", "etc/hostname"):
        (base / leftover).unlink(missing_ok=True)
    (base / ".complete").write_text("")
    return base


def _enable(root: Path, unit: str, text: str, targets: tuple[str, ...]) -> None:
    units = root / "etc/systemd/system"
    (units / unit).write_text(text)
    for target in targets:
        wants = units / target
        wants.mkdir(exist_ok=True)
        (wants / unit).symlink_to(f"/etc/systemd/system/{unit}")


def make_rootfs(cache: Path, dest: Path, slot: str, broken: bool = False) -> Path:
    """A copy of the cached base root at ``dest`` with the console marker (and the failing unit)."""
    base = _base(cache)
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    run(["cp", "-a", "--reflink=auto", base, dest])
    (dest / ".complete").unlink()
    (dest / "etc/appliance-slot").write_text(slot + "\n")
    canary = dest / CANARY_PATH
    canary.parent.mkdir(parents=True, exist_ok=True)
    canary.write_text(CANARY)
    model = dest / MODEL_PATH
    model.parent.mkdir(parents=True, exist_ok=True)
    matmul_chain_model(model, width=32, depth=2, seed=17)
    _enable(dest, "verity-marker.service", MARKER_UNIT, ("multi-user.target.wants",))
    # Node/Unseal's helper, as an image with sealed data carries it, and the agent's part played
    for name, (text, mode) in unseal_files("appliance").items():
        target = dest / name.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)
    (dest / "etc/systemd/system/multi-user.target.wants").mkdir(exist_ok=True)
    (dest / "etc/systemd/system/multi-user.target.wants" / UNSEAL_PATH_UNIT).symlink_to(
        f"/etc/systemd/system/{UNSEAL_PATH_UNIT}")
    _enable(dest, "unseal-stand-in.service", UNSEAL_STAND_IN_UNIT, ("multi-user.target.wants",))
    if broken:
        _enable(dest, "broken-slot.service", BROKEN_UNIT,
                ("boot-complete.target.requires", "multi-user.target.wants"))
    for path in dest.rglob("*"):
        if not path.is_symlink():
            os.utime(path, (EPOCH, EPOCH))
    return dest


def cache_dir(default: Path) -> Path:
    """Where the base root is cached: $APPLIANCE_TEST_CACHE or ``default``."""
    env = os.environ.get("APPLIANCE_TEST_CACHE")
    path = Path(env) if env else default
    path.mkdir(parents=True, exist_ok=True)
    return path
