"""The site's local registry: a TUF repository built with python-tuf.

A registry directory holds::

    registry.toml          expiry policy per role, root threshold, key ids
    keys/                  ed25519 private keys (PKCS#8 PEM, encrypted with a passphrase if
                           one was given at init); never copied with published/
    pending.json           targets added but not yet published
    published/metadata/    1.root.json .. N.root.json, root.json, N.targets.json, targets.json,
                           N.snapshot.json, snapshot.json, timestamp.json
    published/targets/     target files, named HASH.NAME (consistent snapshots)

``published/`` is all a node needs: served over HTTP (:func:`make_server`) or copied to a
USB stick and read as a directory.  Every write is atomic and ordered so that a reader of
``published/`` always sees a complete, consistent state: new target files and versioned
metadata first, ``timestamp.json`` (the commit point for clients) last.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Snapshot, TargetFile, Targets, Timestamp

from agent.errors import NotFoundError, RegistryError
from agent.fsutil import fsync_dir, stream_sha256
from agent.updates.clock import ISSUED_FIELD, format_time, parse_time
from provisioning._registry_store import (
    DEFAULT_EXPIRY_DAYS,
    ONLINE_ROLES,
    PASSPHRASE_ENV,
    ROLES,
    Layout,
    RegistryConfig,
    RoleConfig,
    Store,
    metafile,
    new_signer,
    stamp,
)

__all__ = [
    "KINDS",
    "PASSPHRASE_ENV",
    "add_target",
    "init_registry",
    "make_server",
    "publish",
    "publish_bundle",
    "registry_status",
    "rotate_key",
    "target_path",
    "trusted_root",
]

log = logging.getLogger(__name__)

KINDS = ("bundle", "agent", "os", "file")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_VERSION_RE = re.compile(r"^\d{1,9}(\.\d{1,9}){0,3}$")  # as agent.bundle.parse_version
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_CHUNK = 1 << 20


def _now(now: datetime | None) -> datetime:
    return (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)


# ---------------------------------------------------------------- init

def init_registry(directory: Path, *, root_threshold: int = 1, root_keys: int | None = None,
                  passphrase: str | None = None, expiry_days: Mapping[str, int] | None = None,
                  now: datetime | None = None) -> dict[str, Any]:
    """Create a registry: keys, config and version 1 of every role, published.

    Built in a temporary sibling directory and renamed into place, so ``directory`` either
    does not exist afterwards or is a complete registry.

    Raises:
        RegistryError: ``directory`` exists and is not empty, or thresholds are inconsistent.
    """
    directory = Path(directory)
    count = root_keys if root_keys is not None else root_threshold
    if not 1 <= root_threshold <= count <= 16:
        raise RegistryError(f"root threshold {root_threshold} with {count} root keys: need "
                            "1 <= threshold <= keys <= 16")
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise RegistryError(f"{directory}: exists and is not an empty directory; refusing to "
                            "initialise a registry over it")
    days = dict(DEFAULT_EXPIRY_DAYS) | dict(expiry_days or {})
    now = _now(now)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.init-", dir=directory.parent))
    try:
        store = Store(tmp)
        signers = {"root": [new_signer() for _ in range(count)]} | {r: [new_signer()] for r in ONLINE_ROLES}
        for role_signers in signers.values():
            for signer in role_signers:
                store.write_key(signer, passphrase)
        config = RegistryConfig(
            {r: RoleConfig(days[r], tuple(s.public_key.keyid for s in signers[r]),
                           root_threshold if r == "root" else 1) for r in ROLES},
            encrypted=bool(passphrase),
        )
        store.save_config(config)
        store.layout.lock.touch(mode=0o600)
        root = Root(consistent_snapshot=True)
        for role, role_signers in signers.items():
            for signer in role_signers:
                root.add_key(signer.public_key, role)
        root.roles["root"].threshold = root_threshold
        stamp(root, 1, config.expires("root", now), now)
        root_md = Metadata(root)
        for signer in signers["root"]:
            root_md.sign(signer, append=True)
        store.layout.metadata.mkdir(parents=True)
        store.layout.targets.mkdir(parents=True)
        store.write_md(root_md, "1.root.json", "root.json")
        empty = Metadata(Targets())
        stamp(empty.signed, 1, config.expires("targets", now), now)
        _publish_chain(store, config, empty, previous=None, signers=signers, now=now, bump_targets=False)
        tmp.chmod(0o755)
        tmp.replace(directory)  # rename(2) replaces an empty directory atomically
        fsync_dir(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("registry initialised in %s (root threshold %d of %d keys)", directory, root_threshold, count)
    return registry_status(directory)


# ---------------------------------------------------------------- publish

def _publish_chain(store: Store, config: RegistryConfig, targets: Metadata[Targets], *,
                   previous: tuple[Metadata[Timestamp], Metadata[Snapshot]] | None,
                   signers: Mapping[str, list[CryptoSigner]], now: datetime,
                   bump_targets: bool = True) -> dict[str, int]:
    """Sign and write targets, snapshot and timestamp, in the order readers need."""
    if bump_targets:
        stamp(targets.signed, targets.signed.version + 1, config.expires("targets", now), now)
    targets.sign(signers["targets"][0])
    for extra in signers["targets"][1:]:
        targets.sign(extra, append=True)
    tv = targets.signed.version
    targets_bytes = store.write_md(targets, f"{tv}.targets.json", "targets.json")

    sv = previous[1].signed.version + 1 if previous else 1
    snapshot = Metadata(Snapshot(meta={"targets.json": metafile(tv, targets_bytes)}))
    stamp(snapshot.signed, sv, config.expires("snapshot", now), now)
    snapshot.sign(signers["snapshot"][0])
    snapshot_bytes = store.write_md(snapshot, f"{sv}.snapshot.json", "snapshot.json")

    tsv = previous[0].signed.version + 1 if previous else 1
    timestamp = Metadata(Timestamp(snapshot_meta=metafile(sv, snapshot_bytes)))
    stamp(timestamp.signed, tsv, config.expires("timestamp", now), now)
    timestamp.sign(signers["timestamp"][0])
    store.write_md(timestamp, "timestamp.json")  # the commit point for clients
    return {"targets": tv, "snapshot": sv, "timestamp": tsv}


def _online_signers(store: Store, root: Root, passphrase: str | None) -> dict[str, list[CryptoSigner]]:
    return {role: store.signers(root, role, passphrase) for role in ONLINE_ROLES}


def _apply_pending(store: Store, targets: Targets, pending: Mapping[str, Any]) -> list[str]:
    added = []
    for path, entry in sorted(pending.items()):
        stored = _stored_file(store.layout, path, entry["hashes"]["sha256"])
        if not stored.is_file() or stored.stat().st_size != entry["length"]:
            raise RegistryError(f"{stored}: the file added for {path} is missing or has changed; "
                                "add it again")
        targets.targets[path] = TargetFile(entry["length"], dict(entry["hashes"]), path,
                                           {"custom": dict(entry["custom"])})
        added.append(path)
    return added


def publish(directory: Path, *, passphrase: str | None = None, now: datetime | None = None) -> dict[str, Any]:
    """Publish pending targets: new targets, snapshot and timestamp versions, expiries from config.

    Also run with nothing pending, to renew expiries before they lapse.

    Raises:
        NotFoundError / ConfigError: not a registry, or a malformed registry.toml/pending.json.
        RegistryError: keys missing, wrong passphrase, or a damaged published tree.
    """
    store = Store(Path(directory))
    with store.locked():
        root = store.root().signed
        store.check_keys_match(root)
        signers = _online_signers(store, root, passphrase)
        ts, sn, tg = store.current()
        pending = store.pending()
        added = _apply_pending(store, tg.signed, pending)
        versions = _publish_chain(store, store.config, tg, previous=(ts, sn), signers=signers, now=_now(now))
        store.save_pending({})
    log.info("published targets v%d, snapshot v%d, timestamp v%d (%d new targets)",
             versions["targets"], versions["snapshot"], versions["timestamp"], len(added))
    return {"registry": str(directory), "published": added, "versions": versions}


# ---------------------------------------------------------------- add

def target_path(kind: str, name: str, version: str, filename: str) -> str:
    """The target path convention: ``bundles/NAME/NAME-VERSION.bundle``, ``agent/NAME/NAME-VERSION.EXT``,
    ``os/NAME/NAME-VERSION.EXT``, ``files/FILENAME``.

    Raises:
        RegistryError: unknown kind or a name/version/file name outside the allowed characters.
    """
    if kind not in KINDS:
        raise RegistryError(f"kind {kind!r}: must be one of {', '.join(KINDS)}")
    if kind == "file":
        if not _FILE_RE.match(filename):
            raise RegistryError(f"file name {filename!r}: use letters, digits and ._+- only")
        return f"files/{filename}"
    if not _NAME_RE.match(name):
        raise RegistryError(f"name {name!r}: must be 1-64 characters of [a-z0-9._-]")
    if not _VERSION_RE.match(version):
        raise RegistryError(f"version {version!r} is not 1-4 dot-separated numbers such as 1.2.0")
    if kind == "bundle":
        return f"bundles/{name}/{name}-{version}.bundle"
    suffix = "".join(Path(filename).suffixes)[-16:]
    if suffix and not _FILE_RE.match("x" + suffix):
        suffix = ""
    return f"{kind}/{name}/{name}-{version}{suffix}"


def _stored_file(layout: Layout, path: str, sha256: str) -> Path:
    dirname, _, basename = path.rpartition("/")
    return layout.targets / dirname / f"{sha256}.{basename}"


def _copy_hashed(src: Path, dest_dir: Path) -> tuple[Path, int, str]:
    """Copy ``src`` into ``dest_dir`` under a temporary name; return it with length and sha256."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".add-", dir=dest_dir)
    try:
        with os.fdopen(fd, "wb") as out, src.open("rb") as inp:
            digest, length = stream_sha256(inp, _CHUNK, out=out)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return Path(tmp_name), length, digest


