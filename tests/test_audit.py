"""``appliance audit``'s checks before any scanner runs: target, tailoring, baseline, mirror."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import NotFoundError
from provisioning.errors import ImageError
from provisioning.image.audit import DEFAULT_TAILORING, audit, root_of, scanner_root, tree_digest
from testsupport.image_helpers import make_signed_mirror


def _root(tmp_path: Path) -> Path:
    root = tmp_path / "out/stages/configure/root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/os-release").write_text("ID=debian\n")
    return root


def test_root_of_a_build_dir_or_a_root(tmp_path: Path) -> None:
    root = _root(tmp_path)
    assert root_of(tmp_path / "out") == root.resolve() == root_of(root)
    with pytest.raises(NotFoundError, match="not a root filesystem"):
        root_of(tmp_path)
    (tmp_path / "disk.raw").write_bytes(b"")
    with pytest.raises(ImageError, match="auditing a disk image needs its root mounted"):
        root_of(tmp_path / "disk.raw")


def test_a_mirror_without_scanner_packages_says_how_to_add_them(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    keyring = make_signed_mirror(mirror, tmp_path / "work", {"hello-appliance": "1.0-1"})
    with pytest.raises(ImageError, match=r"holds no scanner packages; run `appliance mirror "
                                         r"sync-scanner --mirror .*mirror` \(network\) first"):
        scanner_root(mirror, tmp_path / "cache", keyring=keyring)
    assert not (tmp_path / "cache").exists()


def test_profile_and_baseline_are_checked_before_the_mirror(tmp_path: Path) -> None:
    """A typo in --profile or a broken baseline fails at once, not after the first scan."""
    root = _root(tmp_path)
    missing_mirror = tmp_path / "no-mirror"
    with pytest.raises(ImageError, match=r"no tailored profile extends .*_profile_standard"):
        audit(root, mirror=missing_mirror, out=tmp_path / "a", profiles=("standard",))
    (tmp_path / "b.json").write_text("{}")
    with pytest.raises(ImageError, match=r"b\.json: format = None"):
        audit(root, mirror=missing_mirror, out=tmp_path / "a", baseline=tmp_path / "b.json")
    with pytest.raises(NotFoundError, match="no lock"):
        audit(root, mirror=missing_mirror, out=tmp_path / "a", tailoring=DEFAULT_TAILORING)
    assert not (tmp_path / "a").exists()


def test_the_scanner_root_digest_sees_every_change_but_its_mount_points(tmp_path: Path) -> None:
    root = tmp_path / "scanner"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/oscap").write_bytes(b"\x7fELF scanner")
    (root / "usr/bin/oscap").chmod(0o755)
    (root / "bin").symlink_to("usr/bin")
    for sub in ("target", "out"):
        (root / sub).mkdir()
    first = tree_digest(root)
    (root / "out/report.html").write_text("results")  # the mount points are not the root
    (root / "target/etc").mkdir()
    assert tree_digest(root) == first
    changes = [
        lambda: (root / "usr/bin/oscap").write_bytes(b"\x7fELF scanned"),
        lambda: (root / "usr/bin/oscap").chmod(0o4755),
        lambda: ((root / "bin").unlink(), (root / "bin").symlink_to("/tmp")),
        lambda: (root / "usr/bin/extra").write_text(""),
        (root / "usr/lib").mkdir,
    ]
    seen = {first}
    for change in changes:
        change()
        now = tree_digest(root)
        assert now not in seen
        seen.add(now)
