"""A decoder LLM served with onnxruntime-genai: the :class:`~agent.llm.types.LanguageModel`.

Each request is one sequence with its own ``og.Generator`` (its KV cache).  Steps (the
prompt's prefill, then one token each) run on the model's decode threads, never on the event
loop; the caller gets an async stream of :class:`~agent.llm.types.Chunk`.  Before a sequence
starts it reserves ``prompt + max_tokens`` tokens of the model's :class:`KvBudget`; the
reservation and the generator are freed when the stream ends, is closed (``aclose``), or the
task iterating it is cancelled, once the step then in flight (if any) has returned, since
the decode thread still uses the generator until then.

Prompts and completions are never logged: an error names the model and sizes, not text.

Batching across sequences: onnxruntime-genai 0.11.2 has an experimental ``og.Engine`` /
``og.Request`` scheduler that steps several sequences in one batch.  Tried on the tiny decoder
(4 layers, hidden 512): eight greedy requests of equal prompt length took 0.41 s against 0.77 s
one after another (1.9x), but two prompts of different lengths hung ``Engine.step`` (killed
after 300 s); a sequence reaching its ``max_length`` while another still ran failed the KV
concat (``{2,4,256,16}`` vs ``{2,4,257,16}``); and ``remove_request`` did not stop a sequence,
so a client that leaves could not free its cache.  Static batching (one generator with
``batch_size`` N) is 5x faster at 8 sequences in-process and decodes exactly the tokens of each
prompt alone when the prompts are right-padded with the pad id, as ``Tokenizer.encode_batch``
pads them (checked: 4 prompts of 1 to 12 tokens, 40 greedy tokens each); left padding is
taken as real tokens.  Serving it needs a batcher (requests grouped by equal search options,
a seeded request alone, the budget reserved for the padded batch, rows dropped by their
client discarded until the batch ends): not built yet.  Until then, or until the runtime's
scheduler takes mixed
requests, concurrent sequences share the model through the decode threads, each with its own
generator (ONNX Runtime runs their steps in parallel on the intra-op pool).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime_genai as og

from agent.errors import BundleError, InferenceError, NotFoundError
from agent.llm.budget import KvBudget
from agent.llm.stops import StopScanner
from agent.llm.types import Chunk, FinishReason, Message, ModelCard, Sampling
from agent.ort import CUDA, default_intra_op_threads, usable_providers

__all__ = ["GenaiLanguageModel", "Limits", "open_genai_model"]

ROLES = ("system", "user", "assistant")
MAX_STOPS = 4  # as OpenAI's API
MAX_STOP_CHARS = 256
# top_k goes to the runtime as a C int; no vocabulary comes near this, so above it is a mistake or an attack
MAX_TOP_K = 1 << 20


@dataclass(frozen=True)
class Limits:
    """What one model takes: from its bundle's manifest (capped by the agent's settings)."""

    context_length: int  # prompt + completion tokens of one sequence
    max_tokens: int  # completion tokens one request may ask for
    kv_budget_tokens: int  # tokens all sequences of the model hold at once
    queue_wait_s: float = 5.0  # how long a request waits for budget before CapacityError

    def __post_init__(self) -> None:
        if not 0 < self.max_tokens <= self.context_length <= self.kv_budget_tokens:
            raise ValueError(f"limits must satisfy 0 < max_tokens ({self.max_tokens}) <= "
                             f"context_length ({self.context_length}) <= kv_budget_tokens "
                             f"({self.kv_budget_tokens})")


def open_genai_model(folder: Path, providers: Sequence[str] = (), intra_op_threads: int = 0) -> Any:
    """An ``og.Model`` from a checked model folder, on CUDA when it is usable here (and
    allowed by ``providers``), else the CPU, asking for no provider whose libraries do not
    load (which would log a loud error).

    Raises:
        BundleError: onnxruntime-genai cannot load the folder.
    """
    allowed = [p for p in usable_providers() if not providers or p in providers]
    config = og.Config(str(folder))
    config.clear_providers()
    if CUDA in allowed:
        config.append_provider("cuda")
    threads = intra_op_threads or default_intra_op_threads()
    # Explicit thread counts: ONNX Runtime's default pins threads to cores, which the agent's
    # sandbox forbids (see agent.ort.default_intra_op_threads).
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    try:
        return og.Model(config)
    except RuntimeError as exc:
        raise BundleError(f"{folder}: onnxruntime-genai cannot load the model: {exc}") from None


class _ClosedError(Exception):
    """The model was closed while a step of the sequence waited for a decode thread."""


class _Sequence:
    """One generation: its generator, detokeniser stream and budget reservation."""

    def __init__(self, owner: GenaiLanguageModel, reserved: int) -> None:
        self.owner = owner
        self.reserved = reserved
        self.generator: Any = None
        self.stream: Any = None
        self._step: concurrent.futures.Future[Any] | None = None
        self._freed = False

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(self, *args)`` on a decode thread.

        Raises:
            NotFoundError: the model was unloaded before the step could be queued.
            _ClosedError: the model was unloaded while the step waited for a thread.
        """
        try:
            step = self._step = self.owner._pool.submit(fn, self, *args)
        except RuntimeError:  # the pool was shut down: the model is being unloaded
            raise NotFoundError(f"model {self.owner.card.name} was unloaded") from None
        try:
            return await asyncio.wrap_future(step)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if step.cancelled() and (task is None or not task.cancelling()):
                raise _ClosedError from None  # close() dropped the queued step, nobody cancelled us
            raise

    def close(self) -> None:
        """Free the generator and the reservation once no step is running on it."""
        if self._step is None:
            self._free()
        else:  # runs at once when the step is done (or never started)
            self._step.add_done_callback(lambda _: self._free())

    def _free(self) -> None:
        if self._freed:
            return
        self._freed = True
        self.generator = self.stream = None
        self.owner.budget.release(self.reserved)


