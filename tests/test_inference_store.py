"""The model store and tensor decoding, in-process: install rules and decoding properties."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from agent.bundle import TensorSpec
from agent.config import InferenceSection
from agent.dtypes import DTYPES
from agent.errors import BundleError, InferenceError, NotFoundError
from agent.inference.repository import ModelRepository
from agent.inference.tensors import TYPED_FIELD, decode_inputs, encode_output, serialize_bytes
from agent.proto import grpc_service_pb2 as pb
from provisioning.demo.models import affine_model
from testsupport.inference_support import bytes_read, make_bundle, with_wrong_golden


def _repo(tmp_path: Path) -> ModelRepository:
    return ModelRepository.for_state_dir(tmp_path / "state", InferenceSection())


def test_install_activate_and_read_api(tmp_path: Path) -> None:
    x = np.ones((1, 4), np.float32)
    b1 = make_bundle(tmp_path, affine_model(tmp_path / "a.onnx"), "affine", "1.0.0", {"x": x})
    b2 = make_bundle(tmp_path, affine_model(tmp_path / "b.onnx", scale=5), "affine", "1.1.0", {"x": x})
    repo = _repo(tmp_path)
    repo.install(b1)
    repo.install(b2, activate=False)
    rows = repo.installed()
    assert [(r["version"], r["active"], r["loaded"]) for r in rows] == [("1.0.0", True, False),
                                                                        ("1.1.0", False, False)]
    assert len(rows[0]["sha256"]) == 64
    assert repo.store.find("affine").version == "1.0.0"
    assert repo.install(b1).version == "1.0.0"  # same bundle again: nothing to do


def test_bundle_failing_golden_vectors_is_never_installed(tmp_path: Path) -> None:
    x = np.ones((1, 4), np.float32)
    good = make_bundle(tmp_path, affine_model(tmp_path / "a.onnx"), "affine", "1.0.0", {"x": x})
    bad = with_wrong_golden(good, tmp_path / "bad.bundle")
    repo = _repo(tmp_path)
    with pytest.raises(BundleError, match=r"golden case 0, output 'y': differs"):
        repo.install(bad)
    assert repo.installed() == []
    assert [p.name for p in (tmp_path / "state" / "models" / "affine").iterdir()] == []


def test_a_version_is_never_replaced_in_place(tmp_path: Path) -> None:
    x = np.ones((1, 4), np.float32)
    repo = _repo(tmp_path)
    repo.install(make_bundle(tmp_path, affine_model(tmp_path / "a.onnx"), "affine", "1.0.0", {"x": x}))
    other = tmp_path / "o"
    other.mkdir()
    with pytest.raises(BundleError, match="already installed from a different bundle"):
        repo.install(make_bundle(other, affine_model(other / "b.onnx", scale=7), "affine", "1.0.0", {"x": x}))
    with pytest.raises(NotFoundError, match=r"no installed version '9\.0'"):
        repo.store.find("affine", "9.0")


# ---------------------------------------------------------------- decoding properties

NUMERIC = [d for d in DTYPES if d.kserve != "BYTES"]


def _request(name: str, datatype: str, shape: tuple[int, ...], raw: bytes | None = None) -> Any:
    req = pb.ModelInferRequest(model_name="m")
    t = req.inputs.add(name=name, datatype=datatype, shape=list(shape))
    if raw is not None:
        req.raw_input_contents.append(raw)
    return t, req


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_raw_round_trip_every_numeric_datatype(data: st.DataObject) -> None:
    dtype = data.draw(st.sampled_from(NUMERIC))
    array = data.draw(hnp.arrays(dtype.numpy, hnp.array_shapes(min_dims=1, max_dims=3, max_side=4)))
    _, req = _request("t", dtype.kserve, array.shape, encode_output(array, dtype.kserve))
    got = decode_inputs(req, {"t": TensorSpec("t", dtype.kserve, (-1,) * array.ndim)})["t"]
    assert got.dtype == dtype.numpy
    np.testing.assert_array_equal(got, array)


@settings(max_examples=100, deadline=None)
@given(items=st.lists(st.binary(max_size=10), min_size=1, max_size=8))
def test_bytes_round_trip_raw_and_typed(items: list[bytes]) -> None:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    spec = {"t": TensorSpec("t", "BYTES", (-1,))}
    _, req = _request("t", "BYTES", (len(items),), serialize_bytes(array))
    assert decode_inputs(req, spec)["t"].tolist() == items
    t, req = _request("t", "BYTES", (len(items),))
    t.contents.bytes_contents.extend(items)
    assert decode_inputs(req, spec)["t"].tolist() == items


@settings(max_examples=300, deadline=None)
@given(datatype=st.sampled_from([d.kserve for d in DTYPES]),
       shape=st.lists(st.integers(-3, 2**40), max_size=3),
       raw=st.one_of(st.none(), st.binary(max_size=64)),
       field=st.sampled_from(sorted(set(TYPED_FIELD.values()))),
       count=st.integers(0, 6))
def test_any_input_decodes_or_raises_inference_error(datatype: str, shape: list[int], raw: bytes | None,
                                                      field: str, count: int) -> None:
    t, req = _request("t", datatype, tuple(shape), raw)
    if raw is None:
        typed: dict[str, Any] = {"bool_contents": [True], "bytes_contents": [b"x"],
                                 "fp32_contents": [1.5], "fp64_contents": [2.5]}
        values = typed.get(field, [300]) * count
        getattr(t.contents, field).extend(values)
    spec = {"t": TensorSpec("t", datatype, (-1,) * len(shape))}
    try:
        out = decode_inputs(req, spec)
    except InferenceError as exc:
        assert "'t'" in str(exc) or "raw_input_contents" in str(exc)
    else:
        assert list(out["t"].shape) == shape


_CUDA, _CPU, _TRT = "CUDAExecutionProvider", "CPUExecutionProvider", "TensorrtExecutionProvider"


def _with(affine_bundle: Path, accelerator: Any) -> Any:
    import dataclasses

    from agent.bundle import read_bundle

    return dataclasses.replace(read_bundle(affine_bundle).manifest, accelerator=accelerator)


@pytest.mark.parametrize(("accel", "allowed", "usable", "cuda", "chosen"), [
    ({}, (), (_CUDA, _CPU), "12.2", [_CUDA, _CPU]),
    ({}, (), (_TRT, _CUDA, _CPU), "12.2", [_CUDA, _CPU]),  # TensorRT: not asked for
    ({"providers": (_CPU,)}, (), (_CUDA, _CPU), "12.2", [_CPU]),  # the bundle's choice
    ({"providers": (_CPU, _CUDA)}, (), (_CUDA, _CPU), "12.2", [_CPU, _CUDA]),  # its order
    ({}, (_CPU,), (_CUDA, _CPU), "12.2", [_CPU]),  # the agent's [inference] providers
    ({}, (), (_CPU,), "", [_CPU]),  # a CPU node
    ({"min_cuda": "12.4"}, (), (_CUDA, _CPU), "12.2", [_CPU]),  # runtime too old for its GPU path
    ({"min_cuda": "12.4"}, (), (_CUDA, _CPU), "12.10", [_CUDA, _CPU]),  # numeric, not text
    ({"min_cuda": "12.4"}, (), (_CUDA, _CPU), "13.0", [_CUDA, _CPU]),
    ({"requires_gpu": True}, (), (_CUDA, _CPU), "13.0", [_CUDA, _CPU]),
])
def test_providers_follow_the_bundle_the_agent_and_the_node(
        affine_bundle: Path, accel: dict[str, Any], allowed: tuple[str, ...],
        usable: tuple[str, ...], cuda: str, chosen: list[str]) -> None:
    from agent.bundle import Accelerator
    from agent.inference.model import choose_providers

    manifest = _with(affine_bundle, Accelerator(**accel))
    assert choose_providers(manifest, allowed, usable, cuda) == chosen


@pytest.mark.parametrize(("accel", "allowed", "usable", "cuda", "needle"), [
    ({"requires_gpu": True}, (), (_CPU,), "", "affine 1.0.0 requires a GPU"),
    ({"requires_gpu": True}, (_CPU,), (_CUDA, _CPU), "12.2",
     "allowed by [inference] providers: CPUExecutionProvider"),
    ({"requires_gpu": True, "min_cuda": "12.8"}, (), (_CUDA, _CPU), "12.2",
     "requires a GPU (CUDA 12.8 or later)"),
    ({"providers": (_CUDA,)}, (), (_CPU,), "", "none of its providers (CUDAExecutionProvider)"),
])
def test_a_bundle_no_provider_here_fits_is_refused_by_name(
        affine_bundle: Path, accel: dict[str, Any], allowed: tuple[str, ...],
        usable: tuple[str, ...], cuda: str, needle: str) -> None:
    from agent.bundle import Accelerator
    from agent.inference.model import choose_providers

    with pytest.raises(BundleError) as info:
        choose_providers(_with(affine_bundle, Accelerator(**accel)), allowed, usable, cuda)
    assert needle in str(info.value)
    assert "usable here: " + ", ".join(usable) in str(info.value)


def test_a_gpu_only_bundle_is_not_installed_on_a_cpu_node(tmp_path: Path) -> None:
    """This machine has no GPU: the bundle is refused before anything is written, and the
    message says why (not a golden-vector failure on a CPU session it never asked for)."""
    from agent.bundle import Accelerator
    from agent.ort import usable_providers

    assert _CUDA not in usable_providers()
    x = np.ones((1, 4), np.float32)
    gpu_only = make_bundle(tmp_path, affine_model(tmp_path / "a.onnx"), "affine", "1.0.0", {"x": x},
                           accelerator=Accelerator(requires_gpu=True))
    repo = _repo(tmp_path)
    with pytest.raises(BundleError, match=r"affine 1\.0\.0 requires a GPU"):
        repo.install(gpu_only)
    assert repo.installed() == []
    assert [p.name for p in (tmp_path / "state" / "models" / "affine").iterdir()] == []


@pytest.mark.parametrize(("tf32", "flag"), [(False, "0"), (True, "1")])
def test_cuda_gets_tf32_only_when_the_bundle_allows_it(tf32: bool, flag: str) -> None:
    from agent.ort import provider_entries

    assert provider_entries([_TRT, _CUDA, _CPU], tf32=tf32) == [
        _TRT, (_CUDA, {"use_tf32": flag}), _CPU]
    assert provider_entries([_CPU], tf32=tf32) == [_CPU]


# ------------------------------------------------------------------ one read of the bundle file

def _big_bundle(tmp_path: Path, **change: Any) -> Path:
    """An affine bundle whose model.onnx is 8 MiB of other bytes (the store does not look
    inside it; the verifier below does not run it), written by the project's write_bundle."""
    import dataclasses
    import hashlib
    import random
    import tarfile

    from agent.bundle import MODEL, FileEntry, read_bundle, write_bundle

    x = np.ones((1, 4), np.float32)
    small = make_bundle(tmp_path, affine_model(tmp_path / "a.onnx"), "affine", "1.0.0", {"x": x})
    model = random.Random(5).randbytes(8 << 20)
    manifest = read_bundle(small).manifest
    files = dict(manifest.files) | {MODEL: FileEntry(hashlib.sha256(model).hexdigest(), len(model))}
    with tarfile.open(small) as tar:
        golden = tar.extractfile("golden.json").read()  # type: ignore[union-attr]
    out = tmp_path / f"big-{len(change)}.bundle"
    with out.open("wb") as f:
        write_bundle(f, dataclasses.replace(manifest, files=files, **change), model, golden)
    return out


