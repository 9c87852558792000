"""The image's SPDX 2.3 document: every package with its hash, licence and supplier, every file.

What it reads, all from the built root and the mirror the root was built from:

- ``var/lib/dpkg/status``: installed packages, their maintainer (the SPDX supplier), their
  ``Depends``/``Pre-Depends`` (``DEPENDS_ON``, first alternative present in the image, virtual
  names through ``Provides``);
- ``var/lib/dpkg/info/PKG.list``: which files each package owns (``CONTAINS``); paths are
  followed through the root's directory symlinks (merged /usr: ``/bin/sh`` is ``/usr/bin/sh``);
- ``usr/share/doc/PKG/copyright`` in the machine-readable (DEP-5) format: the ``License:`` short
  names of its ``Files`` paragraphs, mapped to SPDX ids (``licenseDeclared``); a name SPDX does
  not know becomes a ``LicenseRef-`` with its text in ``hasExtractedLicensingInfos``; a
  copyright file in free text gives ``NOASSERTION``;
- the mirror's lock: the sha256 of each .deb and wheel as it was downloaded (the package
  checksum), and the Packages index the .deb came from (its pool path, so the download
  location is the Debian archive's URL of that exact file);
- the venv's ``*.dist-info``: wheels, and the files each installed (``RECORD``).

Files: one entry per regular file with SHA1 (SPDX 2.3 requires it) and SHA256, taken from the
build's file manifest so each file is read once (:func:`file_digests` computes both in one
pass).  The output depends only on its inputs (sorted everywhere, ``created`` from
SOURCE_DATE_EPOCH, the namespace a hash of the content).
"""

from __future__ import annotations

import csv
import datetime
import gzip
import hashlib
import json
import os
import re
import stat
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provisioning.image._debian import parse_stanzas, wanted_entries
from provisioning.image.mirror import Lock, LockedFile
from provisioning.image.plan import VENV
from provisioning.image.profile import Profile

__all__ = ["DebPackage", "Wheel", "file_digests", "installed_debs", "installed_wheels",
           "license_expression", "spdx_sbom"]

_BLOCK = 4 << 20
_DISTRO = {"bullseye": "11", "bookworm": "12", "trixie": "13", "forky": "14"}
NOASSERTION = "NOASSERTION"


# ------------------------------------------------------------------ reading the root


@dataclass(frozen=True)
class DebPackage:
    """One installed package, as dpkg's status records it."""

    name: str
    version: str
    architecture: str
    source: str
    maintainer: str
    depends: tuple[tuple[str, ...], ...] = ()  # groups of alternatives (Pre-Depends, Depends)
    provides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Wheel:
    """One distribution installed in the agent's venv."""

    name: str
    version: str
    dist_info: Path
    license: str = ""  # the METADATA License-Expression (PEP 639), when it has one


def _names(field_value: str) -> tuple[tuple[str, ...], ...]:
    """``a (>= 1) | b:any, c`` -> (("a", "b"), ("c",))."""
    groups = []
    for group in field_value.split(","):
        alts = []
        for alt in group.split("|"):
            m = re.match(r"\s*([a-z0-9][a-z0-9+.-]*)", alt)
            if m:
                alts.append(m.group(1))
        if alts:
            groups.append(tuple(alts))
    return tuple(groups)


def installed_debs(root: Path) -> list[DebPackage]:
    """Installed packages from ``root``'s dpkg status, sorted by name and architecture."""
    with (root / "var/lib/dpkg/status").open(encoding="utf-8") as handle:
        stanzas = [s for s in parse_stanzas(handle) if s.get("Status", "").endswith(" installed")]
    debs = [DebPackage(s["Package"], s["Version"], s.get("Architecture", ""),
                       s.get("Source", s["Package"]).split(" ")[0], s.get("Maintainer", ""),
                       _names(s.get("Pre-Depends", "")) + _names(s.get("Depends", "")),
                       tuple(a[0] for a in _names(s.get("Provides", ""))))
            for s in stanzas]
    return sorted(debs, key=lambda p: (p.name, p.architecture))


def _metadata(path: Path) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        if not line:
            break
        key, sep, value = line.partition(": ")
        if sep and not key.startswith(" "):
            headers.setdefault(key, value.strip())
    return headers