class GenaiLanguageModel:
    """A :class:`~agent.llm.types.LanguageModel` over an onnxruntime-genai model folder."""

    def __init__(self, model: Any, card: ModelCard, limits: Limits, *, decode_threads: int = 0) -> None:
        self.card = card
        self.limits = limits
        self._model = model
        self._tokenizer = og.Tokenizer(model)
        self._eos = frozenset(int(t) for t in self._tokenizer.eos_token_ids)
        self.budget = KvBudget(limits.kv_budget_tokens, card.name)
        workers = decode_threads or max(2, default_intra_op_threads())
        self._closed = False
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=f"llm-{card.name}")

    @property
    def active_sequences(self) -> int:
        """Sequences holding a generator (and budget) now."""
        return self.budget.sequences

    def close(self) -> None:
        """Stop taking steps: streams in flight end after their current step, with
        ``finish_reason="cancelled"``; new requests are refused."""
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ prompts

    def chat_prompt(self, messages: Sequence[Message]) -> str:
        if not messages:
            raise InferenceError(f"model {self.card.name}: empty conversation")
        for i, m in enumerate(messages):
            if m.role not in ROLES:
                raise InferenceError(f"model {self.card.name}: messages[{i}].role {m.role[:32]!r} "
                                     f"is not one of {', '.join(ROLES)}")
        doc = json.dumps([{"role": m.role, "content": m.content} for m in messages])
        try:
            return str(self._tokenizer.apply_chat_template(doc, add_generation_prompt=True))
        except RuntimeError as exc:
            raise InferenceError(f"model {self.card.name}: its chat template failed: {exc}") from None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (for golden checks and prompt accounting)."""
        return [int(t) for t in self._tokenizer.encode(text)]

    def greedy(self, prompt: str, max_new: int) -> list[int]:
        """Token ids of ``prompt`` decoded greedily in the calling thread (the golden check:
        the same model object that then serves).

        Raises:
            InferenceError: the prompt does not fit.
        """
        ids = self.encode(prompt)
        options = _search_options(Sampling(temperature=0), len(ids) + self._max_new(len(ids), max_new))
        seq = _Sequence(self, 0)
        self._prefill(seq, ids, options)
        out = []
        while not seq.generator.is_done():
            out.append(self._next(seq)[0])
        return out

    # ------------------------------------------------------------------ generation

    def generate(self, prompt: str, sampling: Sampling, *,
                 deadline: float | None = None) -> AsyncIterator[Chunk]:
        """See :class:`~agent.llm.types.LanguageModel`.  A request the model cannot take
        raises ``InferenceError`` here, before any stream exists; ``CapacityError`` comes from
        the stream's first step (after the bounded wait for budget)."""
        if self._closed:
            raise NotFoundError(f"model {self.card.name} was unloaded")
        _check_sampling(self.card.name, sampling)
        ids = self.encode(prompt)
        new = self._max_new(len(ids), sampling.max_tokens)
        options = _search_options(sampling, len(ids) + new)
        return self._stream(ids, new, options, sampling.stop, deadline)

    def _max_new(self, prompt_tokens: int, asked: int | None) -> int:
        lim, name = self.limits, self.card.name
        if prompt_tokens == 0:
            raise InferenceError(f"model {name}: the prompt is empty")
        room = lim.context_length - prompt_tokens
        if room <= 0:
            raise InferenceError(f"model {name}: the prompt is {prompt_tokens} tokens; the context "
                                 f"length is {lim.context_length}")
        if asked is None:
            return min(lim.max_tokens, room)
        if not 0 < asked <= lim.max_tokens:
            raise InferenceError(f"model {name}: max_tokens {asked} is outside 1..{lim.max_tokens}")
        if asked > room:
            raise InferenceError(f"model {name}: prompt ({prompt_tokens} tokens) plus max_tokens "
                                 f"({asked}) exceeds the context length {lim.context_length}")
        return asked

    async def _stream(self, ids: list[int], new: int, options: dict[str, Any], stops: tuple[str, ...],
                      deadline: float | None) -> AsyncIterator[Chunk]:
        asked = time.monotonic()
        await self.budget.acquire(len(ids) + new, self.limits.queue_wait_s)
        queued = time.monotonic() - asked
        seq = _Sequence(self, len(ids) + new)
        try:
            try:
                await seq.run(self._prefill, ids, options)
            except _ClosedError:
                yield Chunk("", (), "cancelled", len(ids), 0, queued)
                return
            scanner = StopScanner(stops)
            held: list[int] = []  # token ids not yet sent in a chunk
            count = 0
            finish: FinishReason
            while True:
                if self._closed or (deadline is not None and time.monotonic() >= deadline):
                    finish, tail = "cancelled", scanner.flush()
                    break
                try:
                    token, piece, done = await seq.run(self._next)
                except _ClosedError:
                    finish, tail = "cancelled", scanner.flush()
                    break
                count += 1
                held.append(token)
                text, hit = scanner.feed(piece)
                if hit:
                    finish, tail = "stop", text
                    break
                if done:
                    finish, tail = ("stop" if token in self._eos else "length"), text + scanner.flush()
                    break
                if text:
                    yield Chunk(text, tuple(held), queue_s=queued)
                    held = []
            yield Chunk(tail, tuple(held), finish, len(ids), count, queued)
        finally:
            seq.close()

    def _prefill(self, seq: _Sequence, ids: list[int], options: dict[str, Any]) -> None:
        params = og.GeneratorParams(self._model)
        params.set_search_options(**options)
        seq.generator = og.Generator(self._model, params)
        seq.stream = self._tokenizer.create_stream()
        seq.generator.append_tokens(np.asarray(ids, dtype=np.int32))

    @staticmethod
    def _next(seq: _Sequence) -> tuple[int, str, bool]:
        gen = seq.generator
        gen.generate_next_token()
        token = int(gen.get_next_tokens()[0])
        return token, str(seq.stream.decode(token)), bool(gen.is_done())


