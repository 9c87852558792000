"""The manifest's tensors against the model's: what a bundle declares must be what it runs.

A manifest's inputs and outputs drive request validation, ModelMetadata and ModelConfig; a
bundle whose manifest says something else than its model (a signed bundle from a third
party, or a hand-edited one) would pass requests the session then fails on, or advertise
shapes no client can send.  :func:`check_signature` compares the two on the session the
golden vectors run on, at install and at every load.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agent.bundle import Manifest, TensorSpec
from agent.dtypes import by_kserve
from agent.errors import BundleError

__all__ = ["check_signature", "signature_mismatches"]


def _compare(kind: str, declared: Sequence[TensorSpec], actual: Sequence[Any], *,
             all_declared: bool) -> list[str]:
    found = {node.name: node for node in actual}
    problems = []
    for spec in declared:
        node = found.get(spec.name)
        if node is None:
            problems.append(f"{kind} {spec.name!r}: declared in the manifest, the model has no such "
                            f"{kind} (it has {', '.join(repr(n) for n in found) or 'none'})")
            continue
        onnx_type = by_kserve(spec.datatype).onnx
        if node.type != onnx_type:
            problems.append(f"{kind} {spec.name!r}: datatype is {spec.datatype} ({onnx_type}) in the "
                            f"manifest, {node.type} in the model")
            continue
        shape = node.shape
        if shape is None:
            continue  # the model leaves the rank open: the manifest may narrow it
        if len(spec.shape) != len(shape):
            problems.append(f"{kind} {spec.name!r}: rank is {len(spec.shape)} in the manifest "
                            f"{list(spec.shape)}, {len(shape)} in the model {list(shape)}")
            continue
        for axis, (want, have) in enumerate(zip(spec.shape, shape, strict=True)):
            if isinstance(have, int) and have >= 0 and want != have:
                problems.append(f"{kind} {spec.name!r}: shape[{axis}] is {want} in the manifest, "
                                f"{have} in the model")
    if all_declared:
        names = {spec.name for spec in declared}
        problems.extend(f"{kind} {name!r}: the model needs it, the manifest does not declare it"
                        for name in found if name not in names)
    return problems


def signature_mismatches(manifest: Manifest, session: Any) -> list[str]:
    """Every difference between the manifest's tensors and ``session``'s (an ONNX Runtime
    InferenceSession), one sentence each naming the tensor, the field and both values."""
    return (_compare("input", manifest.inputs, session.get_inputs(), all_declared=True)
            + _compare("output", manifest.outputs, session.get_outputs(), all_declared=False))


def check_signature(manifest: Manifest, session: Any) -> None:
    """Refuse a bundle whose manifest declares other tensors than its model has.

    Raises:
        BundleError: naming the bundle and every mismatch.
    """
    problems = signature_mismatches(manifest, session)
    if problems:
        raise BundleError(f"{manifest.name} {manifest.version}: the manifest does not describe the "
                          "model: " + "; ".join(problems))
