"""Model bundles: determinism, round trip, tampering and bad input, through library and CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import random
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto

from agent.bundle import read_bundle
from agent.errors import BundleError, NotFoundError, VerificationError
from provisioning.bundle import create_bundle, verify_bundle
from provisioning.demo.models import affine_model, identity_model, save_golden
from tests.conftest import run_appliance
from testsupport.tar_edit import edit_json_member


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_same_inputs_same_bytes_across_processes(tmp_path: Path) -> None:
    model = affine_model(tmp_path / "m.onnx")
    golden = save_golden(tmp_path / "g.npz", {"x": np.ones((3, 4), np.float32)})
    outs = []
    for n in range(2):
        out = tmp_path / f"b{n}.bundle"
        proc = run_appliance("bundle", "create", model, "--name", "affine", "--version", "1.2.0",
                             "--golden", golden, "--out", out, "--max-batch-size", "8",
                             "--preferred-batch-size", "4")
        assert proc.returncode == 0, proc.stderr
        outs.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert outs[0] == outs[1]


def test_manifest_describes_model_and_golden(affine_bundle: Path) -> None:
    bundle = read_bundle(affine_bundle)
    m = bundle.manifest
    assert (m.name, m.version) == ("affine", "1.0.0")
    assert [(s.name, s.datatype, s.shape) for s in m.inputs] == [("x", "FP32", (-1, 4))]
    assert [(s.name, s.datatype, s.shape) for s in m.outputs] == [("y", "FP32", (-1, 4))]
    case = bundle.golden_cases()[0]
    np.testing.assert_allclose(case.outputs["y"], case.inputs["x"] * 2 + 1)
    with tarfile.open(affine_bundle) as tar:
        assert tar.getnames() == ["manifest.json", "model.onnx", "golden.json"]
        assert {(m.uid, m.gid, m.mtime, m.mode) for m in tar.getmembers()} == {(0, 0, 0, 0o644)}


def test_inspect_and_verify_cli_json(affine_bundle: Path, cli) -> None:  # type: ignore[no-untyped-def]
    res = cli("bundle", "verify", affine_bundle, "--json")
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert doc["verified"] is True
    assert doc["sha256"] == hashlib.sha256(affine_bundle.read_bytes()).hexdigest()
    res = cli("bundle", "inspect", affine_bundle)
    assert res.code == 0 and "affine 1.0.0" in res.out and "FP32" in res.out


def _region_offsets(path: Path) -> dict[str, int]:
    """Offset of one byte inside each member's data, and one inside a tar header."""
    with tarfile.open(path) as tar:
        offsets = {m.name: m.offset_data + m.size // 2 for m in tar.getmembers()}
        offsets["header"] = tar.getmembers()[1].offset + 124  # inside the size field
    return offsets


@pytest.mark.parametrize("region", ["manifest.json", "model.onnx", "golden.json", "header"])
def test_flipped_byte_in_each_region_is_refused(affine_bundle: Path, region: str) -> None:
    data = bytearray(affine_bundle.read_bytes())
    data[_region_offsets(affine_bundle)[region]] ^= 0x01
    affine_bundle.write_bytes(bytes(data))
    with pytest.raises((BundleError, VerificationError)) as info:
        verify_bundle(affine_bundle)
    assert str(affine_bundle.name) in str(info.value)


def test_hash_mismatch_names_member(affine_bundle: Path) -> None:
    data = bytearray(affine_bundle.read_bytes())
    data[_region_offsets(affine_bundle)["golden.json"]] ^= 0x01
    affine_bundle.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match=r"golden.json: sha256 .* does not match"):
        read_bundle(affine_bundle)


def test_non_onnx_model_refused_nothing_written(tmp_path: Path) -> None:
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"this is not a model")
    golden = save_golden(tmp_path / "g.npz", {"x": np.ones((1, 4), np.float32)})
    before = _files(tmp_path)
    proc = run_appliance("bundle", "create", fake, "--name", "x", "--version", "1",
                         "--golden", golden, "--out", tmp_path / "x.bundle")
    assert proc.returncode != 0
    assert "model.onnx" in proc.stderr and "not an ONNX model" in proc.stderr
    assert _files(tmp_path) == before


