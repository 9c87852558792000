"""File primitives: atomic writes, streamed hashes, and copies checked while they are made.

Atomic writes: temp file in the same directory, fsync, ``os.replace``, fsync the dir; a reader
sees the old file or the new one, never a torn one, even across a power cut.  A verified copy
(:func:`copy_verified`) hashes the very bytes it writes and never reads past the declared
length, so what was checked is what was written.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Protocol

from agent.errors import VerificationError

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "copy_verified", "file_sha256",
           "fsync_dir", "stream_sha256"]


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename is durable only once its directory is)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: Path, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """Yield a binary file that replaces ``path`` atomically when the block ends cleanly.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        tmp.chmod(mode)
        tmp.replace(path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path, mode) as handle:
        handle.write(data)


def atomic_write_text(path: Path, text: str, mode: int = 0o644) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode(), mode)


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def stream_sha256(handle: Readable, block: int = 4 << 20,
                  progress: Callable[[int], None] | None = None,
                  out: IO[bytes] | None = None) -> tuple[str, int]:
    """Hex sha256 and length of what ``handle`` reads until its end, in ``block``-sized pieces;
    ``progress`` gets the length of each piece; each piece is also written to ``out`` if given."""
    digest = hashlib.sha256()
    length = 0
    while chunk := handle.read(block):
        digest.update(chunk)
        length += len(chunk)
        if out is not None:
            out.write(chunk)
        if progress is not None:
            progress(len(chunk))
    return digest.hexdigest(), length


def copy_verified(src: Readable, dst: IO[bytes] | None, length: int, sha256: str, *,
                  where: str, against: str = "the declared", block: int = 1 << 20) -> None:
    """Copy ``src`` to ``dst`` (``None``: only check) while hashing; it must be ``length``
    bytes with hex ``sha256``.  Reads at most one byte past ``length``, and writes none.

    ``where`` names the source in messages, ``against`` whose values they are
    (``"the manifest"``, ``"the signed target"``).

    Raises:
        VerificationError: longer or shorter than ``length``, or another sha256; ``dst`` may
            then hold a prefix of the bytes (the caller discards it).
    """
    digest = hashlib.sha256()
    seen = 0
    while chunk := src.read(min(block, length - seen + 1)):
        seen += len(chunk)
        if seen > length:
            raise VerificationError(f"{where}: longer than the {length} bytes {against} declares")
        digest.update(chunk)
        if dst is not None:
            dst.write(chunk)
    if seen != length:
        raise VerificationError(f"{where}: {seen} bytes, {against} declares {length}")
    if digest.hexdigest() != sha256:
        raise VerificationError(f"{where}: sha256 {digest.hexdigest()} does not match {against}'s "
                                f"{sha256}")


def file_sha256(path: Path, block: int = 4 << 20,
                progress: Callable[[int], None] | None = None) -> str:
    """Hex sha256 of a file's bytes (see :func:`stream_sha256`)."""
    with path.open("rb") as f:
        return stream_sha256(f, block, progress)[0]
