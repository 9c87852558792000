"""The generative models being served: the :class:`~agent.llm.types.GenerativeModels` the front
ends ask.  The model repository adds a model after its bundle passed verification and its
golden check, and removes it on unload; lookups are safe from any thread.
"""

from __future__ import annotations

import threading

from agent.errors import NotFoundError, echo
from agent.llm.embedding import OrtEmbeddingModel
from agent.llm.engine import GenaiLanguageModel
from agent.llm.types import ModelCard

__all__ = ["ServedGenerative"]


class ServedGenerative:
    def __init__(self) -> None:
        self._models: dict[str, GenaiLanguageModel | OrtEmbeddingModel] = {}
        self._lock = threading.Lock()

    def add(self, model: GenaiLanguageModel | OrtEmbeddingModel) -> None:
        """Serve ``model`` under its card's name, replacing (and closing) one of that name."""
        with self._lock:
            old = self._models.get(model.card.name)
            self._models[model.card.name] = model
        if old is not None and old is not model:
            old.close()

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
