"""A restarted serving process catches up with what its sibling serves (``_match``): the same
versions, not the active defaults, on a real repository with two installed versions."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from agent.config import InferenceSection
from agent.inference.repository import ModelRepository
from agent.inference.service import _match
from provisioning.demo.models import affine_model
from testsupport.inference_support import make_bundle


def _ready(repo: ModelRepository) -> list[tuple[str, str]]:
    return [(e.name, e.version) for e in repo.index(ready_only=True)]


def test_a_restarted_worker_serves_the_siblings_versions(tmp_path: Path) -> None:
    x = np.ones((1, 4), np.float32)
    repo = ModelRepository.for_state_dir(tmp_path / "state", InferenceSection())
    for name, version, scale in (("affine", "1.0.0", 1), ("affine", "1.1.0", 5), ("other", "2.0.0", 2)):
        repo.install(make_bundle(tmp_path, affine_model(tmp_path / f"{name}{version}.onnx", scale=scale),
                                 name, version, {"x": x}), activate=version != "1.1.0")

    async def main() -> list[list[tuple[str, str]]]:
        seen = []
        await repo.serve("affine")  # what a restarted worker serves by default: the active 1.0.0
        seen.append(_ready(repo))
        # the sibling serves 1.1.0 (loaded explicitly) and "other"
        await _match(repo, [["affine", "1.1.0"], ["other", "2.0.0"]])
        seen.append(_ready(repo))
        await _match(repo, [["affine", "1.0.0"], ["affine", "1.1.0"]])  # two versions; "other" unloaded
        seen.append(_ready(repo))
        await _match(repo, [])
        seen.append(_ready(repo))
        await repo.close()
        return seen

    assert asyncio.run(main()) == [
        [("affine", "1.0.0")],
        [("affine", "1.1.0"), ("other", "2.0.0")],
        [("affine", "1.0.0"), ("affine", "1.1.0")],
        [],
    ]