def _check_sampling(name: str, s: Sampling) -> None:
    def bad(field: str, value: object, allowed: str) -> InferenceError:
        return InferenceError(f"model {name}: {field} {value!r} is outside {allowed}")

    if not (math.isfinite(s.temperature) and 0 <= s.temperature <= 2):
        raise bad("temperature", s.temperature, "0..2")
    if not (math.isfinite(s.top_p) and 0 < s.top_p <= 1):
        raise bad("top_p", s.top_p, "(0, 1]")
    if not 0 <= s.top_k <= MAX_TOP_K:
        raise bad("top_k", s.top_k, f"0..{MAX_TOP_K} (0: no limit)")
    if len(s.stop) > MAX_STOPS or any(not x or len(x) > MAX_STOP_CHARS for x in s.stop):
        raise InferenceError(f"model {name}: stop takes up to {MAX_STOPS} non-empty strings of at "
                             f"most {MAX_STOP_CHARS} characters")


def _search_options(s: Sampling, max_length: int) -> dict[str, Any]:
    """onnxruntime-genai search options for ``s`` (``max_length`` counts the prompt too)."""
    if s.temperature == 0 or s.top_k == 1:
        return {"max_length": max_length, "do_sample": False}
    options: dict[str, Any] = {"max_length": max_length, "do_sample": True,
                               "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k}
    if s.seed is not None:
        options["random_seed"] = s.seed & 0x7FFFFFFF  # the runtime's seed is a 31-bit int
    return options
