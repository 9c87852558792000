"""Requests to one language model decoded together: static batches of one ``oga.Generator``.

A request becomes a :class:`Row`: it waits in a queue until a decode thread is free, then that
thread takes it with the other waiting rows it may share a batch with (equal search options,
no seed, up to ``max_batch``), prompts right-padded with the pad id to the longest (so each
row decodes exactly the tokens it would alone; left padding would be read as prompt).  Every
row of a batch gets as many steps as the batch's largest ``max_tokens``; a row ends at its
own ``max_tokens``, end-of-text token, stop string, deadline, or when its reader leaves, and
the tokens the batch makes for it afterwards are dropped.  A batch whose rows have all ended
stops stepping and frees its generator and budget at once.

No fixed delay: at concurrency 1 a request starts at once.  At most ``workers`` batches step
at once (one per decode thread; a batch waiting for a reader does not count), so under load a
request waits for a batch to end and starts with the others that waited meanwhile.

KV budget: each row reserves its own ``prompt + max_tokens`` before it queues (the bounded
wait and ``CapacityError`` are :class:`~agent.llm.budget.KvBudget`'s).  A batch holds
``rows x (longest prompt + largest max_tokens)`` tokens of cache, so it reserves the
difference too; a row whose share of it does not fit now waits for a later batch.  A row's
reservation is held until both its stream has ended and its batch's generator is freed.

Pace: each step of a batch is its own task on the decode pool, so new batches, other batches'
steps and the model's close take turns on the threads.  A slow reader does not hold back the
rows beside it: the batch steps on while any of its readers keeps up, and a row's chunks wait
in its stream's queue (at most its ``max_tokens`` of them, which the manifest caps).  Only when
every live row is :data:`READ_AHEAD` chunks ahead of its reader does the batch wait (holding no
thread, its cache kept) until one reader catches up or leaves, up to the rows' deadlines: work
nobody is reading is not done ahead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from agent.errors import NotFoundError
from agent.llm import oga
from agent.llm.budget import KvBudget
from agent.llm.stops import StopScanner
from agent.llm.types import Chunk, FinishReason

__all__ = ["READ_AHEAD", "BatchStats", "Batcher", "Row"]

READ_AHEAD = 16  # chunks a batch makes ahead of its readers before it waits for one of them

Item = Chunk | Exception | None  # a chunk, the runtime's failure, or "look again" (closed)


@dataclass(eq=False)
class Row:
    """One request: shared by its stream (on its loop) and the decode thread stepping it.
    ``state``, ``holds``, ``unread`` and ``batch`` change under the batcher's lock."""

    ids: list[int]
    new: int  # the most tokens it may generate
    options: dict[str, Any]  # search options but max_length
    key: tuple[Any, ...] | None  # rows with equal keys may share a batch; None: it runs alone
    stops: tuple[str, ...]
    deadline: float | None  # time.monotonic() based
    asked: float  # time.monotonic() when the request came
    loop: asyncio.AbstractEventLoop
    chunks: asyncio.Queue[Item]
    dropped: asyncio.Future[None]  # done when its batch no longer steps it
    state: Literal["waiting", "running", "ended"] = "waiting"
    left: bool = False  # its stream has ended
    holds: int = 1  # who keeps its reservation: its stream, and its batch's generator
    unread: int = 0  # chunks sent, not yet taken by the stream
    batch: _Batch | None = None
    queue_s: float = 0.0  # from the request to its batch's first step
    # the decode thread's while the row runs
    scanner: StopScanner | None = None
    stream: Any = None  # the tokenizer's detokenising stream
    held: list[int] = field(default_factory=list)  # token ids not yet sent in a chunk
    count: int = 0

    @property
    def own(self) -> int:
        """Tokens of cache the row needs alone."""
        return len(self.ids) + self.new

    def send(self, item: Item) -> None:
        """Hand ``item`` to the row's stream (any thread)."""
        with contextlib.suppress(RuntimeError):  # its loop is closed: nobody reads the stream
            self.loop.call_soon_threadsafe(self.chunks.put_nowait, item)

    def mark_dropped(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(_resolve, self.dropped)

    def final(self, finish: FinishReason, text: str) -> Chunk:
        held, self.held = tuple(self.held), []
        return Chunk(text, held, finish, len(self.ids), self.count, self.queue_s)

    def stopped(self, finish: FinishReason = "cancelled") -> Chunk | None:
        """Its last chunk when it ends from outside its decoding (closed model, deadline);
        ``None`` when its stream already left."""
        if self.left:
            return None
        return self.final(finish, self.scanner.flush() if self.scanner else "")


@dataclass
class BatchStats:
    """What the batcher has done: for tests, benchmarks and a curious operator."""

    sizes: Counter[int] = field(default_factory=Counter)  # batches started, by their number of rows
    cache_tokens: int = 0  # rows x max_length of the generators alive now: the cache they may hold
    cache_peak: int = 0  # the most of that at once (never above the budget's total)
    paused: int = 0  # batches waiting now for readers all READ_AHEAD chunks behind


@dataclass(eq=False)
class _Batch:
    rows: list[Row]  # in the generator's order
    extra: int  # budget reserved beyond the rows' own
    live: list[Row]  # rows still stepped
    generator: Any = None
    cache: int = 0  # rows x max_length of its generator
    ending: dict[Row, Item] = field(default_factory=dict)  # ended, not yet told
    stepping: bool = True  # a decode task runs or is queued for it; False: waiting for a reader
    over: bool = False  # its generator and budget are freed


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Batcher:
    """The waiting rows and running batches of one model; see the module docstring."""

    def __init__(self, model: Any, tokenizer: Any, budget: KvBudget, *, name: str, context_length: int,
                 max_batch: int, workers: int) -> None:
        self.name = name
        self.budget = budget
        self.context_length = context_length
        self.max_batch = max_batch
        self.workers = workers
        self.stats = BatchStats()
        self.closed = False
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=f"llm-{name}")
        self._model = model
        self._tokenizer = tokenizer
        self._eos = frozenset(int(t) for t in tokenizer.eos_token_ids)
        self._pad = int(tokenizer.pad_token_id)
        self._lock = threading.Lock()
        self._waiting: list[Row] = []
        self._batches: set[_Batch] = set()

    def close(self) -> None:
        """Rows end with ``finish_reason="cancelled"``: waiting ones and those of batches
        waiting for a reader now, the others after their batch's current step."""
        self.closed = True
        self.pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            waiting, self._waiting = self._waiting, []
            for row in waiting:
                row.state = "ended"
            paused = [b for b in self._batches if not b.stepping]
        for row in waiting:
            row.send(None)
        for batch in paused:
            self._finish(batch)

    def generator(self, prompts: list[list[int]], options: dict[str, Any], new: int) -> Any:
        """A generator that has taken ``prompts`` (one row each, right-padded with the pad
        id as ``Tokenizer.encode_batch`` pads them), with room for ``new`` tokens per row."""
        longest = max(len(p) for p in prompts)
        if "random_seed" not in options:
            # A seed from the OS's generator, as the runtime's own would be: unseeded, its
            # Generator seeds itself from std::random_device, which costs 12-15 ms per
            # generator where RDSEED traps (virtual machines), all of it in time to first token.
            # Greedy rows draw nothing from it.
            options = {**options, "random_seed": secrets.randbits(31)}
        params = oga.GeneratorParams(self._model)
        if len(prompts) == 1:
            params.set_search_options(**options, max_length=longest + new)
            tokens = np.asarray(prompts[0], dtype=np.int32)
        else:
            params.set_search_options(**options, max_length=longest + new, batch_size=len(prompts))
            tokens = np.full((len(prompts), longest), self._pad, dtype=np.int32)
            for i, prompt in enumerate(prompts):
                tokens[i, :len(prompt)] = prompt
        generator = oga.Generator(self._model, params)
        generator.append_tokens(tokens)
        return generator

    # ------------------------------------------------------------------ the stream's side

    def row(self, ids: list[int], new: int, options: dict[str, Any], stops: tuple[str, ...], *,
            deadline: float | None, asked: float) -> Row:
        """A row for a request whose reservation is taken (call on the stream's loop)."""
        loop = asyncio.get_running_loop()
        return Row(ids, new, options, self._key(ids, options), stops, deadline, asked, loop,
                   asyncio.Queue(), loop.create_future())

    def _key(self, ids: list[int], options: dict[str, Any]) -> tuple[Any, ...] | None:
        """What rows must share to be decoded in one batch; ``None`` for a row that runs alone:
        a seeded one (its samples must not depend on who else asked) and one whose prompt
        holds the pad id (padding is told from the prompt by that id)."""
        if "random_seed" in options or self._pad in ids:
            return None
        return tuple(sorted(options.items()))

    def join(self, row: Row) -> None:
        """Queue ``row`` for a batch, and ask a decode thread to form one.

        Raises:
            NotFoundError: the model was unloaded.
        """
        with self._lock:
            self._waiting.append(row)
        try:
            # One task per row, so a free thread always finds the rows waiting then; a task
            # that finds none (others took them) returns at once.
            self.pool.submit(self._drive)
        except RuntimeError:  # the pool was shut down: the model is being unloaded
            raise NotFoundError(f"model {self.name} was unloaded") from None

    async def next_chunk(self, row: Row, sent: int) -> Chunk:
        """The row's next chunk, or a last one with ``finish_reason="cancelled"`` once the
        model is closed or the deadline passed (what the batch made then is dropped).

        Raises:
            Exception: what the runtime raised for the row's batch.
        """
        if not row.chunks.empty():
            # Queued already: yield to the loop anyway, so that a stream draining its queue
            # neither starves other tasks nor outruns a cancel.  (An empty queue yields below.)
            await asyncio.sleep(0)
        waited = row.queue_s if row.batch is not None else time.monotonic() - row.asked
        cancelled = Chunk("", (), "cancelled", len(row.ids), sent, waited)
        if self.closed or (row.deadline is not None and time.monotonic() >= row.deadline):
            return cancelled
        try:
            # A timeout on this task, not wait_for's task per chunk: one turn of the loop per
            # token at concurrency 1 (row.deadline is time.monotonic() based, as is the loop's clock).
            async with asyncio.timeout_at(row.deadline):
                item = await row.chunks.get()
        except TimeoutError:
            return cancelled
        if isinstance(item, Exception):
            raise item
        if item is None or (self.closed and item.finish_reason is None):
            return cancelled
        if item.finish_reason is None:
            with self._lock:
                row.unread -= 1
                batch = row.batch if row.batch is not None and not row.batch.stepping else None
            if batch is not None:  # it may wait for this reader
                self._resume(batch)
        return item

    async def leave(self, row: Row) -> None:
        """The row's stream ended: a waiting row leaves the queue; a running one leaves its
        batch now if the batch waits for readers, else at its next step, and this waits for
        that.  A batch left with no rows frees its generator and budget at once."""
        with self._lock:
            batch = row.batch
            row.left = True
            running = row.state == "running"
            if row.state == "waiting":
                self._waiting.remove(row)
                row.state = "ended"
            idle = running and batch is not None and not batch.stepping and not batch.over
            paused = batch if idle else None
            if paused:  # no thread steps the batch: take the row out here
                paused.live.remove(row)
                row.state = "ended"
            self._unhold(row)
        if paused:
            if paused.live:
                self._resume(paused)  # the row may have been the reader it waited for
            else:
                self._finish(paused)
        elif running:
            await row.dropped

    def _unhold(self, row: Row) -> None:
        """One holder lets go of the row's reservation (under the lock)."""
        row.holds -= 1
        if row.holds == 0:
            self.budget.release(row.own)

    # ------------------------------------------------------------------ the decode threads

    def _drive(self) -> None:
        batch = self._take()
        if batch is None:
            return
        rows = batch.rows
        longest, most = max(len(r.ids) for r in rows), max(r.new for r in rows)
        try:
            batch.generator = self.generator([r.ids for r in rows], rows[0].options, most)
            with self._lock:
                batch.cache = len(rows) * (longest + most)
                self.stats.cache_tokens += batch.cache
                self.stats.cache_peak = max(self.stats.cache_peak, self.stats.cache_tokens)
            for row in rows:
                row.scanner, row.stream = StopScanner(row.stops), self._tokenizer.create_stream()
        except Exception as exc:  # noqa: BLE001 - the runtime's failure goes to every row's caller
            batch.ending, batch.live = dict.fromkeys(rows, exc), []
            self._finish(batch)
            return
        self._run(batch)

    def _take(self) -> _Batch | None:
        """The rows to decode together, from those waiting now, with the tokens of budget
        reserved for the batch beyond the rows' own; ``None`` when no row waits.

        The first waiting row always starts (its own reservation covers it alone).  Others
        with its key join, in order, up to ``max_batch``, while the padded batch stays within
        the context length and the budget has room for the padding; a row that does not fit
        waits for a later batch.
        """
        with self._lock:
            stepping = sum(1 for b in self._batches if b.stepping)
            if self.closed or not self._waiting or stepping >= self.workers:
                return None  # _next_batch asks again when a batch ends or waits for a reader
            first = self._waiting[0]
            rows, longest, most, extra = [first], len(first.ids), first.new, 0
            for row in self._waiting[1:]:
                if first.key is None or len(rows) == self.max_batch:
                    break
                prompt, new = max(longest, len(row.ids)), max(most, row.new)
                if row.key != first.key or prompt + new > self.context_length:
                    continue
                grow = (len(rows) + 1) * (prompt + new) - sum(r.own for r in rows) - row.own - extra
                if not self.budget.try_extend(grow):
                    continue
                rows.append(row)
                longest, most, extra = prompt, new, extra + grow
            batch = _Batch(rows, extra, list(rows))
            now = time.monotonic()
            for row in rows:
                self._waiting.remove(row)
                row.state, row.queue_s, row.batch = "running", now - row.asked, batch
                row.holds += 1
            self._batches.add(batch)
            self.stats.sizes[len(rows)] += 1
        return batch

    def _run(self, batch: _Batch) -> None:
        """One step of ``batch``, then queue the next, behind whatever else waits for a thread
        (new batches, other batches' steps, the model's close); or wait while its readers are
        all :data:`READ_AHEAD` chunks behind; or, its rows all ended, free it."""
        try:
            if self._still_live(batch):
                self._step(batch)
            more = self._still_live(batch)
        except Exception as exc:  # noqa: BLE001 - the runtime's failure goes to every row's caller
            for row in batch.live:
                batch.ending.setdefault(row, exc)
            batch.live, more = [], False
        if not more:
            self._finish(batch)  # tells the last rows once their cache is freed
            return
        self._deliver(batch)
        with self._lock:
            wait = _behind(batch)
            if wait:  # from here a reader's _resume may queue the next step
                batch.stepping = False
                self.stats.paused += 1
        if wait:
            self._next_batch()
        else:
            self._submit(batch)

    def _next_batch(self) -> None:
        """A batch ended or waits for a reader: let the rows waiting form the next one."""
        with self._lock:
            # Closed: the rows are ended; and a close cancelling queued steps runs _finish
            # inside the pool's shutdown, where a submit would deadlock.
            if self.closed or not self._waiting:
                return
        with contextlib.suppress(RuntimeError):  # closed meanwhile
            self.pool.submit(self._drive)

    def _resume(self, batch: _Batch) -> None:
        """Queue the next step of ``batch`` if it waits for its readers and one of them is
        now within :data:`READ_AHEAD` (or gone)."""
        with self._lock:
            if batch.stepping or batch.over or _behind(batch):
                return
            batch.stepping = True
            self.stats.paused -= 1
        self._submit(batch)

    def _submit(self, batch: _Batch) -> None:
        try:
            future = self.pool.submit(self._run, batch)
        except RuntimeError:  # the model was closed
            self._finish(batch)
            return
        future.add_done_callback(lambda f: self._finish(batch) if f.cancelled() else None)

    def _still_live(self, batch: _Batch) -> bool:
        """Move rows that end from outside (model closed, reader left, deadline passed) to
        ``ending``; whether any row is left to step."""
        for row in batch.live:
            if row not in batch.ending and (self.closed or row.left or _late(row)):
                batch.ending[row] = row.stopped()
        batch.live = [r for r in batch.live if r not in batch.ending]
        return bool(batch.live)

    def _step(self, batch: _Batch) -> None:
        """One token for every row of the batch; live rows take theirs (an ended row's is
        dropped), and those that end go to ``ending``."""
        generator = batch.generator
        generator.generate_next_token()
        tokens = generator.get_next_tokens()
        sent: list[tuple[Row, Chunk]] = []
        for i, row in enumerate(batch.rows):
            chunk = self._advance(row, int(tokens[i])) if row in batch.live else None
            if chunk is not None and chunk.finish_reason is not None:
                batch.ending[row] = chunk
            elif chunk is not None:
                sent.append((row, chunk))
        if generator.is_done():  # the runtime ended rows we did not (not expected)
            for row in batch.live:
                if row not in batch.ending:
                    batch.ending[row] = row.stopped("length")
        with self._lock:
            for row, _ in sent:
                row.unread += 1
        for row, chunk in sent:
            row.send(chunk)

    def _advance(self, row: Row, token: int) -> Chunk | None:
        """Take the row's next token: a chunk to send (the last one when the row ends), or
        ``None`` while the text is held (an unfinished character or a possible stop string)."""
        assert row.scanner is not None
        row.count += 1
        row.held.append(token)
        text, hit = row.scanner.feed(str(row.stream.decode(token)))
        if hit:
            return row.final("stop", text)
        if token in self._eos:
            return row.final("stop", text + row.scanner.flush())
        if row.count >= row.new:
            return row.final("length", text + row.scanner.flush())
        if not text:
            return None
        held, row.held = tuple(row.held), []
        return Chunk(text, held, queue_s=row.queue_s)

    def _finish(self, batch: _Batch) -> None:
        """Free the batch's generator, then its budget, then tell the rows that ended."""
        with self._lock:
            if batch.over:
                return
            batch.over = True
            self._batches.discard(batch)
            if not batch.stepping:
                self.stats.paused -= 1
        for row in batch.live:  # only when the model was closed while it waited for a reader
            if row not in batch.ending:
                batch.ending[row] = row.stopped()
        batch.live, batch.generator = [], None
        with self._lock:
            self.stats.cache_tokens -= batch.cache
            self.budget.release(batch.extra, 0)
            for row in batch.rows:
                row.scanner = row.stream = None
                self._unhold(row)
        self._deliver(batch)
        self._next_batch()

    def _deliver(self, batch: _Batch) -> None:
        """Mark the rows in ``ending`` ended and send each its last chunk (or the error)."""
        ending, batch.ending = batch.ending, {}
        with self._lock:
            for row in ending:
                row.state = "ended"
        for row, item in ending.items():
            if item is not None:
                row.send(item)
            row.mark_dropped()


def _behind(batch: _Batch) -> bool:
    """Whether ``batch`` should wait for its readers (under the lock): every live row's is
    READ_AHEAD chunks behind, and no row has left (a row that left is dropped first, as its
    stream waits).  One reader keeping up is enough to step on."""
    live = batch.live
    return bool(live) and not any(r.left for r in live) and all(r.unread >= READ_AHEAD for r in live)


def _late(row: Row) -> bool:
    return row.deadline is not None and time.monotonic() >= row.deadline
