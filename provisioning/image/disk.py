"""The disk stage: a GPT raw image with an ESP, two root slots with verity, and a data partition.

Layout (1 MiB aligned, in this order so that the data partition is last and can grow)::

    esp            EFI system partition: systemd-boot + UKIs with boot counting
    root-a         squashfs of slot A          PARTUUID = first 128 bits of A's root hash
    root-a-verity  dm-verity hash tree of A    PARTUUID = last 128 bits of A's root hash
    root-b         slot B (empty, or a second sealed root)
    root-b-verity
    data           ext4, mounted at /var; grown to fill the disk on first boot by
                   systemd-repart (then resize2fs online through x-systemd.growfs)

Every identifier is derived from the inputs, never random: the root partitions' UUIDs from
their root hashes (systemd's convention, so ``roothash=`` alone finds them), the ESP's and
data partition's from the image name only (an OS update for slot B must find the same data
partition), the disk's from the name and slot A's root hash.

Nothing is mounted: partitions are built as files (mkfs.vfat + mtools, mkfs.ext4 -d) and
copied into place; sfdisk writes the partition table into the image file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from agent.fsutil import atomic_write_text, data_extents, file_sha256
from agent.osrelease import root_uuids, uki_file_name
from provisioning.errors import ImageError
from provisioning.image.configure import IMAGE_METADATA_IN_ROOT
from provisioning.image.measure import pcr11_record
from provisioning.image.partuuid import data_uuid, derived_uuid, esp_uuid
from provisioning.image.stage import DiskSizes, RunFn, StageContext

__all__ = [
    "DISK_NAME", "MANIFEST_NAME", "TYPE", "Partition", "Sealed", "build_disk", "data_uuid", "disk",
    "esp_uuid", "layout", "load_sealed", "sfdisk_script", "verity_mib",
    "write_manifest",
]

MiB = 1024 * 1024
SECTOR = 512
DISK_NAME = "disk.raw"
MANIFEST_NAME = "image-manifest.json"
MANIFEST_SCHEMA = "sovereign-appliance/image-manifest/1"

# GPT partition type GUIDs (UEFI spec and the Discoverable Partitions Specification).
TYPE = {
    "esp": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
    "root": "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",         # root, x86-64
    "root-verity": "2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5",  # root verity, x86-64
    "data": "0FC63DAF-8483-4772-8E79-3D69D8477DE4",         # generic Linux data
}
# The backup GPT needs 33 sectors at the end; round up to a whole MiB.
_TAIL_MIB = 1


def esp_volume_id(name: str) -> str:
    """The ESP's FAT volume id (8 hex digits)."""
    return hashlib.sha256(f"sovereign-appliance\0{name}\0esp-volid".encode()).hexdigest()[:8]


def verity_mib(root_mib: int) -> int:
    """MiB needed for a sha256 verity hash tree over a ``root_mib`` partition (4 KiB blocks)."""
    blocks = root_mib * MiB // 4096
    hashes = 0
    while blocks > 1:
        blocks = math.ceil(blocks / 128)  # 128 sha256 digests per 4 KiB hash block
        hashes += blocks
    return max(1, math.ceil((hashes + 1) * 4096 / MiB))  # + the verity superblock


@dataclass(frozen=True)
class Partition:
    """One GPT entry: where it lies and what identifies it."""

    label: str
    type: str
    uuid: str
    start_mib: int
    size_mib: int

    @property
    def offset(self) -> int:
        """Byte offset in the disk image."""
        return self.start_mib * MiB

    @property
    def size(self) -> int:
        """Size in bytes."""
        return self.size_mib * MiB


@dataclass(frozen=True)
class Sealed:
    """What the seal stage made for one root slot (read back from ``seal.json``)."""

    name: str
    version: str
    roothash: str
    root_image: Path
    verity_image: Path
    uki: Path
    # the UKI's initrd makes the data partition at first boot, as LUKS2 sealed to the TPM
    # (provisioning.image.seal): the disk leaves its space empty
    sealed_data: bool = False

    def to_json(self) -> dict[str, str | bool]:
        """File names relative to the seal directory."""
        return {"name": self.name, "version": self.version, "roothash": self.roothash,
                "root_image": self.root_image.name, "verity_image": self.verity_image.name,
                "uki": self.uki.name, "sealed_data": self.sealed_data}


def load_sealed(directory: Path) -> Sealed:
    """Read ``seal.json`` from a seal stage's output directory.

    Raises:
        ImageError: the file is missing or names files that do not exist.
    """
    path = directory / "seal.json"
    try:
        doc = json.loads(path.read_text())
        sealed = Sealed(doc["name"], doc["version"], doc["roothash"], directory / doc["root_image"],
                        directory / doc["verity_image"], directory / doc["uki"],
                        doc.get("sealed_data", False))  # absent: a seal output from before it
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ImageError(f"{path}: not a seal stage output ({exc})") from exc
    if not isinstance(sealed.sealed_data, bool):
        raise ImageError(f"{path}: sealed_data = {sealed.sealed_data!r}: must be true or false")
    for p in (sealed.root_image, sealed.verity_image, sealed.uki):
        if not p.is_file():
            raise ImageError(f"{path}: names {p.name}, which is missing")
    return sealed


