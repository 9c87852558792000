"""A generative bundle's folder opened as a served model, and its golden check.

The golden check runs on the very model object that will serve: an LLM must reproduce the
recorded token ids of every golden prompt decoded greedily, an encoder the recorded vectors
within the manifest's ``atol``.  Anything else is refused before the model is served.
Blocking: callers run these off the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from agent.errors import ApplianceError, BundleError
from agent.llm.bundle import GenManifest, GoldenEmbedding, GoldenPrompt
from agent.llm.embedding import OrtEmbeddingModel
from agent.llm.engine import GenaiLanguageModel, Limits
from agent.llm.load import load_embedding_model, load_language_model
from agent.llm.types import ModelCard

__all__ = ["GenerativeModel", "card_of", "check_golden", "open_model", "record_golden_embeddings",
           "record_golden_prompts"]

GenerativeModel = GenaiLanguageModel | OrtEmbeddingModel


def card_of(manifest: GenManifest, created: float) -> ModelCard:
    return ModelCard(manifest.name, manifest.version, manifest.kind, manifest.limits.context_length,
                     manifest.parameters, manifest.quantisation, int(created))


def open_model(folder: Path, manifest: GenManifest, created: float, *, providers: Sequence[str] = (),
               intra_op_threads: int = 0) -> GenerativeModel:
    """Open the model of an extracted bundle (its files exactly the manifest's members).

    Raises:
        BundleError: the folder is refused or cannot be loaded.
    """
    card = card_of(manifest, created)
    if manifest.kind == "llm":
        lim = manifest.limits
        return load_language_model(folder, manifest.members, card,
                                   Limits(lim.context_length, lim.max_tokens, lim.kv_budget_tokens),
                                   providers=providers, intra_op_threads=intra_op_threads)
    return load_embedding_model(folder, manifest.members, manifest.graph, card, providers=providers,
                                intra_op_threads=intra_op_threads)


def record_golden_prompts(model: GenaiLanguageModel, prompts: Sequence[str],
                          tokens: int) -> tuple[GoldenPrompt, ...]:
    """Greedy token ids of each prompt (operator side, when a bundle is made)."""
    return tuple(GoldenPrompt(p, tuple(model.greedy(p, tokens))) for p in prompts)


def record_golden_embeddings(model: OrtEmbeddingModel,
                             texts: Sequence[str]) -> tuple[GoldenEmbedding, ...]:
    vectors = model.embed_sync(list(texts)).vectors
    return tuple(GoldenEmbedding(t, v) for t, v in zip(texts, vectors, strict=True))


def check_golden(model: GenerativeModel, manifest: GenManifest) -> None:
    """Raises BundleError when a golden case does not reproduce on ``model``."""
    origin = f"{manifest.name} {manifest.version}"
    if isinstance(model, GenaiLanguageModel):
        for i, case in enumerate(manifest.golden_prompts):
            try:
                got = tuple(model.greedy(case.prompt, len(case.token_ids)))
            except ApplianceError as exc:
                raise BundleError(f"{origin}: golden prompt {i}: {exc}") from None
            if got != case.token_ids:
                at = next((j for j, (a, b) in enumerate(zip(got, case.token_ids, strict=False)) if a != b),
                          min(len(got), len(case.token_ids)))
                raise BundleError(f"{origin}: golden prompt {i}: greedy decoding gave token "
                                  f"{got[at] if at < len(got) else 'end'} at position {at}, the bundle "
                                  f"recorded {case.token_ids[at] if at < len(case.token_ids) else 'end'}; "
                                  "refused")
        return
    texts = [g.text for g in manifest.golden_embeddings]
    try:
        vectors = np.array(model.embed_sync(texts).vectors)
    except ApplianceError as exc:
        raise BundleError(f"{origin}: golden embeddings: {exc}") from None
    want = np.array([g.vector for g in manifest.golden_embeddings])
    if vectors.shape != want.shape:
        raise BundleError(f"{origin}: golden embeddings have shape {list(want.shape)}, the model "
                          f"gives {list(vectors.shape)}; refused")
    diff = float(np.max(np.abs(vectors - want)))
    if not diff <= manifest.atol:
        raise BundleError(f"{origin}: golden embeddings differ by up to {diff:.3g} (atol "
                          f"{manifest.atol:g}); refused")
