"""Triton version numbers for bundle versions.

Triton's clients treat a model version as an integer: perf_analyzer matches statistics with
``std::stoll(version)``, so a bundle versioned ``1.0.0`` reads as version 1 and is then not
found.  Each bundle version of a model therefore also has a Triton number: 1, 2, ... in the
order this node first sees them (versions first seen together are numbered in version order).
A number is never reused or changed, also after its version is deleted and installed again,
so it is safe in a dashboard or a script.  The numbers live in ``STATE/models/triton-versions.json``.

The bundle version stays the name everywhere else (metadata, inventory, parameters, the
index); every RPC that takes a model version accepts either.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from agent.bundle import parse_version
from agent.fsutil import atomic_write_text

__all__ = ["FILE_NAME", "TritonVersions", "is_number"]

log = logging.getLogger(__name__)

FILE_NAME = "triton-versions.json"


class TritonVersions:
    """The persistent map (model, bundle version) -> Triton version number."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._numbers: dict[str, dict[str, int]] = self._load()

    def _load(self) -> dict[str, dict[str, int]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            # Losing the map renumbers from 1: worse for dashboards, never wrong for a request.
            log.warning("%s: unreadable (%s); Triton version numbers start again", self.path, exc)
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(name): {str(v): int(n) for v, n in versions.items() if isinstance(n, int)}
                for name, versions in data.items() if isinstance(versions, dict)}

    def _save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(self._numbers, indent=1, sort_keys=True) + "\n")
        except OSError as exc:
            log.warning("%s: cannot record Triton version numbers (%s); kept in memory", self.path, exc)

    def number(self, name: str, version: str, known: Callable[[], Iterable[str]] = tuple) -> int:
        """The Triton number of ``name``'s ``version``, numbering it (and the not yet numbered
        versions that ``known()`` lists, in version order) first when it has none."""
        with self._lock:
            if version not in self._numbers.get(name, {}):
                self._assign(name, {version, *known()})
            return self._numbers[name][version]

    def number_all(self, name: str, versions: Iterable[str]) -> None:
        """Number every one of ``versions`` that has no number yet (in version order)."""
        with self._lock:
            self._assign(name, set(versions))

    def _assign(self, name: str, versions: set[str]) -> None:
        """Give the ones of ``versions`` without a number the next numbers (caller holds the lock)."""
        numbers = self._numbers.setdefault(name, {})
        fresh = sorted(versions - numbers.keys(), key=_order)
        if fresh:
            start = max(numbers.values(), default=0) + 1
            numbers.update({v: start + i for i, v in enumerate(fresh)})
            self._save()

    def version_of(self, name: str, number: str) -> str | None:
        """The bundle version numbered ``number`` (a decimal string), or None."""
        if not is_number(number):
            return None
        with self._lock:
            for version, n in self._numbers.get(name, {}).items():
                if n == int(number):
                    return version
        return None


def is_number(text: str) -> bool:
    """Whether ``text`` can be a Triton version number: ASCII digits only (``str.isdigit``
    also accepts characters such as '²' that ``int`` refuses)."""
    return 0 < len(text) <= 18 and text.isascii() and text.isdigit()


def _order(version: str) -> tuple[int, ...]:
    try:
        return parse_version(version)
    except ValueError:
        return ()
