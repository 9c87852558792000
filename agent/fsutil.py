"""File primitives: atomic writes, streamed hashes, and copies checked while they are made.

Atomic writes: temp file in the same directory, fsync, ``os.replace``, fsync the dir; a reader
sees the old file or the new one, never a torn one, even across a power cut.  A verified copy
(:func:`copy_verified`) hashes the very bytes it writes and never reads past the declared
length, so what was checked is what was written.  :class:`OnePassReader` does the same for
the parts of a file read once: the whole file's sha256 and each part's sha256 come from the
one buffer that is parsed and written, each digest on a thread of its own.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import queue
import stat
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Protocol, TypeVar

from agent.errors import BundleError, NotFoundError, VerificationError

__all__ = ["OnePassReader", "atomic_write", "atomic_write_bytes", "atomic_write_text", "copy_verified",
           "data_extents", "file_sha256", "fsync_dir", "fsync_tree", "read_tar_once", "stream_sha256"]

T = TypeVar("T")


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename is durable only once its directory is)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every regular file and directory under ``root`` (links are not followed): a
    directory renamed into place afterwards then holds its files' bytes across a power cut."""
    for top, dirs, files in os.walk(root):
        for name in files:
            path = Path(top) / name
            if path.is_symlink() or not path.is_file():
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for name in dirs:
            fsync_dir(Path(top) / name)
    fsync_dir(root)


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
    """Hex sha256 of a file's bytes (see :func:`stream_sha256`).

    A regular file's holes are hashed as the zeros they read as, without reading them: a disk
    image is mostly holes, and reading them took 35 s of a 42 s disk stage here (issue #14).
    """
    with path.open("rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            return stream_sha256(f, block, progress)[0]
        digest = hashlib.sha256()
        zeros = memoryview(bytes(block))
        pos = 0
        for start, end in data_extents(f.fileno(), info.st_size):
            for hole in range(pos, start, block):  # the hole before this extent
                piece = zeros[:min(block, start - hole)]
                digest.update(piece)
                if progress is not None:
                    progress(len(piece))
            f.seek(start)
            pos = start
            while pos < end and (chunk := f.read(min(block, end - pos))):
                digest.update(chunk)
                pos += len(chunk)
                if progress is not None:
                    progress(len(chunk))
            if pos < end:  # the file was cut short while it was read
                break
        return digest.hexdigest()


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The data extents of the file open at ``fd`` (``size`` bytes), as (start, end), and
    (size, size) last: what lies between them reads as zeros.  A file system that cannot say
    where its holes are (no SEEK_DATA) has one extent, the whole file."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        except OSError as e:
            if e.errno == errno.ENXIO:  # nothing but a hole from pos to the end
                break
            if e.errno != errno.EINVAL:
                raise
            start, end = pos, size  # SEEK_DATA unsupported here
        if start >= size:
            break
        yield start, end
        pos = end
    yield size, size


class _Digester:
    """A sha256 fed in order on a thread of its own: hashlib releases the GIL while it hashes a
    buffer of more than 2 KiB, so two digests of the same bytes, and the write of them, run on
    separate cores.  A buffer fed here must not change until :meth:`wait` for the number
    :meth:`feed` gave it has returned."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._todo: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self._fed = 0
        self._done = 0  # buffers hashed, in the order fed
        self._stopped = False
        self._failure: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while (data := self._todo.get()) is not None:
                self._sha.update(data)
                with self._cond:
                    self._done += 1
                    self._cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that asks for the digest
            self._failure = exc
        finally:
            with self._cond:
                self._stopped = True
                self._cond.notify_all()

    def feed(self, data: memoryview) -> int:
        self._fed += 1
        self._todo.put(data)
        return self._fed

    def wait(self, fed: int) -> None:
        """Return once the ``fed``-th buffer has been hashed (or the thread has stopped)."""
        with self._cond:
            self._cond.wait_for(lambda: self._done >= fed or self._stopped)

    def close(self) -> None:
        """Let the thread hash what it was fed, and end it."""
        if self._thread.is_alive():
            self._todo.put(None)
            self._thread.join()

    def hexdigest(self) -> str:
        self.close()
        if self._failure is not None:
            raise self._failure
        return self._sha.hexdigest()


class OnePassReader:
    """A file read once, front to back, through a ring of buffers: every buffer is hashed (the
    sha256 of the whole file) on a thread of its own, and the same bytes are what :meth:`read`
    hands out (to a parser such as tarfile) and what :meth:`copy_part` checks and writes.  No
    byte is read twice, so no digest can come from bytes other than those used.

    :meth:`seek` goes forward (the bytes skipped are read and hashed on the way) or back within
    the buffer in hand (tarfile's end-of-data probe re-reads one byte), never further back.
    Memory: ``depth`` buffers of ``piece`` bytes, and no read larger than one.
    """

    def __init__(self, raw: io.RawIOBase, piece: int = 4 << 20, depth: int = 4) -> None:
        self._raw = raw
        self._ring = [memoryview(bytearray(piece)) for _ in range(depth)]
        # Per buffer: the digests that still may read it, and up to which item.
        self._users: list[list[tuple[_Digester, int]]] = [[] for _ in range(depth)]
        self._slot = depth - 1  # the buffer in hand
        self._whole = _Digester()
        self._view = memoryview(b"")  # the bytes of the buffer in hand
        self._start = 0  # file offset of _view[0]
        self._pos = 0  # file offset of the next byte handed out

    def __enter__(self) -> OnePassReader:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._whole.close()

    def _end(self) -> int:
        return self._start + len(self._view)

    def _advance(self) -> bool:
        """Read the next buffer's worth of the file; False at the end of the file."""
        slot = (self._slot + 1) % len(self._ring)
        for digester, fed in self._users[slot]:  # no digest may see this buffer change
            digester.wait(fed)
        buf = self._ring[slot]
        n = 0
        while n < len(buf) and (got := self._raw.readinto(buf[n:])):
            n += got
        if not n:  # the buffer in hand stays, for a seek back within it
            return False
        self._start, self._view, self._slot = self._end(), buf[:n], slot
        self._users[slot] = [(self._whole, self._whole.feed(self._view))]
        return True

    def _available(self) -> memoryview:
        """The bytes from the current position to the end of the buffer in hand (reading the
        next buffer when that is empty); empty at the end of the file."""
        if self._pos == self._end() and not self._advance():
            return self._view[:0]
        return self._view[self._pos - self._start:]

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        """Raises:
            io.UnsupportedOperation: a relative seek, or a seek back before the buffer in hand.
        """
        if whence != os.SEEK_SET:
            raise io.UnsupportedOperation(f"seek whence {whence}: only absolute offsets here")
        if offset < self._start:
            raise io.UnsupportedOperation(f"seek back to {offset}: the file is read once, "
                                          f"and {self._start} bytes are behind")
        while offset > self._end():
            self._pos = self._end()
            if not self._advance():
                break
        self._pos = min(offset, self._end())  # past the end of the file: reads give b""
        return self._pos

    def read(self, size: int = -1, /) -> bytes:
        """Up to ``size`` bytes (a copy); fewer only at the end of the file.  Reads are for
        headers: bulk bytes go through :meth:`copy_part`.

        Raises:
            io.UnsupportedOperation: ``size`` is negative or larger than a buffer (tarfile asks
                for what a header declares, and memory stays bounded whatever that is).
        """
        if not 0 <= size <= len(self._ring[0]):
            raise io.UnsupportedOperation(f"a read of {size} bytes: reads here are bounded "
                                          f"(0..{len(self._ring[0])})")
        parts = []
        while size > 0 and (view := self._available()):
            part = view[:size]
            parts.append(part)
            self._pos += len(part)
            size -= len(part)
        return b"".join(parts)

    def copy_part(self, length: int, dst: IO[bytes] | None, sha256: str, *, where: str,
                  against: str = "the declared") -> None:
        """Copy the next ``length`` bytes to ``dst`` (``None``: only check); they must have hex
        ``sha256``.  Their digest is taken on a thread of its own from the buffers written.

        Raises:
            VerificationError: the file ends first, or another sha256; ``dst`` may then hold
                the bytes (the caller discards it).
        """
        part = _Digester()
        seen = 0
        try:
            while seen < length and (view := self._available()):
                piece = view[:length - seen]
                self._users[self._slot].append((part, part.feed(piece)))
                if dst is not None:
                    dst.write(piece)
                self._pos += len(piece)
                seen += len(piece)
            digest = part.hexdigest()
        finally:
            part.close()
        if seen != length:
            raise VerificationError(f"{where}: {seen} bytes, {against} declares {length}")
        if digest != sha256:
            raise VerificationError(f"{where}: sha256 {digest} does not match {against}'s {sha256}")

    def finish(self) -> tuple[str, int]:
        """Read the rest of the file; the hex sha256 and length of all of it."""
        while self._advance():
            pass
        self._pos = self._end()
        return self._whole.hexdigest(), self._end()


def read_tar_once(path: Path, walk: Callable[[tarfile.TarFile, OnePassReader], T],
                  what: str) -> tuple[T, str, int]:
    """Read the uncompressed tar file ``path`` once through :class:`OnePassReader`: ``walk``
    gets the archive (its headers parsed from the reader's buffers) and the reader (members
    hashed, and written, from the same buffers).  Returns what ``walk`` returned, and the whole
    file's sha256 and length.

    Raises:
        NotFoundError: ``path`` is not a file.
        BundleError: the archive cannot be read ("not a {what}"), and what ``walk`` raises.
    """
    if not path.is_file():
        raise NotFoundError(f"{path}: no such bundle file")
    try:
        with path.open("rb", buffering=0) as raw, OnePassReader(raw) as reader:
            with tarfile.open(fileobj=reader, mode="r:") as tar:  # type: ignore[call-overload]
                result = walk(tar, reader)
            sha256, length = reader.finish()
    except tarfile.TarError as exc:
        raise BundleError(f"{path}: not a {what} (unreadable archive: {exc})") from None
    except io.UnsupportedOperation as exc:  # a negative size, an offset behind what was read
        raise BundleError(f"{path}: not a {what} ({exc})") from None
    return result, sha256, length
