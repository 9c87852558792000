"""The generative models being served: the :class:`~agent.llm.types.GenerativeModels` the front
ends ask.  The model repository adds a model after its bundle passed verification and its
golden check, replaces it on an update or rollback, and removes it on unload; lookups are
safe from any thread.

A front end looks a model up once per request and keeps that object for the request's whole
stream, so a replaced model keeps serving the streams it had: :func:`drain_generative` waits
for them before the replaced model is closed.
"""

from __future__ import annotations

import asyncio
import threading
import time

from agent.errors import NotFoundError, echo
from agent.llm.embedding import OrtEmbeddingModel
from agent.llm.engine import GenaiLanguageModel
from agent.llm.types import ModelCard

__all__ = ["ServedGenerative", "drain_generative"]

DRAIN_POLL_S = 0.02

_Model = GenaiLanguageModel | OrtEmbeddingModel


async def drain_generative(model: _Model, within_s: float) -> bool:
    """Wait until no sequence runs on ``model`` (at most ``within_s`` seconds); whether it drained.

    A language model's sequences hold its KV budget from before their first step to their end,
    and a request waiting for budget is granted (and counted) in the same step that frees it,
    so none active means none in flight.  An embedding request holds no state beyond its call: an
    encoder drains at once.
    """
    if not isinstance(model, GenaiLanguageModel):
        return True
    deadline = time.monotonic() + within_s
    while True:
        # One turn of the loop first: a request that looked the model up just before it was
        # replaced starts its sequence without awaiting anything else.
        await asyncio.sleep(0)
        if model.active_sequences == 0:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(min(DRAIN_POLL_S, max(0.0, deadline - time.monotonic())))


class ServedGenerative:
    def __init__(self) -> None:
        self._models: dict[str, GenaiLanguageModel | OrtEmbeddingModel] = {}
        self._lock = threading.Lock()

    def add(self, model: GenaiLanguageModel | OrtEmbeddingModel) -> None:
        """Serve ``model`` under its card's name, replacing (and closing) one of that name."""
        old = self.replace(model)
        if old is not None and old is not model:
            old.close()

    def replace(self, model: _Model) -> _Model | None:
        """Serve ``model`` under its card's name at once; return the model it replaces, still
        open (the caller drains and closes it), or None."""
        with self._lock:
            old = self._models.get(model.card.name)
            self._models[model.card.name] = model
        return old

    def remove(self, name: str) -> bool:
        """Stop serving ``name``; False when it was not served."""
        with self._lock:
            model = self._models.pop(name, None)
        if model is None:
            return False
        model.close()
        return True

    def _get(self, name: str, kind: str) -> GenaiLanguageModel | OrtEmbeddingModel:
        model = self._models.get(name)
        if model is None or model.card.kind != kind:
            served = ", ".join(sorted(n for n, m in self._models.items() if m.card.kind == kind))
            raise NotFoundError(f"unknown {'language' if kind == 'llm' else 'embedding'} model "
                                f"{echo(name)} (served: {served or 'none'})")
        return model

    def language_model(self, name: str) -> GenaiLanguageModel:
        model = self._get(name, "llm")
        assert isinstance(model, GenaiLanguageModel)
        return model

    def embedding_model(self, name: str) -> OrtEmbeddingModel:
        model = self._get(name, "embedding")
        assert isinstance(model, OrtEmbeddingModel)
        return model

    def cards(self) -> list[ModelCard]:
        return sorted((m.card for m in list(self._models.values())), key=lambda c: c.name)
