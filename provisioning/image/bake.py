"""Baked bundles: verified against the registry's TUF metadata, installed as the agent would.

The registry is a directory in python-tuf's static layout::

    REGISTRY/metadata/1.root.json ... N.root.json, timestamp.json, [V.]snapshot.json, [V.]targets.json
    REGISTRY/targets/[HASH.]NAME

:func:`verify_targets` runs python-tuf's ``Updater`` over that directory (through a fetcher
that reads files, since the default fetcher cannot read ``file://``), starting from the trusted
root the image will carry, into a scratch directory: at build time nothing of the node's
state exists yet, so the node's own client (``agent.updates.client.RegistryClient``) is only
initialised with that root for the image's state directory.  Each downloaded bundle then
passes :func:`agent.bundle.read_bundle` and its golden vectors, and is extracted to
``STATE/models/NAME/VERSION/``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from agent.errors import VerificationError
from agent.state import StateLayout
from provisioning.errors import ProfileError

__all__ = [
    "BakedBundle",
    "DirectoryFetcher",
    "bake_bundles",
    "registry_targets",
    "trusted_root",
    "verify_targets",
]

_BASE = "http://registry.invalid/"


def registry_targets(registry: Path) -> dict[str, dict[str, object]]:
    """Target names published in the registry's top-level targets metadata (not verified).

    Used for early profile checks only; baking verifies through :func:`verify_targets`.

    Raises:
        ProfileError: no readable targets metadata.
    """
    meta = registry / "metadata"
    candidates = sorted(meta.glob("*.targets.json"), key=lambda p: int(p.name.split(".")[0]))
    path = candidates[-1] if candidates else meta / "targets.json"
    try:
        data = json.loads(path.read_bytes())
        targets = data["signed"]["targets"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ProfileError(f"{registry}: no readable targets metadata ({exc})") from None
    if not isinstance(targets, dict):
        raise ProfileError(f"{path}: signed.targets is not an object")
    return targets


def trusted_root(registry: Path) -> Path:
    """The root metadata the image trusts: the registry's first root (1.root.json).

    Raises:
        ProfileError: the registry has no 1.root.json (or root.json).
    """
    for name in ("1.root.json", "root.json"):
        path = registry / "metadata" / name
        if path.is_file():
            return path
    raise ProfileError(f"{registry}: no metadata/1.root.json to trust")


class DirectoryFetcher:
    """Serves the registry directory to python-tuf's Updater (404 for what is missing)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def _fetch(self, url: str) -> Iterator[bytes]:
        from tuf.api.exceptions import DownloadHTTPError

        rel = unquote(urlparse(url).path).lstrip("/")
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            raise DownloadHTTPError(f"{rel}: not in the registry", 404)
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                yield chunk


def _fetcher(root: Path) -> object:
    """A FetcherInterface subclass instance (built lazily: tuf is imported only when baking)."""
    from tuf.ngclient.fetcher import FetcherInterface

    class _Fetcher(DirectoryFetcher, FetcherInterface):
        pass

    return _Fetcher(root)


def verify_targets(registry: Path, root: Path, names: tuple[str, ...], metadata_out: Path,
                   files_out: Path) -> dict[str, Path]:
    """Refresh TUF metadata from ``registry`` trusting ``root``; download and verify ``names``.

    ``metadata_out`` receives the verified metadata (what an agent's updater caches);
    ``files_out`` the verified target files.  Returns target name -> file.

    Raises:
        VerificationError: metadata or a target fails TUF verification (signature, threshold,
            expiry, rollback, length or hash), or a target is not in the signed metadata.
    """
    from tuf.api.exceptions import DownloadError, RepositoryError
    from tuf.ngclient.updater import Updater

    metadata_out.mkdir(parents=True, exist_ok=True)
    files_out.mkdir(parents=True, exist_ok=True)
    try:
        updater = Updater(str(metadata_out), _BASE + "metadata/", str(files_out), _BASE + "targets/",
                          fetcher=_fetcher(registry), bootstrap=root.read_bytes())  # type: ignore[arg-type]
        updater.refresh()
        out: dict[str, Path] = {}
        for name in names:
            info = updater.get_targetinfo(name)
            if info is None:
                raise VerificationError(f"{registry}: target {name!r} is not in the signed "
                                        "targets metadata")
            dest = files_out / hashlib.sha256(name.encode()).hexdigest()
            out[name] = Path(updater.download_target(info, str(dest)))
    except (RepositoryError, DownloadError) as exc:
        raise VerificationError(f"{registry}: TUF verification failed: "
                                f"{type(exc).__name__}: {exc}") from None
    return out


