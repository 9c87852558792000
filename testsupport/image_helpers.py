"""Real fixtures for the image builder's tests: a signed TUF registry and a small signed apt mirror."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from provisioning.image.measure import pe_sections
from provisioning.image.mirror import LOCK, Lock, LockedFile, file_sha256


def make_registry(root: Path, targets: dict[str, Path]) -> Path:
    """A static TUF repository (python-tuf layout) publishing ``targets`` (name -> file)."""
    meta_dir, targets_dir = root / "metadata", root / "targets"
    meta_dir.mkdir(parents=True)
    targets_dir.mkdir()
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=30)
    signers = {r: CryptoSigner.generate_ed25519() for r in ("root", "targets", "snapshot", "timestamp")}
    root_md = Metadata(Root(expires=expires))
    for role, signer in signers.items():
        root_md.signed.add_key(signer.public_key, role)
    tmd = Metadata(Targets(expires=expires))
    for name, path in targets.items():
        tmd.signed.targets[name] = TargetFile.from_file(name, str(path))
        shutil.copyfile(path, targets_dir / name)
    smd = Metadata(Snapshot(expires=expires))
    smd.signed.meta["targets.json"] = MetaFile(version=tmd.signed.version)
    ts = Metadata(Timestamp(expires=expires))
    ts.signed.snapshot_meta = MetaFile(version=smd.signed.version)
    root_md.signed.consistent_snapshot = False
    ser = JSONSerializer(compact=False)
    for md, role, name in ((root_md, "root", "1.root.json"), (tmd, "targets", "targets.json"),
                           (smd, "snapshot", "snapshot.json"), (ts, "timestamp", "timestamp.json")):
        md.sign(signers[role])
        md.to_file(str(meta_dir / name), ser)
    shutil.copyfile(meta_dir / "1.root.json", meta_dir / "root.json")
    return root


def _deb(work: Path, name: str, version: str) -> Path:
    pkg = work / f"{name}-build"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "usr/share/doc" / name).mkdir(parents=True)
    (pkg / "usr/share/doc" / name / "README").write_text(f"{name} {version}\n")
    (pkg / "DEBIAN/control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: amd64\nMaintainer: Test <t@example.invalid>\n"
        f"Priority: optional\nDescription: test package {name}\n")
    out = work / f"{name}_{version}_amd64.deb"
    env = dict(os.environ, SOURCE_DATE_EPOCH="1700000000")
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(pkg), str(out)],
                   check=True, capture_output=True, env=env)
    return out


def make_signed_mirror(mirror: Path, work: Path, packages: dict[str, str]) -> Path:
    """A mirror of real small .debs with a gpg-signed InRelease; returns the keyring to trust."""
    gnupg = work / "gnupg"
    gnupg.mkdir(mode=0o700, parents=True)
    env = dict(os.environ, GNUPGHOME=str(gnupg))
    subprocess.run(["gpg", "--batch", "--passphrase", "", "--quick-gen-key",
                    "Test Archive <archive@example.invalid>", "ed25519", "sign", "1d"],
                   check=True, capture_output=True, env=env)
    keyring = work / "keyring.gpg"
    keyring.write_bytes(subprocess.run(["gpg", "--export"], check=True, capture_output=True,
                                       env=env).stdout)
    pool = mirror / "debian/pool"
    indices = mirror / "debian/indices"
    pool.mkdir(parents=True)
    indices.mkdir(parents=True)
    stanzas, debs = [], []
    for name, version in packages.items():
        deb = _deb(work, name, version)
        shutil.copyfile(deb, pool / deb.name)
        digest = file_sha256(deb)
        stanzas.append(f"Package: {name}\nVersion: {version}\nArchitecture: amd64\n"
                       f"Filename: pool/main/{name[0]}/{name}/{deb.name}\nSize: {deb.stat().st_size}\n"
                       f"SHA256: {digest}\n")
        debs.append(LockedFile(f"debian/pool/{deb.name}", digest, deb.stat().st_size, name, version,
                               "amd64"))
    packages_text = "\n".join(stanzas).encode()
    list_name = "example_debian_dists_trixie_main_binary-amd64_Packages"
    with gzip.GzipFile(indices / f"{list_name}.gz", "wb", mtime=0) as handle:
        handle.write(packages_text)
    release = (f"Suite: trixie\nCodename: trixie\nSHA256:\n {hashlib.sha256(packages_text).hexdigest()}"
               f" {len(packages_text)} main/binary-amd64/Packages\n")
    inrelease = indices / "example_debian_dists_trixie_InRelease"
    subprocess.run(["gpg", "--batch", "--yes", "--clearsign", "-o", str(inrelease)],
                   input=release.encode(), check=True, capture_output=True, env=env)
    # gpg started an agent for this throwaway home: stop it, so the test leaves no daemon.
    subprocess.run(["gpgconf", "--homedir", str(gnupg), "--kill", "gpg-agent"],
                   check=False, capture_output=True)
    (mirror / "wheels").mkdir()
    wheel = mirror / "wheels/demo-1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    idx = (
        LockedFile(f"debian/indices/{inrelease.name}", file_sha256(inrelease), inrelease.stat().st_size,
                   extra={"kind": "InRelease"}),
        LockedFile(f"debian/indices/{list_name}.gz", file_sha256(indices / f"{list_name}.gz"),
                   (indices / f"{list_name}.gz").stat().st_size,
                   extra={"kind": "Packages", "release": f"debian/indices/{inrelease.name}",
                          "release_path": "main/binary-amd64/Packages"}),
    )
    lock = Lock("trixie", "amd64", "3.13", tuple(packages), tuple(debs), idx, (),
                (LockedFile("wheels/demo-1.0-py3-none-any.whl", file_sha256(wheel), 22, "demo", "1.0"),))
    (mirror / LOCK).write_bytes(lock.canonical())
    return keyring


def _cpio_members(archive: bytes) -> dict[str, str]:
    """name -> sha256 of each member of a concatenation of newc cpio archives."""
    members: dict[str, str] = {}
    at = 0
    while at + 110 <= len(archive):
        if archive[at:at + 6] not in (b"070701", b"070702"):
            at += 1  # padding between concatenated archives
            continue
        field = [int(archive[at + 6 + 8 * i:at + 14 + 8 * i], 16) for i in range(13)]
        size, namesize = field[6], field[11]
        name_at = at + 110
        name = archive[name_at:name_at + namesize - 1].decode(errors="replace")
        data_at = name_at + namesize + (-(110 + namesize) % 4)
        if name == "TRAILER!!!":
            at = data_at
            continue
        members[name] = hashlib.sha256(archive[data_at:data_at + size]).hexdigest() + f" mode={field[1]:o}"
        at = data_at + size + (-size % 4)
    return members


def uki_difference(a: Path, b: Path) -> str:
    """Which sections of two UKIs differ and, for the initrd, which files: for a failure message."""
    sa, sb = pe_sections(a.read_bytes()), pe_sections(b.read_bytes())
    differ = sorted(n for n in sa.keys() | sb.keys() if sa.get(n) != sb.get(n))
    lines = [f"sections that differ: {differ or 'none (headers only)'}"]
    if ".initrd" in differ and ".initrd" in sa and ".initrd" in sb:
        def unpack(blob: bytes) -> bytes:
            start = blob.find(b"\x28\xb5\x2f\xfd")  # zstd after any uncompressed early cpio
            if start < 0:
                return blob
            # no check: zstd complains of the section's zero padding after what it decompressed
            raw = subprocess.run(["zstd", "-dc"], input=blob[start:], capture_output=True, check=False).stdout
            return blob[:start] + raw
        ma, mb = _cpio_members(unpack(sa[".initrd"])), _cpio_members(unpack(sb[".initrd"]))
        changed = sorted(n for n in ma.keys() & mb.keys() if ma[n] != mb[n])
        only_a, only_b = sorted(ma.keys() - mb.keys())[:20], sorted(mb.keys() - ma.keys())[:20]
        lines.append(f"initrd files that differ: {changed[:40] or 'none'}; "
                     f"only in the first: {only_a}; only in the second: {only_b}")
    return "\n".join(lines)
