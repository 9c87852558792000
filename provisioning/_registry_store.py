"""The registry's on-disk store: layout, ``registry.toml``, private keys and metadata files.

Kept apart from the operations in :mod:`provisioning.registry` so that those read as a list
of steps.  Every reader here raises an error naming the file, the key and the bad value.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import Metadata, MetaFile, Root, Signed, Snapshot, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from agent.errors import ConfigError, NotFoundError, RegistryError
from agent.fsutil import atomic_write_bytes, atomic_write_text
from agent.updates.clock import ISSUED_FIELD, format_time

__all__ = [
    "DEFAULT_EXPIRY_DAYS",
    "ONLINE_ROLES",
    "PASSPHRASE_ENV",
    "ROLES",
    "Layout",
    "RegistryConfig",
    "RoleConfig",
    "Store",
]

ROLES = ("root", "targets", "snapshot", "timestamp")
ONLINE_ROLES = ("targets", "snapshot", "timestamp")
DEFAULT_EXPIRY_DAYS = {"root": 365, "targets": 90, "snapshot": 30, "timestamp": 7}
PASSPHRASE_ENV = "APPLIANCE_REGISTRY_PASSPHRASE"  # noqa: S105 - a variable name, not a secret
FORMAT = 1
_KEYID_RE = re.compile(r"^[0-9a-f]{64}$")
_SERIALIZER = JSONSerializer(compact=False)


class Layout:
    """Paths of one registry directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.config = self.root / "registry.toml"
        self.keys = self.root / "keys"
        self.retired = self.keys / "retired"
        self.published = self.root / "published"
        self.metadata = self.published / "metadata"
        self.targets = self.published / "targets"
        self.pending = self.root / "pending.json"
        self.lock = self.root / ".lock"

    def key_file(self, keyid: str) -> Path:
        return self.keys / f"{keyid}.pem"


# ---------------------------------------------------------------- registry.toml

@dataclass(frozen=True)
class RoleConfig:
    expiry_days: int
    keys: tuple[str, ...]
    threshold: int = 1


@dataclass(frozen=True)
class RegistryConfig:
    roles: Mapping[str, RoleConfig]
    encrypted: bool = False
    format: int = FORMAT

    def expires(self, role: str, now: datetime) -> datetime:
        return (now + timedelta(days=self.roles[role].expiry_days)).replace(microsecond=0)

    def render(self) -> str:
        lines = [
            "# Sovereign Appliance registry, written by `appliance registry init`.",
            "# expiry_days: how long each newly signed role stays valid (edit freely; used on",
            "# the next publish or rotate-key). keys: key ids of each role; private keys live",
            "# in keys/ (never copy keys/ with published/).",
            f"format = {self.format}",
            f"encrypted = {'true' if self.encrypted else 'false'}",
        ]
        for role in ROLES:
            rc = self.roles[role]
            lines += ["", f"[roles.{role}]"]
            if role == "root":
                lines.append(f"threshold = {rc.threshold}")
            lines.append(f"expiry_days = {rc.expiry_days}")
            lines.append("keys = [" + ", ".join(f'"{k}"' for k in rc.keys) + "]")
        return "\n".join(lines) + "\n"