def installed_wheels(root: Path) -> list[Wheel]:
    """Distributions installed in the agent's venv (from their dist-info METADATA)."""
    found = []
    for meta in sorted(root.glob(f"{VENV.lstrip('/')}/lib/python3*/site-packages/*.dist-info/METADATA")):
        headers = _metadata(meta)
        if headers.get("Name"):
            found.append(Wheel(headers["Name"], headers.get("Version", ""), meta.parent,
                               headers.get("License-Expression", "")))
    return found


def file_digests(path: Path) -> tuple[str, str]:
    """(sha1, sha256) of a file's bytes, read once."""
    sha1, sha256 = hashlib.sha1(usedforsecurity=False), hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_BLOCK):
            sha1.update(chunk)
            sha256.update(chunk)
    return sha1.hexdigest(), sha256.hexdigest()


class _Resolver:
    """Paths as packages name them -> the regular file of the root they reach (or None)."""

    def __init__(self, root: Path, files: Mapping[str, Any]) -> None:
        self.root = root
        self.files = files
        self._dirs: dict[str, str] = {"/": "/"}

    def _dir(self, path: str, depth: int = 0) -> str:
        if path in self._dirs:
            return self._dirs[path]
        parent, _, name = path.rpartition("/")
        real = self._dir(parent or "/", depth).rstrip("/") + "/" + name
        disk = self.root / real.lstrip("/")
        if depth < 16 and disk.is_symlink():
            target = str(disk.readlink())
            base = "" if target.startswith("/") else real.rpartition("/")[0]
            real = self._dir(os.path.normpath(f"{base}/{target}").replace("//", "/"), depth + 1)
        self._dirs[path] = real
        return real

    def file(self, path: str) -> str | None:
        path = os.path.normpath("/" + path.lstrip("/"))
        if path in self.files:
            return path
        parent, _, name = path.rpartition("/")
        real = self._dir(parent or "/").rstrip("/") + "/" + name
        return real if real in self.files else None


def _deb_files(root: Path, deb: DebPackage, resolver: _Resolver) -> list[str]:
    info = root / "var/lib/dpkg/info"
    for name in (f"{deb.name}:{deb.architecture}.list", f"{deb.name}.list"):
        if (info / name).is_file():
            lines = (info / name).read_text(encoding="utf-8", errors="surrogateescape").splitlines()
            return sorted({f for line in lines if line and (f := resolver.file(line))})
    return []


def _wheel_files(root: Path, wheel: Wheel, resolver: _Resolver) -> list[str]:
    record = wheel.dist_info / "RECORD"
    if not record.is_file():
        return []
    site = "/" + wheel.dist_info.parent.relative_to(root).as_posix()
    with record.open(newline="", encoding="utf-8") as handle:
        rows = [row[0] for row in csv.reader(handle) if row]
    return sorted({f for rel in rows if (f := resolver.file(f"{site}/{rel}"))})


# ------------------------------------------------------------------ licences

