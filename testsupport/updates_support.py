"""Helpers for the update tests: registries of affine bundles whose versions compute different
functions, a node state directory that trusts the registry, and state-tree hashing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from agent.config import InferenceSection
from agent.inference.repository import ModelRepository
from agent.updates.client import RegistryClient
from provisioning.bundle import create_bundle
from provisioning.demo.models import affine_model, save_golden
from provisioning.registry import add_target, init_registry, publish, trusted_root

X = np.arange(8, dtype=np.float32).reshape(2, 4)


def scale_of(version: str) -> float:
    """Each version computes y = x * scale + 1: scale 2 for odd last parts, 3 for even ones."""
    return 2.0 if int(version.rsplit(".", 1)[-1]) % 2 else 3.0


def expected(version: str, x: np.ndarray | None = None) -> np.ndarray:
    x = X if x is None else x
    return (x * np.float32(scale_of(version)) + np.float32(1.0)).astype(np.float32)


def affine_bundle_at(tmp: Path, version: str, name: str = "affine") -> Path:
    """A real bundle of ``name`` at ``version`` computing ``x * scale_of(version) + 1``."""
    work = tmp / "bundles"
    model = affine_model(work / f"{name}-{version}.onnx", scale=scale_of(version))
    golden = save_golden(work / f"{name}-{version}.npz", {"x": X})
    return create_bundle(model, name=name, version=version, golden=[golden],
                         out=work / f"{name}-{version}.bundle").path


def registry_with(tmp: Path, bundles: list[Path], directory: Path | None = None) -> Path:
    """A real TUF registry with ``bundles`` published (one publish for all of them)."""
    directory = directory or tmp / "registry"
    if not (directory / "registry.toml").exists():
        init_registry(directory)
    for b in bundles:
        add_target(directory, b, kind="bundle")
    publish(directory)
    return directory


def node_state(state: Path, registry: Path, *installed: Path) -> Path:
    """A node state directory trusting ``registry``'s root, with ``installed`` bundles (active)."""
    RegistryClient.initialize(state, trusted_root(registry))
    repo = ModelRepository.for_state_dir(state, InferenceSection())
    for b in installed:
        repo.install(b, activate=True)
    return state


# The event log changes on every outcome, refusals included (that is its job).  With the
# registry's metadata already current (CheckUpdates first), nothing else under the state
# directory may change when an update is refused; see agent.updates.manager.KEPT_AFTER_REFUSAL
# for what a refusal that refreshed newer metadata keeps.
EXCLUDED_FROM_STATE_HASH = ("events/",)


def state_hash(state: Path) -> dict[str, str]:
    """Every entry under ``state`` (files by sha256, directories, symlinks), minus the event log."""
    out: dict[str, str] = {}
    for path in sorted(state.rglob("*")):
        rel = str(path.relative_to(state))
        if any(rel == e.rstrip("/") or rel.startswith(e) for e in EXCLUDED_FROM_STATE_HASH):
            continue
        if path.is_symlink():
            out[rel] = "-> " + str(path.readlink())
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out
