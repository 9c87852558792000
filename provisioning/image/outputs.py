"""Reproducibility and the stage's records: normalise a root, list every file, write an SBOM.

:func:`normalise` removes what differs between two builds of the same inputs (logs, caches,
machine-id, backup files, timestamped pycs, shadow's last-change days) and clamps every
mtime to SOURCE_DATE_EPOCH.  :func:`file_manifest` hashes every file (the witness two builds
are compared by, with the sha1 the SBOM needs); :func:`spdx_sbom` (from
:mod:`provisioning.image.sbom`) turns them, dpkg's records and the mirror's lock into SPDX 2.3.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from provisioning.errors import ImageError
from provisioning.image.plan import VENV
from provisioning.image.sbom import file_digests, installed_debs, installed_wheels, spdx_sbom
from provisioning.tools import run

__all__ = ["debian_packages", "file_manifest", "normalise", "python_packages", "spdx_sbom"]

log = logging.getLogger(__name__)

# Paths (relative to the root) whose content differs run to run and nothing needs.
_REMOVE = (
    "var/cache/ldconfig/aux-cache", "var/lib/dbus/machine-id", "etc/.pwd.lock",
    "etc/passwd-", "etc/group-", "etc/shadow-", "etc/gshadow-", "etc/subuid-", "etc/subgid-",
    "var/lib/dpkg/status-old", "var/lib/dpkg/diversions-old", "var/lib/dpkg/statoverride-old",
    "var/cache/debconf/config.dat-old", "var/cache/debconf/templates.dat-old",
    "var/lib/systemd/catalog/database", "var/lib/systemd/random-seed",
    "var/lib/systemd/credential.secret", "root/.bash_history", "root/.cache",
)
_EMPTY_DIRS = ("var/log", "var/cache/apt", "var/lib/apt/lists", "tmp", "var/tmp",
               "var/cache/man", "run")
_PY_DIRS = ("usr/lib/python3", f"{VENV.lstrip('/')}/lib")


def _walk(root: Path) -> Iterator[Path]:
    """Every path under ``root`` (not following symlinks), sorted, root itself first."""
    yield root
    stack = [root]
    while stack:
        current = stack.pop()
        entries = sorted(os.scandir(current), key=lambda e: e.name, reverse=True)
        for entry in entries:
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                stack.append(path)
        for entry in sorted(entries, key=lambda e: e.name):
            yield Path(entry.path)


def _empty_dir(path: Path) -> None:
    if not path.is_dir() or path.is_symlink():
        return
    for child in sorted(path.iterdir()):
        if child.is_dir() and not child.is_symlink():
            _empty_dir(child)  # directories stay: packages expect them (var/log/apt ...)
        else:
            child.unlink()


# Compilers run side by side.  A fixed number, not the build host's cores: a pyc's bytes depend
# on what its compiler process did before (marshal marks an object shared by its reference count),
# so each process must get the same files in the same order on every host.
COMPILERS = 2


def _sources(directory: Path) -> Iterator[Path]:
    """The .py files ``compileall`` compiles under ``directory``, in its order: names sorted,
    symlinked directories not followed."""
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        path = Path(entry.path)
        if entry.is_dir():
            if not entry.is_symlink():
                yield from _sources(path)
        elif entry.name.endswith(".py") and entry.is_file():
            yield path


def _shares(files: list[Path], parts: int) -> list[list[Path]]:
    """``files`` cut, in order, into ``parts`` runs of about the same bytes."""
    sizes = [f.stat().st_size for f in files]
    total, done = sum(sizes), 0
    shares: list[list[Path]] = []
    share: list[Path] = []
    for path, size in zip(files, sizes, strict=True):
        share.append(path)
        done += size
        if done * parts >= total * (len(shares) + 1) and len(shares) < parts - 1:
            shares.append(share)
            share = []
    shares.append(share)
    return shares + [[] for _ in range(parts - len(shares))]


# Hash-based pycs (valid whatever the mtimes; the same bytes each build), not checked against
# their source at import: the root is a dm-verity image, so a source and its pyc can only change
# together, with a new root.  Checked, every start read and hashed each imported module's source
# besides its pyc: 11 MB for the agent, decompressed and verity-checked on a cold first boot.
PYC_INVALIDATION = "unchecked-hash"


# A pyc's bytes depend on its compiler's history (marshal flags an object as shared by its
# reference count, which the garbage collector's timing moves), and the compilers run side by
# side over a root whose pycs are gone: had one imported a module the other had just compiled,
# its history, and so its output, would follow the race (two builds once differed in one pyc).
# So a compiler writes no pyc of what it imports (-B) and imports all it will ever use, the
# modules compileall and compile() load lazily included, from sources alone, before its first
# file.  tests/test_recompile.py checks that nothing is imported after that.
COMPILER_IMPORTS = ("compileall", "argparse", "linecache", "locale", "shutil", "tokenize", "tracemalloc",
                    "traceback", "unicodedata", "warnings")


def compile_argv(python: tuple[str, ...], *, report_imports: bool = False) -> list[str]:
    """``python`` running compileall over the files named on its stdin, one per line, after
    importing COMPILER_IMPORTS.  With ``report_imports`` it also prints to stderr, as
    ``IMPORTED [...]``, the modules it imported while compiling (tests: there should be none)."""
    main = "ok = compileall.main()"
    if report_imports:
        main = (f"before = set(sys.modules); {main}; "
                "print('IMPORTED', sorted(set(sys.modules) - before), file=sys.stderr)")
    script = f"import sys, {', '.join(COMPILER_IMPORTS)}; {main}; sys.exit(int(not ok))"
    return [*python, "-B", "-c", script, "-q", "-i", "-", "--invalidation-mode", PYC_INVALIDATION]


def _recompile(root: Path, source_date_epoch: int) -> None:
    """Replace every pyc with hash-based pycs (:data:`PYC_INVALIDATION`), compiled by
    COMPILERS processes, each over a fixed run of the sorted sources."""
    dirs = [d for d in root.glob("usr/lib/python3*") if d.is_dir()]
    dirs += [root / d for d in _PY_DIRS if (root / d).is_dir()]
    for base in dirs:
        for cache in sorted(base.rglob("__pycache__")):
            for pyc in cache.glob("*.pyc"):
                pyc.unlink()
    files = [f for base in sorted(set(dirs)) for f in _sources(base)]
    env = {"SOURCE_DATE_EPOCH": str(source_date_epoch), "PYTHONHASHSEED": "0"}

    def compile_share(share: list[Path]) -> tuple[int, str]:
        names = "".join(f"/{f.relative_to(root).as_posix()}\n" for f in share)
        # not check=True: compileall exits 1 when any one file does not compile (a package may
        # ship sources for another Python); _check_compiled judges the outcome as a whole
        done = run(compile_argv(("chroot", str(root), "/usr/bin/python3")), env=env,
                   input_bytes=names.encode(), check=False)
        return done.returncode, done.stderr.decode(errors="replace")

    with ThreadPoolExecutor(COMPILERS) as pool:
        outcomes = list(pool.map(compile_share, _shares(files, COMPILERS)))
    _check_compiled(outcomes, [f.relative_to(root) for f in _uncompiled(files, dirs)], len(files))


# More sources than this without a pyc and the compilers did not do their work: on the read-only
# root every start would compile those modules again in memory (the boot #14 measures).
UNCOMPILED_LIMIT = 0.01


def _uncompiled(files: Iterable[Path], dirs: Iterable[Path]) -> list[Path]:
    """The sources of ``files`` with no pyc in their ``__pycache__`` under ``dirs``."""
    written = {(p.parent.parent, p.name.rsplit(".", 2)[0])  # NAME.cpython-3XY.pyc
               for base in dirs for p in base.rglob("__pycache__/*.pyc")}
    return [f for f in files if (f.parent, f.stem) not in written]


def _check_compiled(outcomes: list[tuple[int, str]], uncompiled: list[Path], sources: int) -> None:
    """Judge the compilers' run: each must have finished (compileall's exit 0, or 1 when some
    file did not compile), and at most :data:`UNCOMPILED_LIMIT` of the ``sources`` may lack a
    pyc.  A few that do not compile are logged by name.

    Raises:
        ImageError: a compiler died (crash, signal, a Python it could not start) or too many
            sources have no pyc.
    """
    for code, stderr in outcomes:
        if code not in (0, 1):
            tail = " | ".join(stderr.strip().splitlines()[-3:]) or "no output"
            raise ImageError(f"configure: the root's pyc compiler (chroot python3 -m compileall) "
                             f"exited {code}: {tail}")
    if len(uncompiled) > sources * UNCOMPILED_LIMIT:
        raise ImageError(f"configure: {len(uncompiled)} of {sources} Python sources in the root have no "
                         f"pyc after compiling (at most {UNCOMPILED_LIMIT:.0%} may fail), among them "
                         f"{', '.join(map(str, uncompiled[:5]))}")
    if uncompiled:
        log.warning("configure: %d Python source(s) in the root did not compile and will be compiled "
                    "in memory at each import: %s", len(uncompiled),
                    ", ".join(map(str, uncompiled[:10])) + (" ..." if len(uncompiled) > 10 else ""))


def _shadow_days(root: Path, source_date_epoch: int) -> None:
    """shadow's last-change field is "today" in days; pin it to SOURCE_DATE_EPOCH's day."""
    path = root / "etc/shadow"
    if not path.exists():
        return
    day = str(source_date_epoch // 86400)
    lines = []
    for line in path.read_text().splitlines():
        fields = line.split(":")
        if len(fields) > 2 and fields[2]:
            fields[2] = day
        lines.append(":".join(fields))
    mode = path.stat().st_mode
    path.write_text("\n".join(lines) + "\n")
    path.chmod(stat.S_IMODE(mode))


def normalise(root: Path, source_date_epoch: int) -> None:
    """Make ``root`` reproducible: drop run-specific files, fixed pycs and shadow dates, clamp mtimes."""
    _recompile(root, source_date_epoch)
    for rel in _REMOVE:
        path = root / rel
        if path.is_dir() and not path.is_symlink():
            _empty_dir(path)
            path.rmdir()
        else:
            path.unlink(missing_ok=True)
    for rel in _EMPTY_DIRS:
        _empty_dir(root / rel)
    for key in sorted((root / "etc/ssh").glob("ssh_host_*")):
        key.unlink()  # host keys are made on the node, never shipped
    _shadow_days(root, source_date_epoch)
    clamp = source_date_epoch * 1_000_000_000
    for path in _walk(root):
        st = path.lstat()
        if st.st_mtime_ns > clamp:
            os.utime(path, ns=(clamp, clamp), follow_symlinks=False)


def _file_entry(root: Path, path: Path) -> dict[str, Any]:
    st = path.lstat()
    rel = "/" + path.relative_to(root).as_posix() if path != root else "/"
    entry: dict[str, Any] = {"path": rel, "mode": f"{st.st_mode:o}", "uid": st.st_uid,
                             "gid": st.st_gid, "mtime": int(st.st_mtime)}
    if stat.S_ISREG(st.st_mode):
        entry["size"] = st.st_size
        # sha1 too, read in the same pass: the SBOM's file entries need both (SPDX 2.3)
        entry["sha1"], entry["sha256"] = file_digests(path)
    elif stat.S_ISLNK(st.st_mode):
        entry["target"] = str(path.readlink())
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        entry["rdev"] = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    return entry


def file_manifest(root: Path) -> list[dict[str, Any]]:
    """Every path under ``root`` with mode, owner, mtime and (for files) size and sha256."""
    return [_file_entry(root, p) for p in _walk(root)]


def debian_packages(root: Path) -> list[dict[str, str]]:
    """Installed packages from ``root``'s dpkg status, sorted by name."""
    return [{"name": p.name, "version": p.version, "architecture": p.architecture,
             "source": p.source, "maintainer": p.maintainer} for p in installed_debs(root)]


def python_packages(root: Path) -> list[dict[str, str]]:
    """Distributions installed in the agent's venv (from their dist-info METADATA)."""
    return [{"name": w.name, "version": w.version} for w in installed_wheels(root)]
