"""Batching across sequences in the generative engine: real onnxruntime-genai on the tiny decoder.

Most tests hold the model's only decode thread while their requests queue, so that the next
free thread finds them all waiting and decodes them as one batch (what load does by chance).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest

from agent.llm.engine import GenaiLanguageModel, Limits
from agent.llm.load import load_language_model
from agent.llm.types import Chunk, ModelCard, Sampling
from provisioning.demo.llm_models import write_decoder

CARD = ModelCard("tiny-llm", "1.0.0", "llm", 256, 0, "fp32", 0)
PROMPT = "The appliance keeps its models"
# prompts of 1 to about 20 tokens: rows of one batch are padded to the longest
PROMPTS = ("hi", PROMPT, "a much longer prompt, with many many more tokens in it than the others",
           "short one here")
T = TypeVar("T")


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_decoder(tmp_path_factory.mktemp("decoder"))


def _model(folder: Path, budget: int = 4096, threads: int = 1) -> GenaiLanguageModel:
    return load_language_model(folder, sorted(p.name for p in folder.iterdir()), CARD,
                               Limits(256, 64, budget, 30.0), intra_op_threads=1, decode_threads=threads)


@pytest.fixture
def model(decoder_dir: Path) -> Iterator[GenaiLanguageModel]:
    m = _model(decoder_dir)
    yield m
    m.close()


async def _collect(stream: AsyncIterator[Chunk]) -> list[Chunk]:
    return [c async for c in stream]


async def _first(stream: AsyncIterator[Chunk]) -> Chunk:
    return await anext(stream)


def _ids(chunks: list[Chunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


async def _queued(model: GenaiLanguageModel, consumers: list[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run ``consumers`` (each reads one stream of ``model``) once all their requests wait
    for the model's one decode thread, which is held meanwhile."""
    release = threading.Event()
    model._pool.submit(release.wait)
    tasks = [asyncio.ensure_future(c()) for c in consumers]
    await _until(lambda: model.active_sequences == len(tasks))  # each holds its reservation once queued
    release.set()
    return list(await asyncio.wait_for(asyncio.gather(*tasks), 60))


async def _paused(model: GenaiLanguageModel) -> None:
    """Wait until the model's batch waits for its readers (who read no more)."""
    await _until(lambda: model.batching.paused > 0)


async def _until(done: Callable[[], bool]) -> None:
    """Poll ``done``, about state the decode threads change, for up to a minute."""
    for _ in range(6000):
        if done():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the model never got there")


def test_batched_rows_decode_what_each_decodes_alone(model: GenaiLanguageModel) -> None:
    asked = list(zip(PROMPTS, (40, 8, 24, 33), strict=True))
    assert len({len(model.encode(p)) for p in PROMPTS}) == len(PROMPTS)  # all lengths differ
    alone = [model.greedy(p, n) for p, n in asked]

    streams = [model.generate(p, Sampling(max_tokens=n, temperature=0)) for p, n in asked]
    results = asyncio.run(_queued(model, [partial(_collect, s) for s in streams]))

    assert model.batching.sizes == Counter({4: 1})
    for (_, n), want, chunks in zip(asked, alone, results, strict=True):
        assert _ids(chunks) == want
        last = chunks[-1]
        assert last.completion_tokens == len(want)
        assert last.finish_reason == ("length" if len(want) == n else "stop")
    assert model.active_sequences == 0 and model.budget.in_use == 0 and model.batching.cache_tokens == 0


