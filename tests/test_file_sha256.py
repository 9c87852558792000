"""agent.fsutil.file_sha256: a sparse file's holes are hashed as zeros without being read, and
the digest is the one of the file's bytes as read, whatever the layout of data and holes."""

from __future__ import annotations

import hashlib
import os
import random
import threading
from pathlib import Path
from typing import Any

import pytest

from agent.fsutil import file_sha256

BLOCK = 64 * 1024  # small, so that data and holes span several blocks


def _sparse(path: Path, size: int, data_at: list[tuple[int, int]]) -> bytes:
    """A file of ``size`` bytes, holes except for random bytes at each (offset, length); returns
    what it reads as."""
    rng = random.Random(size)
    with path.open("wb") as f:
        f.truncate(size)
        for offset, length in data_at:
            f.seek(offset)
            f.write(rng.randbytes(length))
    return path.read_bytes()


@pytest.mark.parametrize("layout", [
    [],                                                   # one hole
    [(0, 5000)],                                          # data, then a long hole
    [(3 * BLOCK + 17, 2 * BLOCK + 5)],                    # hole, data, hole
    [(0, BLOCK), (40 * BLOCK, 300), (80 * BLOCK - 9, 9)],  # data at the start, middle and end
    [(0, 80 * BLOCK)],                                    # no hole at all
])
def test_the_digest_is_that_of_the_bytes_read(tmp_path: Path, layout: list[tuple[int, int]]) -> None:
    content = _sparse(tmp_path / "disk.raw", 80 * BLOCK, layout)
    pieces: list[int] = []
    assert file_sha256(tmp_path / "disk.raw", BLOCK, pieces.append) == hashlib.sha256(content).hexdigest()
    assert sum(pieces) == len(content) and max(pieces) <= BLOCK


def test_holes_are_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1 GiB image with 8 KiB of data: only the data is read (where the file system reports
    holes: tmpfs and ext4 do)."""
    path = tmp_path / "disk.raw"
    content_at = 512 << 20
    with path.open("wb") as f:
        f.truncate(1 << 30)
        f.seek(content_at)
        f.write(b"\x01" * 8192)
    with path.open("rb") as f:
        if os.lseek(f.fileno(), 0, os.SEEK_DATA) != content_at:
            pytest.skip("this file system does not report holes")
    read: list[int] = []
    real_open = Path.open

    class Counting:
        def __init__(self, f: Any) -> None:
            self._f = f

        def read(self, n: int = -1) -> bytes:
            chunk: bytes = self._f.read(n)
            read.append(len(chunk))
            return chunk

        def __getattr__(self, name: str) -> Any:
            return getattr(self._f, name)

        def __enter__(self) -> Counting:
            return self

        def __exit__(self, *exc: object) -> None:
            self._f.close()

    monkeypatch.setattr(Path, "open", lambda self, *a, **k: Counting(real_open(self, *a, **k)))
    expected = hashlib.sha256(bytes(content_at) + b"\x01" * 8192 + bytes((1 << 30) - content_at - 8192))
    assert file_sha256(path) == expected.hexdigest()
    assert sum(read) <= 64 << 10  # the data's block, not the gigabyte


def test_a_pipe_is_read_to_its_end(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    data = random.Random(3).randbytes(300_000)

    def write() -> None:
        with fifo.open("wb") as f:
            f.write(data)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert file_sha256(fifo, BLOCK) == hashlib.sha256(data).hexdigest()
    finally:
        writer.join()
