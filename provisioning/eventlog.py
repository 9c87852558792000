"""The firmware's TPM event log, read as hostile input: parsed, replayed, and asked about Secure Boot.

A node's quote signs PCR values; the event log says how they came about.  The log is the
crypto-agile format of the TCG PC Client Platform Firmware Profile (what Linux exposes as
``/sys/kernel/security/tpm0/binary_bios_measurements``), little-endian throughout:

- a first event in the old SHA-1 format (TCG_PCR_EVENT), of type EV_NO_ACTION, whose data is the
  "Spec ID Event03" header naming the digest algorithms and their sizes;
- then TCG_PCR_EVENT2 records: PCR index, event type, one digest per algorithm, event data.

Replaying the digests of one bank (``pcr = H(pcr || digest)``; EV_NO_ACTION events are not
extended; a "StartupLocality" event sets PCR 0's starting value) must give the quoted values:
only then is the log the node's real history, and what it says can be believed.  Of what it
says, the fleet reads the Secure Boot state: the EV_EFI_VARIABLE_DRIVER_CONFIG event of the
``SecureBoot`` variable in PCR 7, whose digest must be the hash of its data (else a log could
replay and still lie about the value).

Nothing here trusts a length it has not checked against what is left; every failure is an
:class:`~provisioning.errors.AttestError` naming the event and the field.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from provisioning.errors import AttestError

__all__ = ["EV_EFI_VARIABLE_DRIVER_CONFIG", "EV_NO_ACTION", "EV_SEPARATOR", "Event", "EventLog",
           "initial", "parse_event_log", "replay", "secure_boot"]

EV_NO_ACTION = 0x00000003
EV_SEPARATOR = 0x00000004
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
_SPEC_ID = b"Spec ID Event03\0"
_STARTUP_LOCALITY = b"StartupLocality\0"
EFI_GLOBAL_VARIABLE = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
_ALGS = {0x0004: ("sha1", 20), 0x000B: ("sha256", 32), 0x000C: ("sha384", 48), 0x000D: ("sha512", 64),
         0x0012: ("sm3_256", 32)}
MAX_EVENTS = 10_000  # firmware logs have a few hundred; more is not a log
MAX_EVENT_DATA = 1 << 20
MAX_PCR = 23


@dataclass(frozen=True)
class Event:
    pcr: int
    kind: int
    digests: Mapping[int, bytes]  # TPM algorithm id -> digest
    data: bytes


@dataclass(frozen=True)
class EventLog:
    algorithms: Mapping[int, int]  # TPM algorithm id -> digest size, from the Spec ID header
    events: tuple[Event, ...]
    startup_locality: int = 0


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0
        self.where = "event log"

    def take(self, n: int, field: str) -> bytes:
        if n < 0 or self._pos + n > len(self._data):
            raise AttestError(f"{self.where}: {field} needs {n} bytes, {len(self._data) - self._pos} left")
        out = self._data[self._pos:self._pos + n]
        self._pos += n
        return out

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return int(struct.unpack("<H", self.take(2, field))[0])

    def u32(self, field: str) -> int:
        return int(struct.unpack("<I", self.take(4, field))[0])

    def u64(self, field: str) -> int:
        return int(struct.unpack("<Q", self.take(8, field))[0])

    @property
    def done(self) -> bool:
        return self._pos >= len(self._data)


def _spec_header(data: bytes) -> dict[int, int]:
    r = _Reader(data)
    r.where = "event log: Spec ID event"
    if r.take(16, "signature") != _SPEC_ID:
        raise AttestError("event log: the first event is not the crypto-agile 'Spec ID Event03' header "
                          "(a SHA-1-only log cannot be replayed into a sha256 bank)")
    r.u32("platformClass")
    r.take(4, "specVersion, errata, uintnSize")
    count = r.u32("numberOfAlgorithms")
    if not 1 <= count <= len(_ALGS):
        raise AttestError(f"event log: Spec ID event names {count} algorithms")
    algorithms = {}
    for _ in range(count):
        alg, size = r.u16("algorithmId"), r.u16("digestSize")
        known = _ALGS.get(alg)
        if known is None or known[1] != size or alg in algorithms:
            raise AttestError(f"event log: Spec ID event: algorithm 0x{alg:04x} of {size} bytes is unknown, "
                              "repeated or of the wrong size")
        algorithms[alg] = size
    r.take(r.u8("vendorInfoSize"), "vendorInfo")
    return algorithms


def parse_event_log(data: bytes) -> EventLog:
    """Parse a crypto-agile TCG event log.

    Raises:
        AttestError: not such a log, truncated, an event with an unknown or missing algorithm,
            a PCR index over 23, too many events, or event data over 1 MiB.
    """
    r = _Reader(data)
    r.where = "event log: first event"
    pcr, kind = r.u32("pcrIndex"), r.u32("eventType")
    r.take(20, "digest")
    header = r.take(r.u32("eventSize"), "event")
    if pcr != 0 or kind != EV_NO_ACTION:
        raise AttestError(f"event log: the first event is PCR {pcr} type 0x{kind:08x}, not the Spec ID "
                          "header")
    algorithms = _spec_header(header)
    events: list[Event] = []
    locality = 0
    while not r.done:
        if len(events) >= MAX_EVENTS:
            raise AttestError(f"event log: more than {MAX_EVENTS} events")
        r.where = f"event log: event {len(events) + 1}"
        pcr, kind = r.u32("pcrIndex"), r.u32("eventType")
        if pcr > MAX_PCR:
            raise AttestError(f"{r.where}: pcrIndex {pcr} is over {MAX_PCR}")
        count = r.u32("digests.count")
        if count != len(algorithms):
            raise AttestError(f"{r.where}: {count} digests, the header names {len(algorithms)} algorithms")
        digests: dict[int, bytes] = {}
        for _ in range(count):
            alg = r.u16("digests.hashAlg")
            if alg not in algorithms or alg in digests:
                raise AttestError(f"{r.where}: digest algorithm 0x{alg:04x} not in the header, or repeated")
            digests[alg] = r.take(algorithms[alg], "digests.digest")
        size = r.u32("eventSize")
        if size > MAX_EVENT_DATA:
            raise AttestError(f"{r.where}: eventSize {size} is over {MAX_EVENT_DATA}")
        event = Event(pcr, kind, digests, r.take(size, "event"))
        if kind == EV_NO_ACTION and pcr == 0 and event.data.startswith(_STARTUP_LOCALITY):
            if len(event.data) != len(_STARTUP_LOCALITY) + 1:
                raise AttestError(f"{r.where}: StartupLocality event of {len(event.data)} bytes")
            locality = event.data[-1]
        events.append(event)
    return EventLog(algorithms, tuple(events), locality)


def initial(log: EventLog, pcr: int, size: int) -> bytes:
    """PCR ``pcr``'s value before any event: zero, but PCR 0 starts at the startup locality."""
    return bytes(size - 1) + bytes([log.startup_locality]) if pcr == 0 else bytes(size)