def test_rows_whose_reader_leaves_or_deadline_passes_are_dropped_and_the_others_complete(
        model: GenaiLanguageModel) -> None:
    greedy = Sampling(max_tokens=48, temperature=0)
    alone = [model.greedy(p, 48) for p in PROMPTS]

    async def leaves() -> list[Chunk]:
        stream = model.generate(PROMPTS[1], greedy)
        first = await anext(stream)
        await stream.aclose()  # type: ignore[attr-defined]
        return [first]

    async def late() -> list[Chunk]:
        deadline = time.monotonic() + 0.3
        stream = model.generate(PROMPTS[3], greedy, deadline=deadline)
        first = await anext(stream)
        # reads no more: once the others have ended, the batch waits for this reader alone,
        # READ_AHEAD chunks ahead of it, until its deadline passes
        await _until(lambda: time.monotonic() > deadline)
        return [first, *await _collect(stream)]

    def reads(prompt: str) -> Callable[[], Awaitable[list[Chunk]]]:
        return lambda: _collect(model.generate(prompt, greedy))

    results = asyncio.run(_queued(model, [reads(PROMPTS[0]), leaves, reads(PROMPTS[2]), late]))

    assert model.batching.sizes == Counter({4: 1})
    for i, finish in ((1, None), (3, "cancelled")):  # the one that left, the one past its deadline
        got = _ids(results[i])
        assert results[i][-1].finish_reason == finish
        assert got == alone[i][:len(got)] and len(got) < len(alone[i])
    for i in (0, 2):
        assert _ids(results[i]) == alone[i] and results[i][-1].finish_reason in ("length", "stop")
    assert model.active_sequences == 0 and model.budget.in_use == 0 and model.batching.cache_tokens == 0


def test_a_slow_reader_does_not_hold_back_the_rows_beside_it(model: GenaiLanguageModel) -> None:
    """One row's reader takes nothing after its first chunk until the other rows of its batch
    have all their tokens; then it reads its own, all of them, as decoded alone."""
    greedy = Sampling(max_tokens=48, temperature=0)
    alone = [model.greedy(p, 48) for p in PROMPTS[:3]]

    async def main() -> list[list[Chunk]]:
        others_done, ended = asyncio.Event(), []

        async def reads(prompt: str) -> list[Chunk]:
            chunks = await _collect(model.generate(prompt, greedy))
            ended.append(prompt)
            if len(ended) == 2:
                others_done.set()
            return chunks

        async def slow() -> list[Chunk]:
            stream = model.generate(PROMPTS[1], greedy)
            first = await anext(stream)
            # 48 tokens are far more than READ_AHEAD: the others end only if the batch steps on
            await asyncio.wait_for(others_done.wait(), 30)
            return [first, *await _collect(stream)]

        return await _queued(model, [partial(reads, PROMPTS[0]), slow, partial(reads, PROMPTS[2])])

    results = asyncio.run(main())
    assert model.batching.sizes == Counter({3: 1})
    assert [_ids(r) for r in results] == alone
    assert all(r[-1].finish_reason in ("length", "stop") for r in results)
    assert model.active_sequences == 0 and model.budget.in_use == 0 and model.batching.cache_tokens == 0


def test_a_batch_whose_readers_all_leave_frees_its_cache_at_once(model: GenaiLanguageModel) -> None:
    async def main() -> tuple[int, int, int]:
        streams = [model.generate(p, Sampling(max_tokens=64, temperature=0)) for p in PROMPTS[:3]]
        await _queued(model, [partial(_first, s) for s in streams])
        await _paused(model)
        held = model.batching.cache_tokens
        for stream in streams:
            await stream.aclose()  # type: ignore[attr-defined]
        return held, model.budget.in_use, model.batching.cache_tokens

    held, in_use, cache = asyncio.run(main())
    assert model.batching.sizes == Counter({3: 1})
    assert held > 0 and (in_use, cache) == (0, 0) and model.batching.paused == 0
    assert model.active_sequences == 0


