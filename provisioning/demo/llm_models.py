"""Tiny generative models made on the spot: a decoder LLM and a text encoder, with a BPE
tokenizer trained here.  For the tests, the demo and the benchmarks; no weights are fetched.

The decoder is written with plain ONNX operators in the layout onnxruntime-genai loads for a
decoder-only model: inputs ``input_ids``, ``attention_mask`` and ``past_key_values.N.key/value``
(``[batch, heads, past, head_size]``), outputs ``logits`` and ``present.N.key/value``, the KV
cache grown by ``Concat`` (so ``past_present_share_buffer`` is false in ``genai_config.json``).
Positions come from the attention mask (cumulative sum), so no ``position_ids`` input is needed.

Everything is seeded: the same arguments give the same bytes, which the bundle tests rely on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from provisioning.demo.models import IR_VERSION, OPSET

__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "TEXT",
    "DecoderShape",
    "train_tokenizer",
    "write_decoder",
    "write_encoder",
]

# Text the tokenizer learns its merges from (and the words the models can spell).
TEXT = """\
The appliance keeps its models on the node and answers the fleet over mutual TLS.
Every bundle is signed, every member is hashed, and nothing unverified is loaded.
A site owns its keys, its registry and its hardware; updates come on a stick or a local server.
The quick brown fox jumps over the lazy dog while the operator signs a release.
Tokens stream back one by one; a client that leaves frees its sequence and its cache.
"""

EOS = "<|endoftext|>"
SPECIAL_TOKENS = (EOS, "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

# A Jinja chat template in the Hugging Face convention (tokenizer_config.json "chat_template").
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(folder: Path, vocab_size: int = 320, context_length: int = 256) -> int:
    """Train a byte-level BPE tokenizer on :data:`TEXT`; write ``tokenizer.json`` and
    ``tokenizer_config.json`` (with :data:`CHAT_TEMPLATE`) into ``folder``.  Returns the
    vocabulary size actually reached."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TEXT.splitlines(), trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(tok.to_str(pretty=False))
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": EOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS,
        "add_bos_token": False, "add_prefix_space": False,
        "model_max_length": context_length,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    return int(tok.get_vocab_size())


@dataclass(frozen=True)
class DecoderShape:
    """Sizes of the tiny decoder.  ``activation`` is the FFN's: ``relu`` (the default, which
    the recorded fixtures were made with) or ``gelu`` (GPT-2's, tanh form: the benchmark
    writes the same weights for llama.cpp's gpt2 architecture, which has GELU built in)."""

    layers: int = 2
    hidden: int = 64
    heads: int = 4
    context_length: int = 256
    ffn: int = 128
    activation: Literal["relu", "gelu"] = "relu"