def layout(name: str, sizes: DiskSizes, slot_a: str, slot_b: str | None) -> tuple[Partition, ...]:
    """The partition table for slot A's root hash and slot B's (None: an empty slot B).

    Raises:
        ImageError: a root hash is malformed, or A and B have the same root hash.
    """
    if slot_b is not None and slot_b == slot_a:
        raise ImageError("slot A and slot B have the same root hash: their partition UUIDs would clash")
    vmib = verity_mib(sizes.root_mib)
    a_root, a_verity = root_uuids(slot_a)
    if slot_b is None:
        b_root, b_verity = derived_uuid(name, "root-b-empty"), derived_uuid(name, "root-b-verity-empty")
    else:
        b_root, b_verity = root_uuids(slot_b)
    rows = (
        ("esp", TYPE["esp"], esp_uuid(name), sizes.esp_mib),
        ("root-a", TYPE["root"], a_root, sizes.root_mib),
        ("root-a-verity", TYPE["root-verity"], a_verity, vmib),
        ("root-b", TYPE["root"], b_root, sizes.root_mib),
        ("root-b-verity", TYPE["root-verity"], b_verity, vmib),
        (sizes.data_label, TYPE["data"], data_uuid(name), sizes.data_mib),
    )
    parts, start = [], 1
    for label, type_, uid, size in rows:
        parts.append(Partition(label, type_, uid, start, size))
        start += size
    return tuple(parts)


def disk_mib(parts: Sequence[Partition]) -> int:
    """Total image size in MiB: the partitions plus room for the backup GPT."""
    last = parts[-1]
    return last.start_mib + last.size_mib + _TAIL_MIB


def sfdisk_script(disk_id: str, parts: Sequence[Partition]) -> str:
    """The sfdisk input that writes exactly ``parts`` with their UUIDs and labels."""
    lines = ["label: gpt", f"label-id: {disk_id.upper()}", "unit: sectors", "first-lba: 2048", ""]
    for p in parts:
        lines.append(f"start={p.offset // SECTOR}, size={p.size // SECTOR}, type={p.type}, "
                     f'uuid={p.uuid.upper()}, name="{p.label}"')
    return "\n".join(lines) + "\n"


def _faketime(ctx_epoch: int) -> list[str]:
    # mkfs.ext4 (1.47.0), mkfs.vfat and mtools stamp the current time into inodes and
    # directory entries; a frozen clock makes their output a function of the inputs only.
    stamp = datetime.fromtimestamp(ctx_epoch, UTC).strftime("%Y-%m-%d %H:%M:%S")
    return ["faketime", "-f", stamp]  # -f without "@": the clock stands still


def _fixed_env() -> dict[str, str]:
    # NO_FAKE_STAT: the frozen clock must not also fake the source files' times that
    # mcopy -m and mkfs.ext4 -d copy (they are set to SOURCE_DATE_EPOCH beforehand)
    return {"TZ": "UTC", "MTOOLS_SKIP_CHECK": "1", "NO_FAKE_STAT": "1"}


def build_esp(run: RunFn, path: Path, *, name: str, size_mib: int, epoch: int,
              files: Sequence[tuple[Path, str]]) -> None:
    """A FAT32 image at ``path`` holding ``files`` (source, '/ESP/PATH'), built with mtools."""
    path.unlink(missing_ok=True)
    env = _fixed_env()
    run([*_faketime(epoch), "mkfs.vfat", "-F", "32", "-n", "ESP", "-i", esp_volume_id(name),
         "--invariant", "-C", path, str(size_mib * 1024)], env=env)
    made: set[str] = set()
    for src, dest in files:
        parents = Path(dest).parents
        for parent in reversed(parents[:-1]):  # skip "/"
            if str(parent) not in made:
                run([*_faketime(epoch), "mmd", "-i", path, f"::{parent}"], env=env)
                made.add(str(parent))
        os.utime(src, (epoch, epoch))
        run([*_faketime(epoch), "mcopy", "-m", "-i", path, src, f"::{dest}"], env=env)


