"""The file work of a hot swap runs in a worker process (agent.inference.isolated); what it
must still guarantee: refusals change nothing, the model check is bound to the bytes that
get a session, the golden vectors run on the serving session, a broken worker is a refusal.

Under load, end to end, see tests/test_updates_agent.py (hot swap under load fails no request)
and tests/test_model_refs.py (a signed update carrying a file-reading model is refused).
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import MODEL
from agent.config import InferenceSection
from agent.errors import BundleError, VerificationError
from agent.inference import isolated
from agent.inference.repository import ModelRepository
from agent.modelrefs import check_model
from agent.ort import make_session
from provisioning.demo.models import affine_model
from tests.test_model_refs import _crafted_bundle, in_initializer
from testsupport.inference_support import with_wrong_golden
from testsupport.updates_support import X, affine_bundle_at, expected, state_hash


def _repo(state: Path) -> ModelRepository:
    return ModelRepository.for_state_dir(state, InferenceSection())


def _hidden(state: Path) -> list[Path]:
    return list((state / "models").rglob(".*"))


def test_install_for_serving_serves_the_checked_session(tmp_path: Path) -> None:
    state = tmp_path / "state"
    repo = _repo(state)
    repo.install(affine_bundle_at(tmp_path, "1.0.1"))
    installed, model = repo.install_for_serving(affine_bundle_at(tmp_path, "1.0.2"))
    try:
        assert (installed.version, installed.active) == ("1.0.2", False)  # not active before swap
        assert model.sha256 == installed.sha256
        assert np.allclose(model.run_sync({"x": X}, ["y"])["y"], expected("1.0.2"))
        assert model._may_inline  # the worker's verdict on the model's operators came through
    finally:
        model.close()
    assert _hidden(state) == []


def test_a_wrong_golden_vector_refuses_the_bundle_and_changes_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    repo = _repo(state)
    repo.install(affine_bundle_at(tmp_path, "1.0.1"))
    before = state_hash(state)
    bad = with_wrong_golden(affine_bundle_at(tmp_path, "1.0.2"), tmp_path / "bad.bundle")
    with pytest.raises(BundleError, match="golden"):
        repo.install_for_serving(bad)
    assert state_hash(state) == before


def test_a_model_reading_outside_its_bundle_is_refused_by_the_worker(tmp_path: Path) -> None:
    state = tmp_path / "state"
    repo = _repo(state)
    repo.install(affine_bundle_at(tmp_path, "1.0.1"))
    before = state_hash(state)
    evil = _crafted_bundle(tmp_path / "evil.bundle", in_initializer("/etc/appliance/tls/node.key"))
    with pytest.raises(BundleError, match=r"affine 9\.0\.0: tensor 'W' .*node\.key.*refused"):
        repo.install_for_serving(evil)
    assert state_hash(state) == before


def test_a_changed_file_is_refused_when_a_kept_version_is_staged(tmp_path: Path) -> None:
    state = tmp_path / "state"
    repo = _repo(state)
    repo.install(affine_bundle_at(tmp_path, "1.0.1"))
    repo.install(affine_bundle_at(tmp_path, "1.0.2"))
    kept = repo.store.find("affine", "1.0.1")
    (kept.path / MODEL).write_bytes(affine_model(tmp_path / "other.onnx", scale=5.0).read_bytes())
    with pytest.raises(VerificationError, match=r"1\.0\.1/model\.onnx: sha256"):
        asyncio.run(repo.stage("affine", "1.0.1"))


def test_a_worker_without_an_answer_is_a_refusal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    repo = _repo(state)
    repo.install(affine_bundle_at(tmp_path, "1.0.1"))
    before = state_hash(state)
    monkeypatch.setattr(sys, "executable", "/bin/false")  # the worker exits at once, saying nothing
    with pytest.raises(BundleError, match="ended without an answer"):
        repo.install_for_serving(affine_bundle_at(tmp_path, "1.0.2"))
    assert state_hash(state) == before


def test_a_staging_directory_outside_the_store_is_not_taken(tmp_path: Path) -> None:
    repo = _repo(tmp_path / "state")
    outside = tmp_path / "elsewhere" / ".1.0.2.x"
    outside.mkdir(parents=True)
    for reported in (outside, repo.store.root / "affine" / "visible", "relative/.x"):
        with pytest.raises(BundleError, match="outside the store"):
            isolated._staged_dir(repo.store, reported)
    assert outside.is_dir()  # refused, and never deleted either


def test_a_model_check_stands_only_for_the_bytes_and_files_it_checked(tmp_path: Path) -> None:
    model = affine_model(tmp_path / "a.onnx").read_bytes()
    other = affine_model(tmp_path / "b.onnx", scale=3.0).read_bytes()
    check = check_model(model, (), "a")
    assert check.fixed_cost
    make_session(model, checked=check)  # the very bytes: accepted without parsing them again
    with pytest.raises(BundleError, match="not the ones its file check passed"):
        make_session(other, checked=check)
    wider = dataclasses.replace(check, members=frozenset({"weights.bin"}))
    with pytest.raises(BundleError, match="allowed the data files"):
        make_session(model, checked=wider)
