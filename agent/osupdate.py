"""OS updates on the node: a verified OS release into the inactive root slot, booted on trial.

The agent is unprivileged and sandboxed (no devices, read-only system): it verifies an OS
release through TUF like any target and stages it on the data partition with a request
(``STATE/os/pending.json``).  The root-owned ``appliance-os-update.service`` (started by a
path unit when the request appears) then, with :func:`install_pending`:

1. refreshes its *own* TUF metadata (``/var/lib/appliance-os``, initialised from the image's
   baked root) from the same source, and copies the staged file into its own directory
   while hashing it: the copy must have the signed length and sha256, so a compromised
   agent cannot hand it anything the registry did not sign; then every member is checked
   against ``release.json`` (:func:`agent.osrelease.read_release`);
2. writes the root and verity images to the inactive slot's partitions (``root-b`` and
   ``root-b-verity`` when running from A) and gives them the partition UUIDs derived from
   the new root hash (what ``roothash=`` finds them by);
3. installs the UKI on the ESP as ``NAME-VERSION+3-0.efi``: systemd-boot tries the newest
   entry, counting down; ``appliance-boot-check.service`` blesses it only once the agent
   serves, otherwise the count runs out and the firmware boots the old, blessed entry;
4. records the attempt (``STATE/os/attempt.json``) and reboots.

After the reboot the agent compares the running root hash with the attempt
(:func:`attempt_outcome`) and reports ``update.os.applied`` or ``update.os.failed``.
The data partition (/var) is never touched by a switch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.errors import UpdateError, VerificationError
from agent.fsutil import atomic_write_text, copy_verified
from agent.osrelease import (
    active_slot,
    read_release,
    root_uuids,
    running_root_hash,
    running_sealed_data,
    uki_file_name,
)
from agent.state import StateLayout

__all__ = ["ATTEMPT", "PENDING", "attempt_outcome", "install_pending", "install_release", "os_dir"]

log = logging.getLogger(__name__)

PENDING = "pending.json"
ATTEMPT = "attempt.json"
BY_PARTLABEL = Path("/dev/disk/by-partlabel")
SYS_CLASS_BLOCK = Path("/sys/class/block")
ESP = Path("/efi")
# systemd-boot's record of the entry it booted (UTF-16LE after 4 attribute bytes).
LOADER_ENTRY_SELECTED = Path(
    "/sys/firmware/efi/efivars/LoaderEntrySelected-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f")
_COUNTER = re.compile(r"\+\d+(-\d+)?(?=\.efi$)")
_BLOCK = 4 << 20


def os_dir(state_dir: Path) -> Path:
    """Where OS updates are staged and recorded (``STATE/os``)."""
    return StateLayout(state_dir).os


def _partition_size(dev: Path, sys_class_block: Path) -> int:
    return int((sys_class_block / dev.resolve().name / "size").read_text()) * 512


def _disk_and_number(dev: Path, sys_class_block: Path) -> tuple[Path, int]:
    name = dev.resolve().name
    number = int((sys_class_block / name / "partition").read_text())
    parent = (sys_class_block / name).resolve().parent.name
    return Path("/dev") / parent, number


_GPT_SIGNATURE = b"EFI PART"


def set_partition_uuid(disk: Path, number: int, part_uuid: str, sector: int = 512) -> None:
    """Set partition ``number``'s unique GUID in both GPT copies of ``disk`` (CRCs redone).

    Written here rather than with sfdisk, which the image does not carry.

    Raises:
        UpdateError: no valid GPT, or no such partition.
    """
    import struct
    import uuid
    import zlib

    with disk.open("r+b") as f:
        f.seek(sector)
        primary = f.read(sector)
        if primary[:8] != _GPT_SIGNATURE:
            raise UpdateError(f"{disk}: no GPT header at LBA 1")
        backup_lba = struct.unpack_from("<Q", primary, 32)[0]
        for lba in (1, backup_lba):
            f.seek(lba * sector)
            header = bytearray(f.read(sector))
            if header[:8] != _GPT_SIGNATURE:
                raise UpdateError(f"{disk}: no GPT header at LBA {lba}")
            size = struct.unpack_from("<I", header, 12)[0]
            entries_lba, count, entry_size = struct.unpack_from("<QII", header, 72)
            if not 1 <= number <= count:
                raise UpdateError(f"{disk}: no partition {number} (table has {count} entries)")
            f.seek(entries_lba * sector)
            entries = bytearray(f.read(count * entry_size))
            at = (number - 1) * entry_size
            entries[at + 16:at + 32] = uuid.UUID(part_uuid).bytes_le
            struct.pack_into("<I", header, 88, zlib.crc32(entries) & 0xFFFFFFFF)
            struct.pack_into("<I", header, 16, 0)
            struct.pack_into("<I", header, 16, zlib.crc32(bytes(header[:size])) & 0xFFFFFFFF)
            f.seek(entries_lba * sector)
            f.write(entries)
            f.seek(lba * sector)
            f.write(header)
        f.flush()
        os.fsync(f.fileno())


def _entry_id(name: str) -> str:
    """A UKI's entry id without its boot counter: ``a-2+1-2.efi`` -> ``a-2.efi``."""
    return _COUNTER.sub("", name)


