"""How commands talk to people and scripts: JSON with ``--json``, tables and progress otherwise."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

__all__ = ["Progress", "emit_json", "examples", "print_table", "progress"]


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


class Progress:
    """A progress bar on a terminal, plain log lines (every 10 %) otherwise; on stderr."""

    def __init__(self, label: str, total: int | None, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self._last_decile = -1
        self._last_draw = 0.0

    def advance(self, amount: int = 1) -> None:
        """Record ``amount`` more units of work done."""
        self.done += amount
        if self._tty:
            now = time.monotonic()
            if now - self._last_draw >= 0.1 or (self.total and self.done >= self.total):
                self._last_draw = now
                self._draw()
        elif self.total:
            decile = min(10, self.done * 10 // self.total)
            if decile != self._last_decile:
                self._last_decile = decile
                self._stream.write(f"{self.label}: {decile * 10}%\n")

    def _draw(self) -> None:
        if self.total:
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(frac * 30)
            self._stream.write(f"\r{self.label} [{bar:<30}] {frac * 100:5.1f}%")
        else:
            self._stream.write(f"\r{self.label} {self.done}")
        self._stream.flush()

    def finish(self) -> None:
        """End the display (newline on a terminal)."""
        if self._tty:
            self._draw()
            self._stream.write("\n")


@contextmanager
def progress(label: str, total: int | None) -> Iterator[Progress]:
    """Context manager around :class:`Progress` that always finishes the display."""
    bar = Progress(label, total)
    try:
        yield bar
    finally:
        bar.finish()


def examples(*commands: str) -> dict[str, Any]:
    """``add_parser`` keywords that end a command's --help with real examples, kept as written."""
    import argparse

    text = "examples:\n" + "\n".join(f"  {c}" for c in commands)
    return {"epilog": text, "formatter_class": argparse.RawDescriptionHelpFormatter}