def build_data(run: RunFn, path: Path, *, name: str, size_mib: int, epoch: int, content: Path | None) -> None:
    """An ext4 image for the data partition, populated from ``content`` (the root's /var)."""
    path.unlink(missing_ok=True)
    with path.open("wb") as f:
        f.truncate(size_mib * MiB)
    uid = data_uuid(name)
    argv: list[str | Path] = [
        *_faketime(epoch), "mkfs.ext4", "-q", "-F", "-L", "appliance-data", "-U", uid,
        "-E", f"root_owner=0:0,hash_seed={uid},lazy_itable_init=0,lazy_journal_init=0,nodiscard",
        "-O", "^metadata_csum_seed"]
    if content is not None:
        argv += ["-d", content]
    run([*argv, path], env=_fixed_env())
    if content is not None:
        # mkfs.ext4 -d copies each file's atime, mtime and ctime (1.47.0 has no
        # SOURCE_DATE_EPOCH); pin all three, in place, without touching the source tree
        script = path.with_suffix(".debugfs")
        script.write_text("".join(f'sif "{p}" {field} @{epoch}\n'
                                  for p in _tree_paths(content) for field in ("atime", "mtime", "ctime")))
        run([*_faketime(epoch), "debugfs", "-w", "-f", script, path], env=_fixed_env())
        script.unlink()


