"""The configure stage's pyc compilation in fixed shares: the files it hands to its compiler
processes are exactly those `compileall DIR` compiles, in its order, cut into runs that cover
them all once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from provisioning.image.outputs import _shares, _sources


def _tree(base: Path) -> Path:
    """A package tree with what compileall treats specially: a symlinked directory (not
    followed), a symlinked file (compiled), non-Python files and a __pycache__."""
    lib = base / "lib"
    (lib / "pkg/sub").mkdir(parents=True)
    (lib / "pkg/__pycache__").mkdir()
    for name in ("a.py", "pkg/__init__.py", "pkg/b.py", "pkg/sub/c.py", "pkg/sub/Z.py",
                 "pkg/data.txt", "pkg/d.pyi"):
        (lib / name).write_text("x = 1\n" * (len(name) + 3))
    (base / "elsewhere").mkdir()
    (base / "elsewhere/e.py").write_text("y = 2\n")
    (lib / "linked").symlink_to(base / "elsewhere")
    (lib / "f.py").symlink_to(base / "elsewhere/e.py")
    return lib


def test_the_sources_are_those_compileall_compiles_in_its_order(tmp_path: Path) -> None:
    lib = _tree(tmp_path / "one")
    ours = [p.relative_to(lib).as_posix() for p in _sources(lib)]
    assert ours == sorted(ours, key=lambda s: s.split("/"))
    # what compileall itself compiles: the sources next to a new pyc
    done = subprocess.run([sys.executable, "-m", "compileall", "-q", str(lib)], check=False)
    assert done.returncode == 0
    compiled = sorted(f"{p.parent.parent.relative_to(lib).as_posix()}/{p.name.split('.')[0]}.py".lstrip("./")
                      for p in lib.rglob("__pycache__/*.pyc"))
    assert sorted(ours) == compiled
    assert "linked/e.py" not in ours and "f.py" in ours and "pkg/d.pyi" not in ours


def test_the_shares_cover_every_file_once_in_order(tmp_path: Path) -> None:
    files = []
    for i, size in enumerate([10, 400, 3, 3, 3, 250, 90, 1, 500, 7]):
        path = tmp_path / f"m{i:02}.py"
        path.write_bytes(b"#" * size)
        files.append(path)
    for parts in (1, 2, 3):
        shares = _shares(files, parts)
        assert len(shares) == parts
        assert [f for share in shares for f in share] == files
    for parts in (2, 3):  # each share within one file of an even split of the bytes
        loads = [sum(f.stat().st_size for f in share) for share in _shares(files, parts)]
        assert max(loads) <= sum(loads) / parts + 500, loads
    assert _shares([], 2) == [[], []]