# Debian's DEP-5 short names (lower case) -> SPDX ids, where they differ or SPDX has them too.
_LICENSES = {
    "expat": "MIT", "mit": "MIT", "bsd-2-clause": "BSD-2-Clause", "bsd-3-clause": "BSD-3-Clause",
    "bsd-4-clause": "BSD-4-Clause", "bsd-1-clause": "BSD-1-Clause", "0bsd": "0BSD",
    "apache-2.0": "Apache-2.0", "apache-2": "Apache-2.0", "apache-1.1": "Apache-1.1",
    "isc": "ISC", "zlib": "Zlib", "cc0": "CC0-1.0", "cc0-1.0": "CC0-1.0",
    "mpl-1.1": "MPL-1.1", "mpl-2.0": "MPL-2.0", "mpl-1.0": "MPL-1.0",
    "artistic": "Artistic-1.0-Perl", "artistic-1.0": "Artistic-1.0", "artistic-2.0": "Artistic-2.0",
    "psf-2": "PSF-2.0", "psf-2.0": "PSF-2.0", "python": "Python-2.0", "python-2.0": "Python-2.0",
    "openssl": "OpenSSL", "x11": "X11", "curl": "curl", "bsl-1.0": "BSL-1.0",
    "boost-1.0": "BSL-1.0", "unlicense": "Unlicense", "cc-by-3.0": "CC-BY-3.0",
    "cc-by-4.0": "CC-BY-4.0", "cc-by-sa-3.0": "CC-BY-SA-3.0", "cc-by-sa-4.0": "CC-BY-SA-4.0",
    "ofl-1.1": "OFL-1.1", "unicode-dfs-2016": "Unicode-DFS-2016", "wtfpl": "WTFPL",
    "fsfap": "FSFAP", "fsful": "FSFUL", "fsfullr": "FSFULLR", "ijg": "IJG", "libpng": "Libpng",
    "libpng-2.0": "libpng-2.0", "zope-2.1": "ZPL-2.1", "w3c": "W3C", "tcl": "TCL", "hpnd": "HPND",
    "ntp": "NTP", "info-zip": "Info-ZIP", "lppl-1.3c": "LPPL-1.3c", "ftl": "FTL",
    "bzip2-1.0.6": "bzip2-1.0.6", "sleepycat": "Sleepycat", "bsd-source-code": "BSD-Source-Code",
    "mit-0": "MIT-0", "mit-cmu": "MIT-CMU", "x11-distribute-modifications-variant":
    "X11-distribute-modifications-variant", "gpl-2+ with autoconf exception":
    "GPL-2.0-or-later WITH Autoconf-exception-2.0", "gpl-3+ with autoconf exception":
    "GPL-3.0-or-later WITH Autoconf-exception-3.0",
    "gpl-3+ with gcc-exception-3.1": "GPL-3.0-or-later WITH GCC-exception-3.1",
    "gpl-2+ with bison exception": "GPL-2.0-or-later WITH Bison-exception-2.2",
    "gpl-3+ with bison exception": "GPL-3.0-or-later WITH Bison-exception-2.2",
    "gpl-2+ with libtool exception": "GPL-2.0-or-later WITH Libtool-exception",
    "gpl-2+ with linux-syscall-note": "GPL-2.0-or-later WITH Linux-syscall-note",
    "gpl-2 with linux-syscall-note": "GPL-2.0-only WITH Linux-syscall-note",
}
# The versioned families: GPL-2+ -> GPL-2.0-or-later, LGPL-2.1 -> LGPL-2.1-only ...
_FAMILY = re.compile(r"^(A?GPL|LGPL|GFDL)-?(\d+(?:\.\d+)?)?(\+)?$", re.IGNORECASE)
_VERSIONS = {"GPL": ("1.0", "2.0", "3.0"), "LGPL": ("2.0", "2.1", "3.0"), "AGPL": ("1.0", "3.0"),
             "GFDL": ("1.1", "1.2", "1.3")}
_FIRST = {"GPL": "1.0", "LGPL": "2.0", "AGPL": "1.0", "GFDL": "1.1"}


def _family(term: str) -> str | None:
    m = _FAMILY.match(term)
    if not m:
        return None
    family, version, plus = m.group(1).upper(), m.group(2), m.group(3)
    if version is None:  # "GPL" with no version: any version
        version, plus = _FIRST[family], "+"
    elif "." not in version:
        version += ".0"
    if version not in _VERSIONS[family]:
        return None
    return f"{family}-{version}-{'or-later' if plus else 'only'}"


def _license_ref(term: str) -> str:
    # "+" (or later) kept apart, so GPL-2 and GPL-2+ variants never share a text
    readable = re.sub(r"[^A-Za-z0-9.]+", "-", term.replace("+", "-plus-")).strip("-")
    return "LicenseRef-" + (readable or "unnamed")


def license_id(term: str) -> tuple[str, bool]:
    """A Debian short licence name -> (SPDX id or expression, whether it is a LicenseRef)."""
    spdx = _LICENSES.get(term.lower()) or _family(term)
    return (spdx, False) if spdx else (_license_ref(term), True)


def _split(expression: str, operators: str) -> list[str]:
    return [p.strip() for p in re.split(rf"\s+(?:{operators})\s+", expression, flags=re.IGNORECASE)
            if p.strip()]


def license_expression(short: str) -> tuple[str, list[str]]:
    """One DEP-5 ``License:`` short name (``GPL-2+ or Artistic, and BSD-3-clause``) -> an SPDX
    expression and the Debian names that became LicenseRefs.

    DEP-5 reads "and" before "or" unless commas group: ``A or B, and C`` is ``(A or B) and C``.
    """
    refs: list[str] = []

    def term(t: str) -> str:
        spdx, is_ref = license_id(t)
        if is_ref:
            refs.append(t)
        return spdx

    def group(g: str) -> str:
        ors = [" AND ".join(term(t) for t in _split(o, "and")) for o in _split(g, "or")]
        return " OR ".join(f"({o})" if " AND " in o and len(ors) > 1 else o for o in ors)

    top = re.split(r",\s*(and|or)\s+", short.strip(), flags=re.IGNORECASE)
    parts, ops = top[0::2], [o.upper() for o in top[1::2]]
    out = group(parts[0])
    for op, part in zip(ops, parts[1:], strict=True):
        out = f"({out}) {op} ({group(part)})"
    return out, refs