def booted_entry(efivar: Path = LOADER_ENTRY_SELECTED) -> str | None:
    """The boot entry systemd-boot started (counter stripped), or None when unknown."""
    try:
        raw = efivar.read_bytes()[4:]
    except OSError:
        return None
    name = raw.decode("utf-16-le", errors="replace").split("\x00", 1)[0].strip()
    return _entry_id(name) or None


def drop_stale_entries(uki_dir: Path, running: str | None) -> list[str]:
    """Remove every UKI but the running one's before the inactive slot is overwritten: with two
    root slots, any other entry names a root that is about to stop existing, and must never be a
    fallback. Without a known running entry nothing is removed. Returns the removed names."""
    if running is None:
        log.warning("os update: the booted entry is unknown (no %s); keeping every UKI on the ESP",
                    LOADER_ENTRY_SELECTED.name)
        return []
    removed = []
    for uki in sorted(uki_dir.glob("*.efi")):
        if _entry_id(uki.name) != running:
            uki.unlink()
            removed.append(uki.name)
            log.info("os update: removed %s (its root slot is being overwritten)", uki.name)
    return removed


def _write_member(tar: tarfile.TarFile, member: str, dev: Path, size_limit: int) -> None:
    info = tar.getmember(member)
    if info.size > size_limit:
        raise UpdateError(f"{member}: {info.size} bytes do not fit {dev} ({size_limit} bytes)")
    src = tar.extractfile(info)
    assert src is not None
    with dev.open("r+b") as out:
        while chunk := src.read(_BLOCK):
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())


