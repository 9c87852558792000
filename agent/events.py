"""The node's event log: what happened when (XID errors, throttling, ECC, disks, updates).

Bounded in memory for ``GetEvents``, persisted append-only as JSON Lines under the state
directory so a fleet manager can still read what went wrong after the agent restarts.
Each record is written with one ``write`` on an ``O_APPEND`` descriptor and fsynced before
:meth:`EventLog.record` returns; a line torn by a power cut is skipped on reload.

With ``shared`` (several serving processes, agent.workers), the file is the log: a record is
numbered and appended under an ``flock`` after taking in what the others appended, and readers
take in new lines before answering, so every process numbers and lists the same events.

Kinds are dotted names: ``gpu.xid``, ``gpu.throttle.start``/``stop``, ``gpu.ecc``,
``gpu.remap``, ``gpu.lost``, ``disk.filling``, ``health.changed``, ``update.*`` ...
Any thread may record; readers get copies.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import HealthError
from agent.state import StateLayout

__all__ = ["EVENTS_FILE", "SEVERITIES", "Event", "EventLog"]

log = logging.getLogger(__name__)

# Where the log lies relative to the state directory (StateLayout.events_log).
EVENTS_FILE = StateLayout(Path()).events_log
SEVERITIES = ("info", "warning", "error")


@dataclass(frozen=True)
class Event:
    seq: int
    time: float  # seconds since the epoch
    kind: str
    severity: str
    subject: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "time": self.time, "kind": self.kind, "severity": self.severity,
                "subject": self.subject, "message": self.message, "details": dict(self.details)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Event:
        """Raises KeyError/TypeError/ValueError on a record that is not an event."""
        return cls(seq=int(data["seq"]), time=float(data["time"]), kind=str(data["kind"]),
                   severity=str(data["severity"]), subject=str(data["subject"]),
                   message=str(data["message"]), details=dict(data.get("details") or {}))


class EventLog:
    """Events numbered from 1, the newest ``keep`` in memory, all of them on disk (rotated).

    ``path`` None keeps events in memory only (tests, tools). ``max_bytes`` bounds the file:
    past it, the file becomes ``events.jsonl.1`` (replacing an older one) and a new one starts.
    ``shared``: other processes record into the same file (see the module docstring).
    """

    def __init__(self, path: Path | None = None, *, keep: int = 1000, max_bytes: int = 8 << 20,
                 clock: Callable[[], float] = time.time, shared: bool = False) -> None:
        self.path = path
        self._shared = shared and path is not None
        self._seen = (0, 0)  # (inode, offset) of the file read so far, in shared mode
        self._keep = keep
        self._max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._recent: deque[Event] = deque(maxlen=keep)
        self._seq = 0
        self._listeners: list[Callable[[Event], None]] = []
        if path is not None:
            self._load(path)

    @classmethod
    def open(cls, state_dir: Path, *, keep: int = 1000, max_bytes: int = 8 << 20,
             shared: bool = False) -> EventLog:
        """The log persisted at ``state_dir/events/events.jsonl`` (created when absent)."""
        return cls(StateLayout(state_dir).events_log, keep=keep, max_bytes=max_bytes, shared=shared)

    # ------------------------------------------------------------------ persistence

    def _load(self, path: Path) -> None:
        older = path.with_name(path.name + ".1")
        for source in (older, path):
            try:
                text = source.read_text(errors="replace")
            except FileNotFoundError:
                continue
            except OSError as exc:  # unreadable: start empty rather than not at all
                log.warning("%s: cannot read earlier events: %s", source, exc)
                continue
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    event = Event.from_json(json.loads(line))
                except (ValueError, KeyError, TypeError):
                    log.warning("%s:%d: skipping a record that is not an event (torn write?)", source, n)
                    continue
                self._recent.append(event)
                self._seq = max(self._seq, event.seq)

    def _take_in(self) -> None:
        """Take in the events other processes appended since this one last looked (shared
        mode; under ``self._lock``).  A line still being written waits for the next look."""
        assert self.path is not None
        try:
            with self.path.open("rb") as f:
                st = os.fstat(f.fileno())
                ino, offset = self._seen
                if st.st_ino != ino or st.st_size < offset:  # rotated: a new file
                    offset = 0
                f.seek(offset)
                data = f.read(st.st_size - offset)
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        self._seen = (st.st_ino, offset + end)
        for line in data[:end].splitlines():
            try:
                event = Event.from_json(json.loads(line))
            except (ValueError, KeyError, TypeError):
                continue
            if event.seq > self._seq:
                self._recent.append(event)
                self._seq = event.seq

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """In shared mode: the file to ourselves (flock on its directory), up to date."""
        if not self._shared:
            yield
            return
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._take_in()
            yield
            self._take_in()  # our own line: read past it
        finally:
            os.close(fd)

    def _append(self, event: Event) -> None:
        assert self.path is not None
        line = (json.dumps(event.to_json(), sort_keys=True, separators=(",", ":"),
                           default=str) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if self.path.stat().st_size + len(line) > self._max_bytes:
                self.path.replace(self.path.with_name(self.path.name + ".1"))
        except FileNotFoundError:
            pass
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ API

    def record(self, kind: str, severity: str, subject: str, message: str, **details: Any) -> Event:
        """Append an event; returns it with its sequence number and time.

        Raises:
            HealthError: ``severity`` is not one of :data:`SEVERITIES`, ``kind`` is empty, or
                the event cannot be written to the state directory (the event is then still
                kept in memory, so a full disk does not hide what happened).
        """
        if severity not in SEVERITIES:
            raise HealthError(f"event {kind!r}: severity {severity!r} is not one of {SEVERITIES}")
        if not kind:
            raise HealthError("an event needs a kind")
        with self._lock, self._writing():
            self._seq += 1
            event = Event(self._seq, self._clock(), kind, severity, subject, message, dict(details))
            self._recent.append(event)
            listeners = list(self._listeners)
            failure: OSError | None = None
            if self.path is not None:
                try:
                    self._append(event)
                except OSError as exc:
                    failure = exc
        log.log(logging.ERROR if severity == "error" else
                logging.WARNING if severity == "warning" else logging.INFO,
                "event %s %s: %s", kind, subject, message)
        for listener in listeners:
            listener(event)
        if failure is not None:
            raise HealthError(f"{self.path}: cannot persist event {event.seq} ({kind}): {failure}")
        return event

    def recent(self, after_seq: int = 0, limit: int = 100, kind_prefix: str = "") -> list[Event]:
        """Events with ``seq > after_seq`` whose kind starts with ``kind_prefix``, oldest
        first, at most ``limit`` of them (the newest ones when more match)."""
        with self._lock:
            if self._shared:
                self._take_in()
            matched = [e for e in self._recent
                       if e.seq > after_seq and e.kind.startswith(kind_prefix)]
        return matched[-limit:] if limit > 0 else matched

    @property
    def last_seq(self) -> int:
        with self._lock:
            if self._shared:
                self._take_in()
            return self._seq

    def subscribe(self, listener: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``listener(event)`` after each record (in the recording thread); returns an
        unsubscribe function. A listener must be quick and must not raise."""
        with self._lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe
