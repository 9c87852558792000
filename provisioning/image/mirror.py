"""The air-gapped local mirror: every .deb and wheel the build needs, pinned in a lock.

Layout of ``MIRROR``::

    lock.json                 names, versions, sha256 and size of every file below
    debian/pool/*.deb         the image's whole package closure (as apt downloaded it)
    debian/indices/*          Debian's InRelease and Packages index (gzip) they came from
    debian/Packages, Release  a flat repository over pool/ that mmdebstrap installs from
    wheels/*.whl              the agent's wheel and its runtime dependencies for the image's
    wheels/requirements.txt   Python and platform, pinned with --hash for pip --require-hashes
    scanner/pool, indices,    the audit's scanner root (OpenSCAP 1.4, ComplianceAsCode content,
    scanner/Packages, Release Lynis): the same chain as debian/, locked in the lock's "scanner"

Trust, and why no site mirror key: every .deb is checked back to Debian's own signature.
:func:`verify_mirror` checks each InRelease with gpgv against the Debian archive keyring,
each Packages index against InRelease, and each .deb against its Packages stanza, as well as
against the lock.  The flat repository that mmdebstrap reads (``[trusted=yes]``) is a
derived file whose hash is in the lock and which a build only uses after that chain passed.
Wheels have no upstream signature: their sha256 is pinned in the lock at sync time and pip
installs them with ``--require-hashes``; the lock's own sha256 is printed by ``sync`` and
recorded in the build manifest so it can be compared out of band.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from email.parser import Parser
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement

from agent.errors import NotFoundError, VerificationError
from agent.fsutil import atomic_write_bytes, atomic_write_text, file_sha256
from provisioning.errors import ImageError, ProfileError
from provisioning.image._debian import (
    deb_filename_key,
    parse_release_sha256,
    strip_clearsign,
    wanted_entries,
)
from provisioning.image.aptlog import follow
from provisioning.image.gpu_manifest import GpuManifest
from provisioning.image.gpu_manifest import wheel_requirements as gpu_wheel_requirements
from provisioning.image.gpu_stage import check_lock, check_wheel_files
from provisioning.image.profile import Profile, package_set
from provisioning.output import Progress
from provisioning.tools import require_tool, run, run_lines

__all__ = [
    "DEBIAN_KEYRING",
    "LOCK",
    "SCANNER_DIR",
    "SCANNER_PACKAGES",
    "Lock",
    "LockedFile",
    "debian_source",
    "file_sha256",
    "load_lock",
    "missing_packages",
    "sync_mirror",
    "sync_scanner",
    "verify_mirror",
]

log = logging.getLogger(__name__)

LOCK = "lock.json"
LOCK_FORMAT = 1
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")

# The audit's scanner root: trixie's OpenSCAP 1.4 (the host's 1.3 cannot read a trixie root's
# dpkg database) and Lynis, with the ComplianceAsCode content from forky, the first suite whose
# ssg-debian (0.1.82) carries ssg-debian13-ds.xml.  Apt prefers trixie (Default-Release) and
# takes only the two content packages from forky.
SCANNER_DIR = "scanner"
SCANNER_SUITE = "trixie"
SCANNER_CONTENT_SUITE = "forky"
SCANNER_CONTENT = ("ssg-debian", "ssg-base")
SCANNER_PACKAGES = ("openscap-scanner", "lynis", *SCANNER_CONTENT)
_CHUNK = 1 << 20
Step = Callable[[str], None]


@dataclass(frozen=True)
class LockedFile:
    """One file of the mirror: ``path`` relative to the mirror root."""

    path: str
    sha256: str
    size: int
    name: str = ""
    version: str = ""
    architecture: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "sha256": self.sha256, "size": self.size}
        for key in ("name", "version", "architecture"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        if self.extra:
            out["extra"] = dict(sorted(self.extra.items()))
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LockedFile:
        return cls(data["path"], data["sha256"], int(data["size"]), data.get("name", ""),
                   data.get("version", ""), data.get("architecture", ""),
                   dict(data.get("extra", {})))


@dataclass(frozen=True)
class Lock:
    suite: str
    architecture: str
    python_version: str
    requested: tuple[str, ...]
    debs: tuple[LockedFile, ...]
    indices: tuple[LockedFile, ...]
    repo: tuple[LockedFile, ...]
    wheels: tuple[LockedFile, ...]
    onnxruntime: str = "onnxruntime"
    # The audit's scanner root (debs, indices and flat repository under scanner/); empty in
    # a lock written before the mirror carried it.
    scanner: tuple[LockedFile, ...] = ()

    @property
    def package_names(self) -> frozenset[str]:
        return frozenset(d.name for d in self.debs)

    def files(self) -> tuple[LockedFile, ...]:
        return self.debs + self.indices + self.repo + self.wheels + self.scanner

    @property
    def scanner_debs(self) -> tuple[LockedFile, ...]:
        return tuple(f for f in self.scanner if f.path.startswith(f"{SCANNER_DIR}/pool/"))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": LOCK_FORMAT, "suite": self.suite, "architecture": self.architecture,
            "python_version": self.python_version, "onnxruntime": self.onnxruntime,
            "requested": list(self.requested),
            "debs": [f.to_json() for f in self.debs],
            "indices": [f.to_json() for f in self.indices],
            "repo": [f.to_json() for f in self.repo],
            "wheels": [f.to_json() for f in self.wheels],
            **({"scanner": [f.to_json() for f in self.scanner]} if self.scanner else {}),
        }

    def canonical(self) -> bytes:
        return (json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n").encode()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()


def load_lock(mirror: Path) -> Lock:
    """Read ``MIRROR/lock.json``.

    Raises:
        NotFoundError: no lock (the mirror was never synced, or a sync did not finish).
        ImageError: the lock is malformed.
    """
    path = mirror / LOCK
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise NotFoundError(f"{path}: no lock; run `appliance mirror sync PROFILE --mirror "
                            f"{mirror}` first") from None
    except ValueError as exc:
        raise ImageError(f"{path}: not valid JSON: {exc}") from None
    try:
        if data["format"] != LOCK_FORMAT:
            raise ImageError(f"{path}: format = {data['format']!r}: this version reads {LOCK_FORMAT}")
        files = {k: tuple(LockedFile.from_json(f) for f in data[k])
                 for k in ("debs", "indices", "repo", "wheels")}
        return Lock(data["suite"], data["architecture"], data["python_version"],
                    tuple(data["requested"]), files["debs"], files["indices"], files["repo"],
                    files["wheels"], data.get("onnxruntime", "onnxruntime"),
                    tuple(LockedFile.from_json(f) for f in data.get("scanner", [])))
    except (KeyError, TypeError, ValueError) as exc:
        raise ImageError(f"{path}: malformed lock: {type(exc).__name__}: {exc}") from None


def missing_packages(profile: Profile, lock: Lock, extra: tuple[str, ...] = ()) -> list[str]:
    """Packages the profile asks for that the mirror does not hold (sorted)."""
    return sorted(set(package_set(profile, extra)) - lock.package_names)


def debian_source(mirror: Path) -> str:
    """The one-line apt source mmdebstrap installs from (the flat repository, checked by hash)."""
    # copy:// (not file://): mmdebstrap copies the repository into the chroot, whose apt
    # cannot see host paths, and removes it again with the other apt state.
    return f"deb [trusted=yes] copy://{(mirror / 'debian').resolve()} ./"


# ------------------------------------------------------------------ verification


def _check_inrelease(path: Path, keyring: Path) -> str:
    """The signed body of ``path`` after gpgv found at least one valid Debian signature."""
    result = run([require_tool("gpgv"), "--status-fd", "1", "--keyring", keyring, path],
                 check=False)
    status = result.text
    if "[GNUPG:] VALIDSIG" not in status or "[GNUPG:] BADSIG" in status:
        raise VerificationError(f"{path}: no valid signature by a key in {keyring}:\n"
                                + result.stderr.decode(errors="replace")[-2000:])
    return strip_clearsign(path.read_text())


def _signed_index(mirror: Path, path: str, signed: tuple[str, int]) -> str:
    """The text of the gzipped index ``path``, whose (sha256, size) must be ``signed``.

    One decompression for the check and the parse, and never more than the signed size held
    in memory: a longer stream is a mismatch, whatever it would have grown to.

    Raises:
        VerificationError: the index is not the signed one.
    """
    with gzip.open(mirror / path, "rb") as handle:
        data = handle.read(signed[1] + 1)
    actual = (hashlib.sha256(data).hexdigest(), len(data))
    if actual != signed:
        raise VerificationError(f"{mirror}: {path}: sha256/size {actual} does not match "
                                f"the signed InRelease's {signed}")
    return data.decode("utf-8")


def _check_files(mirror: Path, files: Iterable[LockedFile], step: Step | None) -> None:
    for f in files:
        path = mirror / f.path
        if not path.is_file():
            raise VerificationError(f"{mirror}: {f.path} is in the lock but missing")
        actual = file_sha256(path)
        if actual != f.sha256 or path.stat().st_size != f.size:
            raise VerificationError(f"{mirror}: {f.path}: sha256 {actual} does not match the "
                                    f"lock's {f.sha256}")
        if step:
            step(f.path)


def _debian_entries(mirror: Path, indices: tuple[LockedFile, ...], keyring: Path,
                    wanted: set[str]) -> dict[tuple[str, str, str], str]:
    """(name, version, arch) -> sha256 from signature-checked Debian indices, for ``wanted``."""
    releases: dict[str, dict[str, tuple[str, int]]] = {}
    for f in indices:
        if f.extra.get("kind") == "InRelease":
            releases[f.path] = parse_release_sha256(_check_inrelease(mirror / f.path, keyring))
    entries: dict[tuple[str, str, str], str] = {}
    for f in indices:
        if f.extra.get("kind") != "Packages":
            continue
        signed = releases.get(f.extra["release"], {}).get(f.extra["release_path"])
        if signed is None:
            raise VerificationError(f"{mirror}: {f.path}: {f.extra['release_path']} is not listed "
                                    f"in {f.extra['release']}")
        for e in wanted_entries(_signed_index(mirror, f.path, signed), wanted):
            if e.name in wanted:  # the stanza's own Package field, as parse_stanzas reads it
                entries[(e.name, e.version, e.architecture)] = e.sha256
    return entries


def _check_debs(mirror: Path, debs: tuple[LockedFile, ...],
                signed_by: dict[tuple[str, str, str], str]) -> None:
    """Raise VerificationError unless every deb's sha256 is the one ``signed_by`` holds for it."""
    for d in debs:
        signed = signed_by.get((d.name, d.version, d.architecture))
        if signed != d.sha256:
            raise VerificationError(f"{mirror}: {d.path}: {d.name} {d.version} "
                                    + ("is in no signed Packages index" if signed is None else
                                       f"has sha256 {d.sha256}, Debian's index says {signed}"))


