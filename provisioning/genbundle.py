"""Creating generative bundles (an LLM folder or a text-encoder folder) on the release
engineer's machine.

The folder is checked as a node would check it, opened on the same runtime, and its golden
cases are recorded by running it (greedy token ids of fixed prompts; embedding vectors of
fixed texts); the bundle file then appears atomically, and is read back and verified.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from agent.errors import BundleError
from agent.fsutil import atomic_write
from agent.llm.bundle import (
    GenManifest,
    GoldenEmbedding,
    GoldenPrompt,
    Kind,
    LlmLimits,
    Walked,
    extract_bundle_hashed,
    folder_files,
    parse_gen_manifest,
    verify_bundle,
    write_bundle,
)
from agent.llm.embedding import OrtEmbeddingModel
from agent.llm.engine import GenaiLanguageModel
from agent.llm.folder import GENAI_CONFIG, check_llm_folder
from agent.llm.installed import check_golden, open_model, record_golden_embeddings, record_golden_prompts

__all__ = ["DEFAULT_PROMPTS", "DEFAULT_TEXTS", "create_generative_bundle", "llm_context_length",
           "model_size", "verify_generative_bundle"]

DEFAULT_PROMPTS = ("The appliance keeps", "<|user|>Hello<|end|><|assistant|>")
DEFAULT_TEXTS = ("a signed model bundle", "the quick brown fox")
_DTYPE_NAMES = {1: "fp32", 10: "fp16", 16: "bf16", 3: "int8", 2: "uint8", 22: "int4", 21: "uint4"}


def model_size(graph: Path) -> tuple[int, str]:
    """(parameter count, dominant weight type such as ``fp16`` or ``int4``) of an ONNX graph,
    read without loading its external data."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    counts: Counter[str] = Counter()
    for t in model.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        counts[_DTYPE_NAMES.get(t.data_type, f"type{t.data_type}")] += n
    total = sum(counts.values())
    return total, (counts.most_common(1)[0][0] if counts else "")


def create_generative_bundle(folder: Path, out: Path, *, kind: Kind, name: str, version: str,
                             context_length: int, max_tokens: int, kv_budget_tokens: int,
                             graph: str = "", prompts: Sequence[str] = DEFAULT_PROMPTS,
                             golden_tokens: int = 16, texts: Sequence[str] = DEFAULT_TEXTS,
                             atol: float = 1e-4, description: str = "") -> GenManifest:
    """Bundle a model folder into ``out``; returns the manifest written.

    ``graph`` defaults to the genai_config's decoder filename (LLM) or ``model.onnx``.

    Raises:
        BundleError, VerificationError: the folder or the limits are refused, the model does
            not load, or the written file does not verify (nothing is left at ``out``).
    """
    files = folder_files(folder)
    if kind == "llm" and not graph:
        graph = check_llm_folder(folder, files, str(folder)).graph
    graph = graph or "model.onnx"
    if kind == "embedding" and GENAI_CONFIG in files:
        raise BundleError(f"{folder}: holds {GENAI_CONFIG}: an LLM folder, not a text encoder")
    parameters, quantisation = model_size(folder / graph) if graph in files else (0, "")
    limits = LlmLimits(context_length, max_tokens, kv_budget_tokens)
    draft = GenManifest(kind, name, version, files, graph, limits, parameters, quantisation,
                        description=description, atol=atol)
    _check_draft(draft)
    model = open_model(folder, draft, time.time())
    try:
        if isinstance(model, GenaiLanguageModel):
            n = min(golden_tokens, max_tokens)
            manifest = replace(draft, golden_prompts=record_golden_prompts(model, prompts, n))
        else:
            assert isinstance(model, OrtEmbeddingModel)
            manifest = replace(draft, golden_embeddings=record_golden_embeddings(model, texts))
    finally:
        model.close()
    _check_draft(manifest)
    with atomic_write(out) as handle:
        write_bundle(handle, manifest, folder)
    try:
        verify_bundle(out)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return manifest


def _check_draft(manifest: GenManifest) -> None:
    """The manifest as a node would parse it (limits, names, sizes); a golden-less draft is
    checked with a placeholder case."""
    probe = manifest
    if not manifest.golden_prompts and not manifest.golden_embeddings:
        probe = replace(manifest, golden_prompts=(GoldenPrompt("x", (0,)),),
                        golden_embeddings=(GoldenEmbedding("x", (0.0,)),))
    parse_gen_manifest(probe.canonical(), f"{manifest.name} {manifest.version}: manifest")


def llm_context_length(folder: Path) -> int:
    """The context length an LLM folder's genai_config.json declares.

    Raises:
        BundleError: the folder is refused.
    """
    # Names only: hashing gigabytes of weights is create_generative_bundle's job, done once there.
    return check_llm_folder(folder, [p.name for p in folder.iterdir()], str(folder)).context_length


def verify_generative_bundle(path: Path) -> Walked:
    """Check every member of a bundle file, then open its model as a node would and run its
    golden check.  The manifest comes with the sha256 and length of the file, taken in the
    same single read as the members' hashes.

    Raises:
        NotFoundError, BundleError, VerificationError.
    """
    with tempfile.TemporaryDirectory(prefix="genbundle-") as tmp:
        walked = extract_bundle_hashed(path, Path(tmp))
        model = open_model(Path(tmp), walked.manifest, time.time())
        try:
            check_golden(model, walked.manifest)
        finally:
            model.close()
    return walked