def test_a_seeded_request_runs_alone_and_samples_the_same_under_load(model: GenaiLanguageModel) -> None:
    seeded = Sampling(max_tokens=24, temperature=0.9, seed=5)
    unseeded = Sampling(max_tokens=24, temperature=0.9)
    alone = _ids(asyncio.run(_collect(model.generate(PROMPT, seeded))))
    model.batching.sizes.clear()

    def reads(prompt: str, sampling: Sampling) -> Callable[[], Awaitable[list[Chunk]]]:
        return lambda: _collect(model.generate(prompt, sampling))

    results = asyncio.run(_queued(model, [reads(PROMPT, unseeded), reads(PROMPT, seeded),
                                          reads(PROMPTS[0], seeded), reads(PROMPT, unseeded),
                                          reads(PROMPT, unseeded)]))

    assert _ids(results[1]) == alone
    # the unseeded three together; each seeded one alone, even beside another with its seed
    assert model.batching.sizes == Counter({3: 1, 1: 2})


def test_a_model_closed_under_a_batch_ends_its_rows_as_cancelled(model: GenaiLanguageModel) -> None:
    async def main() -> list[list[Chunk]]:
        streams = [model.generate(p, Sampling(max_tokens=64, temperature=0)) for p in PROMPTS[:3]]
        firsts = await _queued(model, [partial(_first, s) for s in streams])
        await _paused(model)
        model.close()
        freed.append(model.batching.cache_tokens == 0)  # before any reader looks again
        return [[f, *await _collect(s)] for f, s in zip(firsts, streams, strict=True)]

    freed: list[bool] = []
    results = asyncio.run(main())
    assert freed == [True]
    assert model.batching.sizes == Counter({3: 1})
    assert all(r[-1].finish_reason == "cancelled" and r[-1].completion_tokens < 64 for r in results)
    assert model.batching.paused == 0
    assert model.active_sequences == 0 and model.budget.in_use == 0 and model.batching.cache_tokens == 0


def test_32_concurrent_greedy_streams_batch_within_the_kv_budget(decoder_dir: Path) -> None:
    """Mixed prompt lengths and max_tokens, so that a batch's padding is a good part of its cache."""
    model = _model(decoder_dir, budget=6 * 64 + 64, threads=2)
    asked = [(f"{PROMPTS[i % 4]} {i}", 8 + 10 * (i % 4)) for i in range(32)]
    alone = [model.greedy(p, n) for p, n in asked]

    async def main() -> list[list[Chunk]]:
        return await asyncio.gather(*(_collect(model.generate(p, Sampling(max_tokens=n, temperature=0)))
                                      for p, n in asked))

    try:
        results = asyncio.run(main())
    finally:
        model.close()
    assert [_ids(r) for r in results] == alone
    assert all(r[-1].finish_reason in ("length", "stop") for r in results)
    assert max(model.batching.sizes) > 1, model.batching.sizes
    assert model.batching.cache_peak <= model.budget.total and model.budget.peak <= model.budget.total
    assert model.active_sequences == 0 and model.budget.in_use == 0 and model.batching.cache_tokens == 0



def test_a_stop_string_ends_its_row_only(model: GenaiLanguageModel) -> None:
    greedy = Sampling(max_tokens=48, temperature=0)
    full = "".join(c.text for c in asyncio.run(_collect(model.generate(PROMPT, greedy))))
    stop = full[6:8]
    streams = [model.generate(PROMPT, Sampling(max_tokens=48, temperature=0, stop=(stop,))),
               model.generate(PROMPT, greedy)]
    stopped, whole = asyncio.run(_queued(model, [partial(_collect, s) for s in streams]))
    assert model.batching.sizes[2] == 1
    assert "".join(c.text for c in stopped) == full[:full.find(stop)] and stopped[-1].finish_reason == "stop"
    assert "".join(c.text for c in whole) == full


class _FailingGenerator:
    """A real generator whose third step fails, as the runtime's would (out of memory, say)."""

    def __init__(self, real: object) -> None:
        self._real = real
        self._steps = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)

    def generate_next_token(self) -> None:
        self._steps += 1
        if self._steps == 3:
            raise RuntimeError("injected failure")
        self._real.generate_next_token()  # type: ignore[attr-defined]


