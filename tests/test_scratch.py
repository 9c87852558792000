"""The system tier's scratch folders: gone after a passing fixture, kept after a failure or a mount."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from testsupport.scratch import mounts_under, scratch


class _Request:
    """What scratch reads of a fixture request: the temp factory and the session's failure count."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self.factory = factory
        self.session = SimpleNamespace(testsfailed=0)

    def getfixturevalue(self, name: str) -> Any:
        assert name == "tmp_path_factory"
        return self.factory


def test_a_folder_goes_when_every_test_passed(tmp_path_factory: pytest.TempPathFactory) -> None:
    request = _Request(tmp_path_factory)
    with scratch(cast(pytest.FixtureRequest, request), "gone") as path:
        (path / "sub").mkdir()
        (path / "sub" / "big").write_bytes(b"x" * 4096)
    assert not path.exists()


def test_a_folder_stays_when_a_test_failed_meanwhile(tmp_path_factory: pytest.TempPathFactory) -> None:
    request = _Request(tmp_path_factory)
    with scratch(cast(pytest.FixtureRequest, request), "kept") as path:
        (path / "evidence").write_text("look here")
        request.session.testsfailed += 1
    assert (path / "evidence").read_text() == "look here"


def test_mounts_are_found_at_and_below_a_path(tmp_path: Path) -> None:
    assert "/proc" in mounts_under(Path("/"))
    assert mounts_under(Path("/proc")) and all(m.startswith("/proc") for m in mounts_under(Path("/proc")))
    assert mounts_under(tmp_path) == []


def test_a_folder_with_a_mount_under_it_is_not_removed(tmp_path: Path) -> None:
    """In a private mount namespace (the host sees nothing), a tmpfs under the folder keeps it,
    and what is on the tmpfs is untouched."""
    script = tmp_path / "mounted.py"
    script.write_text(
        "import pathlib, subprocess, sys, types, warnings\n"
        "from testsupport.scratch import scratch\n"
        "base = pathlib.Path(sys.argv[1])\n"
        "class Factory:\n"
        "    def mktemp(self, name):\n"
        "        (base / name).mkdir()\n"
        "        return base / name\n"
        "class Request:\n"
        "    session = types.SimpleNamespace(testsfailed=0)\n"
        "    def getfixturevalue(self, name):\n"
        "        return Factory()\n"
        "with warnings.catch_warnings(record=True) as said:\n"
        "    warnings.simplefilter('always')\n"
        "    with scratch(Request(), 's') as p:\n"
        "        (p / 'm').mkdir()\n"
        "        subprocess.run(['mount', '-t', 'tmpfs', 'none', str(p / 'm')], check=True)\n"
        "        (p / 'm' / 'file').write_text('x')\n"
        "print((p / 'm' / 'file').exists(), [str(w.message) for w in said])\n")
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, str(script),
                           str(tmp_path)], capture_output=True, text=True, check=False, cwd=root,
                          env={"PYTHONPATH": str(root), "PATH": os.environ["PATH"]})
    if proc.returncode != 0 and "Operation not permitted" in proc.stderr:
        pytest.skip("no mount namespace here")
    assert proc.returncode == 0, proc.stderr
    kept, said = proc.stdout.split(" ", 1)
    assert kept == "True" and "still mounted under it" in said and str(tmp_path / "s" / "m") in said