class _Graph:
    """Collects nodes and initializers; names are generated, weights seeded."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._n = 0

    def weight(self, name: str, shape: tuple[int, ...], scale: float | None = None) -> str:
        from onnx import numpy_helper

        std = scale if scale is not None else 1.0 / np.sqrt(shape[0])
        self.inits.append(numpy_helper.from_array(
            (self.rng.standard_normal(shape) * std).astype(np.float32), name))
        return name

    def const(self, name: str, value: Any, dtype: Any = np.int64) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs: Any) -> Any:
        from onnx import helper

        self._n += 1
        outs = [f"{op_type.lower()}_{self._n}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"n{self._n}", **attrs))
        return outs[0] if n_out == 1 else outs

    def named(self, op_type: str, inputs: list[str], output: str, **attrs: Any) -> str:
        from onnx import helper

        self._n += 1
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=f"n{self._n}", **attrs))
        return output

    def layer_norm(self, x: str, width: int, prefix: str) -> str:
        scale = self.const(f"{prefix}.ln_scale", np.ones(width), np.float32)
        bias = self.const(f"{prefix}.ln_bias", np.zeros(width), np.float32)
        out: str = self.op("LayerNormalization", [x, scale, bias], axis=-1, epsilon=1e-5)
        return out


def _heads(g: _Graph, x: str, shape: DecoderShape) -> str:
    """[B, S, E] -> [B, H, S, D]."""
    head = shape.hidden // shape.heads
    split = g.op("Reshape", [x, g.const(f"shape_heads_{g._n}", [0, 0, shape.heads, head])])
    out: str = g.op("Transpose", [split], perm=[0, 2, 1, 3])
    return out


def _attention(g: _Graph, h: str, i: int, mask4: str, shape: DecoderShape) -> str:
    e = shape.hidden
    q = _heads(g, g.op("MatMul", [h, g.weight(f"l{i}.wq", (e, e))]), shape)
    k = _heads(g, g.op("MatMul", [h, g.weight(f"l{i}.wk", (e, e))]), shape)
    v = _heads(g, g.op("MatMul", [h, g.weight(f"l{i}.wv", (e, e))]), shape)
    k_all = g.named("Concat", [f"past_key_values.{i}.key", k], f"present.{i}.key", axis=2)
    v_all = g.named("Concat", [f"past_key_values.{i}.value", v], f"present.{i}.value", axis=2)
    scale = g.const(f"l{i}.scale", 1.0 / np.sqrt(e // shape.heads), np.float32)
    scores = g.op("Mul", [g.op("MatMul", [q, g.op("Transpose", [k_all], perm=[0, 1, 3, 2])]), scale])
    masked = g.op("Where", [mask4, scores, g.const(f"l{i}.neg", -1e9, np.float32)])
    ctx = g.op("MatMul", [g.op("Softmax", [masked], axis=-1), v_all])
    merged = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]),
                              g.const(f"l{i}.merge", [0, 0, e])])
    out: str = g.op("MatMul", [merged, g.weight(f"l{i}.wo", (e, e))])
    return out


def _mask(g: _Graph) -> tuple[str, str]:
    """Positions of the new tokens ([B, S], from the attention mask) and the boolean
    attention mask [B, 1, S, T]: causal, and never onto padding."""
    one = g.const("one", 1)
    zero = g.const("zero", 0)
    seq = g.op("Gather", [g.op("Shape", ["input_ids"]), one], axis=0)  # S
    total = g.op("Gather", [g.op("Shape", ["attention_mask"]), one], axis=0)  # T
    past = g.op("Sub", [total, seq])
    cum = g.op("Sub", [g.op("CumSum", ["attention_mask", one]), one])
    axis1 = g.const("axis1", [1])
    start = g.op("Unsqueeze", [g.op("Neg", [seq]), g.const("axis0", [0])])
    big = g.const("big", [1 << 30])
    positions = g.op("Max", [g.op("Slice", [cum, start, big, axis1]), zero])
    key_idx = g.op("Range", [zero, total, one])  # [T]
    query_idx = g.op("Unsqueeze", [g.op("Range", [past, total, one]), axis1])  # [S, 1]
    causal = g.op("LessOrEqual", [key_idx, query_idx])  # [S, T]
    keep = g.op("Cast", [g.op("Unsqueeze", ["attention_mask", g.const("axes12", [1, 2])])],
                to=9)  # BOOL, [B, 1, 1, T]
    return positions, g.op("And", [causal, keep])


def _gelu_tanh(g: _Graph, x: str, prefix: str) -> str:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), from opset-17 operators (ONNX's
    ``Gelu`` op needs opset 20)."""
    cube = g.op("Mul", [g.op("Mul", [x, x]), x])
    inner = g.op("Add", [x, g.op("Mul", [cube, g.const(f"{prefix}.gelu.c", 0.044715, np.float32)])])
    t = g.op("Tanh", [g.op("Mul", [inner, g.const(f"{prefix}.gelu.k", np.sqrt(2 / np.pi), np.float32)])])
    half_x = g.op("Mul", [x, g.const(f"{prefix}.gelu.half", 0.5, np.float32)])
    out: str = g.op("Mul", [half_x, g.op("Add", [t, g.const(f"{prefix}.gelu.one", 1.0, np.float32)])])
    return out


def _ffn_activation(g: _Graph, x: str, shape: DecoderShape, prefix: str) -> str:
    if shape.activation == "gelu":
        return _gelu_tanh(g, x, prefix)
    out: str = g.op("Relu", [x])
    return out


