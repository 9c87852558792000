"""``appliance agent serve --trusted-root FILE``: a node outside an image gets its trust anchor.

A real TUF registry in a temporary directory, a real agent on loopback and a real inference;
then the refusals: a different root is taken only when it chains from the trusted one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from agent.errors import VerificationError
from agent.updates.client import RegistryClient, metadata_dir
from provisioning.registry import init_registry, rotate_key, trusted_root
from tests.conftest import run_appliance
from testsupport.inference_support import Agent, raw_request, stub
from testsupport.updates_support import X, affine_bundle_at, expected, registry_with


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("trusted-root")
    return registry_with(tmp, [affine_bundle_at(tmp, "1.0.1")])


def _root_file(registry: Path, out: Path) -> Path:
    out.write_bytes(trusted_root(registry))
    return out


def test_serve_with_trusted_root_on_a_fresh_state_serves_the_model(registry: Path, tmp_path: Path) -> None:
    root = _root_file(registry, tmp_path / "root.json")
    state = tmp_path / "state"
    agent = Agent(state, "--trusted-root", str(root), "--registry", str(registry / "published"),
                  "--model", "affine")
    try:
        stb, pb = stub(agent.url)
        resp = stb.ModelInfer(raw_request(pb, "affine", [("x", "FP32", [2, 4], X.tobytes())]), timeout=30)
        got = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(2, 4)
        np.testing.assert_array_equal(got, expected("1.0.1"))
    finally:
        assert agent.stop() == 0
    assert (metadata_dir(state) / "root.json").read_bytes() == root.read_bytes()
    # The second start finds the same root: nothing to change, it serves again.
    again = Agent(state, "--trusted-root", str(root), "--model", "affine")
    assert again.stop() == 0


def test_a_foreign_root_is_refused_and_the_anchor_kept(registry: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    RegistryClient.initialize(state, trusted_root(registry))
    before = (metadata_dir(state) / "root.json").read_bytes()
    other = tmp_path / "other"
    init_registry(other)
    foreign = _root_file(other, tmp_path / "foreign.json")
    proc = run_appliance("agent", "serve", "--state-dir", state, "--port", "0", "--metrics-port", "0",
                         "--http-port", "0",
                         "--trusted-root", foreign, timeout=60)
    assert proc.returncode != 0
    assert f"--trusted-root {foreign}: root v1 is not the node's trusted root v1" in proc.stderr
    assert "refusing to change the trust anchor" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (metadata_dir(state) / "root.json").read_bytes() == before


def test_not_a_root_is_refused_on_a_fresh_state(tmp_path: Path) -> None:
    bogus = tmp_path / "root.json"
    bogus.write_text('{"signed": {}, "signatures": []}')
    proc = run_appliance("agent", "serve", "--state-dir", tmp_path / "state", "--port", "0",
                         "--metrics-port", "0", "--http-port", "0", "--trusted-root", bogus, timeout=60)
    assert proc.returncode != 0
    assert "not TUF root metadata" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (metadata_dir(tmp_path / "state") / "root.json").exists()


def test_rotation_chain_is_followed_one_version_at_a_time(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    init_registry(reg)
    v1 = trusted_root(reg)
    state = tmp_path / "state"
    assert RegistryClient.adopt_root(state, v1) == "initialised"
    assert RegistryClient.adopt_root(state, v1) == "unchanged"
    rotate_key(reg, "root")
    v2 = trusted_root(reg)
    rotate_key(reg, "root")
    v3 = trusted_root(reg)

    with pytest.raises(VerificationError, match=r"root v3 is not the node.s trusted root v1 .* skips"):
        RegistryClient.adopt_root(state, v3)
    assert RegistryClient.adopt_root(state, v2) == "rotated"
    assert (metadata_dir(state) / "root.json").read_bytes() == v2
    assert RegistryClient.adopt_root(state, v1) == "older"  # a baked root the node rotated past
    assert (metadata_dir(state) / "root.json").read_bytes() == v2

    # v2 of another registry has the right version but not the trusted keys' signatures.
    other = tmp_path / "other"
    init_registry(other)
    rotate_key(other, "root")
    fresh = tmp_path / "fresh"
    shutil.copytree(state, fresh)
    RegistryClient.initialize(fresh, v1)
    with pytest.raises(VerificationError, match="not signed by the threshold of the node's trusted root v1"):
        RegistryClient.adopt_root(fresh, trusted_root(other))
    assert (metadata_dir(fresh) / "root.json").read_bytes() == v1
