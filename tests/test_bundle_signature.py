"""A bundle's manifest must describe its model (issue 19, finding 4b): dimensions are bounded
when the manifest is parsed, and names, datatypes, ranks and fixed dimensions are compared
with the real ONNX Runtime session at install and at load."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import GOLDEN, MAX_DIM, TensorSpec, read_bundle, write_bundle
from agent.config import InferenceSection
from agent.errors import BundleError
from agent.inference.repository import ModelRepository
from provisioning.demo.models import affine_model
from testsupport.inference_support import make_bundle, place_unchecked


@pytest.fixture
def affine(tmp_path: Path) -> Path:
    model = affine_model(tmp_path / "affine.onnx")  # x, y: FP32 [batch, 4]
    return make_bundle(tmp_path, model, "affine", "1.0.0", {"x": np.ones((2, 4), np.float32)})


def _with_tensors(bundle_path: Path, out: Path, *, inputs: tuple[TensorSpec, ...] | None = None,
                  outputs: tuple[TensorSpec, ...] | None = None) -> Path:
    """A copy of a bundle whose manifest declares other tensors (files and hashes unchanged)."""
    bundle = read_bundle(bundle_path)
    manifest = bundle.manifest
    manifest = dataclasses.replace(manifest, inputs=inputs or manifest.inputs,
                                   outputs=outputs or manifest.outputs)
    with tarfile.open(bundle_path, mode="r:") as tar:
        member = tar.extractfile(GOLDEN)
        assert member is not None
        golden = member.read()
    buf = io.BytesIO()
    write_bundle(buf, manifest, bundle.read_model(), golden)
    out.write_bytes(buf.getvalue())
    return out


@pytest.mark.parametrize("dim", [2**63, 2**70, MAX_DIM + 1, -2])
def test_manifest_dimensions_are_bounded(affine: Path, tmp_path: Path, dim: int) -> None:
    bad = _with_tensors(affine, tmp_path / "bad.bundle", inputs=(TensorSpec("x", "FP32", (-1, dim)),))
    with pytest.raises(BundleError, match=r"inputs\[0\]\.shape.*0\.\.2147483647"):
        read_bundle(bad)


def test_largest_allowed_dimension_parses(affine: Path, tmp_path: Path) -> None:
    ok = _with_tensors(affine, tmp_path / "ok.bundle", outputs=(TensorSpec("y", "FP32", (-1, MAX_DIM)),))
    assert read_bundle(ok).manifest.outputs[0].shape == (-1, MAX_DIM)


MISMATCHES = {
    "fixed dim": ((TensorSpec("x", "FP32", (-1, 8)),), None, "input 'x': shape[1] is 8 in the manifest, 4"),
    "dtype": ((TensorSpec("x", "FP64", (-1, 4)),), None, "input 'x': datatype is FP64"),
    "rank": ((TensorSpec("x", "FP32", (-1, 4, 1)),), None, "input 'x': rank is 3 in the manifest"),
    "name": ((TensorSpec("z", "FP32", (-1, 4)),), None, "input 'z': declared in the manifest"),
    "output dim": (None, (TensorSpec("y", "FP32", (-1, 5)),), "output 'y': shape[1] is 5 in the manifest"),
}


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_manifest_that_differs_from_the_model_is_refused_at_install(affine: Path, tmp_path: Path,
                                                                    case: str) -> None:
    inputs, outputs, needle = MISMATCHES[case]
    bad = _with_tensors(affine, tmp_path / "bad.bundle", inputs=inputs, outputs=outputs)
    repo = ModelRepository.for_state_dir(tmp_path / "state", InferenceSection())
    with pytest.raises(BundleError, match="the manifest does not describe the model") as caught:
        repo.install(bad)
    assert needle in str(caught.value), str(caught.value)
    assert repo.store.installed() == []


def test_manifest_that_differs_from_the_model_is_refused_at_load(affine: Path, tmp_path: Path) -> None:
    bad = _with_tensors(affine, tmp_path / "bad.bundle", inputs=(TensorSpec("x", "FP32", (-1, 8)),))
    state = tmp_path / "state"
    place_unchecked(state, bad)
    repo = ModelRepository.for_state_dir(state, InferenceSection())
    with pytest.raises(BundleError, match="input 'x': shape\\[1\\] is 8 in the manifest, 4 in the model"):
        asyncio.run(repo.load("affine"))
    assert not repo.is_served("affine")