def verify_mirror(mirror: Path, *, keyring: Path = DEBIAN_KEYRING,
                  step: Step | None = None) -> Lock:
    """Recheck every file of the mirror against the lock, and every .deb back to Debian's signature.

    ``step(path)`` is called after each file checks out (for progress displays).

    Raises:
        NotFoundError, ImageError: no lock, or a malformed one.
        VerificationError: a file is missing, altered or unexpected; an InRelease signature
            does not verify; a Packages index or a .deb does not match the signed chain.
    """
    lock = load_lock(mirror)
    _check_files(mirror, lock.files(), step)
    # The image's pool answers only to the image's indices, never to the scanner's testing
    # (forky) one; the scanner's pool may answer to either.
    image = _debian_entries(mirror, lock.indices, keyring,
                            {d.name for d in lock.debs + lock.scanner_debs})
    scanner = _debian_entries(mirror, tuple(f for f in lock.scanner if "kind" in f.extra),
                              keyring, {d.name for d in lock.scanner_debs})
    _check_debs(mirror, lock.debs, image)
    _check_debs(mirror, lock.scanner_debs, image | scanner)
    listed = {f.path for f in lock.files()}
    for sub in ("debian/pool", "wheels", f"{SCANNER_DIR}/pool"):
        for path in sorted((mirror / sub).glob("*")):
            rel = path.relative_to(mirror).as_posix()
            if rel not in listed and rel != "wheels/requirements.txt":
                raise VerificationError(f"{mirror}: {rel} is not in the lock")
    return lock


