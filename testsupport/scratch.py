"""Big scratch folders of the system tier that go away when their fixture is done.

One system-tier session builds several images (root trees, squashfs, sparse disks, work folders):
left in pytest's temp folder until the session ends they add up to many GB, and CI's disk is
shared. A folder made here is removed when its fixture ends, unless a test of the session failed
since it was made (then it stays, to look at), or something is still mounted under it (then
removing it could reach into what is mounted: it stays, and the mount is named).
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (from /proc/self/mountinfo)."""
    root = path.resolve()
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if Path(point).is_relative_to(root):
            found.append(point)
    return found


@contextmanager
def scratch(request: pytest.FixtureRequest, name: str) -> Iterator[Path]:
    """A new folder under pytest's base temp, removed on leaving if every test since passed."""
    factory: pytest.TempPathFactory = request.getfixturevalue("tmp_path_factory")
    path = factory.mktemp(name)
    failed_before = request.session.testsfailed
    yield path
    if request.session.testsfailed != failed_before:
        return
    mounted = mounts_under(path)
    if mounted:
        warnings.warn(f"{path} kept: still mounted under it: {', '.join(mounted)}", stacklevel=2)
        return
    shutil.rmtree(path, ignore_errors=True)
