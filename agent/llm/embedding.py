"""A text encoder served for embeddings: the :class:`~agent.llm.types.EmbeddingModel`.

The bundle holds an ONNX encoder (``input_ids``, ``attention_mask`` -> ``last_hidden_state``
``[batch, seq, hidden]``) and a Hugging Face ``tokenizer.json``; the vector of a text is the
mean of its tokens' hidden states (padding left out), scaled to unit length, so that a dot
product is the cosine similarity.  The session is an ordinary ONNX Runtime session made by
:func:`agent.ort.make_session`, which refuses a model reading files outside its bundle.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.errors import InferenceError
from agent.llm.types import Embeddings, ModelCard

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["MAX_TEXTS", "OrtEmbeddingModel"]

MAX_TEXTS = 256  # texts per request: each is a row of one batch


class OrtEmbeddingModel:
    def __init__(self, session: Any, tokenizer: Tokenizer, card: ModelCard) -> None:
        self.card = card
        self._session = session
        self._tokenizer = tokenizer
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()

    def close(self) -> None:
        """Nothing to free beyond the session (dropped with this object)."""

    async def embed(self, texts: Sequence[str]) -> Embeddings:
        rows = self._encode(texts)
        vectors = await asyncio.get_running_loop().run_in_executor(None, self._run, rows)
        return _embeddings(vectors, rows)

    def embed_sync(self, texts: Sequence[str]) -> Embeddings:
        """:meth:`embed` in the calling thread (golden checks, which run off the loop)."""
        rows = self._encode(texts)
        return _embeddings(self._run(rows), rows)

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        name = self.card.name
        if not texts or len(texts) > MAX_TEXTS:
            raise InferenceError(f"model {name}: input takes 1..{MAX_TEXTS} texts, got {len(texts)}")
        rows = [list(e.ids) for e in self._tokenizer.encode_batch(list(texts))]
        for i, ids in enumerate(rows):
            if not ids:
                raise InferenceError(f"model {name}: input[{i}] is empty")
            if len(ids) > self.card.context_length:
                raise InferenceError(f"model {name}: input[{i}] is {len(ids)} tokens; the context "
                                     f"length is {self.card.context_length}")
        return rows

    def _run(self, rows: list[list[int]]) -> np.ndarray[Any, Any]:
        width = max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
            mask[i, :len(r)] = 1
        (hidden,) = self._session.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})
        return pool_and_normalise(np.asarray(hidden, dtype=np.float32), mask)


def _embeddings(vectors: np.ndarray[Any, Any], rows: list[list[int]]) -> Embeddings:
    return Embeddings(tuple(tuple(float(x) for x in v) for v in vectors), sum(len(r) for r in rows))


def pool_and_normalise(hidden: np.ndarray[Any, Any], mask: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Mean over the unmasked tokens of ``hidden [batch, seq, width]``, each row L2-normalised
    (a zero vector stays zero)."""
    weights = mask[:, :, None].astype(np.float32)
    summed = (hidden * weights).sum(axis=1)
    mean = summed / np.maximum(weights.sum(axis=1), 1.0)
    norm = np.linalg.norm(mean, axis=1, keepdims=True)
    result: np.ndarray[Any, Any] = mean / np.where(norm > 0, norm, 1.0)
    return result