@dataclass
class _Licences:
    """Declared licences of packages, and the texts of the LicenseRefs they use."""

    texts: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (name, text)

    def from_copyright(self, path: Path, owner: str) -> str:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return NOASSERTION
        stanzas = list(parse_stanzas(text.splitlines()))
        fmt = stanzas[0].get("Format", "").lower() if stanzas else ""
        if "copyright-format" not in fmt and "dep5" not in fmt:
            return NOASSERTION  # free text: nothing a machine can read without guessing
        standalone = {s["License"].partition("\n")[0].strip().lower(): s["License"].partition("\n")[2]
                      for s in stanzas if "License" in s and "Files" not in s}
        found: set[str] = set()
        for s in stanzas:
            if "Files" not in s or "License" not in s:
                continue
            short, _, body = s["License"].partition("\n")
            if not short.strip():
                continue
            expression, refs = license_expression(short)
            found.add(expression)
            for name in refs:
                ref = _license_ref(name)
                full = standalone.get(name.lower()) or body
                self.texts.setdefault(ref, (name, _dep5_text(full) or
                                            f"{owner}: the Debian copyright file names the licence "
                                            f"'{name}' without its text."))
        if not found:
            return NOASSERTION
        ordered = sorted(found)
        return ordered[0] if len(ordered) == 1 else " AND ".join(
            f"({e})" if " " in e else e for e in ordered)

    def extracted(self) -> list[dict[str, Any]]:
        return [{"licenseId": ref, "name": name, "extractedText": text}
                for ref, (name, text) in sorted(self.texts.items())]


def _dep5_text(body: str) -> str:
    """A deb822 field's continuation lines as text ("." stands for an empty line)."""
    return "\n".join("" if line == "." else line for line in body.splitlines()).strip()


def _copyright_path(root: Path, package: str) -> Path:
    """usr/share/doc/PKG/copyright, following a doc directory that links elsewhere in the root."""
    doc = root / "usr/share/doc" / package
    for _ in range(8):
        if not doc.is_symlink():
            break
        target = str(doc.readlink())
        doc = root / target.lstrip("/") if target.startswith("/") else doc.parent / target
    return doc / "copyright"


# ------------------------------------------------------------------ suppliers, locations

_ORGANISATION = re.compile(r"\b(team|maintainers|group|project|developers|packagers|debian)\b|"
                           r"@lists\.|alioth-lists|tracker\.debian\.org", re.IGNORECASE)


def supplier(maintainer: str) -> str:
    """Debian's ``Maintainer`` -> an SPDX actor: a team or list is an Organization, else a Person."""
    m = re.match(r"^\s*(.*?)\s*<([^>]*)>\s*$", maintainer)
    name, email = (m.group(1), m.group(2)) if m else (maintainer.strip(), "")
    if not name:
        return NOASSERTION
    kind = "Organization" if _ORGANISATION.search(maintainer) else "Person"
    name = name.replace("(", "[").replace(")", "]")  # the actor syntax keeps () for the email
    return f"{kind}: {name} ({email})" if email else f"{kind}: {name}"


def _pool_paths(mirror: Path, lock: Lock) -> dict[tuple[str, str, str], str]:
    """(name, version, arch) -> the .deb's path in the Debian archive, from the mirror's indices."""
    wanted = {d.name for d in lock.debs}
    found: dict[tuple[str, str, str], str] = {}
    for f in lock.indices:
        if f.extra.get("kind") != "Packages" or not (mirror / f.path).is_file():
            continue
        with gzip.open(mirror / f.path, "rt", encoding="utf-8") as handle:
            text = handle.read()
        for e in wanted_entries(text, wanted):
            if e.name in wanted and e.filename:
                found.setdefault((e.name, e.version, e.architecture), e.filename)
    return found


def _canonical_wheel_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ------------------------------------------------------------------ the document


class _Ids:
    """SPDX ids from readable names, unique even where two names sanitise alike."""

    def __init__(self) -> None:
        self._used: set[str] = set()

    def new(self, prefix: str, name: str) -> str:
        base = f"SPDXRef-{prefix}-" + re.sub(r"[^A-Za-z0-9.-]+", "-", name).strip("-")
        spdx_id = base
        if spdx_id in self._used:
            spdx_id = f"{base}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
        self._used.add(spdx_id)
        return spdx_id