def _describe(file: Path, kind: str | None, name: str | None, version: str | None) -> tuple[str, str, str]:
    if kind is None:
        kind = "bundle" if file.suffix == ".bundle" else "file"
    if kind == "bundle":
        from agent.bundle import read_bundle  # numpy: only when a bundle is added
        from agent.llm.bundle import is_generative_bundle, verify_bundle

        # A generative bundle (LLM, text encoder) is the same kind of target: nodes tell the
        # two formats apart when they install it.
        manifest = verify_bundle(file) if is_generative_bundle(file) else read_bundle(file).manifest
        checks = (("--name", name, manifest.name), ("--version", version, manifest.version))
        for flag, given, actual in checks:
            if given is not None and given != actual:
                raise RegistryError(f"{file}: {flag} {given!r} differs from the bundle manifest's {actual!r}")
        return kind, manifest.name, manifest.version
    if kind == "file":
        return kind, name or file.name, version or "0"
    if kind not in KINDS:
        raise RegistryError(f"kind {kind!r}: must be one of {', '.join(KINDS)}")
    if not name or not version:
        raise RegistryError(f"{file}: kind {kind} needs --name and --version")
    return kind, name, version


def add_target(directory: Path, file: Path, *, kind: str | None = None, name: str | None = None,
               version: str | None = None) -> dict[str, Any]:
    """Copy ``file`` into the registry as a pending target with custom {kind, name, version}.

    A bundle's kind, name and version come from its (checked) manifest.  The same path with
    the same bytes is a no-op; the same path with other bytes is refused (bump the version).

    Raises:
        NotFoundError: no such file, or not a registry.
        BundleError / VerificationError: a ``.bundle`` that is not a sound bundle.
        RegistryError: bad kind/name/version, or the path is taken by other bytes.
    """
    file = Path(file)
    store = Store(Path(directory))
    if not file.is_file():
        raise NotFoundError(f"{file}: no such file")
    with store.locked():
        kind, name, version = _describe(file, kind, name, version)
        path = target_path(kind, name, version, file.name)
        custom = {"kind": kind, "name": name, "version": version}
        _, _, tg = store.current()
        pending = store.pending()
        tmp, length, sha256 = _copy_hashed(file, store.layout.targets / path.rpartition("/")[0])
        try:
            published = tg.signed.targets.get(path)
            known = pending.get(path) or (published.to_dict() if published is not None else None)
            if known is not None and known["hashes"].get("sha256") != sha256:
                raise RegistryError(f"{path}: already in the registry with sha256 "
                                    f"{known['hashes'].get('sha256')}; {file} differs ({sha256}). "
                                    "Give it a new version instead of replacing a released one")
            state = "unchanged" if known is not None else "added"
            stored = _stored_file(store.layout, path, sha256)
            tmp.chmod(0o644)
            tmp.replace(stored)
            fsync_dir(stored.parent)
        finally:
            tmp.unlink(missing_ok=True)
        if path not in tg.signed.targets:
            pending[path] = {"length": length, "hashes": {"sha256": sha256}, "custom": custom}
            store.save_pending(pending)
    return {"path": path, "length": length, "sha256": sha256, "custom": custom, "state": state,
            "stored": str(stored)}


