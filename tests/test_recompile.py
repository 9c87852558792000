"""The configure stage's pyc compilation in fixed shares: the files it hands to its compiler
processes are exactly those `compileall DIR` compiles, in its order, cut into runs that cover
them all once; and the pycs it writes are hash-based and not checked against their source."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from provisioning.errors import ImageError
from provisioning.image.outputs import _check_compiled, _shares, _sources, _uncompiled, compile_argv


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


def test_pycs_are_hash_based_and_imported_without_their_source(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    (lib / "pkg").mkdir(parents=True)
    (lib / "pkg/__init__.py").write_text("")
    (lib / "pkg/mod.py").write_text("VALUE = 'compiled'\n")
    names = "".join(f"{p}\n" for p in sorted(lib.rglob("*.py")))
    env = {"SOURCE_DATE_EPOCH": "1700000000", "PYTHONHASHSEED": "0", "PATH": "/usr/bin:/bin"}

    def compile_tree() -> dict[str, bytes]:
        done = subprocess.run(compile_argv((sys.executable,)), input=names.encode(), env=env,
                              capture_output=True, check=False)
        assert done.returncode == 0, done.stderr
        return {p.name: p.read_bytes() for p in sorted(lib.rglob("__pycache__/*.pyc"))}

    first = compile_tree()
    assert len(first) == 2
    for name, pyc in first.items():  # PEP 552 flags: bit 0 hash-based, bit 1 check the source
        assert int.from_bytes(pyc[4:8], "little") == 0b01, name
    assert compile_tree() == first  # the same bytes from the same sources
    # On the sealed root a source cannot change without its pyc; here it does, and the import
    # still runs the pyc: it never read the source.
    (lib / "pkg/mod.py").write_text("VALUE = 'source'\n")
    read = subprocess.run([sys.executable, "-c", "import pkg.mod; print(pkg.mod.VALUE)"],
                          env={**env, "PYTHONPATH": str(lib), "PYTHONDONTWRITEBYTECODE": "1"},
                          capture_output=True, text=True, check=True)
    assert read.stdout.strip() == "compiled"


def test_a_compiler_imports_nothing_while_it_compiles(tmp_path: Path) -> None:
    """What compileall and compile() import lazily (a non-ASCII name, a SyntaxWarning, a syntax
    error, a coding cookie) is imported before the first file: a compiler's history is then the
    same whatever its neighbour has compiled meanwhile (see outputs.COMPILER_IMPORTS)."""
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "a_plain.py").write_text("x = 1\n")
    (lib / "b_names.py").write_text("café = 'ü'\n", encoding="utf-8")
    (lib / "c_warns.py").write_text("pattern = '\\d+'\nassert (1, 'never')\n")
    (lib / "d_broken.py").write_text("def f(:\n")
    (lib / "e_latin.py").write_bytes("# -*- coding: latin-1 -*-\ns = 'é'\n".encode("latin-1"))
    names = "".join(f"{p}\n" for p in sorted(lib.glob("*.py")))
    done = subprocess.run(compile_argv((sys.executable,), report_imports=True), input=names.encode(),
                          env={"PYTHONHASHSEED": "0", "PATH": "/usr/bin:/bin"}, capture_output=True,
                          check=False)
    err = done.stderr.decode()
    assert done.returncode == 1 and "d_broken.py" in done.stdout.decode() + err  # the broken file fails
    assert "SyntaxWarning" in err  # the warnings were formatted, in this process
    assert [line for line in err.splitlines() if line.startswith("IMPORTED")] == ["IMPORTED []"], err
    assert len(list(lib.glob("__pycache__/*.pyc"))) == 4  # all but the broken one


def test_sources_without_a_pyc_are_found_and_judged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """After the compilers ran, the sources with no pyc are those that did not compile; a few
    pass (logged), a compiler that died or a root mostly left uncompiled fails the build."""
    lib = tmp_path / "lib"
    (lib / "pkg").mkdir(parents=True)
    (lib / "pkg/__init__.py").write_text("")
    (lib / "pkg/good.py").write_text("x = 1\n")
    (lib / "pkg/broken.py").write_text("def f(:\n")
    (lib / "top.py").write_text("y = 2\n")
    files = list(_sources(lib))
    names = "".join(f"{p}\n" for p in files)
    done = subprocess.run(compile_argv((sys.executable,)), input=names.encode(), capture_output=True,
                          env={"PYTHONHASHSEED": "0", "PATH": "/usr/bin:/bin"}, check=False)
    assert done.returncode == 1
    uncompiled = _uncompiled(files, [lib])
    assert uncompiled == [lib / "pkg/broken.py"]
    assert _uncompiled(files, [tmp_path / "elsewhere"]) == files  # pycs looked for where the sources are

    _check_compiled([(1, ""), (0, "")], uncompiled, sources=400)  # 1 of 400: under the limit
    assert "1 Python source(s)" in caplog.text and "pkg/broken.py" in caplog.text  # named in the log
    with pytest.raises(ImageError, match=r"1 of 4 Python sources .* no pyc .*pkg/broken\.py"):
        _check_compiled([(1, ""), (0, "")], uncompiled, sources=4)
    with pytest.raises(ImageError, match=r"exited -11: .*Segmentation fault"):
        _check_compiled([(0, ""), (-11, "Fatal Python error: Segmentation fault")], [], sources=400)
    with pytest.raises(ImageError, match="exited 127: no output"):
        _check_compiled([(127, "")], [], sources=400)
