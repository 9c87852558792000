"""agent.fsutil.OnePassReader: a file read once through a ring of buffers, the whole file's
sha256 and each part's sha256 taken on threads of their own from the very buffers that are
handed out and written.  Real files, small buffers so that the ring wraps many times."""

from __future__ import annotations

import hashlib
import io
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent.errors import VerificationError
from agent.fsutil import OnePassReader

PIECE, DEPTH = 4096, 3
_real_sha256 = hashlib.sha256


@pytest.fixture
def data_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = random.Random(7).randbytes(100_003)  # 24.4 buffers: the ring wraps 8 times
    path = tmp_path / "data"
    path.write_bytes(data)
    return path, data


def _sha(data: bytes | bytearray) -> str:
    return _real_sha256(data).hexdigest()


def _no_digest_threads() -> bool:
    return not any(t.name == "sha256" for t in threading.enumerate())


class _SlowSha256:
    """hashlib's sha256, slowed down before it reads each buffer: a reader that reused a
    buffer while a digest still had it queued would hash other bytes than it wrote."""

    def __init__(self) -> None:
        self._sha = _real_sha256()

    def update(self, data: Any) -> None:
        time.sleep(0.002)
        self._sha.update(data)

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


# A layout like a tar archive's: a header read by read(), a part, padding skipped by seek().
PARTS = [(0, 512, 9000), (10240, 512, 4096 * 5 + 17), (32768 + 1024, 0, 50_000), (100_000, 3, 0)]


@pytest.mark.parametrize("slow", [False, True])
def test_parts_and_the_whole_file_hash_the_bytes_written(data_file: tuple[Path, bytes], tmp_path: Path,
                                                         slow: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    path, data = data_file
    if slow:
        monkeypatch.setattr(hashlib, "sha256", _SlowSha256)
    with path.open("rb", buffering=0) as raw, OnePassReader(raw, PIECE, DEPTH) as reader:
        for i, (offset, header, size) in enumerate(PARTS):
            reader.seek(offset)
            assert reader.read(header) == data[offset:offset + header]
            start = offset + header
            assert reader.tell() == start
            with (tmp_path / f"part{i}").open("wb") as out:
                reader.copy_part(size, out, _sha(data[start:start + size]), where=f"part{i}")
            assert (tmp_path / f"part{i}").read_bytes() == data[start:start + size]
        assert reader.finish() == (_sha(data), len(data))
    assert _no_digest_threads()


def test_a_seek_back_within_the_buffer_in_hand_rereads_without_hashing_twice(
        data_file: tuple[Path, bytes]) -> None:
    path, data = data_file
    with path.open("rb", buffering=0) as raw, OnePassReader(raw, PIECE, DEPTH) as reader:
        assert reader.seek(5000) == 5000
        assert reader.read(10) == data[5000:5010]
        reader.seek(4999)  # tarfile's end-of-data probe
        assert reader.read(2) == data[4999:5001]
        with pytest.raises(io.UnsupportedOperation, match="read once"):
            reader.seek(100)  # in a buffer already given back to the ring
        with pytest.raises(io.UnsupportedOperation):
            reader.seek(0, io.SEEK_END)
        for size in (-512, PIECE + 1):
            with pytest.raises(io.UnsupportedOperation, match="bounded"):
                reader.read(size)
        assert reader.seek(len(data) + 50) == len(data)  # past the end: reads give nothing
        assert reader.read(512) == b""
        assert reader.finish() == (_sha(data), len(data))


def test_a_changed_byte_in_a_part_is_refused(data_file: tuple[Path, bytes], tmp_path: Path) -> None:
    path, data = data_file
    claimed = _sha(data[100:60_100])
    changed = bytearray(data)
    changed[100 + 4096 * 7] ^= 1  # on a buffer boundary, after the ring has wrapped
    path.write_bytes(changed)
    with path.open("rb", buffering=0) as raw, OnePassReader(raw, PIECE, DEPTH) as reader:
        reader.seek(100)
        with (tmp_path / "out").open("wb") as out, \
                pytest.raises(VerificationError, match=f"part: sha256 {_sha(changed[100:60_100])} "
                              f"does not match the manifest's {claimed}"):
            reader.copy_part(60_000, out, claimed, where="part", against="the manifest")
        assert reader.finish() == (_sha(bytes(changed)), len(data))


def test_a_part_cut_short_by_the_end_of_the_file_is_refused(data_file: tuple[Path, bytes]) -> None:
    path, data = data_file
    with path.open("rb", buffering=0) as raw, OnePassReader(raw, PIECE, DEPTH) as reader:
        reader.seek(90_000)
        with pytest.raises(VerificationError, match=r"part: 10003 bytes, the manifest declares 10004"):
            reader.copy_part(10_004, None, _sha(data[90_000:]), where="part", against="the manifest")
        assert reader.finish() == (_sha(data), len(data))


class _FullDisk(io.RawIOBase):
    """A writable file that fills up after ``room`` bytes (ENOSPC, as a real disk does)."""

    def __init__(self, room: int) -> None:
        self.room = room

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        if len(b) > self.room:
            raise OSError(28, "No space left on device")
        self.room -= len(b)
        return len(b)


def test_a_failed_write_stops_every_digest_thread(data_file: tuple[Path, bytes]) -> None:
    path, data = data_file
    with pytest.raises(OSError, match="No space"), path.open("rb", buffering=0) as raw, \
            OnePassReader(raw, PIECE, DEPTH) as reader:
        reader.copy_part(len(data), _FullDisk(30_000), _sha(data), where="part")  # type: ignore[arg-type]
    assert _no_digest_threads()