def publish_bundle(directory: Path, bundle_path: Path, *, passphrase: str | None = None) -> dict[str, Any]:
    """Add a bundle and publish it in one step (used by the demo).

    Raises:
        as :func:`add_target` and :func:`publish`.
    """
    added = add_target(directory, bundle_path, kind="bundle")
    published = publish(directory, passphrase=passphrase)
    return added | {"versions": published["versions"]}


# ---------------------------------------------------------------- rotate-key

def rotate_key(directory: Path, role: str, *, keyid: str | None = None, passphrase: str | None = None,
               now: datetime | None = None) -> dict[str, Any]:
    """Replace a role's key(s) with fresh ones: a new root version, signed by the old root keys
    (the old threshold) and, for root, by the new ones (the new threshold); then publish.

    ``keyid`` (or a unique prefix) picks one key; by default every key of the role is replaced.
    Old private keys move to ``keys/retired/`` (destroy them once you are satisfied).

    Raises:
        RegistryError: unknown role or key, missing keys, wrong passphrase.
    """
    if role not in ROLES:
        raise RegistryError(f"role {role!r}: must be one of {', '.join(ROLES)}")
    store = Store(Path(directory))
    now = _now(now)
    with store.locked():
        config = store.config
        old_md = store.root()
        old = old_md.signed
        store.check_keys_match(old)
        current = list(old.roles[role].keyids)
        if keyid is None:
            replace = current
        else:
            replace = [k for k in current if k.startswith(keyid)]
            if len(replace) != 1:
                raise RegistryError(f"{role}: key {keyid!r} matches {len(replace)} of its keys {current}")
        old_root_signers = store.signers(old, "root", passphrase, minimum=old.roles["root"].threshold)
        online = {r: store.signers(old, r, passphrase) for r in ONLINE_ROLES if r != role}
        fresh = [new_signer() for _ in replace]

        new_md = Metadata[Root].from_bytes(old_md.to_bytes())
        new = new_md.signed
        for k in replace:
            new.revoke_key(k, role)
        for signer in fresh:
            new.add_key(signer.public_key, role)
        stamp(new, old.version + 1, config.expires("root", now), now)
        new_root_signers = (
            [s for s in old_root_signers if s.public_key.keyid not in replace] + fresh
            if role == "root" else old_root_signers
        )
        new_md.signatures.clear()
        for signer in {s.public_key.keyid: s for s in old_root_signers + new_root_signers}.values():
            new_md.sign(signer, append=True)
        # Check what clients will check before anything is written.
        for name, trusted in (("old", old), ("new", new)):
            try:
                trusted.verify_delegate(Root.type, new_md.signed_bytes, new_md.signatures)
            except UnsignedMetadataError as exc:
                raise RegistryError(f"root v{new.version} would not verify under the {name} root "
                                    f"keys ({exc}); are all of root's keys present in keys/?") from None

        for signer in fresh:
            store.write_key(signer, passphrase)
        store.write_md(new_md, f"{new.version}.root.json", "root.json")
        roles = dict(config.roles)
        roles[role] = RoleConfig(config.roles[role].expiry_days, tuple(new.roles[role].keyids),
                                 new.roles[role].threshold)
        store.save_config(RegistryConfig(roles, config.encrypted, config.format))
        signers = online | ({role: fresh} if role in ONLINE_ROLES else {})
        ts, sn, tg = store.current()
        versions = _publish_chain(store, store.config, tg, previous=(ts, sn), signers=signers, now=now)
        store.layout.retired.mkdir(mode=0o700, exist_ok=True)
        for k in replace:
            old_file = store.layout.key_file(k)
            if old_file.exists():
                old_file.replace(store.layout.retired / old_file.name)
    log.info("rotated %s: root v%d; retired %s", role, new.version, ", ".join(replace))
    return {"role": role, "root_version": new.version, "retired": replace,
            "new": [s.public_key.keyid for s in fresh], "versions": versions}


