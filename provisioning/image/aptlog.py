"""Reading mmdebstrap's ``--verbose`` output (its own ``I:`` lines, apt's and dpkg's) as progress.

mmdebstrap is silent for minutes otherwise.  :class:`AptLog` is fed one line at a time and
keeps what a progress display needs: the phase mmdebstrap announced last, the packages
downloaded (count and bytes, against apt's "Need to get" totals) and the packages dpkg
unpacked.  It does no I/O; :func:`follow` connects it to a :class:`~provisioning.output.Progress`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from provisioning.output import Progress

__all__ = ["AptLog", "follow", "parse_size"]

log = logging.getLogger(__name__)

_SIZE = r"([\d.,]+)\s*([kMG]?B)"
_GET = re.compile(rf"^Get:\d+ .*\[{_SIZE}\]\s*$")
_NEED = re.compile(rf"^Need to get {_SIZE}(?:/{_SIZE})? of archives")
_UNPACK = re.compile(r"^Unpacking ([^\s:]+)(?::\S+)? ")
_FACTOR = {"B": 1, "kB": 1000, "MB": 1000**2, "GB": 1000**3}


def parse_size(number: str, unit: str) -> int:
    """apt's sizes (``1,234 kB``, ``45.6 MB``: SI units, ``,`` between thousands) in bytes."""
    return int(float(number.replace(",", "")) * _FACTOR[unit])


@dataclass
class AptLog:
    """What mmdebstrap/apt/dpkg said so far (see the module docstring)."""

    phase: str = ""
    downloaded: int = 0
    downloaded_bytes: int = 0
    need_bytes: int = 0
    unpacked: set[str] = field(default_factory=set)

    def feed(self, line: str) -> None:
        """Take one line of output."""
        text = line.strip()
        if text.startswith("I: "):
            self.phase = text[3:].rstrip(". ")
        elif m := _GET.match(text):
            self.downloaded += 1
            self.downloaded_bytes += parse_size(m.group(1), m.group(2))
        elif m := _NEED.match(text):
            self.need_bytes += parse_size(m.group(1), m.group(2))
        elif m := _UNPACK.match(text):
            self.unpacked.add(m.group(1))


def follow(bar: Progress, measure: Callable[[AptLog], tuple[int, int | None]]) -> Callable[[str], None]:
    """A line handler for :func:`provisioning.tools.run_lines`: each line goes to the debug log (the
    build log keeps mmdebstrap's whole output) and updates ``bar`` with ``measure(log)``'s
    (done, total) and the current phase."""
    state = AptLog()

    def on_line(line: str) -> None:
        log.debug("%s", line)
        state.feed(line)
        done, total = measure(state)
        if total != bar.total:
            bar.set_total(total)
        bar.set_phase(state.phase)
        if done != bar.done:
            bar.update(done)

    return on_line