def _dependency(alternatives: tuple[str, ...], present: Mapping[str, str]) -> str | None:
    """The package of the first alternative the image has, as a real or a virtual package."""
    for name in alternatives:
        found = present.get(name) or present.get(f"virtual:{name}")
        if found:
            return found
    return None


def _rel(a: str, kind: str, b: str) -> dict[str, str]:
    return {"spdxElementId": a, "relationshipType": kind, "relatedSpdxElement": b}


def _checksums(**values: str) -> list[dict[str, str]]:
    return [{"algorithm": k.upper(), "checksumValue": v} for k, v in values.items()]


def _regular_files(root: Path, files: Iterable[Mapping[str, Any]]) -> dict[str, tuple[str, str]]:
    """path -> (sha1, sha256) for the manifest's regular files (hashing only what lacks sha1)."""
    out: dict[str, tuple[str, str]] = {}
    for entry in files:
        if "sha256" not in entry or not stat.S_ISREG(int(entry.get("mode", "100644"), 8)):
            continue
        path = entry["path"]
        sha1 = entry.get("sha1") or file_digests(root / path.lstrip("/"))[0]
        out[path] = (sha1, entry["sha256"])
    return out


def _package(spdx_id: str, name: str, version: str, *, supplier_: str = NOASSERTION,
             location: str = NOASSERTION, license_: str = NOASSERTION, sha256: str = "",
             file_name: str = "", purl: str = "", source: str = "",
             files: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """One SPDX package; ``files`` are the (sha1, ...) of what it contains (verification code)."""
    p: dict[str, Any] = {
        "SPDXID": spdx_id, "name": name, "supplier": supplier_,
        "downloadLocation": location, "filesAnalyzed": bool(files),
        "licenseConcluded": NOASSERTION, "licenseDeclared": license_,
        "copyrightText": NOASSERTION}
    if version:
        p["versionInfo"] = version
    if sha256:
        p["checksums"] = _checksums(sha256=sha256)
    if file_name:
        p["packageFileName"] = file_name
    if purl:
        p["externalRefs"] = [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                              "referenceLocator": purl}]
    if source:
        p["sourceInfo"] = source
    if files:
        code = hashlib.sha1("".join(sorted(s for s, _ in files)).encode(), usedforsecurity=False)
        p["packageVerificationCode"] = {"packageVerificationCodeValue": code.hexdigest()}
    return p