# ---------------------------------------------------------------- status

def _role_status(store: Store, md: Metadata[Any], root: Root, role: str, now: datetime) -> dict[str, Any]:
    signed = md.signed
    try:
        root.verify_delegate(role, md.signed_bytes, md.signatures)
        signatures = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure is reported, not raised
        signatures = f"INVALID: {exc}"
    keys = [{"keyid": k, "private_key": "present" if store.layout.key_file(k).exists() else "absent"}
            for k in root.roles[role].keyids]
    return {
        "version": signed.version, "expires": format_time(signed.expires),
        "expired": signed.expires <= now, "issued": signed.unrecognized_fields.get(ISSUED_FIELD),
        "threshold": root.roles[role].threshold, "keys": keys, "signatures": signatures,
        "expiry_days": store.config.roles[role].expiry_days,
    }


def registry_status(directory: Path, *, now: datetime | None = None) -> dict[str, Any]:
    """Versions, expiries, keys and signature checks of every role; targets; pending; warnings.

    Raises:
        NotFoundError / ConfigError / RegistryError: not a registry, or a damaged one.
    """
    store = Store(Path(directory))
    config = store.config
    now = _now(now)
    root_md = store.root()
    root = root_md.signed
    ts, sn, tg = store.current()
    roles = {
        role: _role_status(store, md, root, role, now)
        for role, md in (("root", root_md), ("targets", tg), ("snapshot", sn), ("timestamp", ts))
    }
    warnings = []
    if root.roles["root"].threshold < 2:
        warnings.append("root threshold is 1: fine for a lab; production needs >= 2 keys kept offline")
    for role, st in roles.items():
        if st["expired"]:
            warnings.append(f"{role} expired at {st['expires']}: run `appliance registry publish`")
        elif (parse_time(st["expires"]) - now).total_seconds() < config.roles[role].expiry_days * 86400 / 4:
            warnings.append(f"{role} expires soon ({st['expires']})")
        if st["signatures"] != "ok":
            warnings.append(f"{role}: {st['signatures']}")
    try:
        store.check_keys_match(root)
    except Exception as exc:  # noqa: BLE001 - reported
        warnings.append(str(exc))
    targets = [
        {"path": p, "length": t.length, "sha256": t.hashes.get("sha256"), **(t.custom or {})}
        for p, t in sorted(tg.signed.targets.items())
    ]
    return {
        "registry": str(directory), "published": str(store.layout.published),
        "encrypted_keys": config.encrypted, "consistent_snapshot": bool(root.consistent_snapshot),
        "roles": roles, "targets": targets, "pending": sorted(store.pending()), "warnings": warnings,
    }