def _field(path: Path, table: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in table:
        raise ConfigError(f"{path}: {where}{key}: missing")
    value = table[key]
    if isinstance(value, bool) and kind is int:
        raise ConfigError(f"{path}: {where}{key} = {value!r}: expected an integer")
    if not isinstance(value, kind):
        raise ConfigError(f"{path}: {where}{key} = {value!r}: expected {kind.__name__}")
    return value


def parse_config(path: Path) -> RegistryConfig:
    """Read and validate ``registry.toml`` in one pass.

    Raises:
        NotFoundError: no such file (not a registry directory).
        ConfigError: malformed TOML or a bad value (named with its key).
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"{path}: no such file: {path.parent} is not a registry "
                            "(create one with `appliance registry init`)") from None
    try:
        data = tomllib.loads(raw.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"format", "encrypted", "roles"})
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}")
    fmt = _field(path, data, "format", int, "")
    if fmt != FORMAT:
        raise ConfigError(f"{path}: format = {fmt}: this tool reads format {FORMAT}")
    encrypted = _field(path, data, "encrypted", bool, "")
    roles_raw = _field(path, data, "roles", dict, "")
    if set(roles_raw) != set(ROLES):
        raise ConfigError(f"{path}: [roles]: expected tables {', '.join(ROLES)}, got {sorted(roles_raw)}")
    roles = {}
    for role in ROLES:
        table = roles_raw[role]
        where = f"[roles.{role}] "
        allowed = {"expiry_days", "keys"} | ({"threshold"} if role == "root" else set())
        extra = sorted(set(table) - allowed)
        if extra:
            raise ConfigError(f"{path}: {where}unknown key(s) {', '.join(extra)}")
        days = _field(path, table, "expiry_days", int, where)
        if not 1 <= days <= 3650:
            raise ConfigError(f"{path}: {where}expiry_days = {days}: must be 1 to 3650")
        keys = _field(path, table, "keys", list, where)
        bad = [k for k in keys if not isinstance(k, str) or not _KEYID_RE.match(k)]
        if bad or not keys:
            raise ConfigError(f"{path}: {where}keys = {keys!r}: expected one or more 64-hex key ids")
        threshold = _field(path, table, "threshold", int, where) if role == "root" else 1
        if not 1 <= threshold <= len(keys):
            raise ConfigError(f"{path}: {where}threshold = {threshold}: must be 1 to the number of "
                              f"keys ({len(keys)})")
        roles[role] = RoleConfig(days, tuple(keys), threshold)
    return RegistryConfig(roles, encrypted, fmt)


# ---------------------------------------------------------------- keys

def new_signer() -> CryptoSigner:
    """A fresh ed25519 signer."""
    return CryptoSigner.generate_ed25519()


def key_pem(signer: CryptoSigner, passphrase: str | None) -> bytes:
    """The signer's private key as PKCS#8 PEM, encrypted when a passphrase is given."""
    private = signer._private_key  # securesystemslib offers only unencrypted PEM
    encryption = BestAvailableEncryption(passphrase.encode()) if passphrase else NoEncryption()
    return private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, encryption)


