"""The image's SPDX document, from a small real root and mirror, checked by the SPDX project's tools.

The root is made of real files under tmp_path: a dpkg status with three installed packages
(Depends with alternatives and a virtual package), their info/*.list, DEP-5 copyright files
(one with a licence SPDX does not list, one in free text), a merged-/usr symlink, a venv
with one wheel and files no package owns.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from spdx_tools.common.spdx_licensing import spdx_licensing
from spdx_tools.spdx.parser.parse_anything import parse_file
from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

from provisioning.image import sbom as sbom_module
from provisioning.image.mirror import Lock, LockedFile
from provisioning.image.outputs import file_manifest, spdx_sbom
from provisioning.image.profile import Profile, load_profile
from provisioning.image.sbom import iter_relationships, license_expression, supplier

ROOT = Path(__file__).resolve().parent.parent
SITE = "opt/appliance/venv/lib/python3.11/site-packages"

STATUS = """\
Package: base-tool
Status: install ok installed
Priority: optional
Architecture: amd64
Maintainer: Jane Doe <jane@example.org>
Version: 1.0-1
Pre-Depends: libfoo1
Depends: libfoo1 (>= 1.0), no-such-pkg | libbar-abi, missing-entirely
Description: a tool

Package: gone
Status: deinstall ok config-files
Architecture: amd64
Maintainer: Nobody <nobody@example.org>
Version: 0.1

Package: libbar2
Status: install ok installed
Architecture: amd64
Source: bar (2.0-3)
Maintainer: Bar Maintainers <bar@lists.example.org>
Version: 2.0-3
Provides: libbar-abi
Depends: libfoo1 | libbar-abi

Package: libfoo1
Status: install ok installed
Architecture: amd64
Multi-Arch: same
Source: foo
Maintainer: Debian Foo Team <team+foo@tracker.debian.org>
Version: 1:1.5-2
"""

DEP5_FOO = """\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: foo

Files: *
Copyright: 2020 Foo Authors
License: GPL-2+

Files: lib/x.c
Copyright: 2021 X
License: BSD-3-clause or Expat