# ------------------------------------------------------------------ sync: Debian


def _mmdebstrap_download(profile: Profile, packages: tuple[str, ...], debs: Path,
                         lists: Path, bar: Progress | None) -> None:
    """Resolve and download the closure with a real bootstrap; apt checks Release signatures.

    With ``bar``: apt's "Get:" lines counted in bytes against its "Need to get" totals.
    """
    d = profile.debian
    include = ",".join(p for p in packages)
    argv = [require_tool("mmdebstrap"), f"--variant={d.variant}", f"--architectures={d.architecture}",
            f"--components={','.join(d.components)}", f"--include={include}",
            "--skip=essential/unlink", f"--keyring={DEBIAN_KEYRING}",
            f"--customize-hook=sync-out /var/cache/apt/archives {debs}",
            f"--customize-hook=sync-out /var/lib/apt/lists {lists}",
            "--format=null", d.suite, "/dev/null", d.archive]
    if bar is None:
        run(argv)
        return
    bar.stage("download", None, "B")
    run_lines([argv[0], "--verbose", *argv[1:]],
              follow(bar, lambda state: (state.downloaded_bytes, state.need_bytes or None)))


def _release_path(list_name: str) -> tuple[str, str]:
    """apt list file name -> (InRelease list file name, path inside the Release file).

    ``deb.debian.org_debian_dists_trixie_main_binary-amd64_Packages`` ->
    (``..._dists_trixie_InRelease``, ``main/binary-amd64/Packages``); suite names have no ``_``.

    Raises:
        ImageError: the name has no ``_dists_SUITE_`` part.
    """
    found = re.search(r"_dists_[^_]+_", list_name)
    if found is None:
        raise ImageError(f"{list_name}: not an apt list file name (no _dists_SUITE_)")
    return list_name[:found.end()] + "InRelease", list_name[found.end():].replace("_", "/")