def _no_check(manifest: Any, model: bytes, golden: Any) -> None:
    pass


def test_an_install_reads_the_bundle_once_and_records_the_hash_of_those_bytes(tmp_path: Path) -> None:
    """One read checks, hashes and unpacks the file; the commit reads the staged model back
    (to load it): about twice the bundle, where four reads were made before."""
    import hashlib

    from agent.inference.store import ModelStore

    bundle = _big_bundle(tmp_path)
    size = bundle.stat().st_size
    before = bytes_read()
    if before is None:
        pytest.skip("no read accounting in /proc/self/io here")
    installed = ModelStore(tmp_path / "state").install(bundle, _no_check)
    read = (bytes_read() or 0) - before
    assert size < read < 2.2 * size, f"{read} bytes read for a {size}-byte bundle"
    assert installed.sha256 == hashlib.sha256(bundle.read_bytes()).hexdigest()
    assert installed.length == size


def test_a_manifest_changed_between_reads_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same name and version, another description: the file is replaced after its manifest was
    read (to find the version's place) and before the read that installs it."""
    import os

    from agent.bundle import read_manifest
    from agent.errors import VerificationError
    from agent.inference.store import ModelStore

    target, other = _big_bundle(tmp_path), _big_bundle(tmp_path, description="another")

    def then_replaced(path: Path) -> Any:
        manifest = read_manifest(path)
        os.replace(other, target)  # a fault injected into the real read: the file changes
        return manifest

    monkeypatch.setattr("agent.inference.store.read_manifest", then_replaced)
    store = ModelStore(tmp_path / "state")
    with pytest.raises(VerificationError, match="the manifest changed while it was read"):
        store.install(target, _no_check)
    assert store.installed() == []
    assert list((tmp_path / "state" / "models" / "affine").iterdir()) == []
