"""What a generative model folder may say, checked before any runtime opens it.

onnxruntime-genai follows ``genai_config.json`` wherever it points: the graph's ``filename``,
custom-op libraries in ``session_options``, engine-cache paths in provider options, vision and
speech sub-models of multimodal types.  ONNX Runtime then opens every external-data location
the graph names.  A signed bundle says who vouches for it, not that it is harmless, so a
config is read against an allow-list of keys (anything else is refused, naming it), the
graph must be a member of the bundle, and every external-data reference of the graph must
name a hashed member too (:func:`agent.modelrefs.check_model_files`): a model cannot make
the node read its own files.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import BundleError
from agent.modelrefs import check_model_files, safe_member_name

__all__ = ["GENAI_CONFIG", "LlmFacts", "check_encoder_folder", "check_llm_folder"]

GENAI_CONFIG = "genai_config.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
MAX_CONFIG = 1 << 20
MAX_TOKENIZER = 64 << 20  # real tokenizer.json files are tens of MB; parsed whole by the runtime
MAX_GRAPH = 2 << 30  # the graph without its weights (protobuf's own limit is 2 GiB)

# Decoder-only types of onnxruntime-genai that read nothing beyond the decoder graph.
DECODER_TYPES = frozenset({"chatglm", "ernie4_5", "gemma", "gemma2", "gemma3_text", "gpt2", "granite",
                           "llama", "mistral", "nemotron", "olmo", "phi", "phi3", "phi3small",
                           "qwen2", "qwen3", "smollm3"})
_MODEL_KEYS = {"type", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
               "decoder_start_token_id", "context_length", "vocab_size", "decoder"}
_DECODER_KEYS = {"filename", "session_options", "head_size", "hidden_size", "num_attention_heads",
                 "num_key_value_heads", "num_hidden_layers", "inputs", "outputs"}
_SESSION_KEYS = {"log_id", "provider_options", "intra_op_num_threads", "inter_op_num_threads",
                 "enable_cpu_mem_arena", "enable_mem_pattern", "graph_optimization_level"}
_PROVIDER_OPTIONS = {"enable_cuda_graph", "enable_skip_layer_norm_strict_mode", "prefer_nhwc"}
_SEARCH_KEYS = {"diversity_penalty", "do_sample", "early_stopping", "length_penalty", "max_length",
                "min_length", "no_repeat_ngram_size", "num_beams", "num_return_sequences",
                "past_present_share_buffer", "repetition_penalty", "temperature", "top_k", "top_p"}


@dataclass(frozen=True)
class LlmFacts:
    """What the server needs to know from a checked ``genai_config.json``."""

    model_type: str
    context_length: int
    vocab_size: int
    graph: str  # member name of the decoder graph


def _fail(origin: str, where: str, problem: str) -> BundleError:
    return BundleError(f"{origin}: {where}: {problem}")


def _object(value: Any, origin: str, where: str, allowed: Collection[str]) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _fail(origin, where, f"expected an object, got {type(value).__name__}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise _fail(origin, where, f"unknown key(s) {', '.join(repr(k[:64]) for k in unknown[:8])}; "
                    "refused (a key this agent does not know may name a file)")
    return value


def _int(data: Mapping[str, Any], key: str, origin: str, where: str) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise _fail(origin, f"{where}.{key}", f"expected a positive integer, got {str(value)[:40]}")
    return value


def _session_options(value: Any, origin: str) -> None:
    where = "model.decoder.session_options"
    opts = _object(value, origin, where, _SESSION_KEYS)
    providers = opts.get("provider_options", [])
    if not isinstance(providers, list):
        raise _fail(origin, f"{where}.provider_options", "expected a list")
    for i, entry in enumerate(providers):
        at = f"{where}.provider_options[{i}]"
        if not isinstance(entry, dict):
            raise _fail(origin, at, "expected an object")
        for provider, options in entry.items():
            _object(options, origin, f"{at}.{str(provider)[:32]}", _PROVIDER_OPTIONS)


def _read_json(path: Path, origin: str) -> Any:
    try:
        if path.stat().st_size > MAX_CONFIG:
            raise _fail(origin, path.name, f"over {MAX_CONFIG} bytes")
        return json.loads(path.read_bytes())
    except OSError as exc:
        raise _fail(origin, path.name, f"cannot be read ({exc.strerror})") from None
    except (ValueError, RecursionError) as exc:
        raise _fail(origin, path.name, f"not valid JSON ({str(exc)[:80]})") from None


def _check_tokenizer(folder: Path, members: Collection[str], origin: str) -> None:
    for name in (TOKENIZER, TOKENIZER_CONFIG):
        if name in members and (folder / name).stat().st_size > MAX_TOKENIZER:
            raise _fail(origin, name, f"over {MAX_TOKENIZER} bytes; refused")


def _check_graph(folder: Path, graph: str, members: Collection[str], origin: str) -> None:
    path = folder / graph
    if path.stat().st_size > MAX_GRAPH:
        raise _fail(origin, graph, f"over {MAX_GRAPH} bytes: weights belong in external data files")
    data = frozenset(members) - {graph, GENAI_CONFIG, TOKENIZER, TOKENIZER_CONFIG}
    check_model_files(path.read_bytes(), data, f"{origin}: {graph}")


def check_llm_folder(folder: Path, members: Collection[str], origin: str) -> LlmFacts:
    """Check an onnxruntime-genai decoder folder whose files are exactly ``members``.

    Raises:
        BundleError: naming ``origin``, the file, the key and the value refused.
    """
    for required in (GENAI_CONFIG, TOKENIZER, TOKENIZER_CONFIG):
        if required not in members:
            raise _fail(origin, required, "missing from the model folder")
    _check_tokenizer(folder, members, origin)
    cfg = _object(_read_json(folder / GENAI_CONFIG, origin), origin, GENAI_CONFIG, {"model", "search"})
    _object(cfg.get("search", {}), origin, "search", _SEARCH_KEYS)
    model = _object(cfg.get("model"), origin, "model", _MODEL_KEYS)
    kind = model.get("type")
    if kind not in DECODER_TYPES:
        raise _fail(origin, "model.type", f"{str(kind)[:40]!r} is not a decoder-only type this agent "
                    f"serves ({', '.join(sorted(DECODER_TYPES))})")
    decoder = _object(model.get("decoder"), origin, "model.decoder", _DECODER_KEYS)
    _session_options(decoder.get("session_options", {}), origin)
    graph = decoder.get("filename")
    if not isinstance(graph, str) or not safe_member_name(graph) or graph not in members:
        raise _fail(origin, "model.decoder.filename", f"{str(graph)[:80]!r} is not a file of the bundle")
    _check_graph(folder, graph, members, origin)
    return LlmFacts(str(kind), _int(model, "context_length", origin, "model"),
                    _int(model, "vocab_size", origin, "model"), graph)


def check_encoder_folder(folder: Path, members: Collection[str], graph: str, origin: str) -> None:
    """Check a text-encoder folder: ``graph`` and the tokenizer are members, and the graph
    reads external data only from members.

    Raises:
        BundleError: naming ``origin``, the file and what is wrong.
    """
    for required in (graph, TOKENIZER):
        if required not in members:
            raise _fail(origin, required, "missing from the model folder")
    _check_tokenizer(folder, members, origin)
    _check_graph(folder, graph, members, origin)