def test_a_runtime_failure_reaches_every_row_of_the_batch_and_frees_it(
        model: GenaiLanguageModel, monkeypatch: pytest.MonkeyPatch) -> None:
    real = model._batcher.generator
    monkeypatch.setattr(model._batcher, "generator", lambda *a: _FailingGenerator(real(*a)))

    async def fails(stream: AsyncIterator[Chunk]) -> str:
        with pytest.raises(RuntimeError, match="injected failure"):
            await _collect(stream)
        return "raised"

    streams = [model.generate(p, Sampling(max_tokens=32, temperature=0)) for p in PROMPTS[:3]]
    assert asyncio.run(_queued(model, [partial(fails, s) for s in streams])) == ["raised"] * 3
    assert model.batching.sizes == Counter({3: 1})
    assert model.active_sequences == 0 and model.budget.in_use == 0 and model.batching.cache_tokens == 0


def test_requests_that_come_while_a_batch_steps_wait_for_it_then_start_together(
        model: GenaiLanguageModel) -> None:
    """One decode thread: one batch steps at a time, and a request waits for a thread to be free
    of a batch, not only of a step (the steps of different batches would contend)."""
    greedy = Sampling(max_tokens=12, temperature=0)

    async def main() -> tuple[Counter[int], list[list[Chunk]]]:
        hold, gate = threading.Event(), threading.Event()
        model._pool.submit(hold.wait)
        long = Sampling(max_tokens=64, temperature=0)
        first = asyncio.ensure_future(_collect(model.generate(PROMPT, long)))
        await _until(lambda: model.active_sequences == 1)
        model._pool.submit(gate.wait)  # after the first request's batch starts and takes one step
        hold.set()
        await _until(lambda: model.batching.sizes[1] == 1)
        later = [asyncio.ensure_future(_collect(model.generate(p, greedy))) for p in PROMPTS[:2]]
        await _until(lambda: model.active_sequences == 3)
        # the batches started once the later requests' own tries to start one have run
        during = model._pool.submit(lambda: Counter(model.batching.sizes))
        gate.set()
        return await asyncio.wrap_future(during), await asyncio.gather(first, *later)

    during, results = asyncio.run(main())
    assert during == Counter({1: 1})  # the first batch steps; the later requests wait...
    assert model.batching.sizes == Counter({1: 1, 2: 1})  # ...and start together when it ends
    alone = [model.greedy(PROMPT, 64), *(model.greedy(p, 12) for p in PROMPTS[:2])]
    assert [_ids(r) for r in results] == alone


def test_a_batch_waiting_for_a_slow_reader_lets_the_next_batch_start(model: GenaiLanguageModel) -> None:
    async def main() -> tuple[list[Chunk], list[Chunk]]:
        hold, gate = threading.Event(), threading.Event()
        model._pool.submit(hold.wait)
        slow = model.generate(PROMPT, Sampling(max_tokens=64, temperature=0))
        first = asyncio.ensure_future(_first(slow))
        await _until(lambda: model.active_sequences == 1)
        model._pool.submit(gate.wait)  # after the slow reader's batch starts and takes one step
        hold.set()
        await _until(lambda: model.batching.sizes[1] == 1)
        short = Sampling(max_tokens=8, temperature=0)
        other = asyncio.ensure_future(_collect(model.generate(PROMPTS[0], short)))
        await _until(lambda: model.active_sequences == 2)
        gate.set()  # the other request finds the one decode thread taken by a stepping batch, and waits
        # until that batch waits for its reader, who reads no more until the other is done
        done = await asyncio.wait_for(other, 60)
        return [await first, *await _collect(slow)], done

    slow, other = asyncio.run(main())
    assert model.batching.sizes == Counter({1: 2})
    assert _ids(other) == model.greedy(PROMPTS[0], 8) and _ids(slow) == model.greedy(PROMPT, 64)
