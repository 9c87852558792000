"""Small ONNX models made on the spot with ``onnx``: for the demo, the tests and the benchmarks.

No model is downloaded: every model here is built from a few graph nodes, with an IR version
that the pinned ONNX Runtime accepts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "IR_VERSION", "OPSET", "affine_model", "identity_model", "matmul_chain_model", "save_golden",
]

IR_VERSION = 9  # newest onnx defaults to an IR newer than ONNX Runtime 1.23 reads
OPSET = 17


def _save(model: object, path: Path) -> Path:
    import onnx

    onnx.checker.check_model(model)  # type: ignore[arg-type]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())  # type: ignore[attr-defined]
    return path


def affine_model(path: Path, width: int = 4, scale: float = 2.0, bias: float = 1.0) -> Path:
    """``y = x * scale + bias`` on FP32 ``[batch, width]``: tiny, batchable."""
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])
    s = numpy_helper.from_array(np.full((width,), scale, dtype=np.float32), "scale")
    b = numpy_helper.from_array(np.full((width,), bias, dtype=np.float32), "bias")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "scale"], ["t"]), helper.make_node("Add", ["t", "bias"], ["y"])],
        "affine", [x], [y], [s, b],
    )
    return _save(helper.make_model(graph, ir_version=IR_VERSION,
                                   opset_imports=[helper.make_opsetid("", OPSET)]), path)


def matmul_chain_model(path: Path, width: int = 512, depth: int = 8, seed: int = 0) -> Path:
    """``depth`` dense layers of ``width`` x ``width`` with tanh: compute-heavy and batchable."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])
    nodes, inits, prev = [], [], "x"
    for i in range(depth):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        out = "y" if i == depth - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [out]))
        prev = out
    graph = helper.make_graph(nodes, "matmul_chain", [x], [y], inits)
    return _save(helper.make_model(graph, ir_version=IR_VERSION,
                                   opset_imports=[helper.make_opsetid("", OPSET)]), path)


def identity_model(path: Path, onnx_type: int, shape: list[int | str] | None = None) -> Path:
    """``out = Identity(inp)`` for one tensor type (``onnx.TensorProto.*``): datatype tests."""
    from onnx import helper

    dims = shape or ["batch", 3]
    inp = helper.make_tensor_value_info("inp", onnx_type, dims)
    out = helper.make_tensor_value_info("out", onnx_type, dims)
    graph = helper.make_graph([helper.make_node("Identity", ["inp"], ["out"])], "identity", [inp], [out])
    return _save(helper.make_model(graph, ir_version=IR_VERSION,
                                   opset_imports=[helper.make_opsetid("", OPSET)]), path)


def save_golden(
    path: Path,
    inputs: dict[str, np.ndarray[Any, Any]],
    outputs: dict[str, np.ndarray[Any, Any]] | None = None,
) -> Path:
    """Write one golden case as the .npz that ``appliance bundle create --golden`` reads."""
    arrays = {f"inputs/{k}": v for k, v in inputs.items()}
    arrays |= {f"outputs/{k}": v for k, v in (outputs or {}).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]
    return path