def trusted_root(directory: Path) -> bytes:
    """The registry's current ``root.json`` bytes: what a node is initialised with.

    Raises:
        NotFoundError / RegistryError: not a registry.
    """
    store = Store(Path(directory))
    _ = store.config
    path = store.layout.metadata / "root.json"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise RegistryError(f"{path}: missing from the published tree") from None


# ---------------------------------------------------------------- serve

class _ReadOnlyHandler(SimpleHTTPRequestHandler):
    """GET and HEAD of regular files only: no listings, no writes, quiet logging."""

    server_version = "appliance-registry"
    sys_version = ""

    def list_directory(self, path: str | os.PathLike[str]) -> None:
        self.send_error(404, "Not Found")

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


def make_server(directory: Path, port: int, bind: str = "127.0.0.1") -> ThreadingHTTPServer:
    """A (not yet started) read-only HTTP server of ``DIR/published``; ``port`` 0 picks a free one.

    Call ``serve_forever()`` (in a thread if needed) and ``shutdown()`` + ``server_close()``.

    Raises:
        NotFoundError / RegistryError: not a registry.
        RegistryError: the address cannot be bound.
    """
    store = Store(Path(directory))
    _ = store.config
    if not (store.layout.metadata / "timestamp.json").is_file():
        raise RegistryError(f"{store.layout.metadata}: no timestamp.json; nothing is published")
    handler: Callable[..., _ReadOnlyHandler] = functools.partial(
        _ReadOnlyHandler, directory=str(store.layout.published))
    try:
        return ThreadingHTTPServer((bind, port), handler)
    except OSError as exc:
        raise RegistryError(f"cannot serve on {bind}:{port}: {exc.strerror or exc}") from None