def _store_debian(mirror: Path, debs: Path, lists: Path, step: Step, *, sub: str = "debian",
                  bar: Progress | None = None) -> tuple[tuple[LockedFile, ...], tuple[LockedFile, ...]]:
    pool = mirror / sub / "pool"
    indices_dir = mirror / sub / "indices"
    for d in (pool, indices_dir):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    indices: list[LockedFile] = []
    for src in sorted(lists.iterdir()):
        if src.name.endswith("_InRelease"):
            shutil.copyfile(src, indices_dir / src.name)
            rel = f"{sub}/indices/{src.name}"
            indices.append(LockedFile(rel, file_sha256(indices_dir / src.name),
                                      src.stat().st_size, extra={"kind": "InRelease"}))
        elif src.name.endswith("_Packages"):
            release, inner = _release_path(src.name)
            dest = indices_dir / (src.name + ".gz")
            with src.open("rb") as fin, dest.open("wb") as raw, \
                    gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as fout:
                shutil.copyfileobj(fin, fout, _CHUNK)
            indices.append(LockedFile(f"{sub}/indices/{dest.name}", file_sha256(dest),
                                      dest.stat().st_size,
                                      extra={"kind": "Packages",
                                             "release": f"{sub}/indices/{release}",
                                             "release_path": inner}))
    locked: list[LockedFile] = []
    downloaded = sorted(debs.glob("*.deb"))
    if bar is not None:
        bar.stage("pool", sum(p.stat().st_size for p in downloaded), "B")
        bar.set_phase(f"hashing {len(downloaded)} packages")
    for src in downloaded:
        name, version, arch = deb_filename_key(src.name)
        shutil.copyfile(src, pool / src.name)
        locked.append(LockedFile(f"{sub}/pool/{src.name}", file_sha256(pool / src.name),
                                 src.stat().st_size, name, version, arch))
        step(src.name)
        if bar is not None:
            bar.advance(src.stat().st_size)
    return tuple(locked), tuple(indices)


def _flat_repo(mirror: Path, suite: str, sub: str = "debian") -> tuple[LockedFile, ...]:
    """SUB/Packages and SUB/Release over pool/, so apt can read it as ``./``."""
    repo = mirror / sub
    tool = require_tool("apt-ftparchive")
    packages = run([tool, "packages", "pool"], cwd=repo).stdout
    atomic_write_bytes(repo / "Packages", packages)
    (repo / "Release").unlink(missing_ok=True)  # it must not list (and hash) itself
    # Suite and Codename let mmdebstrap's ?archive()/?codename() patterns (minbase's
    # Priority: required set) match this repository as they match Debian's.
    opts = [f"APT::FTPArchive::Release::{k}={v}" for k, v in (
        ("Date", "Thu, 01 Jan 1970 00:00:00 UTC"), ("Suite", suite), ("Codename", suite),
        ("Origin", "Debian"), ("Label", "Debian"))]
    release = run([tool, *(a for o in opts for a in ("-o", o)), "release", "."], cwd=repo).stdout
    atomic_write_bytes(repo / "Release", release)
    return tuple(LockedFile(f"{sub}/{n}", file_sha256(repo / n), (repo / n).stat().st_size)
                 for n in ("Packages", "Release"))


