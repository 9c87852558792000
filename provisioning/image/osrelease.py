"""OS releases: what an A/B update of the root carries, as one registry target of kind ``os``.

An OS release file is an uncompressed ustar archive (deterministic: sorted, fixed times and
owners) of::

    release.json     name, version, root hash, and each member's sha256 and size
    root.squashfs    the sealed root (slot payload)
    root.verity      its dm-verity hash tree
    uki.efi          the Unified Kernel Image whose command line carries the root hash

It is made from an ``appliance build`` output directory (its seal stage) and published with
``appliance registry add REGISTRY FILE --kind os --name NAME --version VERSION``; TUF signs
the file's length and hashes, and :func:`read_release` checks each member against
``release.json`` before anything is written to a slot.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import ImageError, VerificationError
from agent.fsutil import file_sha256, stream_sha256

__all__ = ["MEMBERS", "SCHEMA", "Release", "make_os_release", "read_release", "registry_version"]

SCHEMA = "sovereign-appliance/os-release/1"
MEMBERS = ("root.squashfs", "root.verity", "uki.efi")
_BLOCK = 1 << 20


def registry_version(image_version: str) -> str:
    """The registry version of an image version (``YYYYMMDD.HHMMSS`` is already numeric)."""
    return ".".join(str(int(p)) for p in image_version.split("."))


@dataclass(frozen=True)
class Release:
    name: str
    version: str
    roothash: str
    files: dict[str, dict[str, Any]]
    path: Path

    def member(self, name: str) -> tarfile.TarInfo:
        with tarfile.open(self.path, "r:") as tar:
            return tar.getmember(name)


def make_os_release(build_out: Path, dest: Path) -> Path:
    """Write the OS release of the build in ``build_out`` (its ``stages/seal``) to ``dest``.

    Raises:
        ImageError: the build has no sealed root (run ``appliance build`` to the seal stage).
    """
    from provisioning.image.disk import load_sealed

    seal_dir = build_out / "stages" / "seal"
    if not (seal_dir / "seal.json").is_file():
        raise ImageError(f"{build_out}: no sealed root ({seal_dir}/seal.json missing)")
    sealed = load_sealed(seal_dir)
    sources = {"root.squashfs": sealed.root_image, "root.verity": sealed.verity_image,
               "uki.efi": sealed.uki}
    doc = {"schema": SCHEMA, "name": sealed.name, "version": sealed.version,
           "roothash": sealed.roothash,
           "files": {n: {"sha256": file_sha256(p), "size": p.stat().st_size} for n, p in sources.items()}}
    meta = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
    manifest = build_out / "stages/configure/manifest.json"
    epoch = int(json.loads(manifest.read_text()).get("source_date_epoch", 0)) if manifest.is_file() else 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    with tarfile.open(tmp, "w:", format=tarfile.USTAR_FORMAT) as tar:
        def add(name: str, size: int, fileobj: Any) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid = size, epoch, 0o644, 0, 0
            info.uname = info.gname = "root"
            tar.addfile(info, fileobj)
        add("release.json", len(meta), io.BytesIO(meta))
        for name in MEMBERS:
            with sources[name].open("rb") as f:
                add(name, sources[name].stat().st_size, f)
    tmp.replace(dest)
    return dest


def read_release(path: Path) -> Release:
    """Open an OS release file and check every member against its ``release.json``.

    Raises:
        VerificationError: not an OS release, a member missing, extra, or with another
            size or sha256 than ``release.json`` says (names the member and both values).
    """
    try:
        with tarfile.open(path, "r:") as tar:
            names = tar.getnames()
            if names[:1] != ["release.json"] or sorted(names[1:]) != sorted(MEMBERS):
                raise VerificationError(f"{path}: members {names}: expected release.json then "
                                        f"{', '.join(MEMBERS)}")
            meta_file = tar.extractfile("release.json")
            assert meta_file is not None
            doc = json.loads(meta_file.read())
            if doc.get("schema") != SCHEMA:
                raise VerificationError(f"{path}: release.json schema = {doc.get('schema')!r}: "
                                        f"expected {SCHEMA!r}")
            for name in MEMBERS:
                want = doc["files"][name]
                member = tar.getmember(name)
                f = tar.extractfile(member)
                assert f is not None
                got, _ = stream_sha256(f, _BLOCK)
                if member.size != want["size"] or got != want["sha256"]:
                    raise VerificationError(
                        f"{path}: {name}: size {member.size} sha256 {got}, but release.json "
                        f"says size {want['size']} sha256 {want['sha256']}")
    except (tarfile.TarError, OSError, ValueError, KeyError, TypeError) as exc:
        raise VerificationError(f"{path}: not a readable OS release: {exc}") from None
    return Release(str(doc["name"]), str(doc["version"]), str(doc["roothash"]), dict(doc["files"]), path)
