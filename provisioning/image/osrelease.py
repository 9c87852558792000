"""OS releases: what an A/B update of the root carries, as one registry target of kind ``os``.

The format (an uncompressed, deterministic ustar archive of ``release.json``, the sealed root,
its verity tree and the UKI) is the node's: :mod:`agent.osrelease` reads it.
It is made from an ``appliance build`` output directory (its seal stage) and published with
``appliance registry add REGISTRY FILE --kind os --name NAME --version VERSION``; TUF signs
the file's length and hashes, and the node's :func:`agent.osrelease.read_release` checks
each member against ``release.json`` before anything is written to a slot.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

from agent.fsutil import file_sha256
from agent.osrelease import MEMBERS, SCHEMA, read_release, registry_version
from provisioning.errors import ImageError
from provisioning.image.disk import load_sealed
from provisioning.image.measure import pcr11_record

# read_release and registry_version are the node's (agent.osrelease); the operator's commands
# read a release they just wrote with the same code the node verifies it with.
__all__ = ["make_os_release", "read_release", "registry_version"]


def make_os_release(build_out: Path, dest: Path) -> Path:
    """Write the OS release of the build in ``build_out`` (its ``stages/seal``) to ``dest``.

    Raises:
        ImageError: the build has no sealed root (run ``appliance build`` to the seal stage), or
            its UKI is not one whose PCR 11 can be computed (names the file).
    """
    seal_dir = build_out / "stages" / "seal"
    if not (seal_dir / "seal.json").is_file():
        raise ImageError(f"{build_out}: no sealed root ({seal_dir}/seal.json missing)")
    sealed = load_sealed(seal_dir)
    sources = {"root.squashfs": sealed.root_image, "root.verity": sealed.verity_image,
               "uki.efi": sealed.uki}
    # the UKI's expected PCR 11 (what attestation checks a node booted from this release against);
    # the node's reader ignores it, so older agents take these releases as before
    doc = {"schema": SCHEMA, "name": sealed.name, "version": sealed.version,
           "roothash": sealed.roothash, "pcr11": pcr11_record(sealed.uki), "sealed_data": sealed.sealed_data,
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