def _tree_paths(root: Path) -> list[str]:
    """Every path under ``root`` as seen from the new file system's root ("/" included).

    Raises:
        ImageError: a name debugfs cannot quote (a double quote, a newline or a backslash).
    """
    paths = ["/"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            rel = "/" + str((Path(dirpath) / name).relative_to(root))
            if any(c in rel for c in '"\n\\'):
                raise ImageError(f"{root}{rel}: this name cannot be placed on the data partition")
            paths.append(rel)
    return paths


def _copy_into(image: Path, part: Partition, source: Path) -> None:
    """Copy ``source`` into ``part`` of ``image``, skipping zero blocks so the image stays sparse.

    Only the source's data extents are read: its holes are zeros already in the image (a new
    sparse file), and reading them was most of the disk stage's time (issue #14).
    """
    size = source.stat().st_size
    if size > part.size:
        raise ImageError(f"{source.name} is {size} bytes, larger than partition {part.label} "
                         f"({part.size_mib} MiB): raise the profile's [disk] size")
    chunk = 4 * MiB
    zero = bytes(chunk)
    with source.open("rb") as src, image.open("r+b") as dst:
        for start, end in data_extents(src.fileno(), size):
            src.seek(start)
            pos = start
            while pos < end and (block := src.read(min(chunk, end - pos))):
                if block != zero[: len(block)]:
                    dst.seek(part.offset + pos)
                    dst.write(block)
                pos += len(block)


def loader_conf() -> str:
    """systemd-boot's loader.conf: boot at once, no editor (the command line is sealed)."""
    return "timeout 0\neditor no\nauto-entries no\nauto-firmware no\nconsole-mode keep\n"


def build_disk(run: RunFn, *, out: Path, work: Path, name: str, sizes: DiskSizes, epoch: int,
               slot_a: Sealed, slot_b: Sealed | None, boot_loader: Path, tries: int,
               data_content: Path | None, disk_name: str = DISK_NAME) -> Path:
    """Assemble the raw disk image; return its path.

    The ESP gets ``boot_loader`` (systemd-boot, already signed if Secure Boot is on) as the
    removable-media path and slot A's UKI with a try counter (and slot B's, when given,
    with the same counter and a newer version, so it is tried first).

    Raises:
        ImageError: an input does not fit its partition. ToolError: a tool failed.
    """
    if slot_b is not None and slot_b.sealed_data != slot_a.sealed_data:
        raise ImageError(f"slot A ({slot_a.version}) and slot B ({slot_b.version}) disagree on the data "
                         "partition: one seals it to the TPM, the other does not")
    parts = {p.label: p for p in layout(name, sizes, slot_a.roothash,
                                                 slot_b.roothash if slot_b else None)}
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    conf = work / "loader.conf"
    conf.write_text(loader_conf())
    files = [(boot_loader, "/EFI/BOOT/BOOTX64.EFI"), (boot_loader, "/EFI/systemd/systemd-bootx64.efi"),
             (conf, "/loader/loader.conf"),
             (slot_a.uki, "/EFI/Linux/" + uki_file_name(name, slot_a.version, tries))]
    if slot_b is not None:
        files.append((slot_b.uki, "/EFI/Linux/" + uki_file_name(name, slot_b.version, tries)))
    needed = sum(src.stat().st_size for src, _ in files)
    if needed > (sizes.esp_mib - 2) * MiB:  # FAT32 tables and directories take the rest
        raise ImageError(f"the ESP ({sizes.esp_mib} MiB) cannot hold {needed / MiB:.0f} MiB of boot loader "
                         "and UKIs: raise the profile's [disk] esp_mib")
    esp = work / "esp.vfat"
    build_esp(run, esp, name=name, size_mib=sizes.esp_mib, epoch=epoch, files=files)
    data = work / "data.ext4"
    if not slot_a.sealed_data:
        build_data(run, data, name=name, size_mib=sizes.data_mib, epoch=epoch, content=data_content)

    image = out / (disk_name + ".partial")
    image.unlink(missing_ok=True)
    table = tuple(parts.values())
    with image.open("wb") as f:
        f.truncate(disk_mib(table) * MiB)
    disk_id = derived_uuid(name, "disk", slot_a.roothash)
    # a sealed data partition is made by the node itself, at first boot, with its own key: the
    # image keeps its space (all zeros) and has no entry for it
    written = tuple(p for p in table if not (slot_a.sealed_data and p.label == sizes.data_label))
    run(["sfdisk", "--no-reread", "--no-tell-kernel", "--quiet", image],
        input_bytes=sfdisk_script(disk_id, written).encode())
    _copy_into(image, parts["esp"], esp)
    _copy_into(image, parts["root-a"], slot_a.root_image)
    _copy_into(image, parts["root-a-verity"], slot_a.verity_image)
    if slot_b is not None:
        _copy_into(image, parts["root-b"], slot_b.root_image)
        _copy_into(image, parts["root-b-verity"], slot_b.verity_image)
    if not slot_a.sealed_data:
        _copy_into(image, parts[sizes.data_label], data)
    final = out / disk_name
    image.replace(final)
    return final


def write_manifest(out: Path, *, name: str, version: str, epoch: int, roothash: str,
                   artifacts: dict[str, str], extra: dict[str, object] | None = None) -> Path:
    """Write ``image-manifest.json`` listing each artifact (file name -> kind) with sha256 and size.

    ``appliance flash`` refuses an image whose bytes do not match its entry here.
    """
    doc: dict[str, object] = {
        "schema": MANIFEST_SCHEMA, "name": name, "version": version, "source_date_epoch": epoch,
        "roothash": roothash,
        "artifacts": {fname: {"kind": kind, "sha256": file_sha256(out / fname),
                              "size": (out / fname).stat().st_size}
                      for fname, kind in sorted(artifacts.items())},
    }
    if extra:
        doc.update(extra)
    path = out / MANIFEST_NAME
    atomic_write_text(path, json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return path


def _manifest_extra(ctx: StageContext) -> dict[str, object]:
    """What the profile adds to image-manifest.json: the CPU level, the boot tries, the egress
    allowlist and, when the build audited the root, the compliance summary it recorded in image.json."""
    extra: dict[str, object] = {"cpu_level": ctx.cpu_level} if ctx.cpu_level else {}
    extra["boot_tries"] = ctx.boot_tries  # what a new OS release gets too (the os-install unit's --tries)
    if ctx.egress is not None:
        extra["egress"] = [dict(d) for d in ctx.egress]
    metadata = ctx.rootfs / IMAGE_METADATA_IN_ROOT
    if metadata.is_file():
        compliance = json.loads(metadata.read_text()).get("compliance")
        if compliance is not None:
            extra["compliance"] = compliance
    return extra


def disk(ctx: StageContext) -> Path:
    """The disk stage: reads the seal stage's outputs (``ctx.sealed``, default ``ctx.out``),
    writes ``disk.raw`` and ``image-manifest.json`` to ``ctx.out``; returns the image's path.

    Slot B is left empty (an OS update writes it later). The data partition is populated
    from the root filesystem's /var.

    Raises:
        ImageError: the seal outputs are missing or do not fit. ToolError: a tool failed.
    """
    sealed = load_sealed(ctx.sealed or ctx.out)
    loader = sealed.uki.parent / "systemd-bootx64.efi"
    if not loader.is_file():
        raise ImageError(f"{loader}: missing (the seal stage copies the boot loader there)")
    var = ctx.rootfs / "var"
    image = build_disk(ctx.run, out=ctx.out, work=ctx.work / "disk", name=ctx.name, sizes=ctx.sizes,
                       epoch=ctx.source_date_epoch, slot_a=sealed, slot_b=None, boot_loader=loader,
                       tries=ctx.boot_tries, data_content=var if var.is_dir() else None)
    artifacts = {image.name: "disk"}
    if (ctx.sealed or ctx.out) == ctx.out:  # the seal outputs lie beside the image
        artifacts |= {sealed.root_image.name: "root", sealed.verity_image.name: "verity",
                      sealed.uki.name: "uki", loader.name: "boot-loader"}
    # expected PCR 11 of slot A's UKI, beside its root hash: what attestation checks a node against
    write_manifest(ctx.out, name=ctx.name, version=sealed.version, epoch=ctx.source_date_epoch,
                   roothash=sealed.roothash, artifacts=artifacts,
                   extra=_manifest_extra(ctx) | {"pcr11": pcr11_record(sealed.uki)})
    shutil.rmtree(ctx.work / "disk", ignore_errors=True)
    return image
