"""Tensors on the wire (KServe v2): decoding request inputs, encoding response outputs.

Pure functions over the protocol's message objects: no I/O, no model state beyond the
tensor specs.  Every problem raises :class:`~agent.errors.InferenceError` naming the tensor
and what is wrong with it, so the servicer answers INVALID_ARGUMENT with a useful message.

Rules (those of the protocol and of Triton):
- an input comes as typed ``contents`` or as one entry of ``raw_input_contents``; once raw
  contents are used, every input is raw and none has typed contents;
- raw data is little-endian and row-major; BYTES elements are each a 4-byte little-endian
  length followed by the bytes;
- FP16 has no typed field: it comes raw only;
- typed INT8/INT16 and UINT8/UINT16 values travel as int32/uint32 and must fit the type.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from agent.bundle import TensorSpec
from agent.dtypes import by_kserve
from agent.errors import InferenceError, echo

__all__ = [
    "TYPED_FIELD",
    "check_requested_outputs",
    "decode_inputs",
    "deserialize_bytes",
    "encode_output",
    "serialize_bytes",
]

Array = np.ndarray[Any, Any]

# KServe datatype -> the InferTensorContents field that carries it (FP16: none, raw only).
TYPED_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_ALL_FIELDS = tuple(sorted(set(TYPED_FIELD.values())))
_LEN = struct.Struct("<I")
MAX_ELEMENTS = 1 << 40


def deserialize_bytes(raw: bytes, count: int, where: str) -> Array:
    """Split length-prefixed BYTES data into an object array of ``count`` bytes values.

    Raises:
        InferenceError: truncated data, a different element count, or trailing bytes.
    """
    items: list[bytes] = []
    view = memoryview(raw)
    pos, end = 0, len(raw)
    while pos < end:
        if pos + 4 > end:
            raise InferenceError(f"{where}: BYTES data truncated inside an element length "
                                 f"at offset {pos}")
        (length,) = _LEN.unpack_from(view, pos)
        pos += 4
        if pos + length > end:
            raise InferenceError(f"{where}: BYTES element {len(items)} declares {length} bytes, "
                                 f"only {end - pos} remain")
        items.append(bytes(view[pos:pos + length]))
        pos += length
        if len(items) > count:
            break
    if len(items) != count:
        raise InferenceError(f"{where}: raw BYTES data holds {len(items)}"
                             f"{' or more' if len(items) > count else ''} elements, "
                             f"the shape needs {count}")
    array = np.empty(count, dtype=object)
    array[:] = items
    return array


def serialize_bytes(array: Array) -> bytes:
    """Length-prefixed BYTES data of an array of bytes or str (str encoded as UTF-8)."""
    parts: list[bytes] = []
    for item in array.reshape(-1).tolist():
        data = item if isinstance(item, bytes) else str(item).encode()
        parts.append(_LEN.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def _check_shape(name: str, shape: Sequence[int], spec: TensorSpec, max_batch: int) -> int:
    """Validate ``shape`` against the spec; return the element count."""
    dims = list(shape)
    if len(dims) != len(spec.shape):
        raise InferenceError(f"input {name!r}: shape {dims} has {len(dims)} dimensions, the model "
                             f"expects {len(spec.shape)} ({list(spec.shape)})")
    for i, (got, want) in enumerate(zip(dims, spec.shape, strict=True)):
        if got < 0:
            raise InferenceError(f"input {name!r}: shape {dims}: dimension {i} is negative")
        if want not in (-1, got):
            raise InferenceError(f"input {name!r}: shape {dims}: dimension {i} is {got}, "
                                 f"the model expects {want} ({list(spec.shape)})")
    # numpy refuses shapes whose non-zero dimensions multiply past its index range, even
    # for an empty tensor; no real tensor comes near this bound.
    if math.prod(d for d in dims if d) > MAX_ELEMENTS:
        raise InferenceError(f"input {name!r}: shape {dims} is larger than {MAX_ELEMENTS} elements")
    if max_batch and dims and dims[0] > max_batch:
        raise InferenceError(f"input {name!r}: batch of {dims[0]} exceeds the model's "
                             f"max_batch_size {max_batch}")
    return math.prod(dims)


def _from_raw(name: str, datatype: str, raw: bytes, shape: Sequence[int], count: int) -> Array:
    where = f"input {name!r}"
    if datatype == "BYTES":
        return deserialize_bytes(raw, count, where).reshape(shape)
    dtype = by_kserve(datatype)
    need = count * dtype.size
    if len(raw) != need:
        raise InferenceError(f"{where}: {len(raw)} bytes of raw contents, shape {list(shape)} "
                             f"of {datatype} needs {need}")
    array = np.frombuffer(raw, dtype=dtype.numpy.newbyteorder("<")).reshape(shape)
    if datatype == "BOOL" and array.size and array.view(np.uint8).max() > 1:
        raise InferenceError(f"{where}: BOOL raw contents hold bytes other than 0 and 1")
    return array


def _from_typed(name: str, datatype: str, contents: Any, shape: Sequence[int], count: int) -> Array:
    where = f"input {name!r}"
    field = TYPED_FIELD.get(datatype)
    if field is None:
        raise InferenceError(f"{where}: {datatype} has no typed contents field; send it in "
                             f"raw_input_contents")
    for other in _ALL_FIELDS:
        if other != field and len(getattr(contents, other)):
            raise InferenceError(f"{where}: datatype {datatype} travels in {field}, "
                                 f"but {other} was given")
    values = getattr(contents, field)
    if len(values) != count:
        raise InferenceError(f"{where}: {len(values)} values in {field}, shape {list(shape)} "
                             f"needs {count}")
    dtype = by_kserve(datatype).numpy
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    wide = np.asarray(values)
    if dtype.kind in "iu" and wide.size:
        info = np.iinfo(dtype)  # type: ignore[type-var]
        if int(wide.min()) < info.min or int(wide.max()) > info.max:
            raise InferenceError(f"{where}: a value in {field} is out of range for {datatype}")
    return np.asarray(wide, dtype=dtype).reshape(shape)


def decode_inputs(request: Any, specs: Mapping[str, TensorSpec], max_batch: int = 0) -> dict[str, Array]:
    """Decode the inputs of a ModelInferRequest against the model's input specs.

    Raises:
        InferenceError: an unknown, duplicate or missing input, a wrong datatype or shape,
            contents whose size does not match the shape, or raw and typed contents mixed.
    """
    inputs = request.inputs
    raw = request.raw_input_contents
    if raw and len(raw) != len(inputs):
        raise InferenceError(f"raw_input_contents has {len(raw)} entries for {len(inputs)} inputs; "
                             "give one per input, in order")
    out: dict[str, Array] = {}
    for i, tensor in enumerate(inputs):
        name = tensor.name
        spec = specs.get(name)
        if spec is None:
            raise InferenceError(f"unknown input {echo(name)} (the model's inputs: "
                                 f"{', '.join(sorted(specs))})")
        if name in out:
            raise InferenceError(f"input {echo(name)} given twice")
        if tensor.datatype != spec.datatype:
            raise InferenceError(f"input {name!r}: datatype {tensor.datatype or '(empty)'}, "
                                 f"the model expects {spec.datatype}")
        count = _check_shape(name, tensor.shape, spec, max_batch)
        if raw:
            if tensor.HasField("contents"):
                raise InferenceError(f"input {name!r}: typed contents given together with "
                                     "raw_input_contents")
            out[name] = _from_raw(name, spec.datatype, raw[i], tensor.shape, count)
        else:
            out[name] = _from_typed(name, spec.datatype, tensor.contents, tensor.shape, count)
    missing = [n for n in specs if n not in out]
    if missing:
        raise InferenceError(f"missing input(s) {', '.join(repr(n) for n in missing)}")
    return out


def check_requested_outputs(request: Any, specs: Mapping[str, TensorSpec]) -> list[str]:
    """Names of the outputs to return (all when none are requested), in request order.

    Raises:
        InferenceError: an unknown or duplicate output name.
    """
    if not request.outputs:
        return list(specs)
    names: list[str] = []
    for out in request.outputs:
        if out.name not in specs:
            raise InferenceError(f"unknown output {echo(out.name)} requested (the model's outputs: "
                                 f"{', '.join(sorted(specs))})")
        if out.name in names:
            raise InferenceError(f"output {echo(out.name)} requested twice")
        names.append(out.name)
    return names


def encode_output(array: Array, datatype: str) -> bytes:
    """Raw contents of one output tensor (little-endian; BYTES length-prefixed)."""
    if datatype == "BYTES":
        return serialize_bytes(array)
    dtype = by_kserve(datatype).numpy.newbyteorder("<")
    return np.ascontiguousarray(array, dtype=dtype).tobytes()
