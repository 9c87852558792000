"""The model store: verified bundles installed under the state directory.

Layout::

    STATE/models/NAME/VERSION/manifest.json    as written by Bundle.extract
    STATE/models/NAME/VERSION/model.onnx
    STATE/models/NAME/VERSION/golden.json
    STATE/models/NAME/VERSION/install.json     bundle sha256 and length, install time, verified
    STATE/models/NAME/VERSION/model/...         a generative bundle's model folder (its
                                               manifest.json is then the generative one)
    STATE/models/NAME/active                   the active version (one line)
    STATE/models/NAME/rolled-back              present while the active version is there
                                               because of an explicit Rollback (one line)

A version directory appears (by an atomic rename) only after its bundle was read, its
members re-checked against the manifest and its golden vectors reproduced on a real ONNX
Runtime session; ``install.json`` is written last.  :meth:`ModelStore.open` re-checks the
member hashes before anything is loaded, so a file changed on disk is refused too.  Every
session, at install and at each load, is built by :func:`agent.ort.make_session`, which first
refuses a model that reads tensor data from any file outside its bundle.
The signature layer (TUF) lies before this: callers install only bundle files that the
registry client verified (or, in tests, files made on the spot).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.bundle import (
    GOLDEN,
    MANIFEST,
    MODEL,
    Bundle,
    FileEntry,
    GoldenCase,
    Manifest,
    _parse_manifest,
    check_golden,
    decode_golden,
    extract_bundle,
    parse_version,
    read_bundle,
    read_manifest,
    valid_name,
)
from agent.errors import BundleError, NotFoundError, VerificationError
from agent.fsutil import atomic_write_text, file_sha256, fsync_dir, fsync_tree
from agent.llm.bundle import (
    GenManifest,
    Walked,
    extract_bundle_hashed,
    parse_gen_manifest,
    read_gen_manifest,
)
from agent.state import StateLayout

__all__ = ["InstalledModel", "ModelStore", "OpenedModel", "StagedBundle"]

log = logging.getLogger(__name__)

INSTALL_RECORD = "install.json"
ACTIVE = "active"
ROLLED_BACK = "rolled-back"


@dataclass(frozen=True)
class InstalledModel:
    """One installed, verified version of a model."""

    name: str
    version: str
    sha256: str  # of the bundle file: the TUF target hash
    length: int
    installed_at: float  # seconds since the epoch
    active: bool
    path: Path
    rolled_back: bool = False  # active because of an explicit Rollback
    kind: str = "tensor"  # or a generative bundle's kind: "llm", "embedding"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256,
                "length": self.length, "installed_at": self.installed_at, "active": self.active,
                "rolled_back": self.rolled_back, "kind": self.kind}


@dataclass(frozen=True)
class OpenedModel:
    """An installed version read back from disk with its members re-checked."""

    installed: InstalledModel
    manifest: Manifest
    model: bytes
    golden: list[GoldenCase]


@dataclass(frozen=True)
class StagedBundle:
    """A bundle read, checked and unpacked into a hidden directory of the store
    (``.VERSION.*``, debris to :meth:`ModelStore.clean_debris`), not installed yet."""

    tmp: Path
    manifest: Manifest
    sha256: str  # of the bundle file
    length: int
    source: str


# Loads a session from model bytes and returns a golden-vector runner over it.
Verifier = Callable[[Manifest, bytes, list[GoldenCase]], None]
# Opens a generative model folder and runs its golden check (raises BundleError); gets the
# manifest, the folder and the install time to be recorded.
GenVerifier = Callable[[GenManifest, Path, float], None]
GEN_MODEL_DIR = "model"


def _check_member(path: Path, entry: FileEntry) -> bytes:
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != entry.length or digest != entry.sha256:
        raise VerificationError(f"{path}: sha256 {digest} ({len(data)} bytes) does not match the "
                                f"manifest's {entry.sha256} ({entry.length} bytes)")
    return data


class ModelStore:
    """Installed model bundles under ``state_dir/models``; see the module docstring."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.root = StateLayout(state_dir).models

    # ------------------------------------------------------------------ reading

    def _record(self, vdir: Path) -> dict[str, Any] | None:
        try:
            data = json.loads((vdir / INSTALL_RECORD).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and data.get("verified") is True else None

    def active_version(self, name: str) -> str | None:
        """The active version of ``name``, or None when none is recorded."""
        if not valid_name(name):
            return None
        try:
            text = (self.root / name / ACTIVE).read_text().strip()
        except OSError:
            return None
        return text or None

    def installed(self, name: str | None = None) -> list[InstalledModel]:
        """Every installed, verified version (of ``name`` only, if given), sorted by name and version.

        Directories without a verified install record (an interrupted install, a stray
        directory) are not listed and never loaded.
        """
        if not self.root.is_dir() or (name is not None and not valid_name(name)):
            return []  # "" or "../x" never names an installed model
        out: list[InstalledModel] = []
        names = [name] if name is not None else sorted(p.name for p in self.root.iterdir() if p.is_dir())
        for model in names:
            mdir = self.root / model
            if not mdir.is_dir():
                continue
            active = self.active_version(model)
            rolled_back = self.rolled_back_version(model)
            for vdir in mdir.iterdir():
                rec = self._record(vdir) if vdir.is_dir() else None
                if rec is None:
                    continue
                try:
                    parse_version(vdir.name)
                except ValueError:
                    continue
                out.append(InstalledModel(model, vdir.name, str(rec.get("sha256", "")),
                                          int(rec.get("length", 0)), float(rec.get("installed_at", 0)),
                                          vdir.name == active, vdir,
                                          rolled_back is not None and vdir.name == rolled_back == active,
                                          str(rec.get("kind", "tensor"))))
        return sorted(out, key=lambda m: (m.name, parse_version(m.version)))

    def find(self, name: str, version: str | None = None) -> InstalledModel:
        """The installed version asked for; without ``version`` the active one (else the newest).

        Raises:
            NotFoundError: no such model or version is installed.
        """
        versions = self.installed(name)
        if not versions:
            raise NotFoundError(f"model {name!r} is not installed in {self.root}")
        if version:
            for m in versions:
                if m.version == version:
                    return m
            raise NotFoundError(f"model {name!r} has no installed version {version!r} "
                                f"(installed: {', '.join(m.version for m in versions)})")
        for m in versions:
            if m.active:
                return m
        return versions[-1]

    def open(self, installed: InstalledModel) -> OpenedModel:
        """Read an installed version back, re-checking each member against its manifest.

        Raises:
            BundleError: the manifest or golden vectors are malformed.
            VerificationError: a member no longer matches the manifest's hash.
        """
        vdir = installed.path
        manifest = _parse_manifest((vdir / MANIFEST).read_bytes(), f"{vdir / MANIFEST}")
        if (manifest.name, manifest.version) != (installed.name, installed.version):
            raise VerificationError(f"{vdir}: manifest says {manifest.name} {manifest.version}")
        model = _check_member(vdir / MODEL, manifest.files[MODEL])
        golden = decode_golden(_check_member(vdir / GOLDEN, manifest.files[GOLDEN]))
        return OpenedModel(installed, manifest, model, golden)

    # ------------------------------------------------------------------ writing

    def install(self, bundle_path: Path, verify: Verifier, *, activate: bool = True) -> InstalledModel:
        """Install a bundle file: read and check it, run its golden vectors, then make it visible.

        ``verify(manifest, model_bytes, golden_cases)`` must load the model on a real session
        and raise BundleError when a golden case does not reproduce.  Installing a version
        that is already installed with the same bundle hash is a no-op (apart from ``activate``).
        The same as :meth:`stage` then :meth:`commit`.

        Raises:
            NotFoundError, BundleError, VerificationError: from reading the bundle or from
                ``verify``; nothing is left behind in the store.
        """
        staged = self.stage(bundle_path)
        if isinstance(staged, InstalledModel):
            if activate:
                self.activate(staged.name, staged.version)
            return self.find(staged.name, staged.version)
        return self.commit(staged, verify, activate=activate)

    def stage(self, bundle_path: Path) -> StagedBundle | InstalledModel:
        """Read and check a bundle file and unpack it into a hidden directory of the store:
        the file work of an install, which may run in another process (:meth:`commit` makes
        it an installed version).  The version that is installed already from this very
        bundle is returned as it is.

        Raises:
            NotFoundError, BundleError, VerificationError: the bundle is refused, or that
                version is installed from another bundle; nothing is left behind.
        """
        m = read_manifest(bundle_path)  # only the first member: where the version goes
        final = self.root / m.name / m.version
        if final.exists():
            bundle: Bundle = read_bundle(bundle_path)
            rec = self._record(final)
            if rec is not None and rec.get("sha256") == bundle.sha256:
                return self.find(m.name, m.version)
            raise BundleError(f"{m.name} {m.version} is already installed from a different bundle "
                              f"(sha256 {rec.get('sha256') if rec else 'unverified'}); "
                              "a version is never replaced in place")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{m.version}.", dir=final.parent))
        try:
            bundle = _fill(bundle_path, tmp, m)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return StagedBundle(tmp, bundle.manifest, bundle.sha256, bundle.length, str(bundle_path))

    def commit(self, staged: StagedBundle, verify: Verifier, *, activate: bool = True) -> InstalledModel:
        """Re-check a staged bundle's model and golden vectors, ``verify`` them (see
        :meth:`install`), then make the version visible (one rename) and, with ``activate``
        (or when the model has no active version), active.

        Raises:
            BundleError, VerificationError: from the re-check or ``verify``; the staged
                directory is removed and nothing is installed.
        """
        m = staged.manifest
        final = self.root / m.name / m.version
        try:
            model = _check_member(staged.tmp / MODEL, m.files[MODEL])
            golden = decode_golden(_check_member(staged.tmp / GOLDEN, m.files[GOLDEN]))
            verify(m, model, golden)
            record = {"name": m.name, "version": m.version, "sha256": staged.sha256,
                      "length": staged.length, "installed_at": time.time(), "verified": True,
                      "source": staged.source}
            fsync_tree(staged.tmp)  # the members on disk before the record and the rename
            atomic_write_text(staged.tmp / INSTALL_RECORD, json.dumps(record, sort_keys=True) + "\n")
            staged.tmp.rename(final)
            fsync_dir(final.parent)
        except BaseException:
            self.discard(staged.tmp)
            raise
        log.info("installed %s %s (sha256 %s)", m.name, m.version, staged.sha256)
        if activate or self.active_version(m.name) is None:
            self.activate(m.name, m.version)
        return self.find(m.name, m.version)

    def install_generative(self, bundle_path: Path, verify: GenVerifier, *,
                           activate: bool = True) -> InstalledModel:
        """Install a generative bundle file: its members are checked while they stream into a
        hidden directory beside their final place, in the same single read that hashes the
        whole file (the recorded sha256 is that of the bytes installed); ``verify`` opens the
        model folder there and runs its golden check, then the directory is renamed into
        place.  Only the manifest (the archive's first member) is read before that pass, to
        know the final place; the streamed manifest must be the same, whole.

        ``verify`` gets the manifest, the folder and the install time that will be recorded.

        Raises:
            NotFoundError, BundleError, VerificationError: from reading the bundle or from
                ``verify``; nothing is left behind in the store.
        """
        m = read_gen_manifest(bundle_path)
        final = self.root / m.name / m.version
        if final.exists():
            return self._reinstall(final, m.name, m.version, file_sha256(bundle_path), activate)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{m.version}.", dir=final.parent))
        try:
            installed_at = time.time()
            walked = _fill_generative(bundle_path, tmp, m, verify, installed_at)
            record = {"name": m.name, "version": m.version, "sha256": walked.sha256, "kind": m.kind,
                      "length": walked.length, "installed_at": installed_at,
                      "verified": True, "source": str(bundle_path)}
            fsync_tree(tmp)  # the members on disk before the record and the rename
            atomic_write_text(tmp / INSTALL_RECORD, json.dumps(record, sort_keys=True) + "\n")
            tmp.rename(final)
            fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            with contextlib.suppress(OSError):  # a name first seen here leaves no trace
                final.parent.rmdir()
            raise
        log.info("installed %s %s %s (sha256 %s)", m.kind, m.name, m.version, walked.sha256)
        if activate or self.active_version(m.name) is None:
            self.activate(m.name, m.version)
        return self.find(m.name, m.version)

    def _reinstall(self, final: Path, name: str, version: str, digest: str, activate: bool) -> InstalledModel:
        rec = self._record(final)
        if rec is not None and rec.get("sha256") == digest:
            if activate:
                self.activate(name, version)
            return self.find(name, version)
        raise BundleError(f"{name} {version} is already installed from a different bundle "
                          f"(sha256 {rec.get('sha256') if rec else 'unverified'}); "
                          "a version is never replaced in place")

    def generative_manifest(self, installed: InstalledModel) -> GenManifest:
        """An installed generative version's manifest, as checked when it was installed.  Its
        members are not re-hashed: this is for listing, never for loading (open_generative).

        Raises:
            BundleError: the manifest is malformed.
            VerificationError: it names another model or version.
        """
        vdir = installed.path
        manifest = parse_gen_manifest((vdir / MANIFEST).read_bytes(), str(vdir / MANIFEST))
        if (manifest.name, manifest.version) != (installed.name, installed.version):
            raise VerificationError(f"{vdir}: manifest says {manifest.name} {manifest.version}")
        return manifest

    def describe(self, installed: InstalledModel) -> dict[str, Any]:
        """``installed.to_json()``, plus for a generative version what its manifest says about
        the model: context_length, parameters, quantisation (inventory lists them).  A manifest
        that no longer reads leaves them out (the version is then never served either)."""
        out = installed.to_json()
        if installed.kind == "tensor":
            return out
        try:
            m = self.generative_manifest(installed)
        except (OSError, BundleError, VerificationError) as exc:
            log.warning("%s %s: manifest unreadable for listing: %s", installed.name,
                        installed.version, exc)
            return out
        return out | {"context_length": m.limits.context_length, "parameters": m.parameters,
                      "quantisation": m.quantisation}

    def open_generative(self, installed: InstalledModel) -> tuple[GenManifest, Path]:
        """An installed generative version's manifest and model folder, every member
        re-hashed (streaming) and nothing else in the folder.

        Raises:
            BundleError: the manifest is malformed, or the folder holds other files.
            VerificationError: a member no longer matches the manifest.
        """
        vdir = installed.path
        manifest = self.generative_manifest(installed)
        folder = vdir / GEN_MODEL_DIR
        present = sorted(p.name for p in folder.iterdir())
        if present != manifest.members:
            raise BundleError(f"{folder}: holds {present[:8]}, the manifest lists {manifest.members[:8]}")
        for name in manifest.members:
            entry, path = manifest.files[name], folder / name
            if path.is_symlink() or not path.is_file():
                raise VerificationError(f"{path}: not a regular file")
            digest, size = file_sha256(path), path.stat().st_size
            if (digest, size) != (entry.sha256, entry.length):
                raise VerificationError(f"{path}: sha256 {digest} ({size} bytes) does not match the "
                                        f"manifest's {entry.sha256} ({entry.length} bytes)")
        return manifest, folder

    def discard(self, tmp: Path) -> None:
        """Remove a staged bundle's directory (:attr:`StagedBundle.tmp`) that will not be committed."""
        shutil.rmtree(tmp, ignore_errors=True)

    def staged_manifest(self, tmp: Path) -> Manifest:
        """The manifest of a bundle staged in ``tmp`` (by :meth:`stage`, in another process).

        Raises:
            BundleError: it is malformed, or names another model or version than ``tmp`` is for.
        """
        manifest = _parse_manifest((tmp / MANIFEST).read_bytes(), f"{tmp / MANIFEST}")
        if tmp.parent != self.root / manifest.name or not tmp.name.startswith(f".{manifest.version}."):
            raise BundleError(f"{tmp}: its manifest is for {manifest.name} {manifest.version}")
        return manifest

    def activate(self, name: str, version: str) -> None:
        """Record ``version`` as the active version of ``name``.

        Raises:
            NotFoundError: that version is not installed (and verified).
        """
        self.find(name, version)
        atomic_write_text(self.root / name / ACTIVE, version + "\n")

    def rolled_back_version(self, name: str) -> str | None:
        """The version an explicit Rollback made active, or None (cleared by the next update)."""
        try:
            text = (self.root / name / ROLLED_BACK).read_text().strip()
        except OSError:
            return None
        return text or None

    def mark_rolled_back(self, name: str, version: str | None) -> None:
        """Record (or, with None, clear) that ``version`` of ``name`` is active because of a Rollback."""
        path = self.root / name / ROLLED_BACK
        if version is None:
            if path.exists():
                path.unlink()
                fsync_dir(path.parent)
            return
        atomic_write_text(path, version + "\n")

    def remove(self, name: str, version: str) -> None:
        """Delete an installed version that is not active.

        The version directory is first renamed to a hidden name (one atomic step: from then
        on it is not installed), then deleted; :meth:`clean_debris` finishes the deletion
        if it was interrupted.

        Raises:
            BundleError: ``version`` is the active version.
            NotFoundError: it is not installed.
        """
        installed = self.find(name, version)
        if installed.active:
            raise BundleError(f"{name} {version} is the active version; it is not removed")
        doomed = installed.path.with_name(f".removing-{version}")
        shutil.rmtree(doomed, ignore_errors=True)
        installed.path.rename(doomed)
        fsync_dir(doomed.parent)
        shutil.rmtree(doomed)
        log.info("removed %s %s (sha256 %s)", name, version, installed.sha256)

    def clean_debris(self) -> list[Path]:
        """Delete what interrupted writes leave: hidden temporary entries (half-extracted
        versions, half-removed versions, atomic-write temp files) and version directories
        without a verified install record.  Only for use before anything is served.
        Returns what was deleted."""
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        for mdir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for entry in sorted(mdir.iterdir()):
                stray = entry.name.startswith(".") or (entry.is_dir() and self._record(entry) is None)
                if not stray:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                removed.append(entry)
            if removed:
                fsync_dir(mdir)
        return removed


def _manifest_changed(bundle_path: Path, first: bytes, then: bytes) -> VerificationError:
    return VerificationError(f"{bundle_path}: the manifest changed while it was read (sha256 "
                             f"{hashlib.sha256(first).hexdigest()} first, then "
                             f"{hashlib.sha256(then).hexdigest()})")


def _fill(bundle_path: Path, tmp: Path, expected: Manifest) -> Bundle:
    """Check, hash and unpack a model bundle into ``tmp`` in one read of the file."""
    bundle = extract_bundle(bundle_path, tmp)
    if bundle.manifest.canonical() != expected.canonical():  # the whole manifest, not only its name
        raise _manifest_changed(bundle_path, expected.canonical(), bundle.manifest.canonical())
    return bundle


def _fill_generative(bundle_path: Path, tmp: Path, expected: GenManifest, verify: GenVerifier,
                     installed_at: float) -> Walked:
    """Extract a generative bundle into ``tmp`` (checked and hashed while it streams) and verify it there."""
    (tmp / GEN_MODEL_DIR).mkdir()
    walked = extract_bundle_hashed(bundle_path, tmp / GEN_MODEL_DIR)
    manifest = walked.manifest
    if manifest.canonical() != expected.canonical():  # the whole manifest, not only its name
        raise _manifest_changed(bundle_path, expected.canonical(), manifest.canonical())
    atomic_write_text(tmp / MANIFEST, manifest.canonical().decode())
    verify(manifest, tmp / GEN_MODEL_DIR, installed_at)
    return walked


def golden_verifier(make_runner: Callable[[Manifest, bytes], Any]) -> Verifier:
    """A :data:`Verifier` from a function that builds a golden runner for a model."""

    def verify(manifest: Manifest, model: bytes, cases: list[GoldenCase]) -> None:
        try:
            runner = make_runner(manifest, model)
        except BundleError:
            raise
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises several unrelated types
            raise BundleError(f"{manifest.name} {manifest.version}: ONNX Runtime cannot load "
                              f"the model: {exc}") from None
        check_golden(manifest, cases, runner)

    return verify