Files: debian/*
Copyright: none
License: public-domain
 The packaging is in the public domain.

License: GPL-2+
 On Debian systems, see /usr/share/common-licenses/GPL-2.
"""

DEP5_BASE = """\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/

Files: *
Copyright: 2024 Jane Doe
License: Frobnicate-1

License: Frobnicate-1
 Permission is granted to frobnicate this software.
 .
 No warranty.
"""

FREE_TEXT = """\
This package was debianized by someone in 1999.
It is licensed under terms you may read in the source.
"""

DEBS = {  # name -> (version, arch, pool path in the Debian archive)
    "base-tool": ("1.0-1", "amd64", "pool/main/b/base-tool/base-tool_1.0-1_amd64.deb"),
    "libbar2": ("2.0-3", "amd64", "pool/main/b/bar/libbar2_2.0-3_amd64.deb"),
    "libfoo1": ("1:1.5-2", "amd64", "pool/main/f/foo/libfoo1_1.5-2_amd64.deb"),
}


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def _fake_root(root: Path) -> None:
    _write(root / "usr/bin/base-tool", b"#!/bin/sh\necho base\n")
    (root / "bin").symlink_to("usr/bin")  # merged /usr: base-tool's list names /bin/base-tool
    lib = root / "usr/lib/x86_64-linux-gnu"
    _write(lib / "libfoo.so.1.5", b"\x7fELF foo")
    (lib / "libfoo.so.1").symlink_to("libfoo.so.1.5")
    _write(lib / "libbar.so.2", b"\x7fELF bar")
    _write(root / "usr/share/doc/libfoo1/copyright", DEP5_FOO)
    _write(root / "usr/share/doc/base-tool/copyright", DEP5_BASE)
    _write(root / "usr/share/doc/libbar2/copyright", FREE_TEXT)
    _write(root / "etc/hostname", "appliance\n")  # no package owns it
    _write(root / "var/lib/dpkg/status", STATUS)
    info = root / "var/lib/dpkg/info"
    _write(info / "base-tool.list", "/.\n/bin\n/bin/base-tool\n/usr/share/doc/base-tool\n"
                                    "/usr/share/doc/base-tool/copyright\n")
    _write(info / "libfoo1:amd64.list", "/.\n/usr/lib/x86_64-linux-gnu/libfoo.so.1.5\n"
                                        "/usr/lib/x86_64-linux-gnu/libfoo.so.1\n"
                                        "/usr/share/doc/libfoo1/copyright\n")
    _write(info / "libbar2.list", "/usr/lib/x86_64-linux-gnu/libbar.so.2\n"
                                  "/usr/share/doc/libbar2/copyright\n/usr/lib/removed-later.so\n")
    dist = root / SITE / "demo_pkg-1.2.dist-info"
    _write(root / SITE / "demo_pkg/__init__.py", "VALUE = 1\n")
    _write(dist / "METADATA", "Metadata-Version: 2.4\nName: demo-pkg\nVersion: 1.2\n"
                              "License-Expression: MIT\n\nA demo.\n")
    _write(dist / "RECORD", "demo_pkg/__init__.py,sha256=x,10\ndemo_pkg-1.2.dist-info/METADATA,,\n"
                            "demo_pkg-1.2.dist-info/RECORD,,\n")


def _fake_mirror(mirror: Path) -> Lock:
    stanzas = []
    debs = []
    for name, (version, arch, pool) in sorted(DEBS.items()):
        sha = hashlib.sha256(f"{name} deb".encode()).hexdigest()
        stanzas.append(f"Package: {name}\nVersion: {version}\nArchitecture: {arch}\n"
                       f"Filename: {pool}\nSize: 10\nSHA256: {sha}\n")
        debs.append(LockedFile(f"debian/pool/{Path(pool).name}", sha, 10, name, version, arch))
    index = mirror / "debian/indices/deb.debian.org_debian_dists_trixie_main_binary-amd64_Packages.gz"
    index.parent.mkdir(parents=True)
    with gzip.open(index, "wt") as handle:
        handle.write("\n".join(stanzas))
    indices = (LockedFile(index.relative_to(mirror).as_posix(), "0" * 64, 1,
                          extra={"kind": "Packages", "release": "x", "release_path": "y"}),)
    wheel = LockedFile("wheels/demo_pkg-1.2-py3-none-any.whl",
                       hashlib.sha256(b"wheel").hexdigest(), 5, "demo-pkg", "1.2")
    return Lock("trixie", "amd64", "3.11", ("base-tool",), tuple(debs), indices, (), (wheel,))


@pytest.fixture
def built(tmp_path: Path) -> tuple[Path, Lock, dict[str, Any], Path]:
    root = tmp_path / "root"
    _fake_root(root)
    lock = _fake_mirror(tmp_path / "mirror")
    profile: Profile = load_profile(ROOT / "images/minimal.toml")
    doc = spdx_sbom(root, profile, lock, tmp_path / "mirror", 1_700_000_000,
                    files=file_manifest(root))
    path = tmp_path / "sbom.spdx.json"
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return root, lock, doc, path


def _by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in doc["packages"]}


def _sha256(p: dict[str, Any]) -> str:
    return next(c["checksumValue"] for c in p["checksums"] if c["algorithm"] == "SHA256")


def test_spdx_tools_find_the_document_valid(built: tuple[Path, Lock, dict[str, Any], Path]) -> None:
    path = built[3]
    messages = validate_full_spdx_document(parse_file(str(path)))
    assert messages == [], [m.validation_message for m in messages]
    cli = shutil.which("pyspdxtools", path=str(Path(sys.executable).parent))
    assert cli, "spdx-tools is in the test extra"
    r = subprocess.run([cli, "-i", str(path)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_package_and_file_has_its_sha256(built: tuple[Path, Lock, dict[str, Any], Path]) -> None:
    root, lock, doc, _ = built
    packages = _by_name(doc)
    for d in lock.debs:
        assert _sha256(packages[d.name]) == d.sha256
    assert _sha256(packages["demo-pkg"]) == lock.wheels[0].sha256
    assert all(_sha256(p) for p in doc["packages"] if p["name"] != "minimal")
    regular = sorted("./" + p.relative_to(root).as_posix() for p in root.rglob("*")
                     if p.is_file() and not p.is_symlink())
    assert sorted(f["fileName"] for f in doc["files"]) == regular
    for f in doc["files"]:
        data = (root / f["fileName"]).read_bytes()
        sums = {c["algorithm"]: c["checksumValue"] for c in f["checksums"]}
        assert sums == {"SHA1": hashlib.sha1(data).hexdigest(),
                        "SHA256": hashlib.sha256(data).hexdigest()}


def test_packages_carry_licence_supplier_location_and_purl(
        built: tuple[Path, Lock, dict[str, Any], Path]) -> None:
    doc = built[2]
    packages = _by_name(doc)
    assert "gone" not in packages  # config-files only: not installed
    foo, bar, base = packages["libfoo1"], packages["libbar2"], packages["base-tool"]
    assert foo["licenseDeclared"] == ("(BSD-3-Clause OR MIT) AND GPL-2.0-or-later AND "
                                      "LicenseRef-public-domain")
    assert base["licenseDeclared"] == "LicenseRef-Frobnicate-1"
    assert bar["licenseDeclared"] == "NOASSERTION"  # free-text copyright file
    assert packages["demo-pkg"]["licenseDeclared"] == "MIT"
    extracted = {e["licenseId"]: e for e in doc["hasExtractedLicensingInfos"]}
    assert sorted(extracted) == ["LicenseRef-Frobnicate-1", "LicenseRef-public-domain"]
    assert extracted["LicenseRef-Frobnicate-1"]["extractedText"] == (
        "Permission is granted to frobnicate this software.\n\nNo warranty.")
    assert foo["supplier"] == "Organization: Debian Foo Team (team+foo@tracker.debian.org)"
    assert bar["supplier"] == "Organization: Bar Maintainers (bar@lists.example.org)"
    assert base["supplier"] == "Person: Jane Doe (jane@example.org)"
    assert foo["downloadLocation"] == "http://deb.debian.org/debian/pool/main/f/foo/libfoo1_1.5-2_amd64.deb"
    assert foo["versionInfo"] == "1:1.5-2"
    assert foo["externalRefs"][0]["referenceLocator"] == (
        "pkg:deb/debian/libfoo1@1:1.5-2?arch=amd64&distro=debian-13")
    assert packages["demo-pkg"]["externalRefs"][0]["referenceLocator"] == "pkg:pypi/demo-pkg@1.2"
    assert bar["sourceInfo"] == "Debian source package bar (trixie)"


def test_relationships_describe_contain_and_depend(
        built: tuple[Path, Lock, dict[str, Any], Path]) -> None:
    doc = built[2]
    ids = {p["name"]: p["SPDXID"] for p in doc["packages"]}
    files = {f["fileName"]: f["SPDXID"] for f in doc["files"]}
    image = ids["minimal"]
    assert list(iter_relationships(doc, "DESCRIBES")) == [("SPDXRef-DOCUMENT", image)]
    contains = set(iter_relationships(doc, "CONTAINS"))
    assert {(image, ids[n]) for n in ("base-tool", "libbar2", "libfoo1", "demo-pkg")} <= contains
    owner = {f: a for a, f in contains if f in files.values()}
    assert len(owner) == len(files)  # every file is contained exactly once here
    assert owner[files["./usr/bin/base-tool"]] == ids["base-tool"]  # listed as /bin/base-tool
    assert owner[files["./usr/lib/x86_64-linux-gnu/libfoo.so.1.5"]] == ids["libfoo1"]
    assert owner[files["./usr/share/doc/libbar2/copyright"]] == ids["libbar2"]
    assert owner[files[f"./{SITE}/demo_pkg/__init__.py"]] == ids["demo-pkg"]
    assert owner[files["./etc/hostname"]] == image
    assert owner[files["./var/lib/dpkg/status"]] == image
    depends = set(iter_relationships(doc, "DEPENDS_ON"))
    assert depends == {(ids["base-tool"], ids["libfoo1"]),  # Pre-Depends and Depends, once
                       (ids["base-tool"], ids["libbar2"]),  # no-such-pkg | libbar-abi (virtual)
                       (ids["libbar2"], ids["libfoo1"])}  # first alternative present
    base = next(p for p in doc["packages"] if p["name"] == "base-tool")
    code = hashlib.sha1("".join(sorted(
        hashlib.sha1((built[0] / rel).read_bytes()).hexdigest()
        for rel in ("usr/bin/base-tool", "usr/share/doc/base-tool/copyright"))).encode()).hexdigest()
    assert base["filesAnalyzed"] is True
    assert base["packageVerificationCode"]["packageVerificationCodeValue"] == code


def test_same_root_same_bytes(built: tuple[Path, Lock, dict[str, Any], Path], tmp_path: Path) -> None:
    root, lock, doc, _ = built
    profile = load_profile(ROOT / "images/minimal.toml")
    again = spdx_sbom(root, profile, lock, tmp_path / "mirror", 1_700_000_000,
                      files=file_manifest(root))
    assert json.dumps(again, sort_keys=True) == json.dumps(doc, sort_keys=True)
    assert doc["creationInfo"]["created"] == "2023-11-14T22:13:20Z"
    # a file without sha1 (an older manifest) is hashed here instead
    no_sha1 = [{k: v for k, v in e.items() if k != "sha1"} for e in file_manifest(root)]
    assert spdx_sbom(root, profile, lock, tmp_path / "mirror", 1_700_000_000, files=no_sha1) == doc


@pytest.mark.parametrize(("debian", "spdx"), [
    ("GPL-2+", "GPL-2.0-or-later"), ("GPL-2", "GPL-2.0-only"), ("LGPL-2.1+", "LGPL-2.1-or-later"),
    ("LGPL-3", "LGPL-3.0-only"), ("GPL", "GPL-1.0-or-later"), ("GFDL-1.3+", "GFDL-1.3-or-later"),
    ("Expat", "MIT"), ("BSD-3-clause", "BSD-3-Clause"), ("Apache-2.0", "Apache-2.0"),
    ("public-domain", "LicenseRef-public-domain"), ("GPL-7+", "LicenseRef-GPL-7-plus"),
    ("GPL-2+ or Artistic", "GPL-2.0-or-later OR Artistic-1.0-Perl"),
    ("GPL-2+ or Artistic, and BSD-3-clause",
     "(GPL-2.0-or-later OR Artistic-1.0-Perl) AND (BSD-3-Clause)"),
    ("GPL-3+ with GCC-exception-3.1", "GPL-3.0-or-later WITH GCC-exception-3.1"),
    ("GPL-2+ with OpenSSL exception", "LicenseRef-GPL-2-plus-with-OpenSSL-exception"),
])
def test_debian_names_map_to_spdx(debian: str, spdx: str) -> None:
    assert license_expression(debian)[0] == spdx


def test_every_mapped_id_is_on_spdx_list() -> None:
    """The table must only produce ids SPDX knows (else validation of a real image fails)."""
    ids = set(sbom_module._LICENSES.values())
    ids |= {license_expression(f"{fam}-{v}{plus}")[0] for fam, versions in sbom_module._VERSIONS.items()
            for v in versions for plus in ("", "+")}
    for expression in sorted(ids):
        info = spdx_licensing.validate(expression)
        assert not info.errors and not info.invalid_symbols, (expression, info.errors)


def test_supplier_forms() -> None:
    assert supplier("") == "NOASSERTION"
    assert supplier("Josh Triplett <josh@example.org>") == "Person: Josh Triplett (josh@example.org)"
    assert supplier("GNU Libc Maintainers <debian-glibc@lists.debian.org>").startswith("Organization: ")
