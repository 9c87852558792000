"""The PCR 11 value a UKI leads to: what the build records so the fleet can attest a node.

PCR 11 starts at zero; it is only ever *extended*: ``new = H(old || H(data))``.  The algorithm,
as documented by systemd (systemd-stub(7), systemd-measure(1), systemd-pcrphase.service(8), and
the UAPI group's "Unified Kernel Image" specification):

1. systemd-stub measures the UKI's PE sections in the canonical order of UAPI.5 ("UKI TPM PCR
   Measurements"): ``.linux``, ``.osrel``, ``.cmdline``, ``.initrd``, ``.ucode``, ``.splash``,
   ``.dtb``, ``.uname``, ``.sbat``, ``.pcrpkey``; sections the UKI lacks are skipped, and
   ``.pcrsig`` is never measured (it holds the signature of these very values).  Each section is
   two measurements: its name in ASCII including one trailing NUL byte, then its contents;
2. systemd-pcrphase then extends the words of the boot phases, in UTF-8 without a NUL
   (systemd's docs/TPM2_PCR_MEASUREMENTS.md): ``enter-initrd`` (in the initrd), ``leave-initrd``,
   ``sysinit`` and ``ready`` (the booted system).

The result is given after each phase, as ``systemd-measure calculate`` prints it; the value a
running node quotes is the last one (``ready``).  A section's contents are its in-memory image:
``VirtualSize`` bytes of its raw data (zero-filled where the file holds less).  Multi-profile
UKIs (``.profile``) and auto-selected device trees or firmware (``.dtbauto``, ``.hwids``,
``.fwauto``) are refused: which of their sections the stub measures depends on the machine, and
the image makes none of them.  Several ``.dtb`` sections are refused too (x86 images have none).
Verified against systemd-measure (252 on the build host: tests/test_measure.py).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

from provisioning.errors import ImageError

__all__ = ["MEASURED_SECTIONS", "PHASES", "Pcr11Event", "PcrPhase", "expected_pcr11", "pcr11_events",
           "pcr11_record", "pe_sections"]

MEASURED_SECTIONS = (".linux", ".osrel", ".cmdline", ".initrd", ".ucode", ".splash", ".dtb", ".uname",
                     ".sbat", ".pcrpkey")
PHASES = ("enter-initrd", "leave-initrd", "sysinit", "ready")
_REFUSED = (".profile", ".dtbauto", ".hwids", ".fwauto")
_BANKS = ("sha1", "sha256", "sha384", "sha512")
_MAX_SECTIONS = 96  # the PE format's own limit


@dataclass(frozen=True)
class PcrPhase:
    """PCR 11 once the phases up to and including ``phase`` are measured (named as systemd-measure does)."""

    phase: str
    bank: str
    value: bytes


def _u16(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("<H", data, offset)[0])


def _u32(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("<I", data, offset)[0])


def pe_sections(data: bytes, what: str = "PE file") -> dict[str, bytes]:
    """The sections of a PE image by name, each as the loader maps it (``VirtualSize`` bytes).

    Raises:
        ImageError: not a PE image, a header or section outside the file, or a name twice.
    """
    if len(data) < 0x40 or data[:2] != b"MZ":
        raise ImageError(f"{what}: no MZ header: not a PE image")
    pe = _u32(data, 0x3C)
    if pe + 24 > len(data) or data[pe:pe + 4] != b"PE\0\0":
        raise ImageError(f"{what}: e_lfanew 0x{pe:x} does not point at a PE signature")
    count = _u16(data, pe + 6)
    optional_size = _u16(data, pe + 20)
    table = pe + 24 + optional_size
    if count > _MAX_SECTIONS or table + 40 * count > len(data):
        raise ImageError(f"{what}: section table of {count} entries at 0x{table:x} runs past the end "
                         f"({len(data)} bytes)")
    sections: dict[str, bytes] = {}
    for i in range(count):
        entry = table + 40 * i
        name = data[entry:entry + 8].rstrip(b"\0").decode("ascii", errors="replace")
        virtual_size, raw_size, raw_at = _u32(data, entry + 8), _u32(data, entry + 16), _u32(data, entry + 20)
        if raw_at + raw_size > len(data):
            raise ImageError(f"{what}: section {name!r} ({raw_size} bytes at 0x{raw_at:x}) runs past the end "
                             f"({len(data)} bytes)")
        if name in sections:
            raise ImageError(f"{what}: section {name!r} appears twice")
        raw = data[raw_at:raw_at + min(raw_size, virtual_size)]
        sections[name] = raw + bytes(virtual_size - len(raw))
    return sections


@dataclass(frozen=True)
class Pcr11Event:
    """One extension of PCR 11: what was measured (a section's name or data, or a phase) and its digest."""

    description: str
    digest: bytes


def pcr11_events(uki: Path | bytes, bank: str = "sha256") -> tuple[Pcr11Event, ...]:
    """Every extension of PCR 11 a boot of ``uki`` makes, in order: the stub's, then the phases.

    Raises:
        ImageError: the file is no PE image, lacks ``.linux``, or is a kind of UKI whose
            measurements depend on the machine (see the module docstring).
    """
    what = str(uki) if isinstance(uki, Path) else "UKI"
    if bank not in _BANKS:
        raise ImageError(f"PCR bank {bank!r} is not one of {', '.join(_BANKS)}")
    sections = pe_sections(uki.read_bytes() if isinstance(uki, Path) else uki, what)
    refused = [name for name in _REFUSED if name in sections]
    if refused:
        raise ImageError(f"{what}: has {', '.join(refused)}: multi-profile and device-tree-selecting UKIs "
                         "measure what the machine picks; not supported")
    if ".linux" not in sections:
        raise ImageError(f"{what}: no .linux section: not a UKI")

    def event(description: str, data: bytes) -> Pcr11Event:
        return Pcr11Event(description, hashlib.new(bank, data).digest())

    events = []
    for name in MEASURED_SECTIONS:
        if name in sections:
            events += [event(f"section name {name}", name.encode() + b"\0"),
                       event(f"section data {name}", sections[name])]
    return (*events, *(event(f"phase {word}", word.encode()) for word in PHASES))


def expected_pcr11(uki: Path | bytes, bank: str = "sha256") -> tuple[PcrPhase, ...]:
    """PCR 11 after each boot phase of ``uki`` (a path or its bytes), in the order of PHASES.

    Raises:
        ImageError: as :func:`pcr11_events`.
    """
    events = pcr11_events(uki, bank)
    pcr = bytes(hashlib.new(bank).digest_size)
    out: list[PcrPhase] = []
    for ev in events:
        pcr = hashlib.new(bank, pcr + ev.digest).digest()
        if ev.description.startswith("phase "):
            out.append(PcrPhase(":".join(PHASES[:len(out) + 1]), bank, pcr))
    return tuple(out)


def pcr11_record(uki: Path | bytes,
                 banks: tuple[str, ...] = ("sha256",)) -> dict[str, list[dict[str, object]]]:
    """The expected PCR 11 of ``uki`` after each boot phase, per bank, in the JSON shape
    ``systemd-measure calculate --json=short`` prints (``{"sha256": [{"phase": ..., "pcr": 11,
    "hash": ...}, ...]}``): what the build records with the image's root hash, and what the fleet
    compares a node's quote with.

    Raises:
        ImageError: as :func:`pcr11_events`.
    """
    return {bank: [{"phase": p.phase, "pcr": 11, "hash": p.value.hex()} for p in expected_pcr11(uki, bank)]
            for bank in banks}
