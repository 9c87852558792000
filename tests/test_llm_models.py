"""The tiny decoder computes a GPT-2-shaped block, with the FFN activation asked for.

A numpy forward pass over the ONNX file's own weights is the reference: the benchmark against
llama.cpp (bench/llm_peer.py) writes those weights for llama.cpp's gpt2 architecture, which is
only a fair comparison if the graph is that architecture.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from provisioning.demo.llm_models import DecoderShape, write_decoder

SHAPE = DecoderShape(layers=2, hidden=32, heads=4, ffn=64, context_length=64)


def _norm(x: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    return np.asarray((x - mean) / np.sqrt(x.var(-1, keepdims=True) + 1e-5))


def _gelu(x: np.ndarray) -> np.ndarray:
    return np.asarray(0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))))


def _reference(w: dict[str, np.ndarray], ids: list[int], shape: DecoderShape) -> np.ndarray:
    """Logits of a pre-LayerNorm GPT-2 block stack (unit LayerNorm weights, no biases)."""
    s, h = len(ids), shape.heads
    d = shape.hidden // h
    x = w["embed"][ids] + w["pos_embed"][np.arange(s)]
    causal = np.tril(np.ones((s, s), dtype=bool))
    act = _gelu if shape.activation == "gelu" else (lambda v: np.maximum(v, 0))
    for i in range(shape.layers):
        n = _norm(x)
        q, k, v = ((n @ w[f"l{i}.{m}"]).reshape(s, h, d).transpose(1, 0, 2) for m in ("wq", "wk", "wv"))
        scores = np.where(causal, q @ k.transpose(0, 2, 1) / np.sqrt(d), -1e9)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        ctx = (p / p.sum(-1, keepdims=True)) @ v
        x = x + ctx.transpose(1, 0, 2).reshape(s, shape.hidden) @ w[f"l{i}.wo"]
        x = x + act(_norm(x) @ w[f"l{i}.w1"]) @ w[f"l{i}.w2"]
    return np.asarray(_norm(x) @ w["lm_head"])


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_decoder_is_the_gpt2_block(tmp_path: Path, activation: str) -> None:
    shape = DecoderShape(**{**SHAPE.__dict__, "activation": activation})
    folder = write_decoder(tmp_path / "m", shape)
    model = onnx.load(str(folder / "model.onnx"))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    ids = [7, 42, 99, 5, 300, 17]
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
    empty = np.zeros((1, shape.heads, 0, shape.hidden // shape.heads), np.float32)
    for i in range(shape.layers):
        feeds[f"past_key_values.{i}.key"] = feeds[f"past_key_values.{i}.value"] = empty
    logits = sess.run(["logits"], feeds)[0][0]
    np.testing.assert_allclose(logits, _reference(weights, ids, shape), rtol=1e-4, atol=1e-4)


def test_gelu_is_a_different_model_and_relu_stays_the_default(tmp_path: Path) -> None:
    """The default graph is unchanged by the option (recorded golden ids depend on its bytes)."""
    relu = write_decoder(tmp_path / "a", SHAPE)
    explicit = write_decoder(tmp_path / "b", DecoderShape(**{**SHAPE.__dict__, "activation": "relu"}))
    gelu = write_decoder(tmp_path / "c", DecoderShape(**{**SHAPE.__dict__, "activation": "gelu"}))

    def digest(folder: Path) -> str:
        return hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()

    assert digest(relu) == digest(explicit)
    assert digest(relu) != digest(gelu)
    assert not any(n.op_type == "Tanh" for n in onnx.load(str(relu / "model.onnx")).graph.node)
