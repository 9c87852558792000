"""Firmware TPM event logs made the way UEFI firmware writes them (crypto-agile, TCG PC Client
Platform Firmware Profile), for tests of :mod:`provisioning.eventlog` and the fleet's verdict.

Every event carries a sha1 and a sha256 digest, as OVMF's logs do; :func:`pcrs` gives the values
a TPM reaches when the same events are extended, so a test can quote them."""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from provisioning.eventlog import (
    EFI_GLOBAL_VARIABLE,
    EV_EFI_VARIABLE_DRIVER_CONFIG,
    EV_NO_ACTION,
    EV_SEPARATOR,
)

EV_POST_CODE = 0x00000001
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
SHA1, SHA256 = 0x0004, 0x000B
_ALGS = ((SHA1, "sha1", 20), (SHA256, "sha256", 32))


@dataclass(frozen=True)
class Ev:
    """One event: ``data`` is measured as its own hash unless ``digest_of`` says what was hashed
    (firmware measures a PE image, not the event's device path)."""

    pcr: int
    kind: int
    data: bytes
    digest_of: bytes | None = None


def variable(name: str, value: bytes, guid: uuid.UUID = EFI_GLOBAL_VARIABLE) -> bytes:
    """A UEFI_VARIABLE_DATA, as PCR 7's EV_EFI_VARIABLE_DRIVER_CONFIG events carry it."""
    unicode = name.encode("utf-16-le")
    return guid.bytes_le + struct.pack("<QQ", len(name), len(value)) + unicode + value


def firmware_events(secure_boot: bool | None = True) -> list[Ev]:
    """What OVMF measures on a boot, roughly: code in PCR 0, Secure Boot's variables in PCR 7
    (SecureBoot = ``secure_boot``; None: not measured), separators in PCRs 0-7, the boot loader
    in PCR 4."""
    events = [Ev(0, EV_POST_CODE, b"OVMF firmware volume", b"\x90" * 4096)]
    if secure_boot is not None:
        events.append(Ev(7, EV_EFI_VARIABLE_DRIVER_CONFIG, variable("SecureBoot", bytes([secure_boot]))))
    events += [Ev(7, EV_EFI_VARIABLE_DRIVER_CONFIG, variable(name, b"\x30\x82" + name.encode() * 8))
               for name in ("PK", "KEK", "db", "dbx")]
    events += [Ev(i, EV_SEPARATOR, b"\0\0\0\0") for i in range(8)]
    events.append(Ev(4, EV_EFI_BOOT_SERVICES_APPLICATION, b"\x04\x04path to BOOTX64.EFI", b"MZ systemd-boot"))
    return events


def _spec_id() -> bytes:
    body = b"Spec ID Event03\0" + struct.pack("<IBBBB", 0, 0, 2, 0, 2) + struct.pack("<I", len(_ALGS))
    body += b"".join(struct.pack("<HH", alg, size) for alg, _, size in _ALGS) + b"\0"
    return struct.pack("<II", 0, EV_NO_ACTION) + bytes(20) + struct.pack("<I", len(body)) + body


def digests(event: Ev) -> dict[int, bytes]:
    measured = event.data if event.digest_of is None else event.digest_of
    return {alg: hashlib.new(name, measured).digest() for alg, name, _ in _ALGS}


def encode(events: Sequence[Ev], *, locality: int | None = None) -> bytes:
    """The log's bytes: the Spec ID header, a StartupLocality event when ``locality`` is given,
    then ``events``."""
    out = _spec_id()
    records = list(events)
    if locality is not None:
        records.insert(0, Ev(0, EV_NO_ACTION, b"StartupLocality\0" + bytes([locality])))
    for ev in records:
        d = digests(ev)
        out += struct.pack("<III", ev.pcr, ev.kind, len(_ALGS))
        out += b"".join(struct.pack("<H", alg) + d[alg] for alg, _, _ in _ALGS)
        out += struct.pack("<I", len(ev.data)) + ev.data
    return out


def pcrs(events: Sequence[Ev], *, locality: int = 0) -> dict[int, bytes]:
    """The sha256 PCRs 0-7 after extending ``events`` (as a TPM would; PCR 0 starts at the
    locality)."""
    values = {i: bytes(32) for i in range(8)}
    values[0] = bytes(31) + bytes([locality])
    for ev in events:
        if ev.kind != EV_NO_ACTION:
            values[ev.pcr] = hashlib.sha256(values[ev.pcr] + digests(ev)[SHA256]).digest()
    return values
