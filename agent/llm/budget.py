"""The KV-cache budget of one model: tokens of context that sequences may hold at once.

A sequence reserves ``prompt + max_tokens`` tokens before it starts and gives them back when
its generator is freed, so the cache the runtime can grow to stays within the budget however
many clients ask at once.  A request that does not fit waits, first come first served, up to a
bound, then is refused with :class:`~agent.errors.CapacityError` (HTTP 429 /
``RESOURCE_EXHAUSTED``): never an out-of-memory kill.

Sequences decoded in one batch hold more than the sum of their own reservations (every row
of the batch is as long as its longest prompt plus its largest ``max_tokens``); the batch
takes the difference with :meth:`KvBudget.try_extend`, which never waits and never passes
the total: a row whose padding does not fit waits for a later batch instead.

The budget is shared by every event loop and thread of the process (tests run several loops;
releases come from decode threads), so it is guarded by a lock and wakes waiters through
their own loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass

from agent.errors import CapacityError

__all__ = ["KvBudget"]


@dataclass
class _Waiter:
    tokens: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]
    granted: bool = False


class KvBudget:
    """``total`` tokens shared by the sequences of one model; see the module docstring."""

    def __init__(self, total: int, name: str) -> None:
        self.total = total
        self.name = name
        self.in_use = 0
        self.peak = 0  # the most ever reserved at once: tests assert it never passed ``total``
        self.sequences = 0
        self._lock = threading.Lock()
        self._waiters: deque[_Waiter] = deque()

    def _take(self, tokens: int) -> None:
        self.in_use += tokens
        self.sequences += 1
        self.peak = max(self.peak, self.in_use)

    async def acquire(self, tokens: int, wait_s: float) -> None:
        """Reserve ``tokens``, waiting up to ``wait_s`` seconds behind earlier requests.

        Raises:
            CapacityError: the tokens did not become free in time (or never can).
        """
        if tokens > self.total:
            raise CapacityError(f"model {self.name}: the request needs {tokens} tokens of KV cache, "
                                f"more than the model's whole budget of {self.total}")
        loop = asyncio.get_running_loop()
        with self._lock:
            if not self._waiters and self.in_use + tokens <= self.total:
                self._take(tokens)
                return
            waiter = _Waiter(tokens, loop, loop.create_future())
            self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), wait_s)
        except TimeoutError:
            self._abandon(waiter)
            raise CapacityError(f"model {self.name}: KV-cache budget of {self.total} tokens is in "
                                f"use ({self.in_use} reserved by {self.sequences} sequences); "
                                f"waited {wait_s:g} s for {tokens}") from None
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise

    def try_extend(self, tokens: int) -> bool:
        """Reserve ``tokens`` more for sequences already counted, at once or not at all.

        It does not queue behind waiting requests: a release grants those first (in
        :meth:`release`), so this only takes room the head of the queue could not use yet.
        """
        with self._lock:
            if self.in_use + tokens > self.total:
                return False
            self.in_use += tokens
            self.peak = max(self.peak, self.in_use)
            return True

    def _abandon(self, waiter: _Waiter) -> None:
        """A waiter gave up: hand back what it was granted meanwhile, or leave the queue."""
        with self._lock:
            granted = waiter.granted
            if not granted:
                self._waiters.remove(waiter)
        if granted:
            self.release(waiter.tokens)
        else:
            self._wake()  # a smaller request behind this one may fit now

    def release(self, tokens: int, sequences: int = 1) -> None:
        """Give back ``tokens`` held by ``sequences`` sequences (any thread); ``sequences=0``
        for tokens taken by :meth:`try_extend`."""
        with self._lock:
            self.in_use -= tokens
            self.sequences -= sequences
        self._wake()

    def _wake(self) -> None:
        """Grant waiting requests in order while the head of the queue fits."""
        with self._lock:
            while self._waiters and self.in_use + self._waiters[0].tokens <= self.total:
                waiter = self._waiters.popleft()
                self._take(waiter.tokens)
                waiter.granted = True
                try:
                    waiter.loop.call_soon_threadsafe(_grant, waiter.future)
                except RuntimeError:  # its loop is closed: nobody will use the grant
                    self.in_use -= waiter.tokens
                    self.sequences -= 1


def _grant(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