def _decoder_graph(shape: DecoderShape, vocab: int, seed: int) -> Any:
    from onnx import TensorProto, helper

    g = _Graph(seed)
    e, head = shape.hidden, shape.hidden // shape.heads
    positions, mask4 = _mask(g)
    x = g.op("Add", [g.op("Gather", [g.weight("embed", (vocab, e), 1.0), "input_ids"]),
                     g.op("Gather", [g.weight("pos_embed", (shape.context_length, e), 0.3), positions])])
    for i in range(shape.layers):
        x = g.op("Add", [x, _attention(g, g.layer_norm(x, e, f"l{i}.attn"), i, mask4, shape)])
        up = _ffn_activation(g, g.op("MatMul", [g.layer_norm(x, e, f"l{i}.ffn"),
                                                g.weight(f"l{i}.w1", (e, shape.ffn))]), shape, f"l{i}")
        x = g.op("Add", [x, g.op("MatMul", [up, g.weight(f"l{i}.w2", (shape.ffn, e))])])
    g.named("MatMul", [g.layer_norm(x, e, "final"), g.weight("lm_head", (e, vocab), 0.5)], "logits")
    kv: list[str | int | None] = ["batch", shape.heads, "past", head]
    kv_out: list[str | int | None] = ["batch", shape.heads, "total", head]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])]
    for i in range(shape.layers):
        for part in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{part}",
                                                        TensorProto.FLOAT, kv))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{part}", TensorProto.FLOAT, kv_out))
    return helper.make_graph(g.nodes, "tiny-decoder", inputs, outputs, g.inits)


def _save_external(model: Any, folder: Path, filename: str) -> None:
    """Save with every weight in ``filename + '.data'`` (the layout of real exports)."""
    import onnx

    onnx.checker.check_model(model)
    data = folder / f"{filename}.data"
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(model, str(folder / filename), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=f"{filename}.data", size_threshold=1024)


def write_decoder(folder: Path, shape: DecoderShape = DecoderShape(), seed: int = 0) -> Path:
    """Write a tiny decoder model folder for onnxruntime-genai: ``model.onnx`` (+ ``.data``),
    ``genai_config.json``, ``tokenizer.json``, ``tokenizer_config.json``.  Returns ``folder``."""
    from onnx import helper

    vocab = train_tokenizer(folder, context_length=shape.context_length)
    graph = _decoder_graph(shape, vocab, seed)
    model = helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="sovereign-appliance")
    _save_external(model, folder, "model.onnx")
    eos = SPECIAL_TOKENS.index(EOS)
    config = {
        "model": {
            "type": "llama",
            "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos,
            "context_length": shape.context_length,
            "vocab_size": vocab,
            "decoder": {
                "filename": "model.onnx",
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": shape.hidden // shape.heads,
                "hidden_size": shape.hidden,
                "num_attention_heads": shape.heads,
                "num_key_value_heads": shape.heads,
                "num_hidden_layers": shape.layers,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "max_length": shape.context_length, "num_beams": 1,
                   "past_present_share_buffer": False, "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }
    (folder / "genai_config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    return folder


def write_encoder(folder: Path, shape: DecoderShape = DecoderShape(layers=1), seed: int = 1) -> Path:
    """Write a tiny text encoder folder: ``model.onnx`` (+ ``.data``: input_ids, attention_mask
    -> last_hidden_state ``[batch, seq, hidden]``), ``tokenizer.json``, ``tokenizer_config.json``.
    Pooling and normalisation are the server's job.  Returns ``folder``."""
    from onnx import TensorProto, helper

    vocab = train_tokenizer(folder, context_length=shape.context_length)
    g = _Graph(seed)
    e = shape.hidden
    zero = g.const("zero", 0)
    one = g.const("one", 1)
    positions = g.op("Max", [g.op("Sub", [g.op("CumSum", ["attention_mask", one]), one]), zero])
    x = g.op("Add", [g.op("Gather", [g.weight("embed", (vocab, e), 1.0), "input_ids"]),
                     g.op("Gather", [g.weight("pos_embed", (shape.context_length, e), 0.3), positions])])
    for i in range(shape.layers):
        norm = g.layer_norm(x, e, f"l{i}")
        up = g.op("Tanh", [g.op("MatMul", [norm, g.weight(f"l{i}.w1", (e, shape.ffn))])])
        x = g.op("Add", [x, g.op("MatMul", [up, g.weight(f"l{i}.w2", (shape.ffn, e))])])
    g.named("LayerNormalization", [x, g.const("final.s", np.ones(e), np.float32),
                                   g.const("final.b", np.zeros(e), np.float32)],
            "last_hidden_state", axis=-1)
    graph = helper.make_graph(
        g.nodes, "tiny-encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", e])],
        g.inits)
    model = helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="sovereign-appliance")
    _save_external(model, folder, "model.onnx")
    return folder
