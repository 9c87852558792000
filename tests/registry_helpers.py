"""Helpers for registry and TUF client tests: real registries, a loopback server, tampering."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from provisioning._registry_store import Store
from provisioning.registry import make_server


def tree(directory: Path) -> dict[str, bytes | str]:
    """Every file (bytes) and symlink (target) under ``directory``: the byte-for-byte state."""
    state: dict[str, bytes | str] = {}
    for path in sorted(directory.rglob("*")):
        rel = str(path.relative_to(directory))
        if path.is_symlink():
            state[rel] = "-> " + str(path.readlink())
        elif path.is_file():
            state[rel] = path.read_bytes()
        else:
            state[rel] = "dir"
    return state


@contextmanager
def serve(registry: Path) -> Iterator[tuple[str, list[str]]]:
    """Serve ``registry/published`` on loopback; yield its URL and the list of paths requested."""
    server = make_server(registry, 0)
    requests: list[str] = []
    base = server.RequestHandlerClass
    assert isinstance(base, functools.partial)

    class Recording(base.func):  # type: ignore[misc,name-defined]
        def do_GET(self) -> None:
            requests.append(self.path)
            super().do_GET()

    server.RequestHandlerClass = functools.partial(Recording, **base.keywords)  # type: ignore[assignment]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def metadata(registry: Path, name: str) -> Metadata[Any]:
    return Metadata.from_file(str(registry / "published" / "metadata" / name))


def signers(registry: Path, role: str) -> list[CryptoSigner]:
    store = Store(registry)
    return store.signers(store.root().signed, role, None)


def write_signed(registry: Path, md: Metadata[Any], names: list[str], keys: list[CryptoSigner]) -> bytes:
    """Sign ``md`` with exactly ``keys`` and write it under ``names`` in published/metadata."""
    md.signatures.clear()
    for key in keys:
        md.sign(key, append=True)
    data = md.to_bytes(JSONSerializer(compact=False))
    for name in names:
        (registry / "published" / "metadata" / name).write_bytes(data)
    return data


def forge_timestamp(registry: Path, *, snapshot_version: int | None = None,
                    expires: datetime | None = None,
                    keys: list[CryptoSigner] | None = None) -> Metadata[Timestamp]:
    """A new timestamp version (signed with the real key unless ``keys`` is given)."""
    ts = metadata(registry, "timestamp.json")
    ts.signed.version += 1
    if expires is not None:
        ts.signed.expires = expires
    if snapshot_version is not None:
        name = f"{snapshot_version}.snapshot.json"
        snapshot_bytes = (registry / "published" / "metadata" / name).read_bytes()
        ts.signed.snapshot_meta = MetaFile.from_data(snapshot_version, snapshot_bytes, ["sha256"])
    write_signed(registry, ts, ["timestamp.json"], keys or signers(registry, "timestamp"))
    return ts


__all__ = [
    "MetaFile",
    "Metadata",
    "Root",
    "Snapshot",
    "Targets",
    "Timestamp",
    "forge_timestamp",
    "metadata",
    "serve",
    "signers",
    "tree",
    "write_signed",
]