def load_signer(path: Path, expected: SSlibKey, passphrase: str | None, encrypted: bool) -> CryptoSigner:
    """Load the private key in ``path`` and check it belongs to ``expected``.

    Raises:
        RegistryError: missing file, passphrase needed or wrong, or not the expected key.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RegistryError(f"{path}: private key missing (an offline key must be present "
                            "for this command)") from None
    if encrypted and not passphrase:
        raise RegistryError(f"{path}: the registry's keys are encrypted: give --passphrase-file "
                            f"or set {PASSPHRASE_ENV}")
    try:
        private = load_pem_private_key(data, passphrase.encode() if encrypted and passphrase else None)
    except TypeError as exc:
        raise RegistryError(f"{path}: {exc}") from None
    except ValueError:
        if encrypted:
            raise RegistryError(f"{path}: wrong passphrase (or a damaged key file)") from None
        raise RegistryError(f"{path}: not a PEM private key") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise RegistryError(f"{path}: not an ed25519 key")
    actual = SSlibKey.from_crypto(private.public_key(), expected.keyid, "ed25519")
    if actual.keyval != expected.keyval:
        raise RegistryError(f"{path}: this private key does not match key {expected.keyid} in root.json")
    return CryptoSigner(private, expected)


# ---------------------------------------------------------------- the store

class Store:
    """One registry directory: its config, keys and published metadata."""

    def __init__(self, root: Path) -> None:
        self.layout = Layout(root)
        self._config: RegistryConfig | None = None

    @property
    def config(self) -> RegistryConfig:
        if self._config is None:
            self._config = parse_config(self.layout.config)
        return self._config

    def save_config(self, config: RegistryConfig) -> None:
        atomic_write_text(self.layout.config, config.render())
        self._config = config

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the registry's lock (one writing command at a time).

        Raises:
            RegistryError: another command holds it.
        """
        _ = self.config  # fail with "not a registry" before creating a lock file anywhere
        fd = os.open(self.layout.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise RegistryError(f"{self.layout.root}: another registry command is "
                                        "running on it") from None
                raise
            yield
        finally:
            os.close(fd)

    # ------------------------------------------------------------ metadata
    def read_md(self, name: str) -> Metadata[Any]:
        """Read ``published/metadata/NAME`` as TUF metadata.

        Raises:
            RegistryError: missing or malformed.
        """
        path = self.layout.metadata / name
        try:
            return Metadata.from_bytes(path.read_bytes())
        except FileNotFoundError:
            raise RegistryError(f"{path}: missing from the published tree") from None
        except Exception as exc:  # noqa: BLE001 - tuf raises several types for bad input
            raise RegistryError(f"{path}: not valid TUF metadata: {exc}") from None

    def root(self) -> Metadata[Root]:
        md = self.read_md("root.json")
        if not isinstance(md.signed, Root):
            raise RegistryError(f"{self.layout.metadata / 'root.json'}: not root metadata")
        return md

    def current(self) -> tuple[Metadata[Timestamp], Metadata[Snapshot], Metadata[Targets]]:
        """The published state as clients see it: timestamp -> N.snapshot.json -> M.targets.json."""
        ts = self.read_md("timestamp.json")
        if not isinstance(ts.signed, Timestamp):
            raise RegistryError(f"{self.layout.metadata / 'timestamp.json'}: not timestamp metadata")
        sn = self.read_md(f"{ts.signed.snapshot_meta.version}.snapshot.json")
        if not isinstance(sn.signed, Snapshot):
            raise RegistryError(f"{self.layout.metadata}: snapshot v{ts.signed.snapshot_meta.version} "
                                "is not snapshot metadata")
        tv = sn.signed.meta["targets.json"].version
        tg = self.read_md(f"{tv}.targets.json")
        if not isinstance(tg.signed, Targets):
            raise RegistryError(f"{self.layout.metadata}: targets v{tv} is not targets metadata")
        return ts, sn, tg

    def check_keys_match(self, root: Root) -> None:
        """registry.toml and root.json must name the same keys for each role.

        Raises:
            ConfigError: they differ.
        """
        for role in ROLES:
            want = sorted(root.roles[role].keyids)
            have = sorted(self.config.roles[role].keys)
            if want != have:
                raise ConfigError(f"{self.layout.config}: [roles.{role}] keys = {have}: root.json v"
                                  f"{root.version} lists {want}")

    def signers(self, root: Root, role: str, passphrase: str | None,
                minimum: int | None = None) -> list[CryptoSigner]:
        """Load the private keys of ``role`` present in keys/ (at least ``minimum``, default all).

        Raises:
            RegistryError: too few keys present, wrong passphrase, mismatching key.
        """
        signers = []
        missing = []
        for keyid in root.roles[role].keyids:
            path = self.layout.key_file(keyid)
            if minimum is not None and not path.exists():
                missing.append(str(path))
                continue
            key = root.get_key(keyid)
            if not isinstance(key, SSlibKey):
                raise RegistryError(f"root.json: key {keyid} is not an ed25519 key this tool can use")
            signers.append(load_signer(path, key, passphrase, self.config.encrypted))
        need = len(root.roles[role].keyids) if minimum is None else minimum
        if len(signers) < need:
            raise RegistryError(f"{role}: {len(signers)} of its private keys are present, {need} "
                                f"needed (missing: {', '.join(missing)})")
        return signers

    def write_key(self, signer: CryptoSigner, passphrase: str | None) -> Path:
        self.layout.keys.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.layout.key_file(signer.public_key.keyid)
        atomic_write_bytes(path, key_pem(signer, passphrase), mode=0o600)
        return path

    def write_md(self, md: Metadata[Any], *names: str) -> bytes:
        data = md.to_bytes(_SERIALIZER)
        for name in names:
            atomic_write_bytes(self.layout.metadata / name, data)
        return data

    # ------------------------------------------------------------ pending additions
    def pending(self) -> dict[str, dict[str, Any]]:
        """Targets added but not yet published: ``{path: {"length", "hashes", "custom"}}``.

        Raises:
            ConfigError: pending.json is malformed.
        """
        path = self.layout.pending
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {}
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from None
        if not isinstance(data, dict) or not all(
                isinstance(v, dict) and {"length", "hashes", "custom"} <= set(v) for v in data.values()):
            raise ConfigError(f"{path}: expected {{target path: {{length, hashes, custom}}}}")
        return data

    def save_pending(self, pending: Mapping[str, Any]) -> None:
        if pending:
            atomic_write_text(self.layout.pending, json.dumps(pending, indent=2, sort_keys=True) + "\n")
        else:
            self.layout.pending.unlink(missing_ok=True)


def stamp(signed: Signed, version: int, expires: datetime, now: datetime) -> None:
    """Set version, expiry and our signed issue time (the node's clock floor)."""
    signed.version = version
    signed.expires = expires.astimezone(UTC)
    signed.unrecognized_fields[ISSUED_FIELD] = format_time(now)


def metafile(version: int, data: bytes) -> MetaFile:
    """Version, length and sha256 of a metadata file (clients then fetch exactly that)."""
    return MetaFile.from_data(version, data, ["sha256"])
