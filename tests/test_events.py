"""The event log: sequence numbers, bounds, filters, fsynced JSONL that survives a restart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.errors import HealthError
from agent.events import EVENTS_FILE, EventLog


def test_record_persist_and_reload(tmp_path: Path) -> None:
    log = EventLog.open(tmp_path)
    a = log.record("gpu.xid", "error", "gpu0", "XID 79 on gpu0", xid=79)
    b = log.record("update.applied", "info", "affine", "affine 1.0.1 applied", version="1.0.1")
    assert (a.seq, b.seq) == (1, 2) and b.time >= a.time
    lines = (tmp_path / EVENTS_FILE).read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["gpu.xid", "update.applied"]
    again = EventLog.open(tmp_path)
    assert [(e.seq, e.kind, e.details) for e in again.recent()] == [
        (1, "gpu.xid", {"xid": 79}), (2, "update.applied", {"version": "1.0.1"})]
    assert again.record("disk.filling", "warning", "/data", "95% full").seq == 3


def test_torn_last_line_is_skipped(tmp_path: Path) -> None:
    log = EventLog.open(tmp_path)
    log.record("gpu.ecc", "warning", "gpu0", "ECC")
    with (tmp_path / EVENTS_FILE).open("a") as f:
        f.write('{"seq": 2, "kind": "gpu.x')  # a power cut mid-write
    reloaded = EventLog.open(tmp_path)
    assert [e.seq for e in reloaded.recent()] == [1]
    assert reloaded.record("gpu.ecc", "warning", "gpu0", "again").seq == 2


def test_filters_and_bounds(tmp_path: Path) -> None:
    log = EventLog(None, keep=5)
    for n in range(8):
        log.record("gpu.throttle.start" if n % 2 else "disk.filling", "info", "x", f"n={n}")
    kept = log.recent(limit=0)
    assert [e.seq for e in kept] == [4, 5, 6, 7, 8]  # only the newest `keep` in memory
    assert [e.seq for e in log.recent(after_seq=6)] == [7, 8]
    assert [e.seq for e in log.recent(kind_prefix="gpu.")] == [4, 6, 8]
    assert [e.seq for e in log.recent(limit=2)] == [7, 8]


def test_rotation_keeps_the_file_bounded(tmp_path: Path) -> None:
    log = EventLog.open(tmp_path, max_bytes=600)
    for n in range(20):
        log.record("gpu.ecc", "warning", "gpu0", f"event {n}")
    path = tmp_path / EVENTS_FILE
    assert path.stat().st_size <= 600 and path.with_name(path.name + ".1").exists()
    assert EventLog.open(tmp_path).last_seq == 20


def test_bad_severity_is_refused_and_unwritable_dir_still_keeps_the_event(tmp_path: Path) -> None:
    log = EventLog.open(tmp_path)
    with pytest.raises(HealthError, match="severity 'fatal'"):
        log.record("gpu.xid", "fatal", "gpu0", "x")
    blocker = tmp_path / "file"
    blocker.write_text("")
    broken = EventLog(blocker / "events.jsonl")  # its directory is a file
    with pytest.raises(HealthError, match="cannot persist event 1"):
        broken.record("gpu.xid", "error", "gpu0", "XID 79")
    assert [e.kind for e in broken.recent()] == ["gpu.xid"]


def test_subscribers_see_each_event(tmp_path: Path) -> None:
    log = EventLog(None)
    seen: list[int] = []
    unsubscribe = log.subscribe(lambda e: seen.append(e.seq))
    log.record("a", "info", "s", "m")
    unsubscribe()
    log.record("b", "info", "s", "m")
    assert seen == [1]
