"""Offline clock policy: the node never trusts a clock older than the newest signed time it saw.

Metadata expiry protects against freeze attacks only when the node's idea of "now" can be
trusted.  An appliance without a network time source may boot with its RTC reset to 1970,
which would make every expired timestamp look fresh.  So the node keeps a *floor*: the
newest issue time found in signed metadata it has accepted (our registry signs an
``x-appliance-issued`` time into every role; see :data:`ISSUED_FIELD`).  The reference time
used for expiry checks is ``max(system clock, floor)``.

An operator can override the reference time (for instance when a registry signed a time
in the future by mistake).  The override is explicit (a call naming a reason), persisted
in the state directory, logged at WARNING on every use and reported by :func:`clock_status`
so that inventory shows it.

State lives in ``STATE_DIR/tuf/clock.json``, written atomically.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.errors import ConfigError
from agent.fsutil import atomic_write_text
from agent.state import StateLayout

__all__ = [
    "ISSUED_FIELD",
    "ClockPolicy",
    "ClockStatus",
    "Override",
    "clock_status",
    "format_time",
    "issued_times",
    "parse_time",
    "system_now",
]

log = logging.getLogger(__name__)

ISSUED_FIELD = "x-appliance-issued"


def system_now() -> datetime:
    """The system clock as an aware UTC datetime (what python-tuf itself would use)."""
    return datetime.now(UTC)


def format_time(when: datetime) -> str:
    """``2026-11-20T10:00:00Z`` (UTC, seconds): the form TUF uses for ``expires``."""
    return when.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    """Parse ``2026-11-20T10:00:00Z`` (or any ISO 8601 time with an offset) to aware UTC.

    Raises:
        ValueError: not such a time, or a time without a timezone.
    """
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError(f"time {text!r} has no timezone (write it as 2026-01-31T12:00:00Z)")
    return parsed.astimezone(UTC)


@dataclass(frozen=True)
class Override:
    """An operator's explicit reference time, with the reason and when it was set."""

    time: str
    reason: str
    set_at: str


@dataclass(frozen=True)
class ClockStatus:
    """What inventory reports about the node's time for metadata expiry."""

    system_time: str
    floor: str | None  # newest signed time seen, or None before any
    reference_time: str  # the time expiry is checked against
    source: str  # "system", "floor" (system clock is behind the floor) or "override"
    override: Override | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class ClockPolicy:
    """The node's reference time for TUF expiry, backed by ``STATE_DIR/tuf/clock.json``.

    ``system_clock`` is injectable so that tests can move time without touching the host.
    """

    def __init__(self, state_dir: Path, system_clock: Callable[[], datetime] = system_now) -> None:
        self.path = StateLayout(state_dir).clock
        self._system_clock = system_clock

    # ------------------------------------------------------------ persisted state
    def _load(self) -> dict[str, Any]:
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot read the clock state: {exc}") from None
        try:
            data: dict[str, Any] = json.loads(raw)
            _ = data.get("floor")  # AttributeError unless an object
            if data.get("floor") is not None:
                parse_time(data["floor"])
            if data.get("override") is not None:
                parse_time(data["override"]["time"])
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ConfigError(f"{self.path}: malformed clock state: {exc}") from None
        return data

    def _save(self, data: dict[str, Any]) -> None:
        atomic_write_text(self.path, json.dumps(data, indent=2, sort_keys=True) + "\n", 0o600)

    # ------------------------------------------------------------ queries
    def floor(self) -> datetime | None:
        """The newest signed time seen so far, or ``None``."""
        text = self._load().get("floor")
        return parse_time(text) if text else None

    def override(self) -> Override | None:
        raw = self._load().get("override")
        return Override(**raw) if raw else None

    def status(self) -> ClockStatus:
        """Where the reference time comes from, for inventory and ``--json`` output."""
        system = self._system_clock()
        data = self._load()
        floor = parse_time(data["floor"]) if data.get("floor") else None
        override = Override(**data["override"]) if data.get("override") else None
        if override is not None:
            reference, source = parse_time(override.time), "override"
        elif floor is not None and floor > system:
            reference, source = floor, "floor"
        else:
            reference, source = system, "system"
        return ClockStatus(format_time(system), format_time(floor) if floor else None,
                           format_time(reference), source, override)

    def reference_time(self) -> datetime:
        """The time metadata expiry is checked against: ``max(system clock, floor)`` or the override.

        Raises:
            ConfigError: the clock state file is malformed.
        """
        system = self._system_clock()
        data = self._load()
        if data.get("override"):
            override = Override(**data["override"])
            log.warning("metadata expiry is checked against an operator override: %s "
                        "(system clock %s; reason: %s; set %s)", override.time,
                        format_time(system), override.reason, override.set_at)
            return parse_time(override.time)
        floor = parse_time(data["floor"]) if data.get("floor") else None
        if floor is not None and floor > system:
            log.warning("system clock %s is older than the newest signed time seen (%s): "
                        "using the latter", format_time(system), format_time(floor))
            return floor
        return system

    # ------------------------------------------------------------ updates
    def observe(self, times: Iterable[datetime]) -> bool:
        """Raise the floor to the newest of ``times`` if that is newer; return whether it moved."""
        newest = max(times, default=None)
        if newest is None:
            return False
        data = self._load()
        current = parse_time(data["floor"]) if data.get("floor") else None
        if current is not None and newest <= current:
            return False
        data["floor"] = format_time(newest)
        self._save(data)
        return True

    def set_override(self, when: datetime | None, reason: str = "") -> None:
        """Set (or with ``None`` clear) the operator's reference-time override.

        Raises:
            ConfigError: setting an override without a reason.
        """
        data = self._load()
        if when is None:
            if data.pop("override", None) is not None:
                log.warning("clock override cleared; expiry uses the system clock and the floor again")
            self._save(data)
            return
        if not reason.strip():
            raise ConfigError("a clock override needs a reason (it is logged and shown in inventory)")
        if when.tzinfo is None:
            raise ConfigError(f"clock override {when.isoformat()} has no timezone")
        override = Override(format_time(when), reason.strip(), format_time(self._system_clock()))
        data["override"] = asdict(override)
        self._save(data)
        log.warning("clock override set: metadata expiry will be checked against %s (reason: %s)",
                    override.time, override.reason)


def issued_times(signed_dicts: Iterable[dict[str, Any]]) -> list[datetime]:
    """The ``x-appliance-issued`` times found in signed payloads (unparseable ones skipped)."""
    times = []
    for signed in signed_dicts:
        text = signed.get(ISSUED_FIELD)
        if not isinstance(text, str):
            continue
        try:
            times.append(parse_time(text))
        except ValueError:
            log.warning("ignoring malformed %s %r in signed metadata", ISSUED_FIELD, text)
    return times


def clock_status(state_dir: Path) -> ClockStatus:
    """The node's clock status (for inventory): system time, floor, override, reference time."""
    return ClockPolicy(state_dir).status()
