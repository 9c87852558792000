"""How commands talk to people and scripts: JSON with ``--json``, tables and progress otherwise."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

__all__ = ["Progress", "emit_json", "examples", "format_progress", "human_bytes", "print_table",
           "progress"]


def emit_json(data: Any, stream: TextIO | None = None) -> None:
    """Print ``data`` as indented, key-sorted JSON (one document per command)."""
    out = stream or sys.stdout
    json.dump(data, out, indent=2, sort_keys=True, default=str)
    out.write("\n")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], stream: TextIO | None = None) -> None:
    """Print an aligned plain-text table."""
    out = stream or sys.stdout
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")
        if n == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")


def human_bytes(n: float) -> str:
    """``n`` bytes in SI units, as apt and pip print them (``45.6 MB``)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def format_progress(label: str, done: int, total: int | None, elapsed: float, *, unit: str = "",
                    phase: str = "", bar_width: int = 0) -> str:
    """One progress line: label, phase, an optional bar, done/total, percent, rate and ETA.

    ``unit`` "B" prints sizes (``12.3 MB/45.6 MB``, ``4.1 MB/s``), any other word follows the
    counts (``42/185 packages``).  ``bar_width`` 0 leaves the bar out (plain log lines).
    """
    parts = [f"{label}:" if phase else label]
    if phase:
        parts.append(phase)

    def amount(n: float) -> str:
        return human_bytes(n) if unit == "B" else f"{n:.0f}"

    known = bool(total and total > 0)
    frac = min(1.0, done / total) if known and total else 0.0
    if bar_width and known:
        parts.append(f"[{'#' * int(frac * bar_width):<{bar_width}}]")
    counts = f"{amount(done)}/{amount(total)}" if known and total else amount(done)
    parts.append(f"{counts} {unit}".rstrip() if unit != "B" else counts)
    if known:
        parts.append(f"{frac * 100:.0f}%")
    if elapsed > 0 and done > 0:
        rate = done / elapsed
        parts.append(f"{human_bytes(rate)}/s" if unit == "B" else f"{rate:.1f}/s")
        if known and total and done < total:
            parts.append(f"ETA {_duration((total - done) / rate)}")
    return " ".join(parts)


class Progress:
    """Progress on stderr: a redrawn bar on a terminal, otherwise a plain log line at every
    10 % (when the total is known), at every phase change and at least every ``interval`` s."""

    BAR_WIDTH = 30

    def __init__(self, label: str, total: int | None, stream: TextIO | None = None, *,
                 unit: str = "", interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self._clock = clock
        self.interval = interval
        self._drawn = False
        self._start(label, total, unit)

    def _start(self, label: str, total: int | None, unit: str) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.done = 0
        self.phase = ""
        self._began = self._clock()
        self._last_decile = -1
        self._last_draw = -1e9
        self._last_line = self._began

    def stage(self, label: str, total: int | None, unit: str = "") -> None:
        """End the current display and count a new piece of work from zero."""
        self.finish()
        self._start(label, total, unit)

    def set_total(self, total: int | None) -> None:
        """The total became known (or grew)."""
        self.total = total
        self._show()

    def set_phase(self, phase: str) -> None:
        """Name what is happening now (a line of its own off a terminal)."""
        if phase != self.phase:
            self.phase = phase
            self._show(force=True)

    def advance(self, amount: int = 1) -> None:
        """Record ``amount`` more units of work done."""
        self.update(self.done + amount)

    def update(self, done: int) -> None:
        """Record that ``done`` units are done in all."""
        self.done = done
        self._show()

    def line(self, *, bar: bool = False) -> str:
        """The current state as one line."""
        return format_progress(self.label, self.done, self.total, self._clock() - self._began,
                               unit=self.unit, phase=self.phase,
                               bar_width=self.BAR_WIDTH if bar else 0)

    def _show(self, force: bool = False) -> None:
        now = self._clock()
        if self._tty:
            complete = bool(self.total) and self.done >= (self.total or 0)
            if force or complete or now - self._last_draw >= 0.1:
                self._last_draw = now
                self._stream.write(f"\r{self.line(bar=True)}\x1b[K")
                self._stream.flush()
                self._drawn = True
            return
        decile = min(10, self.done * 10 // self.total) if self.total else -1
        if force or decile != self._last_decile or now - self._last_line >= self.interval:
            self._last_decile = decile
            self._last_line = now
            self._stream.write(self.line() + "\n")
            self._stream.flush()

    def finish(self) -> None:
        """End the display (the final state and a newline on a terminal)."""
        if self._tty and (self._drawn or self.done):
            self._stream.write(f"\r{self.line(bar=True)}\x1b[K\n")
            self._stream.flush()
        self._drawn = False


@contextmanager
def progress(label: str, total: int | None, *, unit: str = "") -> Iterator[Progress]:
    """Context manager around :class:`Progress` that always finishes the display."""
    bar = Progress(label, total, unit=unit)
    try:
        yield bar
    finally:
        bar.finish()


def examples(*commands: str) -> dict[str, Any]:
    """``add_parser`` keywords that end a command's --help with real examples, kept as written."""
    import argparse

    text = "examples:\n" + "\n".join(f"  {c}" for c in commands)
    return {"epilog": text, "formatter_class": argparse.RawDescriptionHelpFormatter}
