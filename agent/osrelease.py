"""The OS release format and what the running root is: the node's side of an A/B update.

An OS release file is an uncompressed ustar archive (deterministic: sorted, fixed times and
owners) of::

    release.json     name, version, root hash, and each member's sha256 and size
    root.squashfs    the sealed root (slot payload)
    root.verity      its dm-verity hash tree
    uki.efi          the Unified Kernel Image whose command line carries the root hash

The image builder writes it (``provisioning.image.osrelease.make_os_release``); the node
reads it here: TUF signs the file's length and hashes, and :func:`read_release` checks each
member against ``release.json`` before anything is written to a slot.  The partition UUIDs
and the UKI's file name are derived the same way by the builder's disk layout and by the
node's slot writer, so both import them from this module.
"""

from __future__ import annotations

import json
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import VerificationError
from agent.fsutil import stream_sha256

__all__ = ["MEMBERS", "SCHEMA", "Release", "active_slot", "read_release", "registry_version",
           "root_uuids", "running_root_hash", "running_sealed_data", "uki_file_name"]

SCHEMA = "sovereign-appliance/os-release/1"
MEMBERS = ("root.squashfs", "root.verity", "uki.efi")
_BLOCK = 1 << 20


def registry_version(image_version: str) -> str:
    """The registry version of an image version (``YYYYMMDD.HHMMSS`` is already numeric)."""
    return ".".join(str(int(p)) for p in image_version.split("."))


@dataclass(frozen=True)
class Release:
    name: str
    version: str
    roothash: str
    files: dict[str, dict[str, Any]]
    path: Path
    # its UKI opens /var from a data partition sealed to the TPM (a node can take it only when
    # its own data is sealed, and the other way round)
    sealed_data: bool = False

    def member(self, name: str) -> tarfile.TarInfo:
        with tarfile.open(self.path, "r:") as tar:
            return tar.getmember(name)


def root_uuids(roothash: str) -> tuple[str, str]:
    """(root, verity) partition UUIDs for a root hash: its first and last 128 bits.

    This is what systemd-veritysetup-generator looks for when only ``roothash=`` is given.

    Raises:
        VerificationError: ``roothash`` is not hex of at least 32 bytes.
    """
    try:
        raw = bytes.fromhex(roothash)
    except ValueError as exc:
        raise VerificationError(f"root hash {roothash!r} is not hexadecimal") from exc
    if len(raw) < 32:
        raise VerificationError(f"root hash {roothash!r} is shorter than 256 bits")
    return str(uuid.UUID(bytes=raw[:16])), str(uuid.UUID(bytes=raw[-16:]))


def uki_file_name(name: str, version: str, tries: int | None) -> str:
    """``NAME-VERSION+TRIES-0.efi`` (systemd-boot's boot counting), or without counter."""
    return f"{name}-{version}.efi" if tries is None else f"{name}-{version}+{tries}-0.efi"


def running_root_hash(cmdline: Path) -> str:
    """The ``roothash=`` of the kernel command line ``cmdline``; "" when there is none."""
    try:
        args = cmdline.read_text().split()
    except OSError:
        return ""
    found = [a.removeprefix("roothash=") for a in args if a.startswith("roothash=")]
    return found[-1] if found else ""


# The sealed kernel command line's /var mount when the data partition is sealed to the TPM
# (provisioning.image.seal.kernel_cmdline writes it; the node reads it here).
SEALED_DATA_MOUNT = "systemd.mount-extra=/dev/mapper/data:/var:"


def running_sealed_data(cmdline: Path) -> bool:
    """True when the running image mounts /var from a data partition sealed to the TPM."""
    try:
        return any(a.startswith(SEALED_DATA_MOUNT) for a in cmdline.read_text().split())
    except OSError:
        return False


def active_slot(sys_block: Path) -> str:
    """"A" or "B": the GPT label of the verity root's data partition, "" when not found."""
    try:
        devices = sorted(sys_block.glob("dm-*"))
    except OSError:
        return ""
    for dm in devices:
        try:
            if (dm / "dm" / "name").read_text().strip() != "root":
                continue
            for slave in sorted((dm / "slaves").iterdir()):
                for line in (slave / "uevent").read_text().splitlines():
                    if line in ("PARTNAME=root-a", "PARTNAME=root-b"):
                        return line[-1].upper()
        except OSError:
            continue
    return ""


def read_release(path: Path) -> Release:
    """Open an OS release file and check every member against its ``release.json``.

    Raises:
        VerificationError: not an OS release, a member missing, extra, or with another
            size or sha256 than ``release.json`` says (names the member and both values).
    """
    try:
        with tarfile.open(path, "r:") as tar:
            names = tar.getnames()
            if names[:1] != ["release.json"] or sorted(names[1:]) != sorted(MEMBERS):
                raise VerificationError(f"{path}: members {names}: expected release.json then "
                                        f"{', '.join(MEMBERS)}")
            meta_file = tar.extractfile("release.json")
            assert meta_file is not None
            doc = json.loads(meta_file.read())
            if not isinstance(doc, dict):
                raise VerificationError(f"{path}: release.json holds {type(doc).__name__}, "
                                        "expected an object")
            if doc.get("schema") != SCHEMA:
                raise VerificationError(f"{path}: release.json schema = {doc.get('schema')!r}: "
                                        f"expected {SCHEMA!r}")
            for name in MEMBERS:
                want = doc["files"][name]
                member = tar.getmember(name)
                f = tar.extractfile(member)
                assert f is not None
                got, _ = stream_sha256(f, _BLOCK)
                if member.size != want["size"] or got != want["sha256"]:
                    raise VerificationError(
                        f"{path}: {name}: size {member.size} sha256 {got}, but release.json "
                        f"says size {want['size']} sha256 {want['sha256']}")
            sealed = doc.get("sealed_data", False)  # absent: a release from before sealing
            if not isinstance(sealed, bool):
                raise VerificationError(f"{path}: release.json sealed_data = {sealed!r}: "
                                        "expected true or false")
            return Release(str(doc["name"]), str(doc["version"]), str(doc["roothash"]),
                           dict(doc["files"]), path, sealed)
    # RecursionError: JSON nested deeper than the parser goes; KeyError: a field missing.
    except (tarfile.TarError, OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise VerificationError(f"{path}: not a readable OS release: {type(exc).__name__}: {exc}") from None
