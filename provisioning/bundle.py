"""Creating model bundles on the release engineer's machine.

``create_bundle`` refuses to write anything until the model loads in ONNX Runtime and every
golden case reproduces on a real session; the file appears atomically or not at all.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle import (
    GOLDEN,
    MODEL,
    Accelerator,
    Batching,
    Bundle,
    GoldenCase,
    Manifest,
    TensorSpec,
    Tolerance,
    _parse_manifest,
    check_golden,
    encode_golden,
    parse_version,
    read_bundle,
    valid_name,
    write_bundle,
)
from agent.dtypes import by_onnx
from agent.errors import BundleError, NotFoundError
from agent.fsutil import atomic_write
from agent.ort import CPU, make_session

__all__ = ["create_bundle", "load_golden_npz", "session_runner", "verify_bundle"]


def _specs(nodes: Sequence[Any], origin: str) -> tuple[TensorSpec, ...]:
    specs = []
    for node in nodes:
        try:
            dtype = by_onnx(node.type)
        except KeyError as exc:
            raise BundleError(f"{origin}: tensor {node.name!r}: {exc.args[0]}") from None
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (node.shape or []))
        specs.append(TensorSpec(node.name, dtype.kserve, shape))
    return tuple(specs)


def _as_text(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    if array.dtype != object:
        return array
    conv = np.empty(array.shape, dtype=object)
    try:
        conv.reshape(-1)[:] = [x.decode() if isinstance(x, bytes) else x for x in array.reshape(-1).tolist()]
    except UnicodeDecodeError as exc:
        raise BundleError(f"a BYTES golden input is not valid UTF-8 ({exc}); ONNX Runtime string "
                          "tensors hold UTF-8 text") from None
    return conv


def session_runner(session: Any) -> Any:
    """A golden-vector runner over an ``InferenceSession`` (BYTES come back as bytes)."""
    names = [o.name for o in session.get_outputs()]

    def run(feeds: Mapping[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        # ORT's string tensors take str (UTF-8 text); given bytes it would feed their repr.
        results = session.run(names, {k: _as_text(v) for k, v in feeds.items()})
        out = {}
        for name, value in zip(names, results, strict=True):
            array = np.asarray(value)
            if array.dtype == object or array.dtype.kind == "U":
                conv = np.empty(array.shape, dtype=object)
                conv.reshape(-1)[:] = [x if isinstance(x, bytes) else str(x).encode()
                                       for x in array.reshape(-1).tolist()]
                array = conv
            out[name] = array
        return out

    return run


def load_golden_npz(path: Path, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> tuple[
        dict[str, np.ndarray[Any, Any]], dict[str, np.ndarray[Any, Any]]]:
    """Read one golden case from an .npz with keys ``inputs/NAME`` and optional ``outputs/NAME``.

    Raises:
        NotFoundError: no such file.
        BundleError: unreadable file, unknown or missing tensors, or wrong dtypes.
    """
    if not path.is_file():
        raise NotFoundError(f"{path}: no such golden-vector file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: not a readable .npz file: {exc}") from None
    specs = {f"inputs/{s.name}": s for s in inputs} | {f"outputs/{s.name}": s for s in outputs}
    unknown = sorted(set(arrays) - set(specs))
    if unknown:
        raise BundleError(f"{path}: unknown tensors {unknown}; expected keys among {sorted(specs)}")
    missing = [f"inputs/{s.name}" for s in inputs if f"inputs/{s.name}" not in arrays]
    if missing:
        raise BundleError(f"{path}: missing golden inputs {missing}")
    ins: dict[str, np.ndarray[Any, Any]] = {}
    outs: dict[str, np.ndarray[Any, Any]] = {}
    for key, given in arrays.items():
        spec = specs[key]
        array = given
        if spec.datatype == "BYTES":
            if given.dtype.kind not in "SU":
                raise BundleError(f"{path}: {key}: BYTES tensor given as {given.dtype}")
            array = np.empty(given.shape, dtype=object)
            array.reshape(-1)[:] = [x.encode() if isinstance(x, str) else bytes(x)
                                    for x in given.reshape(-1).tolist()]
        else:
            from agent.dtypes import by_kserve

            want = by_kserve(spec.datatype).numpy
            if array.dtype != want:
                raise BundleError(f"{path}: {key}: dtype {array.dtype}, the model wants {want} "
                                  f"({spec.datatype})")
        (ins if key.startswith("inputs/") else outs)[spec.name] = array
    return ins, outs


def create_bundle(
    model_path: Path,
    *,
    name: str,
    version: str,
    golden: Sequence[Path],
    out: Path,
    batching: Batching | None = None,
    accelerator: Accelerator | None = None,
    tolerance: Tolerance | None = None,
    description: str = "",
) -> Bundle:
    """Check a model and its golden vectors on a real ONNX Runtime session, then write the bundle.

    Same inputs give the same bytes.  Nothing is written unless every check passes.

    Raises:
        NotFoundError: the model or a golden file does not exist.
        BundleError: the model does not load, a name/version/setting is invalid, or the
            golden vectors do not reproduce.
    """
    # The cheap checks first: a typo should not wait for the model to load.
    if not valid_name(name):
        raise BundleError(f"--name {name!r}: use 1-64 characters of [a-z0-9._-], starting with a "
                          "letter or digit")
    try:
        parse_version(version)
    except ValueError as exc:
        raise BundleError(f"--version: {exc}") from None
    if not golden:
        raise BundleError("at least one golden-vector file (--golden FILE.npz) is required")
    if not model_path.is_file():
        raise NotFoundError(f"{model_path}: no such model file")
    for gpath in golden:
        if not gpath.is_file():
            raise NotFoundError(f"{gpath}: no such golden-vector file")
    model = model_path.read_bytes()
    try:  # make_session refuses a tensor kept outside model.onnx, as the node does
        session = make_session(model, providers=[CPU], origin=str(model_path))
    except BundleError:
        raise
    except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"{model_path}: not an ONNX model that ONNX Runtime can load: {first}") from None
    inputs = _specs(session.get_inputs(), str(model_path))
    outputs = _specs(session.get_outputs(), str(model_path))
    runner = session_runner(session)
    cases: list[GoldenCase] = []
    for gpath in golden:
        ins, outs = load_golden_npz(gpath, inputs, outputs)
        try:
            first = runner(ins)
        except Exception as exc:  # noqa: BLE001 - ORT's errors name the bad input
            raise BundleError(f"{gpath}: the model rejects these golden inputs: {exc}") from None
        if not outs:  # record what the model computes, then insist it is reproducible
            outs = dict(first)
        cases.append(GoldenCase(ins, outs))

    tol = tolerance or Tolerance()
    datatypes = {s.name: s.datatype for s in inputs + outputs}
    golden_bytes = encode_golden(cases, datatypes)
    draft = {
        "format": 1, "name": name, "version": version, "description": description,
        "inputs": [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in inputs],
        "outputs": [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in outputs],
        "files": {
            MODEL: {"sha256": hashlib.sha256(model).hexdigest(), "length": len(model)},
            GOLDEN: {"sha256": hashlib.sha256(golden_bytes).hexdigest(), "length": len(golden_bytes)},
        },
        "batching": _batching_json(batching or Batching()),
        "accelerator": _accel_json(accelerator or Accelerator()),
        "tolerance": {"atol": tol.atol, "rtol": tol.rtol},
    }
    import json

    # One validation pass for created and received manifests alike.
    manifest = _parse_manifest(json.dumps(draft).encode(), f"bundle {name} {version}")
    check_golden(manifest, cases, runner)
    with atomic_write(out) as fh:
        write_bundle(fh, manifest, model, golden_bytes)
    return read_bundle(out)


def _batching_json(b: Batching) -> dict[str, Any]:
    return {"max_batch_size": b.max_batch_size, "max_queue_delay_us": b.max_queue_delay_us,
            "preferred_batch_sizes": list(b.preferred_batch_sizes)}


def _accel_json(a: Accelerator) -> dict[str, Any]:
    out: dict[str, Any] = {"providers": list(a.providers), "requires_gpu": a.requires_gpu,
                           "min_cuda": a.min_cuda}
    if a.tf32:  # only when set: agents that predate the key still read every other bundle
        out["tf32"] = True
    return out


def verify_bundle(path: Path) -> tuple[Bundle, Manifest]:
    """Check a bundle's structure and hashes and run its golden vectors on ONNX Runtime (CPU).

    Raises:
        BundleError / VerificationError: as :func:`agent.bundle.read_bundle`, or the golden
            vectors do not reproduce.
    """
    bundle = read_bundle(path)
    try:
        session = make_session(bundle.read_model(), providers=[CPU], origin=str(path))
    except BundleError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise BundleError(f"{path}: model.onnx does not load in ONNX Runtime: {exc}") from None
    check_golden(bundle.manifest, bundle.golden_cases(), session_runner(session))
    return bundle, bundle.manifest
