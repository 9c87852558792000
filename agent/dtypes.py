"""The one table of tensor datatypes: KServe v2 name, numpy dtype, ONNX Runtime type string."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DTYPES", "Dtype", "by_kserve", "by_onnx"]


@dataclass(frozen=True)
class Dtype:
    kserve: str  # name on the wire (KServe v2 / Triton): "FP32", "BYTES", ...
    onnx: str  # ONNX Runtime's NodeArg.type: "tensor(float)"
    numpy: np.dtype[np.generic]  # object dtype for BYTES
    size: int  # bytes per element in raw contents; 0 for variable-size (BYTES)


def _d(kserve: str, onnx: str, np_type: type[np.generic] | str, size: int) -> Dtype:
    return Dtype(kserve, onnx, np.dtype(np_type), size)


DTYPES: tuple[Dtype, ...] = (
    _d("BOOL", "tensor(bool)", np.bool_, 1),
    _d("UINT8", "tensor(uint8)", np.uint8, 1),
    _d("UINT16", "tensor(uint16)", np.uint16, 2),
    _d("UINT32", "tensor(uint32)", np.uint32, 4),
    _d("UINT64", "tensor(uint64)", np.uint64, 8),
    _d("INT8", "tensor(int8)", np.int8, 1),
    _d("INT16", "tensor(int16)", np.int16, 2),
    _d("INT32", "tensor(int32)", np.int32, 4),
    _d("INT64", "tensor(int64)", np.int64, 8),
    _d("FP16", "tensor(float16)", np.float16, 2),
    _d("FP32", "tensor(float)", np.float32, 4),
    _d("FP64", "tensor(double)", np.float64, 8),
    _d("BYTES", "tensor(string)", np.object_, 0),
)

_BY_KSERVE = {d.kserve: d for d in DTYPES}
_BY_ONNX = {d.onnx: d for d in DTYPES}


def by_kserve(name: str) -> Dtype:
    """Look a datatype up by its KServe name. Raises KeyError naming the unknown type."""
    try:
        return _BY_KSERVE[name]
    except KeyError:
        raise KeyError(f"unknown datatype {name!r} (known: {', '.join(_BY_KSERVE)})") from None


def by_onnx(name: str) -> Dtype:
    """Look a datatype up by ONNX Runtime's type string. Raises KeyError if unsupported."""
    try:
        return _BY_ONNX[name]
    except KeyError:
        raise KeyError(f"unsupported ONNX type {name!r}") from None
