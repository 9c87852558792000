"""A loaded model version: its ONNX Runtime session, scheduler and statistics.

Sessions run on a small thread pool per model (Triton's instance count).  The one exception:
a model whose runs take less than the hop to a worker thread and back (a few microseconds of
compute against tens of microseconds of thread hand-off) runs small requests on the event
loop itself; see :data:`INLINE_MAX_NS`.  Two schedulers:

- direct: each request runs on its own (models without dynamic batching);
- dynamic batching: requests wait up to ``max_queue_delay_us`` to be joined, along the first
  dimension, into one execution of at most ``max_batch_size`` (a preferred size, when
  reached, closes the batch early).  Only models whose every tensor has a dynamic first
  dimension batch; requests with different trailing dimensions never share a batch.

In both, at most ``max_queue`` requests are admitted at a time (waiting or running); one
more gets RESOURCE_EXHAUSTED.  A request whose caller cancels or whose deadline passes
leaves the queue at once and is never executed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle import Manifest, TensorSpec
from agent.errors import BundleError, InferenceError
from agent.inference.stats import ModelStats
from agent.modelrefs import ModelCheck
from agent.ort import CPU, build_cuda_version, make_session, usable_providers

__all__ = ["ExecutionError", "LoadedModel", "QueueFullError", "Result", "build_session",
           "choose_providers", "feeds_for_session", "to_bytes_array"]

log = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]

# A direct (unbatched) request runs on the event loop instead of the model's thread pool
# when all of these hold, so the loop is never held longer than a pool hand-off would cost:
# - the model runs on the CPU and is made of fixed-cost operators only (no control flow, no
#   operator that takes a size from a tensor: agent.modelrefs.fixed_cost), so its run time
#   is set by the shapes of a request, never by its values;
# - the request's inputs are numeric and hold at most INLINE_MAX_BYTES;
# - requests of exactly these input shapes were measured: the median of their last
#   RUN_WINDOW runs (on the pool, or inline) is at most INLINE_MAX_NS.  Shapes not yet
#   measured run on the pool (a request cannot choose a slow shape and hold the loop); at
#   most INLINE_SHAPES shapes are measured per model; a shape that grows slow (a busy
#   machine) goes back to the pool at its next window.
INLINE_MAX_NS = 50_000
INLINE_MAX_BYTES = 64 << 10
RUN_WINDOW = 32
INLINE_SHAPES = 16


class QueueFullError(InferenceError):
    """The model's queue holds ``max_queue`` requests already."""

    grpc_code = "RESOURCE_EXHAUSTED"


class ExecutionError(InferenceError):
    """ONNX Runtime failed while running a request that passed validation."""

    grpc_code = "INTERNAL"


@dataclass
class Result:
    """Outputs of one request, with where its time went (nanoseconds)."""

    outputs: dict[str, Array]
    queue_ns: int = 0
    input_ns: int = 0
    infer_ns: int = 0
    output_ns: int = 0


def _cuda_at_least(have: str, need: str) -> bool:
    def parts(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in v.split(".")[:2] if x.isdigit())
    return bool(have) and parts(have) >= parts(need)


def choose_providers(manifest: Manifest, allowed: Sequence[str], usable: Sequence[str],
                     cuda_version: str) -> list[str]:
    """The providers a bundle's session runs on: the bundle's, in its order of preference,
    that this agent allows (``[inference] providers``; all when empty) and can use here.

    A GPU provider is left out when the bundle's ``min_cuda`` is newer than the CUDA that
    ONNX Runtime was built for.

    Raises:
        BundleError: the bundle requires a GPU and no GPU provider is left, or none of its
            providers is left at all; the message names what the bundle asks and what is here.
    """
    a = manifest.accelerator
    chosen = [p for p in a.providers if p in usable and (not allowed or p in allowed)]
    if a.min_cuda and not _cuda_at_least(cuda_version, a.min_cuda):
        chosen = [p for p in chosen if p == CPU]
    what = f"{manifest.name} {manifest.version}"
    here = (f"usable here: {', '.join(usable)}"
            + (f"; allowed by [inference] providers: {', '.join(allowed)}" if allowed else "")
            + (f"; onnxruntime built for CUDA {cuda_version}" if cuda_version else ""))
    if a.requires_gpu and not any(p != CPU for p in chosen):
        need = f" (CUDA {a.min_cuda} or later)" if a.min_cuda else ""
        raise BundleError(f"{what} requires a GPU{need} and asks for "
                          f"{', '.join(a.providers)}; {here}")
    if not chosen:
        raise BundleError(f"{what}: none of its providers ({', '.join(a.providers)}) can run; {here}")
    return chosen


