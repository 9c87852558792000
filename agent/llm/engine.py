"""A decoder LLM served with onnxruntime-genai: the :class:`~agent.llm.types.LanguageModel`.

Requests are decoded in static batches (one ``oga.Generator`` with ``batch_size`` N) by the
model's :mod:`~agent.llm._batcher`: requests with equal search options that wait when a decode
thread becomes free are decoded together, a seeded one alone.  Steps (the prefill, then one
token for every row) run on the model's decode threads, never on the event loop; the caller
gets an async stream of :class:`~agent.llm.types.Chunk`.  Before a request queues it reserves
``prompt + max_tokens`` tokens of the model's :class:`KvBudget` (a batch reserves its padding
on top); the stream ends at the row's stop string, end-of-text token, ``max_tokens`` or
deadline, or when it is closed (``aclose``) or the task iterating it is cancelled; the batch
then drops the row, and frees its generator and budget when no row is left.

Prompts and completions are never logged: an error names the model and sizes, not text.

Why static batches: onnxruntime-genai 0.11.2 has an experimental ``og.Engine`` / ``og.Request``
scheduler (continuous batching).  Tried on the tiny decoder (4 layers, hidden 512): eight
greedy requests of equal prompt length took 0.41 s against 0.77 s one after another (1.9x), but
two prompts of different lengths hung ``Engine.step`` (killed after 300 s); a sequence reaching
its ``max_length`` while another still ran failed the KV concat (``{2,4,256,16}`` vs
``{2,4,257,16}``); and ``remove_request`` did not stop a sequence, so a client that leaves could
not free its cache.  One generator with ``batch_size`` N is 5x faster at 8 sequences
in-process and decodes exactly the tokens of each prompt alone when the prompts are
right-padded with the pad id, as ``Tokenizer.encode_batch`` pads them (tests check it for
mixed prompt lengths and ``max_tokens``); left padding is taken as real tokens.  The cost: a
batch admits no row once started, and every row of it holds cache for the batch's longest
prompt plus largest ``max_tokens``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import BundleError, InferenceError, NotFoundError
from agent.llm import oga
from agent.llm._batcher import Batcher, BatchStats
from agent.llm.budget import KvBudget
from agent.llm.types import Chunk, Message, ModelCard, Sampling
from agent.ort import CUDA, default_intra_op_threads, usable_providers

__all__ = ["BatchStats", "GenaiLanguageModel", "Limits", "open_genai_model"]

ROLES = ("system", "user", "assistant")
MAX_STOPS = 4  # as OpenAI's API
MAX_STOP_CHARS = 256
# Batches stepping at once.  One step already spreads over the intra-op threads, so more
# generators in parallel mostly contend for them (one generator per request gave about 1.0x the
# tokens/s of concurrency 1 at concurrency 8, bench/llm.py); two let one batch take its prefill
# while another decodes, and keep requests waiting, to start together, when more arrive.
DECODE_THREADS = 2
# top_k goes to the runtime as a C int; no vocabulary comes near this, so above it is a mistake or an attack
MAX_TOP_K = 1 << 20


@dataclass(frozen=True)
class Limits:
    """What one model takes: from its bundle's manifest (capped by the agent's settings)."""

    context_length: int  # prompt + completion tokens of one sequence
    max_tokens: int  # completion tokens one request may ask for
    kv_budget_tokens: int  # tokens all sequences of the model hold at once
    queue_wait_s: float = 5.0  # how long a request waits for budget before CapacityError
    max_batch: int = 8  # sequences decoded in one batch

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {self.max_batch}")
        if not 0 < self.max_tokens <= self.context_length <= self.kv_budget_tokens:
            raise ValueError(f"limits must satisfy 0 < max_tokens ({self.max_tokens}) <= "
                             f"context_length ({self.context_length}) <= kv_budget_tokens "
                             f"({self.kv_budget_tokens})")


def open_genai_model(folder: Path, providers: Sequence[str] = (), intra_op_threads: int = 0,
                     binding: Any = oga) -> Any:
    """An ``oga.Model`` (onnxruntime-genai through :mod:`agent.llm.oga`) from a checked model
    folder, on CUDA when it is usable here (and allowed by ``providers``), else the CPU, asking
    for no provider whose libraries do not load (which would log a loud error).  ``binding``:
    :mod:`agent.llm.oga`, or onnxruntime-genai's own Python module for a baseline (benchmarks).

    Raises:
        BundleError: onnxruntime-genai cannot load the folder.
    """
    allowed = [p for p in usable_providers() if not providers or p in providers]
    config = binding.Config(str(folder))
    config.clear_providers()
    if CUDA in allowed:
        config.append_provider("cuda")
    threads = intra_op_threads or default_intra_op_threads()
    # Explicit thread counts: ONNX Runtime's default pins threads to cores, which the agent's
    # sandbox forbids (see agent.ort.default_intra_op_threads).
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    try:
        return binding.Model(config)
    except RuntimeError as exc:
        raise BundleError(f"{folder}: onnxruntime-genai cannot load the model: {exc}") from None


class GenaiLanguageModel:
    """A :class:`~agent.llm.types.LanguageModel` over an onnxruntime-genai model folder."""

    def __init__(self, model: Any, card: ModelCard, limits: Limits, *, decode_threads: int = 0) -> None:
        self.card = card
        self.limits = limits
        self._model = model
        self._tokenizer = oga.Tokenizer(model)
        self.budget = KvBudget(limits.kv_budget_tokens, card.name)
        self._batcher = Batcher(model, self._tokenizer, self.budget, name=card.name,
                                context_length=limits.context_length, max_batch=limits.max_batch,
                                workers=decode_threads or DECODE_THREADS)
        self._pool = self._batcher.pool  # the decode threads

    @property
    def batching(self) -> BatchStats:
        """Batches started so far, by size, and the cache their generators hold."""
        return self._batcher.stats

    @property
    def active_sequences(self) -> int:
        """Sequences holding KV budget now: their stream has not ended, or their batch's
        generator still holds their cache."""
        return self.budget.sequences

    def close(self) -> None:
        """Stop taking steps: streams in flight end with ``finish_reason="cancelled"`` (those
        of a batch in a step, after it); new requests are refused."""
        self._batcher.close()

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
        new = self._max_new(len(ids), max_new)
        generator = self._batcher.generator([ids], _search_options(Sampling(temperature=0)), new)
        out = []
        while not generator.is_done():
            generator.generate_next_token()
            out.append(int(generator.get_next_tokens()[0]))
        return out

    # ------------------------------------------------------------------ generation

    def generate(self, prompt: str, sampling: Sampling, *,
                 deadline: float | None = None) -> AsyncIterator[Chunk]:
        """See :class:`~agent.llm.types.LanguageModel`.  A request the model cannot take
        raises ``InferenceError`` here, before any stream exists; ``CapacityError`` comes from
        the stream's first step (after the bounded wait for budget)."""
        if self._batcher.closed:
            raise NotFoundError(f"model {self.card.name} was unloaded")
        _check_sampling(self.card.name, sampling)
        ids = self.encode(prompt)
        new = self._max_new(len(ids), sampling.max_tokens)
        return self._stream(ids, new, _search_options(sampling), sampling.stop, deadline)

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
        row = self._batcher.row(ids, new, options, stops, deadline=deadline, asked=asked)
        try:
            self._batcher.join(row)
            sent = 0  # tokens the caller has had
            while True:
                chunk = await self._batcher.next_chunk(row, sent)
                sent += len(chunk.token_ids)
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            await self._batcher.leave(row)


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


def _search_options(s: Sampling) -> dict[str, Any]:
    """onnxruntime-genai search options for ``s``, but ``max_length`` (set per batch)."""
    if s.temperature == 0 or s.top_k == 1:
        return {"do_sample": False}
    options: dict[str, Any] = {"do_sample": True,
                               "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k}
    if s.seed is not None:
        options["random_seed"] = s.seed & 0x7FFFFFFF  # the runtime's seed is a 31-bit int
    return options
