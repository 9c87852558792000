"""Files an ONNX model refers to: every tensor that keeps its data outside the model.

ONNX lets a tensor say "my bytes are in file F at offset O" (``data_location = EXTERNAL`` and
an ``external_data`` entry ``location``), and ONNX Runtime opens F when it builds a session:
absolute paths, ``../`` paths, paths relative to the process's working directory, and even
its in-memory marker (``*/_ORT_MEM_ADDR_/*``, which reads raw process memory).  A signature
on a bundle says who vouches for it, not that it is harmless, so a signed model whose
weights name ``/etc/appliance/tls/node.key`` would hand the node's key to anyone allowed to
run inference.  This module finds every such reference, wherever ONNX allows a tensor:
graph initializers and sparse initializers, tensor attributes (``Constant``'s ``value`` and
the like, single or lists, dense or sparse), subgraphs of control-flow nodes at any depth,
model-local functions (their nodes and their default attributes) and training graphs.

:func:`check_model_files` accepts a model only when each reference names, exactly, a file
that is a hashed member of its bundle; the session is then built with that bundle's
directory as the one place relative names resolve (:func:`agent.ort.make_session`).
The model is read through ``agent/proto/onnx_refs.proto`` (ONNX's field numbers, only the
fields that can carry tensors), so the node needs no ``onnx`` package.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

from google.protobuf.message import DecodeError

from agent.errors import BundleError
from agent.proto import onnx_refs_pb2 as pb

__all__ = ["FIXED_COST_OPS", "DataRef", "ModelCheck", "check_model", "check_model_files", "data_refs",
           "fixed_cost", "safe_member_name"]

_EXTERNAL = 1  # onnx.TensorProto.DataLocation.EXTERNAL
_DEFAULT = 0
_ORT_FORMAT_ID = b"ORTM"  # flatbuffer file identifier of ONNX Runtime's own model format
_MAX_SHOWN = 120


@dataclass(frozen=True)
class DataRef:
    """One tensor whose data ONNX Runtime would read from a file."""

    tensor: str
    where: str  # "graph 'main' initializer", "node 'n1' (Constant) attribute 'value'", ...
    location: str | None  # the external_data "location", None when there is none
    data_location: int


def _shown(name: str | bytes) -> str:
    text = _text(name)
    return repr(text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + f"...({len(text)} chars)")


def _text(value: str | bytes) -> str:
    """A proto2 ``string`` field as text.  The wire may hold bytes that are not UTF-8 (ONNX
    Runtime takes them as they are), and protobuf then hands them back as ``bytes``; they
    come out escaped (``\\xe7``), so such a location is never a plain member name, and any
    name shows as text."""
    return value if isinstance(value, str) else value.decode("utf-8", "backslashreplace")


def _tensor_ref(t: pb.Tensor, where: str) -> DataRef | None:
    if t.data_location == _DEFAULT and not len(t.external_data):
        return None
    location = None
    for entry in t.external_data:
        if _text(entry.key) == "location":
            location = _text(entry.value)
    return DataRef(_text(t.name), where, location, t.data_location)


def _attribute(a: pb.Attribute, where: str, refs: list[DataRef], graphs: list[tuple[pb.Graph, str]]) -> None:
    at = f"{where} attribute {_shown(a.name)}"
    tensors = [a.t] if a.HasField("t") else []
    for t in [*tensors, *a.tensors]:
        ref = _tensor_ref(t, at)
        if ref is not None:
            refs.append(ref)
    sparse = [a.sparse_tensor] if a.HasField("sparse_tensor") else []
    for s in [*sparse, *a.sparse_tensors]:
        refs.extend(_sparse(s, at))
    subgraphs = [a.g] if a.HasField("g") else []
    graphs.extend((g, f"{at} subgraph") for g in [*subgraphs, *a.graphs])


def _sparse(s: pb.SparseTensor, where: str) -> Iterator[DataRef]:
    for part, t in (("values", s.values), ("indices", s.indices)):
        ref = _tensor_ref(t, f"{where} sparse {part}")
        if ref is not None:
            yield ref


def _graph(graph: pb.Graph, where: str, refs: list[DataRef], nodes: list[tuple[pb.Node, str]]) -> None:
    gwhere = f"{where} {_shown(graph.name)}"
    for t in graph.initializer:
        ref = _tensor_ref(t, f"{gwhere} initializer")
        if ref is not None:
            refs.append(ref)
    for s in graph.sparse_initializer:
        refs.extend(_sparse(s, f"{gwhere} sparse initializer"))
    nodes.extend((n, gwhere) for n in graph.node)


def _parse(model: bytes) -> pb.Model:
    """``model`` parsed for its tensor references.

    Raises:
        BundleError: an ORT-format model (only the ONNX format is accepted, so that this check
            sees everything), or bytes that are not an ONNX protobuf.
    """
    if model[4:8] == _ORT_FORMAT_ID:
        raise BundleError("an ONNX Runtime format (.ort) model: only ONNX protobuf models are accepted")
    try:
        return pb.Model.FromString(model)
    except DecodeError as exc:
        raise BundleError(f"not an ONNX model: its protobuf does not parse ({exc})") from None


def data_refs(model: bytes) -> list[DataRef]:
    """Every tensor of ``model`` that ONNX Runtime would read from a file (in no set order).

    Raises:
        BundleError: ``model`` is not an ONNX protobuf model (an ORT-format model included).
    """
    return _refs(_parse(model))


def _refs(parsed: pb.Model) -> list[DataRef]:
    refs: list[DataRef] = []
    # An explicit stack, not recursion: subgraph nesting depth is the model author's choice.
    graphs: list[tuple[pb.Graph, str]] = []
    if parsed.HasField("graph"):
        graphs.append((parsed.graph, "graph"))
    for i, info in enumerate(parsed.training_info):
        for part in ("initialization", "algorithm"):
            if info.HasField(part):
                graphs.append((getattr(info, part), f"training_info[{i}].{part}"))
    nodes: list[tuple[pb.Node, str]] = []
    attributes: list[tuple[pb.Attribute, str]] = []
    for f in parsed.functions:
        fwhere = f"function {_shown(f.name)}"
        nodes.extend((n, fwhere) for n in f.node)
        attributes.extend((a, f"{fwhere} default") for a in f.attribute_proto)
    while graphs or nodes or attributes:
        if attributes:
            _attribute(*attributes.pop(), refs, graphs)
            continue
        if nodes:
            node, where = nodes.pop()
            nwhere = f"{where} node {_shown(node.name)} ({node.op_type})"
            attributes.extend((a, nwhere) for a in node.attribute)
            continue
        _graph(*graphs.pop(), refs, nodes)
    return refs


def safe_member_name(name: str) -> bool:
    """Whether ``name`` is a plain relative path inside a bundle: no absolute path, no ``..``,
    no empty or ``.`` component, no backslash or NUL, no leading dot."""
    if not name or len(name) > 255 or "\\" in name or "\0" in name or name.startswith((".", "/")):
        return False
    parts = PurePosixPath(name).parts
    return "/".join(parts) == name and all(p not in ("", ".", "..") and not p.startswith(".")
                                           for p in parts)


def check_model_files(model: bytes, members: Collection[str], origin: str) -> None:
    """Refuse ``model`` unless every tensor it keeps outside itself lives in one of ``members``
    (the hashed data files of its bundle, as plain relative names).

    Raises:
        BundleError: naming ``origin``, the tensor, where it sits and the location it asks
            for: an absolute path, a ``..`` component, a name that is not a file of the
            bundle, a missing location, an unknown data location, or a model that is not
            ONNX protobuf.
    """
    _check_refs(_parse_for(model, origin), members, origin)


def _parse_for(model: bytes, origin: str) -> pb.Model:
    try:
        return _parse(model)
    except BundleError as exc:
        raise BundleError(f"{origin}: {exc}") from None


def _check_refs(parsed: pb.Model, members: Collection[str], origin: str) -> None:
    for ref in _refs(parsed):
        what = f"{origin}: tensor {_shown(ref.tensor)} ({ref.where})"
        if ref.data_location not in (_DEFAULT, _EXTERNAL):
            raise BundleError(f"{what}: unknown data_location {ref.data_location}")
        if ref.location is None:
            raise BundleError(f"{what}: external data without a location")
        if not safe_member_name(ref.location):
            raise BundleError(f"{what}: keeps its data in {_shown(ref.location)}, outside the "
                              "bundle (absolute, '..' or not a plain relative name); refused")
        if ref.location not in members:
            have = ", ".join(sorted(members)) or "none"
            raise BundleError(f"{what}: keeps its data in {_shown(ref.location)}, which is not a "
                              f"file of the bundle (its data files: {have}); refused")


@dataclass(frozen=True)
class ModelCheck:
    """The verdict of :func:`check_model` on one model: the bytes it passed (by sha256), the
    data files they may read, and whether the model is of fixed cost (:func:`fixed_cost`).

    It lets the check run where parsing a large model cannot hold a serving interpreter (a
    worker process); :func:`agent.ort.make_session` accepts it in place of the check only
    for bytes of that very hash and the same data files."""

    sha256: str
    members: frozenset[str]
    fixed_cost: bool


def check_model(model: bytes, members: Collection[str], origin: str) -> ModelCheck:
    """:func:`check_model_files` and :func:`fixed_cost` from one parse of ``model``.

    Raises:
        BundleError: as :func:`check_model_files`.
    """
    parsed = _parse_for(model, origin)
    _check_refs(parsed, members, origin)
    return ModelCheck(hashlib.sha256(model).hexdigest(), frozenset(members), _fixed_cost(parsed))


# Operators whose output shapes follow from their input shapes and attributes alone: with
# fixed input shapes, a graph made of these costs the same whatever values a request carries.
# Left out on purpose: control flow (Loop, Scan, If), and every operator that takes a size,
# count or shape from a tensor (Expand, Tile, ConstantOfShape, Range, Resize, Upsample, Pad,
# OneHot, DFT/STFT, ...), since a request's values would then set the work.
FIXED_COST_OPS = frozenset({
    "Abs", "Add", "And", "ArgMax", "ArgMin", "AveragePool", "BatchNormalization", "Cast",
    "Ceil", "Clip", "Concat", "Constant", "Conv", "DequantizeLinear", "Div", "Dropout", "Elu",
    "Equal", "Erf", "Exp", "Flatten", "Floor", "Gather", "Gelu", "Gemm", "GlobalAveragePool",
    "GlobalMaxPool", "Greater", "GreaterOrEqual", "HardSigmoid", "Identity",
    "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "MatMul",
    "Max", "MaxPool", "Mean", "Min", "Mul", "Neg", "Not", "Or", "Pow", "QuantizeLinear",
    "Reciprocal", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceSum", "Relu", "Round",
    "Selu", "Shape", "Sigmoid", "Sign", "Size", "Softmax", "Softplus", "Sqrt", "Squeeze", "Sub",
    "Sum", "Tanh", "Transpose", "Unsqueeze", "Where", "Xor",
})


def fixed_cost(model: bytes) -> bool:
    """True when every node of ``model`` is an operator of :data:`FIXED_COST_OPS` in ONNX's
    default domain, in the main graph only (no subgraph, model-local function or training
    graph): its run time then cannot be chosen by the values of a request of fixed shape.
    Reshape and Slice are left out as well (their shape inputs may come from a request).
    False for anything that does not parse."""
    try:
        parsed = _parse(model)
    except BundleError:
        return False
    return _fixed_cost(parsed)


def _fixed_cost(parsed: pb.Model) -> bool:
    if parsed.functions or parsed.training_info or not parsed.HasField("graph"):
        return False
    for node in parsed.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in FIXED_COST_OPS:
            return False
        if any(a.HasField("g") or a.graphs for a in node.attribute):
            return False
    return True