def spdx_sbom(root: Path, profile: Profile, lock: Lock, mirror: Path, source_date_epoch: int, *,
              files: Any) -> dict[str, Any]:
    """An SPDX 2.3 JSON document of the image ``root`` built by ``profile`` from ``mirror``.

    ``files`` is the build's file manifest, an iterable of :func:`outputs.file_manifest`'s
    entries (``path``, ``mode``, ``sha256`` and, so no file is read twice, ``sha1`` of each
    regular file; a file without ``sha1`` is read).  Typed ``Any`` because the build hands it
    over from its JSON manifest.

    Raises:
        OSError: the root's dpkg status cannot be read.
    """
    image_name = profile.image.name
    suite = profile.debian.suite
    archive = profile.debian.archive.rstrip("/")
    distro = _DISTRO.get(suite, suite)
    regular = _regular_files(root, files)
    resolver = _Resolver(root, regular)
    ids = _Ids()
    licences = _Licences()
    image_id = ids.new("Image", image_name)
    packages: list[dict[str, Any]] = []
    relationships = [_rel("SPDXRef-DOCUMENT", "DESCRIBES", image_id)]
    owned: dict[str, list[str]] = {}  # package id -> its files

    debs = installed_debs(root)
    locked = {(d.name, d.version, d.architecture): d for d in lock.debs}
    pool = _pool_paths(mirror, lock)
    own_ids = {(d.name, d.architecture): ids.new("deb", f"{d.name}-{d.version}-{d.architecture}")
               for d in debs}
    deb_ids: dict[str, str] = {}  # package and virtual names -> the first package that has them
    for deb in debs:
        deb_ids.setdefault(deb.name, own_ids[(deb.name, deb.architecture)])
        for virtual in deb.provides:
            deb_ids.setdefault(f"virtual:{virtual}", own_ids[(deb.name, deb.architecture)])
    for deb in debs:
        key = (deb.name, deb.version, deb.architecture)
        entry: LockedFile | None = locked.get(key)
        spdx_id = own_ids[(deb.name, deb.architecture)]
        owned[spdx_id] = _deb_files(root, deb, resolver)
        purl = (f"pkg:deb/debian/{deb.name}@{deb.version}?arch={deb.architecture}"
                f"&distro=debian-{distro}")
        packages.append(_package(
            spdx_id, deb.name, deb.version, supplier_=supplier(deb.maintainer),
            location=f"{archive}/{pool[key]}" if key in pool else NOASSERTION,
            license_=licences.from_copyright(_copyright_path(root, deb.name), deb.name),
            sha256=entry.sha256 if entry else "", file_name=Path(entry.path).name if entry else "",
            purl=purl, source=f"Debian source package {deb.source} ({suite})",
            files=[regular[f] for f in owned[spdx_id]]))
        targets = {_dependency(group, deb_ids) for group in deb.depends} - {None, spdx_id}
        relationships += [_rel(spdx_id, "DEPENDS_ON", t) for t in sorted(filter(None, targets))]

    wheels_locked = {(_canonical_wheel_name(w.name), w.version): w for w in lock.wheels}
    for wheel in installed_wheels(root):
        spdx_id = ids.new("pypi", f"{wheel.name}-{wheel.version}")
        w_entry = wheels_locked.get((_canonical_wheel_name(wheel.name), wheel.version))
        owned[spdx_id] = _wheel_files(root, wheel, resolver)
        declared = wheel.license if wheel.license and all(
            t in _LICENSES.values() or t in {"AND", "OR", "(", ")"}
            for t in re.findall(r"[()]|[^\s()]+", wheel.license)) else NOASSERTION
        packages.append(_package(
            spdx_id, wheel.name, wheel.version, license_=declared,
            sha256=w_entry.sha256 if w_entry else "",
            file_name=Path(w_entry.path).name if w_entry else "",
            purl=f"pkg:pypi/{_canonical_wheel_name(wheel.name)}@{wheel.version}",
            source=f"installed in {VENV}", files=[regular[f] for f in owned[spdx_id]]))

    relationships += sorted((_rel(image_id, "CONTAINS", p["SPDXID"]) for p in packages),
                            key=lambda r: r["relatedSpdxElement"])
    file_ids = {path: ids.new("File", path) for path in sorted(regular)}
    claimed: set[str] = set()
    for spdx_id, paths in sorted(owned.items()):
        relationships += [_rel(spdx_id, "CONTAINS", file_ids[p]) for p in paths]
        claimed.update(paths)
    unowned = [p for p in sorted(regular) if p not in claimed]
    relationships += [_rel(image_id, "CONTAINS", file_ids[p]) for p in unowned]
    image = _package(image_id, image_name, "", source=(
        f"built from Debian {suite} ({profile.debian.architecture}) and mirror lock "
        f"sha256 {lock.sha256}"), files=[regular[p] for p in unowned])
    image["primaryPackagePurpose"] = "OPERATING-SYSTEM"
    spdx_files = [{"SPDXID": file_ids[p], "fileName": "." + p,
                   "checksums": _checksums(sha1=regular[p][0], sha256=regular[p][1])}
                  for p in sorted(regular)]

    doc: dict[str, Any] = {
        "spdxVersion": "SPDX-2.3", "dataLicense": "CC0-1.0", "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"{image_name} image",
        "creationInfo": {
            "created": datetime.datetime.fromtimestamp(source_date_epoch, tz=datetime.UTC)
            .strftime("%Y-%m-%dT%H:%M:%SZ"),
            "creators": ["Tool: sovereign-appliance-build"]},
        "packages": [image, *sorted(packages, key=lambda p: p["SPDXID"])],
        "files": spdx_files,
        "hasExtractedLicensingInfos": licences.extracted(),
        "relationships": relationships,
    }
    identity = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
    doc["documentNamespace"] = (f"https://sovereign-appliance.invalid/spdx/{image_name}/"
                                f"{uuid.UUID(identity[:32])}")
    return doc


def iter_relationships(doc: Mapping[str, Any], kind: str) -> Iterator[tuple[str, str]]:
    """(from, to) of the document's relationships of one ``kind`` (for readers and tests)."""
    for r in doc["relationships"]:
        if r["relationshipType"] == kind:
            yield r["spdxElementId"], r["relatedSpdxElement"]