def test_golden_vectors_that_do_not_reproduce(tmp_path: Path) -> None:
    model = affine_model(tmp_path / "m.onnx")
    x = np.ones((2, 4), np.float32)
    golden = save_golden(tmp_path / "g.npz", {"x": x}, {"y": x * 2 + 1.5})
    before = _files(tmp_path)
    with pytest.raises(BundleError, match=r"golden case 0, output 'y': differs by up to 0.5"):
        create_bundle(model, name="affine", version="1.0.0", golden=[golden],
                      out=tmp_path / "o.bundle")
    assert _files(tmp_path) == before


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--version", "1.0.0", "--golden", "missing.npz"], "missing.npz: no such golden-vector file"),
        (["--version", "one", "--golden", "g.npz"], "version: version 'one'"),
        (["--version", "1.0", "--golden", "bad.npz"], "bad.npz: not a readable .npz"),
        (["--version", "1.0", "--golden", "wrongkey.npz"], "unknown tensors ['inputs/z']"),
        (["--version", "1.0", "--golden", "wrongdtype.npz"], "dtype float64, the model wants float32"),
    ],
)
def test_bad_input_names_file_and_problem(tmp_path: Path, args: list[str], needle: str) -> None:
    affine_model(tmp_path / "m.onnx")
    save_golden(tmp_path / "g.npz", {"x": np.ones((1, 4), np.float32)})
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    save_golden(tmp_path / "wrongkey.npz", {"z": np.ones((1, 4), np.float32)})
    save_golden(tmp_path / "wrongdtype.npz", {"x": np.ones((1, 4), np.float64)})
    before = _files(tmp_path)
    full = [(tmp_path / a) if a.endswith(".npz") else a for a in args]
    proc = run_appliance("bundle", "create", tmp_path / "m.onnx", "--name", "affine", *full,
                         "--out", tmp_path / "o.bundle")
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _files(tmp_path) == before