def build_session(model: bytes, manifest: Manifest, allowed: Sequence[str],
                  intra_op_threads: int, model_dir: Path | None = None, *,
                  checked: ModelCheck | None = None) -> Any:
    """An ONNX Runtime session for a bundle's model on :func:`choose_providers`' providers, with
    TF32 only where the bundle allows it.  The model may keep tensor data only in its bundle's
    hashed data files, read from ``model_dir`` (see :func:`agent.ort.make_session`, which also
    says how ``checked`` stands in for its file check).

    Raises:
        BundleError: no provider fits (see :func:`choose_providers`), or the model refers to
            a file outside its bundle.
        Whatever ONNX Runtime raises for a model it cannot load; callers translate.
    """
    providers = choose_providers(manifest, allowed, usable_providers(), build_cuda_version())
    return make_session(model, model_dir=model_dir, data_files=manifest.data_files,
                        origin=f"{manifest.name} {manifest.version}", providers=providers,
                        intra_op_threads=intra_op_threads, tf32=manifest.accelerator.tf32,
                        checked=checked)


def to_bytes_array(array: Array) -> Array:
    """ORT returns BYTES (string) outputs as str objects; the wire and golden vectors use bytes."""
    if array.dtype == object or array.dtype.kind == "U":
        conv = np.empty(array.shape, dtype=object)
        conv.reshape(-1)[:] = [x if isinstance(x, bytes) else str(x).encode()
                               for x in array.reshape(-1).tolist()]
        return conv
    return array


def _feed(name: str, array: Array) -> Array:
    """An input as ONNX Runtime takes it: string tensors want str objects (UTF-8 text).

    Raises:
        InferenceError: a BYTES element is not valid UTF-8.
    """
    if array.dtype != object:
        return array
    flat = array.reshape(-1).tolist()
    conv = np.empty(array.shape, dtype=object)
    try:
        conv.reshape(-1)[:] = [x.decode() if isinstance(x, bytes) else str(x) for x in flat]
    except UnicodeDecodeError:
        bad = next(i for i, x in enumerate(flat) if isinstance(x, bytes) and not _utf8(x))
        raise InferenceError(f"input {name!r}: BYTES element {bad} is not valid UTF-8 (ONNX Runtime "
                             "string tensors hold UTF-8 text)") from None
    return conv


def _utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def feeds_for_session(feeds: dict[str, Array]) -> dict[str, Array]:
    """All inputs converted with :func:`_feed`."""
    return {k: _feed(k, v) for k, v in feeds.items()}


@dataclass
class _Pending:
    feeds: dict[str, Array]
    outputs: list[str]
    batch: int
    signature: tuple[Any, ...]
    future: asyncio.Future[Result]
    enqueued_ns: int


