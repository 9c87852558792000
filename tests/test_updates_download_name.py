"""The download's file name comes from the signed target path: it must be one safe path
component (issue 19, finding 4a).  Real TUF registry in a temp dir, the node's real client."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import VerificationError
from agent.updates.client import MAX_FILE_NAME, RegistryClient, download_name
from provisioning.registry import add_target, init_registry, publish, trusted_root


@pytest.mark.parametrize("path", ["bundles/a/", "bundles/a/..", "bundles/a/.", "bundles/a/.hidden",
                                  "bundles/a/x\x00y", "bundles/a/x\ny", "bundles/a/x\\y",
                                  "bundles/a/" + "n" * (MAX_FILE_NAME + 1)])
def test_unsafe_download_names_are_refused(path: str) -> None:
    with pytest.raises(VerificationError, match=r"file name .* refused"):
        download_name(path)


def test_safe_download_names_pass() -> None:
    assert download_name("bundles/affine/affine-1.0.2.bundle") == "affine-1.0.2.bundle"
    assert download_name("n" * MAX_FILE_NAME) == "n" * MAX_FILE_NAME


def test_signed_target_with_a_dot_name_is_not_downloaded(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Our registry tool refuses such names; a third party's registry need not: let it sign one.
    import re

    import provisioning.registry

    monkeypatch.setattr(provisioning.registry, "_FILE_RE", re.compile(r".+"))
    reg = tmp_path / "registry"
    init_registry(reg)
    blob = tmp_path / ".profile"
    blob.write_text("export PATH=/tmp/evil:$PATH\n")
    target = add_target(reg, blob, kind="file", name="profile", version="1")
    publish(reg)
    state = tmp_path / "state"
    RegistryClient.initialize(state, trusted_root(reg))
    client = RegistryClient(state, str(reg / "published"))
    client.refresh()
    (path,) = [t.path for t in client.targets()]
    assert path == "files/.profile", (path, target)
    dest = tmp_path / "staging"
    dest.mkdir()
    with pytest.raises(VerificationError, match="starts with a dot"):
        client.download(path, dest)
    assert list(dest.iterdir()) == []
