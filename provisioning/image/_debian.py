"""Debian archive index parsing, free of I/O beyond the streams it is handed.

A deb reaches the mirror only through this chain: ``InRelease`` (signature checked with
gpgv and the Debian archive keyring) lists the sha256 of each ``Packages`` index; each
``Packages`` stanza lists the sha256 of one .deb.  The functions here parse the two formats;
:mod:`provisioning.image.mirror` does the file reading and the signature check.
"""

from __future__ import annotations

import re
from collections.abc import Container, Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import unquote

__all__ = ["PackageEntry", "deb_filename_key", "package_entries", "parse_release_sha256", "parse_stanzas",
           "strip_clearsign", "wanted_entries"]

_STANZA_BREAK = re.compile(r"\n\n+")  # parse_stanzas' separator: one or more empty lines
_PACKAGE_FIELD = re.compile(r"^Package:(.*)$", re.MULTILINE)  # a field, never a continuation


@dataclass(frozen=True)
class PackageEntry:
    name: str
    version: str
    architecture: str
    sha256: str
    size: int
    filename: str


def strip_clearsign(text: str) -> str:
    """The signed body of a clearsigned message (the caller has checked the signature)."""
    lines = text.splitlines()
    if not lines or lines[0] != "-----BEGIN PGP SIGNED MESSAGE-----":
        return text
    body: list[str] = []
    started = False
    for line in lines[1:]:
        if not started:
            started = line == ""  # the Hash: header block ends with a blank line
            continue
        if line == "-----BEGIN PGP SIGNATURE-----":
            break
        body.append(line[2:] if line.startswith("- ") else line)
    return "\n".join(body) + "\n"


def parse_release_sha256(text: str) -> dict[str, tuple[str, int]]:
    """``SHA256:`` section of a Release file: path -> (sha256, size)."""
    out: dict[str, tuple[str, int]] = {}
    inside = False
    for line in text.splitlines():
        if not line.startswith(" "):
            inside = line.strip() == "SHA256:"
            continue
        if inside:
            parts = line.split()
            if len(parts) == 3:
                out[parts[2]] = (parts[0], int(parts[1]))
    return out


def parse_stanzas(lines: Iterable[str]) -> Iterator[dict[str, str]]:
    """deb822 stanzas (continuation lines folded into their field)."""
    stanza: dict[str, str] = {}
    key = ""
    for raw in lines:
        line = raw.rstrip("\n")
        if not line:
            if stanza:
                yield stanza
            stanza, key = {}, ""
            continue
        if line[0] in " \t" and key:
            stanza[key] += "\n" + line.strip()
            continue
        key, _, value = line.partition(":")
        stanza[key] = value.strip()
    if stanza:
        yield stanza


def package_entries(lines: Iterable[str]) -> Iterator[PackageEntry]:
    """Entries of a Packages index."""
    for s in parse_stanzas(lines):
        if "Package" in s and "SHA256" in s:
            yield PackageEntry(s["Package"], s["Version"], s.get("Architecture", ""),
                               s["SHA256"], int(s.get("Size", "0")), s.get("Filename", ""))


def wanted_entries(text: str, names: Container[str]) -> Iterator[PackageEntry]:
    """:func:`package_entries` of index ``text``, only for the stanzas whose Package is in ``names``.

    The others are never parsed: a Debian index holds some 70,000 stanzas and an image wants a
    few hundred, and parsing them all took 3 s of every build, twice (the mirror's check and
    the SBOM; issue #14).
    """
    for stanza in _STANZA_BREAK.split(text):
        field = _PACKAGE_FIELD.search(stanza)
        if field is not None and field.group(1).strip() in names:
            yield from package_entries(stanza.splitlines())


def deb_filename_key(filename: str) -> tuple[str, str, str]:
    """``name_1%3a2.0-1_amd64.deb`` -> ("name", "1:2.0-1", "amd64") (apt's cache naming).

    Raises:
        ValueError: not NAME_VERSION_ARCH.deb.
    """
    if not filename.endswith(".deb"):
        raise ValueError(f"{filename}: not a .deb")
    parts = filename[:-4].split("_")
    if len(parts) != 3:
        raise ValueError(f"{filename}: not NAME_VERSION_ARCH.deb")
    return parts[0], unquote(parts[1]), parts[2]
