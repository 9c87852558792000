"""Stop strings over streamed text: emit what cannot be the start of a stop string, hold the rest.

A stop string may arrive split over several tokens, so text that could still grow into one
is held back until it either completes it (the completion ends there, the stop string itself
is not sent) or can no longer (it is sent).
"""

from __future__ import annotations

__all__ = ["StopScanner"]


class StopScanner:
    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self._held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add ``piece``; return the text now safe to send, and whether a stop string was hit
        (then the text is everything before it, and nothing more may be fed)."""
        text = self._held + piece
        if not self.stops:
            self._held = ""
            return text, False
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return text[:cut], True
        keep = self._partial(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def _partial(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        """The held text (the stream ended without completing a stop string)."""
        text, self._held = self._held, ""
        return text
