"""The node's TUF client: refresh trusted metadata and download verified targets.

Trusted metadata lives in ``STATE_DIR/tuf/metadata/`` under plain names; the trusted root is
``root.json`` there (put in place once by :meth:`RegistryClient.initialize`, e.g. by the image
build).  The source is an ``http(s)://`` URL of a registry's published tree or that tree as a
directory (a USB stick); both go through the same verification.

A refresh either commits a complete, verified set of metadata or leaves the state directory
byte-for-byte as it was.  Expiry is checked against the offline clock policy
(:mod:`agent.updates.clock`), and the newest signed time seen is recorded after a refresh.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import urllib3
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, TargetFile
from tuf.api.serialization import DeserializationError
from tuf.ngclient import Updater

from agent.errors import NotFoundError, UpdateError, VerificationError
from agent.fsutil import atomic_write_bytes
from agent.state import StateLayout
from agent.updates import _session
from agent.updates.clock import ClockPolicy, ClockStatus, issued_times, system_now
from agent.updates.fetchers import parse_source

__all__ = ["MAX_FILE_NAME", "RegistryClient", "TargetInfo", "download_name", "metadata_dir"]

log = logging.getLogger(__name__)


def metadata_dir(state_dir: Path) -> Path:
    """Where a node keeps its trusted TUF metadata."""
    return StateLayout(state_dir).tuf_metadata


@dataclass(frozen=True)
class TargetInfo:
    """A target as the signed targets metadata describes it."""

    path: str  # TUF target path, e.g. bundles/affine/affine-1.0.0.bundle
    length: int
    sha256: str
    kind: str  # bundle | agent | os | file
    name: str
    version: str
    custom: Mapping[str, Any] = field(default_factory=dict)

    @property
    def filename(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "length": self.length, "sha256": self.sha256, "kind": self.kind,
                "name": self.name, "version": self.version, "custom": dict(self.custom)}


def _info(target: TargetFile) -> TargetInfo:
    custom = target.custom if isinstance(target.custom, dict) else {}
    basename = target.path.rsplit("/", 1)[-1]
    return TargetInfo(
        path=target.path, length=target.length, sha256=target.hashes.get("sha256", ""),
        kind=str(custom.get("kind", "file")), name=str(custom.get("name", basename)),
        version=str(custom.get("version", "")), custom=custom,
    )


MAX_FILE_NAME = 200  # bytes; below every file system's NAME_MAX of 255


def download_name(target_path: str) -> str:
    """The file name a target is downloaded to: the last part of its signed path, which must
    be one plain path component (no ``/``, not ``.``/``..``, no leading dot, no NUL or
    control character, at most :data:`MAX_FILE_NAME` bytes).

    Raises:
        VerificationError: the signed target path does not end in a safe file name.
    """
    name = target_path.rsplit("/", 1)[-1]
    problem = ("it is empty" if not name else
               "it starts with a dot" if name.startswith(".") else
               "it holds a backslash or a control character"
               if "\\" in name or any(ord(c) < 32 or ord(c) == 127 for c in name) else
               f"it is longer than {MAX_FILE_NAME} bytes" if len(name.encode()) > MAX_FILE_NAME else "")
    if problem:
        shown = name if len(name) <= 64 else name[:64] + f"...({len(name)} chars)"
        raise VerificationError(f"target {target_path[:200]!r}: file name {shown!r} refused: {problem}")
    return name


class RegistryClient:
    """Refresh from a registry and download verified targets into the node.

    ``clock`` is injectable (tests move time with it); by default the system clock, held
    up by the node's floor of signed times.
    """

    def __init__(self, state_dir: Path, source: str, *,
                 clock: Callable[[], datetime] = system_now) -> None:
        self.state_dir = Path(state_dir)
        self.metadata_dir = metadata_dir(self.state_dir)
        self.source_text = source
        self.source = parse_source(source)
        self.clock = ClockPolicy(self.state_dir, clock)
        self._targets: dict[str, TargetFile] | None = None
        self._updater: Updater | None = None

    # ------------------------------------------------------------ set-up
    @staticmethod
    def initialize(state_dir: Path, trusted_root: bytes) -> None:
        """Store ``trusted_root`` as the node's trust anchor (no network).

        The root must parse and be signed by its own threshold of root keys.  Its signed
        issue time, if any, becomes the first floor of the clock policy.

        Raises:
            VerificationError: not root metadata, or not self-signed to threshold.
        """
        md = _self_signed_root(trusted_root)
        target = metadata_dir(Path(state_dir))
        target.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target / "root.json", trusted_root)
        ClockPolicy(Path(state_dir)).observe(issued_times([md.signed.to_dict()]))

    @staticmethod
    def adopt_root(state_dir: Path, trusted_root: bytes, origin: str = "trusted root") -> str:
        """Make ``trusted_root`` the node's trust anchor unless that would change whom it trusts.

        On a node without a root this is :meth:`initialize`.  A node that has one keeps it
        when ``trusted_root`` is the same file or an older version (the node has since
        rotated past it through the registry); the next version is taken only when it
        chains, i.e. is signed by the threshold of the root the node trusts (TUF root
        rotation, as the updater would take it).  Returns what happened: ``initialised``,
        ``unchanged``, ``older`` or ``rotated``.

        Raises:
            VerificationError: not a self-signed root, or a different root that does not
                chain from the node's (same version, a skipped version, other keys).
        """
        path = metadata_dir(Path(state_dir)) / "root.json"
        try:
            current = path.read_bytes()
        except FileNotFoundError:
            RegistryClient.initialize(state_dir, trusted_root)
            return "initialised"
        new = _self_signed_root(trusted_root, origin)
        if trusted_root == current:
            return "unchanged"
        old = _self_signed_root(current, str(path))
        have, offered = old.signed.version, new.signed.version
        if offered < have:
            return "older"
        if offered != have + 1:
            why = ("differs from it at the same version" if offered == have else
                   "skips versions; a node rotates one version at a time (a refresh from the "
                   "registry walks the whole chain)")
            raise VerificationError(f"{origin}: root v{offered} is not the node's trusted root v{have} "
                                    f"({path}) and {why}; refusing to change the trust anchor")
        try:
            old.signed.verify_delegate(Root.type, new.signed_bytes, new.signatures)
        except tuf_exc.RepositoryError as exc:
            raise VerificationError(f"{origin}: root v{offered} is not signed by the threshold of the "
                                    f"node's trusted root v{have} ({path}): {exc}; refusing to change "
                                    "the trust anchor") from None
        atomic_write_bytes(path, trusted_root)
        ClockPolicy(Path(state_dir)).observe(issued_times([new.signed.to_dict()]))
        return "rotated"

    def clock_status(self) -> ClockStatus:
        """System time, floor of signed times, override and reference time (for inventory)."""
        return self.clock.status()

    # ------------------------------------------------------------ refresh
    def _clock_note(self) -> str:
        st = self.clock.status()
        if st.override is not None:
            return (f"operator override {st.override.time}: {st.override.reason}; "
                    f"system clock {st.system_time}")
        floor = st.floor or "none yet"
        return f"system clock {st.system_time}, newest signed time seen {floor}"

    def refresh(self) -> None:
        """Run the TUF client workflow against the source; commit only a fully verified set.

        Raises:
            NotFoundError: the node has no trusted root yet.
            VerificationError: any signature, threshold, version, expiry, length or hash check
                failed (the state directory is unchanged).
            UpdateError: the source could not be read.
        """
        reference = self.clock.reference_time()
        updater = None
        fetcher = None
        try:
            with _session.updater_session(self.metadata_dir, self.source, reference) as (updater, fetcher):
                updater.refresh()
        except (tuf_exc.RepositoryError, tuf_exc.DownloadError, OSError) as exc:
            if fetcher is None:
                raise
            raise _session.explain(exc, fetcher, updater, self._clock_note) from None
        except urllib3.exceptions.HTTPError as exc:  # a connection broken mid-body
            where = fetcher.last_url if fetcher is not None else self.source_text
            raise UpdateError(f"{where}: download failed: {exc}") from None
        tset = _session.trusted_set(updater)
        self._updater = updater
        self._targets = dict(tset.targets.targets)
        self.clock.observe(issued_times([tset[r].to_dict() for r in ("root", "timestamp",
                                                                       "snapshot", "targets")]))
        log.info("registry %s: timestamp v%d, targets v%d, %d targets", self.source_text,
                 tset.timestamp.version, tset.targets.version, len(self._targets))

    def _ensure(self) -> tuple[Updater, dict[str, TargetFile]]:
        if self._updater is None or self._targets is None:
            self.refresh()
        assert self._updater is not None and self._targets is not None
        return self._updater, self._targets

    # ------------------------------------------------------------ queries
    def targets(self) -> list[TargetInfo]:
        """Every target of the (refreshed) top-level targets metadata, sorted by path.

        Raises:
            as :meth:`refresh` (called first if this client has not refreshed yet).
        """
        _, targets = self._ensure()
        return [_info(t) for _, t in sorted(targets.items())]

    def find_bundle(self, name: str, version: str | None = None) -> TargetInfo:
        """The bundle target ``name`` at ``version``, or its newest version when ``version`` is None.

        Raises:
            NotFoundError: no such bundle (the message lists the versions there are).
            as :meth:`refresh`.
        """
        from agent.bundle import parse_version  # numpy-free import of this module for the rest

        candidates = [t for t in self.targets() if t.kind == "bundle" and t.name == name]
        if version is not None:
            for t in candidates:
                if t.version == version:
                    return t
        else:
            versioned = []
            for t in candidates:
                try:
                    versioned.append((parse_version(t.version), t))
                except ValueError:
                    log.warning("target %s: unparseable version %r ignored", t.path, t.version)
            if versioned:
                return max(versioned, key=lambda vt: vt[0])[1]
        have = ", ".join(sorted(t.version for t in candidates)) or "none"
        wanted = f"{name} {version}" if version else name
        raise NotFoundError(f"registry {self.source_text}: no bundle {wanted} (versions there: {have})")

    def download(self, target: TargetInfo | str, dest_dir: Path) -> Path:
        """Download ``target`` into ``dest_dir`` (file named after the target's last path part).

        The bytes are streamed and checked against the signed length and hashes while they
        arrive; the file appears only once it verified.  A file already there that matches
        is kept without fetching again.

        Raises:
            NotFoundError: no such target in the signed targets metadata.
            VerificationError: the bytes do not match the signed length or hashes.
            UpdateError: the source could not be read.
        """
        updater, targets = self._ensure()
        path = target.path if isinstance(target, TargetInfo) else target
        signed = targets.get(path)
        if signed is None:
            raise NotFoundError(f"registry {self.source_text}: no target {path!r} in the signed metadata")
        dest = Path(dest_dir) / download_name(path)
        if isinstance(target, TargetInfo) and (target.length, target.sha256) != (
                signed.length, signed.hashes.get("sha256", "")):
            raise VerificationError(f"target {path}: the TargetInfo given does not match the signed metadata")
        if _session.file_matches(dest, signed):
            log.info("%s: already present and verified", dest)
            return dest
        url = _session.target_url(updater, self.source.targets_url, signed)
        return _session.download_verified(self.source.fetcher, url, signed, dest)

    def trusted_versions(self) -> dict[str, int]:
        """Versions of the trusted metadata on disk (for inventory); empty before initialise."""
        versions = {}
        for role in ("root", "timestamp", "snapshot", "targets"):
            try:
                data = json.loads((self.metadata_dir / f"{role}.json").read_bytes())
                versions[role] = int(data["signed"]["version"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return versions


def _self_signed_root(data: bytes, origin: str = "trusted root") -> Metadata[Root]:
    """``data`` parsed as TUF root metadata signed by its own threshold of root keys.

    Raises:
        VerificationError: not root metadata, or not self-signed to threshold.
    """
    try:
        md = Metadata[Root].from_bytes(data)
        if not isinstance(md.signed, Root):
            raise VerificationError(f"{origin}: expected a root role, got {md.signed.type!r}")
        md.signed.verify_delegate(Root.type, md.signed_bytes, md.signatures)
    except DeserializationError as exc:
        raise VerificationError(f"{origin}: not TUF root metadata: {exc}") from None
    except tuf_exc.RepositoryError as exc:
        raise VerificationError(f"{origin}: does not verify: {exc}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise VerificationError(f"{origin}: not TUF root metadata: {exc}") from None
    return md