def test_missing_bundle_file(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no such bundle file"):
        read_bundle(tmp_path / "nope.bundle")


def test_not_a_tar(tmp_path: Path) -> None:
    p = tmp_path / "x.bundle"
    p.write_bytes(b"\0" * 10 + b"junk" * 300)
    with pytest.raises(BundleError, match="not a model bundle"):
        read_bundle(p)


def test_manifest_with_unknown_field_is_refused(affine_bundle: Path, tmp_path: Path) -> None:
    out = edit_json_member(affine_bundle, tmp_path / "evil.bundle", "manifest.json",
                           lambda manifest: manifest.update(surprise=1))
    with pytest.raises(BundleError, match="unknown field"):
        read_bundle(out)


def test_bytes_and_bool_models_round_trip(tmp_path: Path) -> None:
    for onnx_type, arr in [
        (TensorProto.STRING, np.array([["a", "bc", "déf"]])),
        (TensorProto.BOOL, np.array([[True, False, True]])),
        (TensorProto.FLOAT16, np.array([[1.5, -2, 3]], dtype=np.float16)),
    ]:
        model = identity_model(tmp_path / f"id{onnx_type}.onnx", onnx_type)
        golden = save_golden(tmp_path / f"g{onnx_type}.npz", {"inp": arr})
        b = create_bundle(model, name=f"id{onnx_type}", version="1", golden=[golden],
                          out=tmp_path / f"id{onnx_type}.bundle")
        bundle, _ = verify_bundle(b.path)
        got = bundle.golden_cases()[0].outputs["out"]
        assert got.shape == arr.shape


def _rewrite_manifest(bundle: Path, out: Path, change: dict[str, object]) -> Path:
    """A copy of ``bundle`` with ``change`` merged into its manifest's accelerator section."""
    return edit_json_member(bundle, out, "manifest.json",
                            lambda manifest: manifest["accelerator"].update(change))


def test_accelerator_needs_round_trip_through_cli(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    model = affine_model(tmp_path / "m.onnx")
    golden = save_golden(tmp_path / "g.npz", {"x": np.ones((2, 4), np.float32)})
    out = tmp_path / "gpu.bundle"
    res = cli("bundle", "create", model, "--name", "affine", "--version", "1.0.0", "--golden", golden,
              "--out", out, "--requires-gpu", "--min-cuda", "12.4", "--tf32", "--atol", "1e-2")
    assert res.code == 0, res.err
    a = read_bundle(out).manifest.accelerator
    assert (a.requires_gpu, a.min_cuda, a.tf32) == (True, "12.4", True)
    res = cli("bundle", "inspect", out)
    assert "(GPU required)  (CUDA 12.4 or later)  (TF32 allowed)" in res.out
    assert "atol 0.01" in res.out
    plain = tmp_path / "plain.bundle"
    assert cli("bundle", "create", model, "--name", "affine", "--version", "1.0.0", "--golden", golden,
               "--out", plain).code == 0
    with tarfile.open(plain) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert "tf32" not in manifest["accelerator"]  # older agents still read bundles without it
    assert read_bundle(plain).manifest.accelerator.tf32 is False


@pytest.mark.parametrize(("change", "needle"), [
    ({"tf32": "yes"}, "accelerator.tf32"),
    ({"min_cuda": "twelve"}, "accelerator.min_cuda"),
    ({"min_cuda": "12"}, "accelerator.min_cuda"),
    ({"providers": []}, "accelerator.providers"),
    ({"providers": ["CUDA"]}, "accelerator.providers"),
    ({"providers": [1]}, "accelerator.providers"),
    ({"fp8": True}, "unknown field"),
])
def test_bad_accelerator_fields_are_named(affine_bundle: Path, tmp_path: Path,
                                          change: dict[str, object], needle: str) -> None:
    bad = _rewrite_manifest(affine_bundle, tmp_path / "bad.bundle", change)
    with pytest.raises(BundleError, match=needle) as info:
        read_bundle(bad)
    assert "bad.bundle" in str(info.value)


def test_create_refuses_a_bad_min_cuda_and_writes_nothing(tmp_path: Path) -> None:
    affine_model(tmp_path / "m.onnx")
    save_golden(tmp_path / "g.npz", {"x": np.ones((1, 4), np.float32)})
    before = _files(tmp_path)
    proc = run_appliance("bundle", "create", tmp_path / "m.onnx", "--name", "affine", "--version",
                         "1.0.0", "--golden", tmp_path / "g.npz", "--out", tmp_path / "o.bundle",
                         "--min-cuda", "latest")
    assert proc.returncode != 0 and "min_cuda" in proc.stderr and "'latest'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _files(tmp_path) == before


# ---------------------------------------------------------------- one read of a big bundle

def _with_model(bundle: Path, out: Path, model: bytes, **change: Any) -> Path:
    """A copy of ``bundle`` with another model.onnx (and manifest fields), through write_bundle."""
    from agent.bundle import MODEL, FileEntry, write_bundle

    manifest = read_bundle(bundle).manifest
    files = dict(manifest.files) | {MODEL: FileEntry(hashlib.sha256(model).hexdigest(), len(model))}
    with tarfile.open(bundle) as tar:
        golden = tar.extractfile("golden.json").read()  # type: ignore[union-attr]
    with out.open("wb") as f:
        write_bundle(f, dataclasses.replace(manifest, files=files, **change), model, golden)
    return out


@pytest.fixture
def big_bundle(affine_bundle: Path, tmp_path: Path) -> Path:
    """20 MiB of model: the reader's 4 MiB buffers wrap around their ring of 4."""
    return _with_model(affine_bundle, tmp_path / "big.bundle", random.Random(3).randbytes(20 << 20))


def test_a_big_bundle_is_hashed_and_unpacked_from_one_read(big_bundle: Path, tmp_path: Path) -> None:
    from agent.bundle import extract_bundle

    data = big_bundle.read_bytes()
    bundle = extract_bundle(big_bundle, tmp_path / "out")
    assert (bundle.sha256, bundle.length) == (hashlib.sha256(data).hexdigest(), len(data))
    with tarfile.open(big_bundle) as tar:
        for info in tar.getmembers():
            written = (tmp_path / "out" / info.name).read_bytes()
            assert written == data[info.offset_data:info.offset_data + info.size]
    assert read_bundle(big_bundle) == dataclasses.replace(bundle, path=big_bundle)


@pytest.mark.parametrize("offset", [4 << 20, (16 << 20) + 4097])
def test_a_byte_changed_in_a_big_model_is_refused(big_bundle: Path, offset: int) -> None:
    data = bytearray(big_bundle.read_bytes())
    data[offset] ^= 1
    big_bundle.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match=r"big\.bundle:model\.onnx: sha256 [0-9a-f]{64} does not "
                       "match the manifest's"):
        read_bundle(big_bundle)


def test_a_declared_size_over_the_limit_is_refused_before_the_member_is_read(
        affine_bundle: Path, tmp_path: Path) -> None:
    from agent.bundle import MAX_MODEL

    with tarfile.open(affine_bundle) as tar:
        parts = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    manifest = json.loads(parts["manifest.json"])
    manifest["files"]["model.onnx"]["length"] = MAX_MODEL + 1
    parts["manifest.json"] = json.dumps(manifest).encode()
    out = tmp_path / "huge.bundle"
    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in parts.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(BundleError, match=r"huge\.bundle: golden vectors or model over the size limit"):
        read_bundle(out)
