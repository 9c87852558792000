"""Model names from requests never select another model or leave the store directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import InferenceSection
from agent.errors import NotFoundError
from agent.inference.repository import ModelRepository


@pytest.mark.parametrize("name", ["", "..", "../affine", "AFFINE", "affine/1", "a" * 65])
def test_bad_names_find_nothing(affine_bundle: Path, tmp_path: Path, name: str) -> None:
    repo = ModelRepository.for_state_dir(tmp_path / "state", InferenceSection())
    repo.install(affine_bundle)
    assert repo.store.find("affine").name == "affine"
    with pytest.raises(NotFoundError):
        repo.store.find(name)
    assert repo.store.active_version(name) is None
