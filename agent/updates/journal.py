"""The update journal: what an interrupted update was doing, so a restart can finish or undo it.

Layout under the state directory::

    STATE/updates/journal.json    the open transaction (present only while one runs)
    STATE/updates/history.jsonl   one line per finished transaction (applied, rolled-back,
                                  interrupted), each with its transaction id
    STATE/updates/staging/        downloads of the open transaction; empty otherwise

``journal.json`` is replaced atomically (temp file, fsync, rename, fsync of the directory:
:mod:`agent.fsutil`) at each phase.  History lines are appended with one ``write`` on an
``O_APPEND`` descriptor and fsynced; a line torn by a power cut is skipped when read.

The commit point of an update is the model store's ``active`` record (see
:meth:`agent.inference.store.ModelStore.activate`): recovery reads the journal and that
record and either finishes the transaction (the record names the new version) or undoes
it (it still names the old one).

Crash points: :func:`checkpoint` is called between steps.  A test (or an operator
reproducing a fault) names one with :func:`set_crash_point` or the environment variable
:data:`CRASH_ENV`; the process then SIGKILLs itself there, which is what a power cut does
to a process.  Unset, it costs one dictionary lookup.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.errors import UpdateError
from agent.fsutil import atomic_write_text, fsync_dir
from agent.state import StateLayout

__all__ = [
    "CRASH_ENV",
    "HistoryEntry",
    "Journal",
    "Transaction",
    "checkpoint",
    "set_crash_point",
]

log = logging.getLogger(__name__)

CRASH_ENV = "APPLIANCE_UPDATES_CRASH_AT"
_crash_at: str | None = os.environ.get(CRASH_ENV) or None


def set_crash_point(step: str | None) -> None:
    """SIGKILL this process when :func:`checkpoint` reaches ``step`` (None: never)."""
    global _crash_at  # noqa: PLW0603 - one process-wide fault-injection switch
    _crash_at = step


def checkpoint(step: str) -> None:
    """Mark a step of an update; the process dies here if this is the configured crash point."""
    if _crash_at is not None and _crash_at == step:
        log.warning("crash point %s reached: SIGKILL", step)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class Transaction:
    """One open update or rollback of a bundle name."""

    txid: str
    op: str  # "apply" | "rollback"
    name: str
    from_version: str | None  # active before; None for a first install
    to_version: str
    target: str = ""  # TUF target path (apply)
    sha256: str = ""
    length: int = 0
    source: str = ""
    preexisting: bool = False  # to_version was installed before this transaction began
    reason: str = ""  # the operator's reason (rollback)
    phase: str = "begin"
    started: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Transaction:
        """Raises TypeError/KeyError on a record that is not a transaction."""
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class HistoryEntry:
    """A finished transaction: ``outcome`` is applied, rolled-back or interrupted."""

    txid: str
    time: float
    outcome: str
    name: str
    version: str  # the version active afterwards
    from_version: str | None
    to_version: str
    target: str
    sha256: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Journal:
    """The journal files of one state directory; see the module docstring."""

    def __init__(self, state_dir: Path) -> None:
        layout = StateLayout(state_dir)
        self.dir = layout.updates
        self.path = layout.updates_journal
        self.history_path = layout.updates_history
        self.staging = layout.updates_staging

    def ensure(self) -> None:
        """Create the directories (at agent start, so refusals later change nothing)."""
        self.staging.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ open transaction
    def current(self) -> Transaction | None:
        """The open transaction, or None.

        Raises:
            UpdateError: the journal exists but cannot be read (never written torn: it is
                replaced atomically, so this means outside interference).
        """
        try:
            data = json.loads(self.path.read_text())
            return Transaction.from_json(data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise UpdateError(f"{self.path}: unreadable update journal: {exc}") from None

    def write(self, tx: Transaction, phase: str | None = None) -> Transaction:
        """Persist ``tx`` (at ``phase``) atomically; return what was written."""
        if phase is not None:
            tx = replace(tx, phase=phase)
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(tx.to_json(), sort_keys=True) + "\n", mode=0o600)
        checkpoint(f"journal:{tx.phase}")
        return tx

    def close(self) -> None:
        """The transaction is over (its history line is written): remove the journal."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return
        fsync_dir(self.dir)

    # ------------------------------------------------------------ staging
    def staging_dir(self, tx: Transaction) -> Path:
        return self.staging / tx.txid

    def clean_staging(self) -> list[Path]:
        """Delete everything under ``staging/``; returns what was there."""
        import shutil

        if not self.staging.is_dir():
            return []
        removed = sorted(self.staging.iterdir())
        for entry in removed:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        if removed:
            fsync_dir(self.staging)
        return removed

    # ------------------------------------------------------------ history
    def history(self, limit: int = 0) -> list[HistoryEntry]:
        """Finished transactions, oldest first (the newest ``limit`` when limit > 0)."""
        try:
            text = self.history_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(HistoryEntry(**json.loads(line)))
            except (ValueError, TypeError):
                log.warning("%s:%d: skipping a record that is not a history entry (torn write?)",
                            self.history_path, n)
        return out[-limit:] if limit > 0 else out

    def recorded(self, txid: str) -> bool:
        return any(e.txid == txid for e in self.history())

    def record(self, entry: HistoryEntry) -> None:
        """Append ``entry`` durably (once per transaction id)."""
        if self.recorded(entry.txid):
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(entry.to_json(), sort_keys=True, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.history_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            # A torn line from an earlier power cut must not swallow this one.
            if os.fstat(fd).st_size and not self._ends_with_newline():
                os.write(fd, b"\n")
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        checkpoint("history")

    def _ends_with_newline(self) -> bool:
        with self.history_path.open("rb") as fh:
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) == b"\n"