def replay(log: EventLog, hash_alg: int) -> dict[int, bytes]:
    """The PCR values of bank ``hash_alg`` that the log's events give (PCRs no event touched are
    left out).

    Raises:
        AttestError: the log has no digests of that algorithm.
    """
    if hash_alg not in log.algorithms:
        raise AttestError(f"event log: no digests of algorithm 0x{hash_alg:04x}")
    name, size = _ALGS[hash_alg]
    pcrs: dict[int, bytes] = {}
    for event in log.events:
        if event.kind == EV_NO_ACTION:
            continue
        before = pcrs.get(event.pcr, initial(log, event.pcr, size))
        pcrs[event.pcr] = hashlib.new(name, before + event.digests[hash_alg]).digest()
    return pcrs


def _variable(data: bytes, where: str) -> tuple[uuid.UUID, str, bytes]:
    """(vendor GUID, name, value) of a UEFI_VARIABLE_DATA."""
    r = _Reader(data)
    r.where = where
    guid = uuid.UUID(bytes_le=r.take(16, "VariableName"))
    chars, length = r.u64("UnicodeNameLength"), r.u64("VariableDataLength")
    if chars > 1024 or length > MAX_EVENT_DATA:
        raise AttestError(f"{where}: UnicodeNameLength {chars} or VariableDataLength {length} out of range")
    try:
        name = r.take(2 * chars, "UnicodeName").decode("utf-16-le")
    except UnicodeDecodeError:
        raise AttestError(f"{where}: UnicodeName is not UTF-16") from None
    value = r.take(length, "VariableData")
    if not r.done:
        raise AttestError(f"{where}: bytes after VariableData")
    return guid, name, value


def secure_boot(log: EventLog, hash_alg: int) -> bool | None:
    """Whether the firmware booted with Secure Boot on, from PCR 7's measurement of the
    ``SecureBoot`` variable (its bank-``hash_alg`` digest must be the hash of the event data);
    None when the log has no such measurement.

    Raises:
        AttestError: the event's digest is not the hash of its data, the variable is not one
            byte, or it is measured twice.
    """
    name = _ALGS[hash_alg][0]
    found: bool | None = None
    for n, event in enumerate(log.events, 1):
        if event.pcr != 7 or event.kind != EV_EFI_VARIABLE_DRIVER_CONFIG:
            continue
        where = f"event log: event {n} (PCR 7 variable)"
        guid, variable, value = _variable(event.data, where)
        if guid != EFI_GLOBAL_VARIABLE or variable != "SecureBoot":
            continue
        if hashlib.new(name, event.data).digest() != event.digests[hash_alg]:
            raise AttestError(f"{where}: the SecureBoot measurement's digest is not the hash of its data")
        if len(value) != 1 or value[0] not in (0, 1):
            raise AttestError(f"{where}: SecureBoot is {value.hex() or 'empty'}, not one byte 0 or 1")
        if found is not None:
            raise AttestError(f"{where}: SecureBoot is measured twice")
        found = value[0] == 1
    return found
