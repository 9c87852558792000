"""Write a built disk image to a device (or a file), safely.

Order: the image is checked against its build manifest (``image-manifest.json`` next to it,
written by the disk stage) before anything is opened for writing; the target is refused when
it, one of its partitions or a device stacked on it is mounted or used as swap (the disks
that hold the running system always are); the write needs ``confirm``; afterwards the
written range is read back (page cache dropped) and its sha256 compared with the manifest.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.errors import NotFoundError, VerificationError
from agent.fsutil import file_sha256
from provisioning.errors import ImageError
from provisioning.image.disk import MANIFEST_NAME

__all__ = ["FlashResult", "Target", "check_image", "flash", "inspect_target", "refuse_in_use"]

CHUNK = 4 * 1024 * 1024
Progress = Callable[[int], None]


@dataclass(frozen=True)
class Target:
    """Where the image goes: a block device or a regular file."""

    path: Path
    block: bool
    size: int | None  # bytes; None for a file (it grows)
    devnums: frozenset[str]  # "major:minor" of the device and its partitions


@dataclass(frozen=True)
class FlashResult:
    """What was written and verified."""

    image: Path
    target: Path
    bytes: int
    sha256: str
    seconds: float


def check_image(image: Path, manifest: Path | None = None) -> dict[str, object]:
    """Check ``image`` against its manifest entry; return that entry.

    Raises:
        NotFoundError: the image or manifest is missing.
        VerificationError: the manifest is malformed, does not list the image as a disk, or
            the image's size or sha256 differ from it.
    """
    if not image.is_file():
        raise NotFoundError(f"image {image} does not exist")
    manifest = manifest or image.parent / MANIFEST_NAME
    try:
        doc = json.loads(manifest.read_text())
    except FileNotFoundError as exc:
        raise NotFoundError(f"build manifest {manifest} does not exist (the build writes it next to "
                            "the image)") from exc
    except (OSError, ValueError) as exc:
        raise VerificationError(f"{manifest}: not valid JSON ({exc})") from exc
    entry = doc.get("artifacts", {}).get(image.name) if isinstance(doc, dict) else None
    if not isinstance(entry, dict) or entry.get("kind") != "disk":
        raise VerificationError(f"{manifest}: artifacts has no disk entry named {image.name!r}")
    size = image.stat().st_size
    if entry.get("size") != size:
        raise VerificationError(f"{image}: {size} bytes, but {manifest} says "
                                f"artifacts.{image.name}.size = {entry.get('size')!r}")
    digest = file_sha256(image, CHUNK)
    if entry.get("sha256") != digest:
        raise VerificationError(f"{image}: sha256 {digest}, but {manifest} says "
                                f"artifacts.{image.name}.sha256 = {entry.get('sha256')!r}")
    return entry



def _sysfs_block(devnum: str) -> Path:
    return Path("/sys/dev/block") / devnum


def inspect_target(path: Path) -> Target:
    """What ``path`` is: a block device (with its partitions' device numbers) or a file.

    Raises:
        ImageError: it is neither a block device nor a regular file (or a new file's folder
            is missing).
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise ImageError(f"target {path}: folder {path.parent} does not exist") from None
        return Target(path, False, None, frozenset())
    if stat.S_ISREG(st.st_mode):
        return Target(path, False, None, frozenset())
    if not stat.S_ISBLK(st.st_mode):
        raise ImageError(f"target {path} is neither a block device nor a regular file")
    devnum = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    sysfs = _sysfs_block(devnum).resolve()
    nums = {devnum}
    for child in sysfs.iterdir() if sysfs.is_dir() else ():
        if (child / "partition").exists():
            nums.add((child / "dev").read_text().strip())
    size = int((sysfs / "size").read_text()) * 512 if (sysfs / "size").exists() else None
    return Target(path, True, size, frozenset(nums))


def refuse_in_use(target: Target, mountinfo: Path = Path("/proc/self/mountinfo"),
                  swaps: Path = Path("/proc/swaps")) -> None:
    """Raise unless ``target`` is free to overwrite.

    Raises:
        ImageError: the device or a partition of it is mounted (the system disk always is),
            used as swap, held by a device-mapper/md device, or the file is mounted.
    """
    for line in mountinfo.read_text().splitlines():
        fields = line.split()
        # 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
        sep = fields.index("-")
        devnum, mountpoint, source = fields[2], fields[4], fields[sep + 2]
        if devnum in target.devnums or source == str(target.path):
            raise ImageError(f"target {target.path} is mounted (on {_unescape(mountpoint)}): "
                             "refusing to overwrite a disk in use")
    for line in swaps.read_text().splitlines()[1:]:
        if line.split() and _same_device(Path(line.split()[0]), target):
            raise ImageError(f"target {target.path} is in use as swap")
    for num in sorted(target.devnums):
        holders = _sysfs_block(num) / "holders"
        if holders.is_dir() and any(holders.iterdir()):
            names = ", ".join(sorted(p.name for p in holders.iterdir()))
            raise ImageError(f"target {target.path} is held by {names} (device mapper, RAID or LVM)")


def _same_device(path: Path, target: Target) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    return stat.S_ISBLK(st.st_mode) and f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" in target.devnums


def _unescape(text: str) -> str:
    return text.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def _write_chunk(fd: int, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` (all of it)."""
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view = view[done:]
        offset += done


def _open_target(path: Path, block: bool, wait: float = 5.0) -> int:
    """Open the target for writing; a block device exclusively (O_EXCL: no mounted filesystem,
    no other exclusive holder). Right after an unmount, udev's probe holds the device for a
    moment: EBUSY is retried for ``wait`` seconds before it is reported.

    Raises:
        ImageError: the device stays busy.
    """
    flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_EXCL if block else os.O_CREAT)
    deadline = time.monotonic() + wait
    while True:
        try:
            return os.open(path, flags, 0o644)
        except OSError as exc:
            if exc.errno != errno.EBUSY or not block:
                raise
            if time.monotonic() > deadline:
                raise ImageError(f"target {path} is busy (held by another program) for {wait:.0f} s; "
                                 "nothing written") from None
            time.sleep(0.2)


def flash(image: Path, target_path: Path, *, confirm: bool, manifest: Path | None = None,
          progress: Progress | None = None, verify_progress: Progress | None = None,
          mountinfo: Path = Path("/proc/self/mountinfo")) -> FlashResult:
    """Check, write and read back ``image`` onto ``target_path``.

    Raises:
        NotFoundError / VerificationError: see :func:`check_image` (nothing written).
        ImageError: the target is in use, too small, is the image itself, or ``confirm`` is
            False (nothing written).
        VerificationError: the bytes read back differ from the image (the target is left
            as written; write it again).
    """
    entry = check_image(image, manifest)
    expected = str(entry["sha256"])
    length = image.stat().st_size
    target = inspect_target(target_path)
    if target_path.exists() and target_path.samefile(image):
        raise ImageError(f"target {target_path} is the image itself")
    refuse_in_use(target, mountinfo)
    if target.size is not None and target.size < length:
        raise ImageError(f"target {target_path} holds {target.size} bytes; the image needs {length}")
    if not confirm:
        raise ImageError(f"writing {image.name} would overwrite everything on {target_path}: "
                         "pass --yes to go ahead")
    began = time.monotonic()
    fd = _open_target(target_path, target.block)
    try:
        if not target.block:
            os.ftruncate(fd, length)
        with image.open("rb") as src:
            offset = 0
            while block := src.read(CHUNK):
                _write_chunk(fd, offset, block)
                offset += len(block)
                if progress:
                    progress(len(block))
        os.fsync(fd)
    finally:
        os.close(fd)
    got = _read_back(target_path, length, verify_progress)
    if got != expected:
        raise VerificationError(f"read-back of {target_path} gives sha256 {got}, the image has {expected}: "
                                "the device did not keep what was written")
    return FlashResult(image, target_path, length, got, time.monotonic() - began)


def _read_back(path: Path, length: int, progress: Progress | None) -> str:
    """sha256 of the first ``length`` bytes, read past the page cache."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        h = hashlib.sha256()
        offset = 0
        while offset < length:
            block = os.pread(fd, min(CHUNK, length - offset), offset)
            if not block:
                raise VerificationError(f"read-back of {path}: ends at {offset} bytes, image has {length}")
            h.update(block)
            offset += len(block)
            if progress:
                progress(len(block))
        return h.hexdigest()
    finally:
        os.close(fd)