@dataclass(frozen=True)
class BakedBundle:
    target: str
    name: str
    version: str
    sha256: str

    def to_json(self) -> dict[str, str]:
        return {"target": self.target, "name": self.name, "version": self.version,
                "sha256": self.sha256}


def _install_as_the_agent_does(state_dir: Path, bundle_path: Path, target: str,
                               installed_at: float) -> None:
    """The agent's own model store install (install record, ``active``), made reproducible."""
    import json

    from agent.config import InferenceSection
    from agent.fsutil import atomic_write_text
    from agent.inference.repository import ModelRepository
    from agent.inference.store import INSTALL_RECORD

    installed = ModelRepository.for_state_dir(state_dir, InferenceSection()).install(bundle_path)
    record_path = StateLayout(state_dir).models / installed.name / installed.version / INSTALL_RECORD
    record = json.loads(record_path.read_text())
    record |= {"installed_at": installed_at, "source": f"baked:{target}"}
    atomic_write_text(record_path, json.dumps(record, sort_keys=True) + "\n")


def _verify(path: Path) -> tuple[str, str, str]:
    """Check a bundle of either kind as its own tooling does; its name, version and sha256.

    Generative bundles (LLM, embedding) are opened on their runtime and their golden check run;
    model bundles run their golden vectors on ONNX Runtime.
    """
    from agent.llm.bundle import is_generative_bundle
    from provisioning.bundle import verify_bundle
    from provisioning.genbundle import verify_generative_bundle

    if is_generative_bundle(path):  # the file's sha256 from the read that checked the members
        walked = verify_generative_bundle(path)
        return walked.manifest.name, walked.manifest.version, walked.sha256
    bundle, _ = verify_bundle(path)
    return bundle.manifest.name, bundle.manifest.version, bundle.sha256


def bake_bundles(registry: Path, targets: tuple[str, ...], state_dir: Path,
                 trusted_dir: Path, *, installed_at: float = 0.0) -> list[BakedBundle]:
    """Verify ``targets`` through TUF and install them under ``state_dir/models/NAME/VERSION``.

    ``trusted_dir`` receives ``root.json`` (the trust anchor) and ``metadata/`` (the verified
    metadata the agent starts from); the node's update client is initialised with that root
    under ``state_dir/tuf``.  Bundles are installed by the agent's own model store (install
    record and ``active`` version), with ``installed_at`` as their install time: each bundle
    is checked again and its golden vectors run, as the agent does for an install.

    Raises:
        VerificationError: TUF verification, bundle hashes or golden vectors fail.
        BundleError: a target is not a well-formed bundle.
    """
    from agent.updates.client import RegistryClient

    root = trusted_root(registry)
    trusted_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root, trusted_dir / "root.json")
    RegistryClient.initialize(state_dir, root.read_bytes())
    baked: list[BakedBundle] = []
    with tempfile.TemporaryDirectory(prefix="bake-") as tmp:
        files = verify_targets(registry, root, targets, trusted_dir / "metadata", Path(tmp))
        for target, path in files.items():
            name, version, sha256 = _verify(path)
            dest = StateLayout(state_dir).models / name / version
            if dest.exists():
                raise VerificationError(f"{target}: {name} {version} is baked twice")
            _install_as_the_agent_does(state_dir, path, target, installed_at)
            baked.append(BakedBundle(target, name, version, sha256))
    return baked