class LoadedModel:
    """One served model version; see the module docstring."""

    def __init__(self, manifest: Manifest, session: Any, *, instances: int, max_queue: int,
                 batching: bool, sha256: str = "", fixed_cost: bool = False,
                 clock: Callable[[], int] = time.perf_counter_ns) -> None:
        self.manifest = manifest
        self.name = manifest.name
        self.version = manifest.version
        self.sha256 = sha256
        self.session = session
        self.provider: str = session.get_providers()[0]
        self.providers: tuple[str, ...] = tuple(session.get_providers())
        self.inputs: dict[str, TensorSpec] = {s.name: s for s in manifest.inputs}
        self.outputs: dict[str, TensorSpec] = {s.name: s for s in manifest.outputs}
        self.batching_cfg = manifest.batching
        self.max_batch = manifest.batching.max_batch_size
        self.dynamic_batching = bool(batching and self.max_batch > 0)
        self.instances = max(1, instances)
        self.max_queue = max_queue
        self.stats = ModelStats(self.name, self.version)
        # times every run and stage, in nanoseconds; the inline decision is made from it, so
        # a test gives a clock of its own rather than depend on how busy the machine is
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=self.instances,
                                            thread_name_prefix=f"ort-{self.name}")
        self._queue: collections.deque[_Pending] = collections.deque()
        self._wakeup = asyncio.Event()
        self._running = 0
        self._slots = asyncio.Semaphore(self.instances)
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        # Only a model whose work a request's values cannot choose may ever hold the event
        # loop: a CPU session of fixed-cost operators (agent.modelrefs.fixed_cost).
        self._may_inline = self.provider == CPU and fixed_cost
        # per input-shape signature: its last runs, how many were seen (see INLINE_MAX_NS)
        self._runs: dict[tuple[Any, ...], collections.deque[int]] = {}
        self._runs_seen: dict[tuple[Any, ...], int] = {}
        self._inline: set[tuple[Any, ...]] = set()

    # ------------------------------------------------------------------ running

    def run_sync(self, feeds: dict[str, Array], outputs: Sequence[str]) -> dict[str, Array]:
        """Run the session on this thread (golden vectors, tests): outputs by name."""
        results = self.session.run(list(outputs), feeds_for_session(feeds))
        return {n: to_bytes_array(np.asarray(r)) for n, r in zip(outputs, results, strict=True)}

    def _execute(self, feeds: dict[str, Array], outputs: Sequence[str]) -> tuple[list[Any], int, int]:
        start = self._clock()
        try:
            results = self.session.run(list(outputs), feeds)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises several unrelated types
            raise ExecutionError(f"model {self.name} {self.version}: ONNX Runtime failed: {exc}") from None
        return results, start, self._clock()

    def _admit(self) -> None:
        if self._closed:
            raise QueueFullError(f"model {self.name} {self.version} is being unloaded")
        if self.stats.pending >= self.max_queue:
            raise QueueFullError(f"model {self.name} {self.version}: queue full "
                                 f"({self.max_queue} requests waiting or running)")

    async def infer(self, feeds: dict[str, Array], outputs: list[str]) -> Result:
        """Run one request (already validated against the specs).

        Raises:
            QueueFullError: ``max_queue`` requests are already admitted.
            ExecutionError: ONNX Runtime failed.
            InferenceError: outputs of a batched model do not split along the batch.
        """
        self._admit()
        self.stats.pending += 1
        try:
            if self.dynamic_batching:
                return await self._submit(feeds, outputs)
            return await self._direct(feeds, outputs)
        finally:
            self.stats.pending -= 1

    async def _direct(self, feeds: dict[str, Array], outputs: list[str]) -> Result:
        t0 = self._clock()
        prepared = feeds_for_session(feeds)
        shapes = self._inline_signature(feeds)
        t1 = self._clock()
        if shapes is not None and shapes in self._inline:
            results, start, end = self._execute(prepared, outputs)
        else:
            loop = asyncio.get_running_loop()
            results, start, end = await loop.run_in_executor(self._executor, self._execute, prepared, outputs)
        if shapes is not None:
            self._measured(shapes, end - start)
        t2 = self._clock()
        out = {n: to_bytes_array(np.asarray(r)) for n, r in zip(outputs, results, strict=True)}
        t3 = self._clock()
        batch = self._batch_of(feeds)
        self.stats.record_execution(batch, t1 - t0, end - start, t3 - t2)
        return Result(out, queue_ns=start - t1, input_ns=t1 - t0, infer_ns=end - start, output_ns=t3 - t2)

    @property
    def inline(self) -> bool:
        """True when requests of some input shapes run on the event loop (see INLINE_MAX_NS)."""
        return bool(self._inline)

    def _inline_signature(self, feeds: dict[str, Array]) -> tuple[Any, ...] | None:
        """The input shapes of a request that may run inline once measured, else None."""
        if not self._may_inline:
            return None
        if sum(a.nbytes for a in feeds.values()) > INLINE_MAX_BYTES \
                or any(a.dtype.kind not in "biuf" for a in feeds.values()):
            return None  # big, or strings (whose nbytes does not count their text)
        return tuple(sorted((k, a.shape, a.dtype.str) for k, a in feeds.items()))

    def _measured(self, shapes: tuple[Any, ...], run_ns: int) -> None:
        """Note one run of a request of these input shapes; decide again, every RUN_WINDOW
        runs of them, whether they run inline (see INLINE_MAX_NS)."""
        runs = self._runs.get(shapes)
        if runs is None:
            if len(self._runs) >= INLINE_SHAPES:
                return  # enough shapes measured: the others stay on the pool
            runs = self._runs[shapes] = collections.deque(maxlen=RUN_WINDOW)
        runs.append(run_ns)
        seen = self._runs_seen[shapes] = self._runs_seen.get(shapes, 0) + 1
        if seen % RUN_WINDOW == 0:
            if sorted(runs)[len(runs) // 2] <= INLINE_MAX_NS:
                self._inline.add(shapes)
            else:
                self._inline.discard(shapes)

    def _batch_of(self, feeds: dict[str, Array]) -> int:
        if self.max_batch <= 0:
            return 1
        first = next(iter(feeds.values()))
        return int(first.shape[0]) if first.ndim else 1

    # ------------------------------------------------------------------ dynamic batching

    async def _submit(self, feeds: dict[str, Array], outputs: list[str]) -> Result:
        sizes = {int(a.shape[0]) for a in feeds.values()}
        if len(sizes) != 1:
            raise InferenceError(f"inputs disagree on the batch dimension: {sorted(sizes)}")
        loop = asyncio.get_running_loop()
        item = _Pending(feeds, outputs, sizes.pop(),
                        (tuple(outputs), *((k, a.shape[1:]) for k, a in sorted(feeds.items()))),
                        loop.create_future(), self._clock())
        self._queue.append(item)
        item.future.add_done_callback(lambda f: self._forget(item) if f.cancelled() else None)
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._batch_loop(), name=f"batcher-{self.name}")
        self._wakeup.set()
        return await item.future

    def _forget(self, item: _Pending) -> None:
        with contextlib.suppress(ValueError):  # already taken into a batch
            self._queue.remove(item)

    def _take_batch(self) -> list[_Pending]:
        """Pop compatible requests from the head of the queue, up to max_batch_size."""
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()
        if not self._queue:
            return []
        head = self._queue.popleft()
        batch, total = [head], head.batch
        keep: list[_Pending] = []
        while self._queue and total < self.max_batch:
            item = self._queue.popleft()
            if item.future.done():
                continue
            if item.signature == head.signature and total + item.batch <= self.max_batch:
                batch.append(item)
                total += item.batch
            else:
                keep.append(item)
        self._queue.extendleft(reversed(keep))
        return batch

    def _ready_size(self) -> int:
        head = next((i for i in self._queue if not i.future.done()), None)
        if head is None:
            return 0
        return sum(i.batch for i in self._queue if not i.future.done() and i.signature == head.signature)

    def _batch_full(self, size: int) -> bool:
        return size >= self.max_batch or any(size >= p for p in self.batching_cfg.preferred_batch_sizes)

    async def _batch_loop(self) -> None:
        delay_s = self.batching_cfg.max_queue_delay_us / 1e6
        while not self._closed:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._slots.acquire()
            # Wait for more requests until the oldest has waited max_queue_delay, the batch
            # is full or reaches a preferred size.
            head = next((i for i in self._queue if not i.future.done()), None)
            if head is not None and delay_s > 0:
                deadline = head.enqueued_ns / 1e9 + delay_s
                while not self._batch_full(self._ready_size()):
                    remaining = deadline - self._clock() / 1e9
                    if remaining <= 0:
                        break
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
                    except TimeoutError:
                        break
            batch = self._take_batch()
            if not batch:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._run_batch(batch))
            task.add_done_callback(lambda _t: self._slots.release())

    async def _run_batch(self, batch: list[_Pending]) -> None:
        t0 = self._clock()
        try:
            if len(batch) == 1:
                feeds = feeds_for_session(batch[0].feeds)
            else:
                feeds = {k: _feed(k, np.concatenate([i.feeds[k] for i in batch], axis=0))
                         for k in batch[0].feeds}
            outputs = batch[0].outputs
            t1 = self._clock()
            loop = asyncio.get_running_loop()
            results, start, end = await loop.run_in_executor(self._executor, self._execute, feeds, outputs)
            t2 = self._clock()
            total = sum(i.batch for i in batch)
            split = self._split(outputs, results, [i.batch for i in batch])
            t3 = self._clock()
        except Exception as exc:  # noqa: BLE001 - every waiter must learn of any failure
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        self.stats.record_execution(total, t1 - t0, end - start, t3 - t2)
        for item, out in zip(batch, split, strict=True):
            if not item.future.done():
                item.future.set_result(Result(out, queue_ns=t0 - item.enqueued_ns + (start - t1),
                                              input_ns=t1 - t0, infer_ns=end - start,
                                              output_ns=t3 - t2))

    def _split(self, outputs: list[str], results: list[Any], sizes: list[int]) -> list[dict[str, Array]]:
        total = sum(sizes)
        arrays = [to_bytes_array(np.asarray(r)) for r in results]
        for name, a in zip(outputs, arrays, strict=True):
            if a.ndim == 0 or a.shape[0] != total:
                raise InferenceError(f"model {self.name}: output {name!r} has shape {list(a.shape)}, "
                                     f"which does not split into a batch of {total}")
        offset = 0
        split: list[dict[str, Array]] = []
        for size in sizes:
            split.append({n: a[offset:offset + size] for n, a in zip(outputs, arrays, strict=True)})
            offset += size
        return split

    # ------------------------------------------------------------------ lifecycle

    async def drain(self, within_s: float) -> bool:
        """Wait until no admitted request is waiting or running (at most ``within_s`` seconds).

        Used by a hot swap: once a model is no longer handed out, the requests it already
        admitted finish on it before it is closed.  Returns whether it drained in time.
        """
        deadline = time.monotonic() + within_s
        while self.stats.pending > 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.002)
        return True

    def close(self) -> None:
        """Refuse new requests, fail queued ones, and let running ones finish in the background."""
        self._closed = True
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(QueueFullError(f"model {self.name} {self.version} was unloaded"))
        if self._worker is not None:
            self._worker.cancel()
        self._wakeup.set()
        self._executor.shutdown(wait=False)