def install_release(release_file: Path, state_dir: Path, *, tries: int = 3,
                    by_partlabel: Path = BY_PARTLABEL, sys_class_block: Path = SYS_CLASS_BLOCK,
                    sys_block: Path = Path("/sys/block"), cmdline: Path = Path("/proc/cmdline"),
                    esp: Path = ESP, loader_entry: Path = LOADER_ENTRY_SELECTED,
                    set_uuid: Callable[[Path, int, str], None] = set_partition_uuid) -> dict[str, Any]:
    """Write a (TUF-verified) OS release into the inactive slot and its UKI onto the ESP.

    Raises:
        VerificationError: a member does not match ``release.json``.
        UpdateError: the release is the running root, or does not fit its partitions.
        OSError: a partition or the ESP could not be written.
    """
    release = read_release(release_file)
    running = running_root_hash(cmdline)
    if release.roothash == running:
        raise UpdateError(f"{release.name} {release.version}: root hash {release.roothash[:16]}... "
                          "is the running root; nothing to install")
    sealed = running_sealed_data(cmdline)
    if release.sealed_data != sealed:  # its UKI would not find /var: the slot would never boot
        kind = {True: "sealed to the TPM", False: "plain"}
        raise UpdateError(f"{release.name} {release.version}: its data partition is "
                          f"{kind[release.sealed_data]}, this node's is {kind[sealed]}; an OS update "
                          "cannot change that ([tpm] seal_data of the image's profile)")
    current = active_slot(sys_block) or "A"
    slot = "b" if current == "A" else "a"
    devices = {"root.squashfs": by_partlabel / f"root-{slot}",
               "root.verity": by_partlabel / f"root-{slot}-verity"}
    uki_dir = esp / "EFI" / "Linux"
    removed = drop_stale_entries(uki_dir, booted_entry(loader_entry))
    with tarfile.open(release_file, "r:") as tar:
        for member, dev in devices.items():
            log.info("os update: writing %s to %s", member, dev)
            _write_member(tar, member, dev, _partition_size(dev, sys_class_block))
        data_uuid, hash_uuid = root_uuids(release.roothash)
        for dev, part_uuid in ((devices["root.squashfs"], data_uuid), (devices["root.verity"], hash_uuid)):
            disk, number = _disk_and_number(dev, sys_class_block)
            set_uuid(disk, number, part_uuid)
        uki = uki_dir / uki_file_name(release.name, release.version, tries)
        tmp = uki_dir / (uki.name + ".part")
        src = tar.extractfile("uki.efi")
        assert src is not None
        with tmp.open("wb") as out:
            shutil.copyfileobj(src, out, _BLOCK)
            out.flush()
            os.fsync(out.fileno())
        tmp.rename(uki)
    attempt = {"name": release.name, "version": release.version, "roothash": release.roothash,
               "from_roothash": running, "from_slot": current, "slot": slot.upper(),
               "uki": uki.name, "removed_entries": removed, "time": time.time()}
    os_dir(state_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(os_dir(state_dir) / ATTEMPT, json.dumps(attempt, sort_keys=True) + "\n")
    log.info("os update: %s %s written to slot %s; boot it on trial", release.name, release.version,
             slot.upper())
    return attempt


def _verified_copy(src: Path, dest: Path, length: int, sha256: str) -> Path:
    """Copy ``src`` (the agent's file) to a root-owned ``dest`` while hashing the bytes copied;
    the copy is what gets installed, so the agent cannot change it after the check.

    Raises:
        VerificationError: length or sha256 differ from the signed target's.
    """
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        with src.open("rb") as fin, dest.open("wb") as fout:
            copy_verified(fin, fout, length, sha256, where=str(src), against="the signed target",
                          block=_BLOCK)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return dest


def install_pending(state_dir: Path, trust_dir: Path, trusted_root: Path, **kw: Any) -> dict[str, Any]:
    """The root service's job: re-verify the agent's staged OS release through TUF, install it.

    Raises:
        VerificationError: the staged file is not the signed target (length or hashes), or
            TUF refuses the registry's metadata. UpdateError: no request, or it cannot be met.
    """
    from agent.updates.client import RegistryClient, metadata_dir

    request_path = os_dir(state_dir) / PENDING
    staged: Path | None = None
    fresh: Path | None = None
    try:  # whatever happens, the request is consumed (the path unit must not fire again)
        try:
            request = json.loads(request_path.read_text())
            target, source, staged = str(request["target"]), str(request["source"]), Path(request["file"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UpdateError(f"{request_path}: no readable OS update request: {exc}") from None
        if staged.resolve().parent != (os_dir(state_dir) / "staged").resolve():
            raise UpdateError(f"{request_path}: file = {str(staged)!r} is not under the staging directory")
        if not (metadata_dir(trust_dir) / "root.json").is_file():
            RegistryClient.initialize(trust_dir, trusted_root.read_bytes())
        client = RegistryClient(trust_dir, source)
        client.refresh()
        info = next((t for t in client.targets() if t.path == target), None)
        if info is None or info.kind != "os":
            raise VerificationError(f"{target}: not an OS target of the registry {source}")
        fresh = _verified_copy(staged, trust_dir / "download" / staged.name, info.length, info.sha256)
        return install_release(fresh, state_dir, **kw)
    finally:
        for path in (fresh, staged, request_path):
            if path is not None:
                path.unlink(missing_ok=True)


def attempt_outcome(state_dir: Path, running_roothash: str) -> tuple[str, dict[str, Any]] | None:
    """After a boot: ("applied"|"failed", attempt) for a recorded attempt, and forget it; else None."""
    path = os_dir(state_dir) / ATTEMPT
    try:
        attempt = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    known = (attempt.get("roothash"), attempt.get("from_roothash"))
    if not running_roothash or running_roothash not in known:
        return None
    outcome = "applied" if running_roothash == attempt.get("roothash") else "failed"
    path.unlink(missing_ok=True)
    return outcome, attempt
