"""The state directory's layout (``/var/lib/appliance`` on a node): the one place that names its files.

Every component asks :class:`StateLayout` where its files are; none spells a path under the
state directory itself::

    STATE/node-id                  this node's id (a random UUID written on first use)
    STATE/models/                  the model store (agent.inference.store owns what is inside)
    STATE/tuf/metadata/            trusted TUF metadata (root.json, timestamp.json, ...)
    STATE/tuf/clock.json           the floor of signed times seen, and any clock override
    STATE/updates/journal.json     the update in progress (agent.updates.journal)
    STATE/updates/history.jsonl    finished updates, one JSON line each
    STATE/updates/staging/         downloads being verified
    STATE/os/                      OS updates: staged release, pending request, attempt record
    STATE/events/events.jsonl      the event log (agent.events)
    STATE/tls/crl-in-force.pem     the newest CRL the agent accepted (an older one is refused)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["StateLayout"]


@dataclass(frozen=True)
class StateLayout:
    """Paths under one state directory (nothing is created or read here)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def node_id(self) -> Path:
        return self.root / "node-id"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def tuf(self) -> Path:
        return self.root / "tuf"

    @property
    def tuf_metadata(self) -> Path:
        return self.tuf / "metadata"

    @property
    def clock(self) -> Path:
        return self.tuf / "clock.json"

    @property
    def updates(self) -> Path:
        return self.root / "updates"

    @property
    def updates_journal(self) -> Path:
        return self.updates / "journal.json"

    @property
    def updates_history(self) -> Path:
        return self.updates / "history.jsonl"

    @property
    def updates_staging(self) -> Path:
        return self.updates / "staging"

    @property
    def os(self) -> Path:
        return self.root / "os"

    @property
    def events(self) -> Path:
        return self.root / "events"

    @property
    def events_log(self) -> Path:
        return self.events / "events.jsonl"

    @property
    def crl_in_force(self) -> Path:
        return self.root / "tls" / "crl-in-force.pem"