# ------------------------------------------------------------------ sync: wheels


def project_root() -> Path:
    """The checkout this code runs from (its pyproject.toml builds the agent's wheel)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise ImageError(f"{root}: no pyproject.toml; the agent's wheel is built from a checkout")
    return root


_COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                      ".mypy_cache", ".ruff_cache", ".pytest_cache", "out", "work",
                                      ".tools", ".hypothesis", "*_pb2*.py", "*_pb2*.pyi")


def build_agent_wheel(dest: Path) -> Path:
    """Build this project's wheel from a clean copy of the checkout (no build isolation).

    Raises:
        ToolError: the build fails.
    """
    with tempfile.TemporaryDirectory(prefix="agent-src-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(project_root(), src, ignore=_COPY_IGNORE)
        run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
             "--disable-pip-version-check", "-q", "-w", dest, src])
    wheels = sorted(dest.glob("sovereign_appliance-*.whl"))
    if len(wheels) != 1:
        raise ImageError(f"{dest}: expected one agent wheel, found {[w.name for w in wheels]}")
    return wheels[0]


# onnxruntime-genai comes in builds matched to an onnxruntime flavour: the -cuda one requires
# onnxruntime-gpu, the plain one the CPU onnxruntime.  Installing the wrong one next to the
# profile's flavour would put both onnxruntime packages (one module) into the venv.
_GENAI_FOR = {"onnxruntime": "onnxruntime-genai", "onnxruntime-gpu": "onnxruntime-genai-cuda"}
_END = r"(?=[\s<>=!~;\[]|$)"


def wheel_requirements(wheel: Path, onnxruntime: str,
                       gpu_set: GpuManifest | None = None) -> list[str]:
    """The wheel's unconditional Requires-Dist, with the onnxruntime flavour chosen by the
    profile (and the onnxruntime-genai build matched to it).

    With a GPU driver set, a requirement on a distribution the set pins (onnxruntime-gpu,
    onnxruntime-genai-cuda) is left out: the set's exact pins (gpu_manifest.wheel_requirements)
    decide which build is fetched, once the agent is seen to accept each pinned version (else
    the image's venv could not be installed).

    Raises:
        ProfileError: the agent's requirement excludes a version the driver set pins.
    """
    with zipfile.ZipFile(wheel) as zf:
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(meta_name).decode())
    genai = _GENAI_FOR.get(onnxruntime, "onnxruntime-genai")
    reqs = []
    for req in meta.get_all("Requires-Dist") or []:
        if ";" in req and "extra ==" in req.split(";", 1)[1]:
            continue  # optional extras (operator, test) are not part of the agent
        chosen = re.sub(rf"^onnxruntime(-gpu)?{_END}", onnxruntime, req)
        chosen = re.sub(rf"^onnxruntime-genai(-cuda)?{_END}", genai, chosen).strip()
        if gpu_set is None or not _pinned_by(gpu_set, chosen, wheel):
            reqs.append(chosen)
    return reqs


def _pinned_by(gpu_set: GpuManifest, requirement: str, wheel: Path) -> bool:
    """Whether the driver set pins ``requirement``'s distribution, at a version it accepts.

    Raises:
        ProfileError: it pins a version the requirement excludes.
    """
    req = Requirement(requirement)
    pin = gpu_set.wheel(req.name)
    if pin is None:
        return False
    if not req.specifier.contains(pin.version, prereleases=True):
        raise ProfileError(f"{gpu_set.path}: [[wheels]] {pin.name} version = {pin.version!r}: the "
                           f"agent ({wheel.name}) requires {requirement}; pin a version it "
                           "accepts, or change the agent's requirement")
    return True


def _platforms(profile: Profile) -> list[str]:
    major, minor = (int(x) for x in profile.glibc_version.split("."))
    machine = profile.machine
    tags = [f"manylinux_{major}_{m}_{machine}" for m in range(minor, 16, -1)]
    return [*tags, f"manylinux2014_{machine}", f"manylinux2010_{machine}",
            f"manylinux1_{machine}", "any"]


def _wheel_name_version(path: Path) -> tuple[str, str]:
    parts = path.name.split("-")
    return parts[0].lower().replace("_", "-"), parts[1]


def _sync_wheels(profile: Profile, mirror: Path, step: Step,
                 bar: Progress | None = None) -> tuple[LockedFile, ...]:
    wheels = mirror / "wheels"
    if wheels.exists():
        shutil.rmtree(wheels)
    wheels.mkdir(parents=True)
    if bar is not None:
        bar.stage("wheels", None)
        bar.set_phase("building the agent's wheel")
    agent = build_agent_wheel(wheels)
    step(agent.name)
    if bar is not None:
        bar.set_phase("downloading its dependencies (pip)")
    reqs = [*wheel_requirements(agent, profile.python.onnxruntime, profile.gpu_set),
            *profile.python.extra]
    if profile.gpu_set is not None:  # the driver set's wheels, exactly as pinned
        reqs += gpu_wheel_requirements(profile.gpu_set)
    py = profile.python_version
    argv: list[str | Path] = [
        sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q",
        "--only-binary=:all:", "--python-version", py, "--implementation", "cp",
        "--abi", f"cp{py.replace('.', '')}", "--abi", "abi3", "--abi", "none", "-d", wheels]
    for tag in _platforms(profile):
        argv += ["--platform", tag]
    run([*argv, *reqs], env={"PIP_NO_INPUT": "1"})
    if profile.gpu_set is not None:
        check_wheel_files(profile.gpu_set, sorted(wheels.glob("*.whl")))
    locked = []
    lines = []
    found = sorted(wheels.glob("*.whl"))
    if bar is not None:
        bar.stage("wheels", sum(p.stat().st_size for p in found), "B")
        bar.set_phase(f"hashing {len(found)} wheels")
    for path in found:
        name, version = _wheel_name_version(path)
        digest = file_sha256(path)
        locked.append(LockedFile(f"wheels/{path.name}", digest, path.stat().st_size, name, version))
        lines.append(f"{name}=={version} --hash=sha256:{digest}")
        step(path.name)
        if bar is not None:
            bar.advance(path.stat().st_size)
    atomic_write_text(wheels / "requirements.txt", "\n".join(lines) + "\n")
    return tuple(locked)


# ------------------------------------------------------------------ sync: the audit's scanner


def _scanner_files(mirror: Path, archive: str, step: Step) -> tuple[LockedFile, ...]:
    """Download the scanner root's closure into MIRROR/scanner (apt checks the signatures)."""
    include = ",".join(f"{p}/{SCANNER_CONTENT_SUITE}" if p in SCANNER_CONTENT else p
                       for p in SCANNER_PACKAGES)
    with tempfile.TemporaryDirectory(prefix="scanner-sync-", dir=mirror) as tmp:
        debs, lists = Path(tmp) / "debs", Path(tmp) / "lists"
        debs.mkdir()
        lists.mkdir()
        log.info("scanner: %s InRelease accepted past its Valid-Until (its signature is still "
                 "checked, and the lock pins it by hash)", SCANNER_CONTENT_SUITE)
        run([require_tool("mmdebstrap"), "--variant=minbase", "--architectures=amd64",
             "--components=main", f"--include={include}", "--skip=essential/unlink",
             f"--keyring={DEBIAN_KEYRING}", f'--aptopt=APT::Default-Release "{SCANNER_SUITE}"',
             f"--customize-hook=sync-out /var/cache/apt/archives {debs}",
             f"--customize-hook=sync-out /var/lib/apt/lists {lists}",
             "--format=null", SCANNER_SUITE, "/dev/null", f"deb {archive} {SCANNER_SUITE} main",
             # forky (testing) carries a Valid-Until that a stale archive copy outlives; the
             # signature is still checked, and the InRelease is pinned by hash in the lock.
             f"deb [check-valid-until=no] {archive} {SCANNER_CONTENT_SUITE} main"])
        locked, indices = _store_debian(mirror, debs, lists, step, sub=SCANNER_DIR)
    return locked + indices + _flat_repo(mirror, SCANNER_SUITE, SCANNER_DIR)


def sync_scanner(mirror: Path, *, archive: str = "http://deb.debian.org/debian",
                 keyring: Path = DEBIAN_KEYRING, step: Step | None = None) -> Lock:
    """Add (or refresh) the audit's scanner packages in an already synced ``mirror``.

    Finished or undone: the scanner directory the existing lock pins is moved aside (not
    overwritten) while the new one downloads; the new lock (old entries plus ``scanner``)
    replaces the old only after the whole mirror verifies again.  A failure puts the old
    directory and lock back; a refresh killed midway is undone by the next call.

    Raises:
        NotFoundError, ImageError: no lock, or a malformed one.
        VerificationError: the mirror, or the downloaded scanner packages, do not verify.
        ToolError: mmdebstrap cannot fetch the packages (no network ...).
    """
    current, aside = mirror / SCANNER_DIR, mirror / f"{SCANNER_DIR}.previous"
    if aside.exists():  # an earlier refresh was killed before it finished: undo it
        log.warning("%s: undoing an interrupted scanner refresh", mirror)
        shutil.rmtree(current, ignore_errors=True)
        aside.rename(current)
    lock = verify_mirror(mirror, keyring=keyring)
    old = (mirror / LOCK).read_bytes()
    if current.exists():
        current.rename(aside)
    try:
        files = _scanner_files(mirror, archive, step or (lambda _p: None))
        atomic_write_bytes(mirror / LOCK, replace(lock, scanner=files).canonical())
        verified = verify_mirror(mirror, keyring=keyring)
    except BaseException:
        atomic_write_bytes(mirror / LOCK, old)
        shutil.rmtree(current, ignore_errors=True)
        if aside.exists():
            aside.rename(current)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    return verified


# ------------------------------------------------------------------ sync


def sync_mirror(profile: Profile, mirror: Path, *, extra_packages: tuple[str, ...] = (),
                step: Step | None = None, keyring: Path = DEBIAN_KEYRING,
                bar: Progress | None = None, scanner: bool = True) -> Lock:
    """Fetch everything ``profile`` needs into ``mirror`` and write its lock (last, atomically).

    With ``scanner``, also the audit's scanner root (:data:`SCANNER_PACKAGES`).

    ``bar`` shows each part with its totals: apt's download (bytes), the pool's and the
    wheels' hashing (bytes, with the number of files) and the final verification (files).

    Needs the network (Debian's archive and PyPI).  A previous lock is removed first, so a
    mirror whose sync was interrupted has no lock and is refused by builds.

    Raises:
        ToolError: mmdebstrap, apt-ftparchive or pip fails (no network, unknown package ...).
        VerificationError: a downloaded file does not check out against Debian's signatures,
            or a GPU wheel against its manifest's pin.
        ProfileError: the archive's GPU packages or kernel differ from the manifest's pins or
            range (the lock is removed again).
    """
    def noop(_: str) -> None:
        pass

    step = step or noop
    mirror.mkdir(parents=True, exist_ok=True)
    (mirror / LOCK).unlink(missing_ok=True)
    packages = package_set(profile, extra_packages)
    with tempfile.TemporaryDirectory(prefix="mirror-sync-", dir=mirror) as tmp:
        debs, lists = Path(tmp) / "debs", Path(tmp) / "lists"
        debs.mkdir()
        lists.mkdir()
        log.info("resolving and downloading %d packages for %s/%s (signatures checked by apt)",
                 len(packages), profile.debian.suite, profile.debian.architecture)
        _mmdebstrap_download(profile, packages, debs, lists, bar)
        locked_debs, indices = _store_debian(mirror, debs, lists, step, bar=bar)
    repo = _flat_repo(mirror, profile.debian.suite)
    log.info("downloading the agent's wheels for Python %s (%s)", profile.python_version,
             profile.machine)
    wheels = _sync_wheels(profile, mirror, step, bar)
    scanned = _scanner_files(mirror, profile.debian.archive, step) if scanner else ()
    lock = Lock(profile.debian.suite, profile.debian.architecture, profile.python_version,
                packages, locked_debs, indices, repo, wheels, profile.python.onnxruntime,
                scanned)
    # Check the chain before publishing the lock: a mirror with a lock is a verified mirror.
    tmp_lock = mirror / (LOCK + ".new")
    atomic_write_bytes(tmp_lock, lock.canonical())
    tmp_lock.replace(mirror / LOCK)
    if bar is not None:
        bar.stage("verify", len(lock.files()), "files")
    try:
        verify_mirror(mirror, keyring=keyring, step=(lambda _p: bar.advance()) if bar else None)
        if profile.gpu_set is not None:  # every pin of the driver set, by version and sha256
            check_lock(profile, lock)
    except BaseException:
        (mirror / LOCK).unlink(missing_ok=True)
        raise
    return lock
