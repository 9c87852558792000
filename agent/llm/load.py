"""Opening a checked generative model folder as a served model (blocking; run off the loop)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

from agent.errors import BundleError
from agent.llm.embedding import OrtEmbeddingModel
from agent.llm.engine import GenaiLanguageModel, Limits, open_genai_model
from agent.llm.folder import TOKENIZER, check_encoder_folder, check_llm_folder
from agent.llm.types import ModelCard
from agent.ort import make_session

__all__ = ["load_embedding_model", "load_language_model"]


def load_language_model(folder: Path, members: Collection[str], card: ModelCard, limits: Limits, *,
                        providers: Sequence[str] = (), intra_op_threads: int = 0,
                        decode_threads: int = 0) -> GenaiLanguageModel:
    """Check ``folder`` (exactly ``members``) and open it with onnxruntime-genai.

    Raises:
        BundleError: the folder is refused, or the runtime cannot load it, or the card's
            context length is beyond what the model's config allows.
    """
    origin = f"{card.name} {card.version}"
    facts = check_llm_folder(folder, members, origin)
    if limits.context_length > facts.context_length:
        raise BundleError(f"{origin}: context length {limits.context_length} is beyond the model's "
                          f"genai_config.json context_length {facts.context_length}")
    model = open_genai_model(folder, providers, intra_op_threads)
    return GenaiLanguageModel(model, card, limits, decode_threads=decode_threads)


def load_embedding_model(folder: Path, members: Collection[str], graph: str, card: ModelCard, *,
                         providers: Sequence[str] = (), intra_op_threads: int = 0) -> OrtEmbeddingModel:
    """Check ``folder`` (exactly ``members``) and open its encoder and tokenizer.

    Raises:
        BundleError: the folder is refused, or ONNX Runtime or the tokenizer cannot load it.
    """
    origin = f"{card.name} {card.version}"
    check_encoder_folder(folder, members, graph, origin)
    data = frozenset(members) - {graph}
    try:
        session = make_session((folder / graph).read_bytes(), model_dir=folder, data_files=data,
                               origin=f"{origin}: {graph}", providers=providers or None,
                               intra_op_threads=intra_op_threads)
        # Imported when an encoder loads: a node without one never pays for it (a second
        # of the agent's start under emulation, where the boot-times report measures it).
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(folder / TOKENIZER))
    except BundleError:
        raise
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime and tokenizers raise unrelated types
        raise BundleError(f"{origin}: cannot load the encoder or its tokenizer: {exc}") from None
    return OrtEmbeddingModel(session, tokenizer, card)
