"""The firmware event log (provisioning.eventlog): logs made the way UEFI firmware writes them
(testsupport.eventlog) replay to the PCRs a TPM reaches with the same events; the Secure Boot
state is read only from a measurement whose digest matches its data; every malformed log is an
AttestError that says where, never another exception."""

from __future__ import annotations

import contextlib
import struct
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from provisioning import eventlog as el
from provisioning.errors import AttestError
from testsupport import eventlog as mk

SHA256 = 0x000B


def test_a_firmware_log_replays_to_the_pcrs_its_events_reach() -> None:
    events = mk.firmware_events()
    log = el.parse_event_log(mk.encode(events))
    assert dict(log.algorithms) == {0x0004: 20, SHA256: 32} and len(log.events) == len(events)
    replayed = el.replay(log, SHA256)
    assert {i: replayed[i] for i in range(8)} == mk.pcrs(events)
    assert el.secure_boot(log, SHA256) is True
    sha1 = el.replay(log, 0x0004)
    assert len(sha1[7]) == 20 and sha1[7] != replayed[7][:20]


def test_startup_locality_sets_pcr_0s_first_value() -> None:
    events = mk.firmware_events()
    log = el.parse_event_log(mk.encode(events, locality=3))
    assert log.startup_locality == 3
    assert el.replay(log, SHA256)[0] == mk.pcrs(events, locality=3)[0] != mk.pcrs(events)[0]


@pytest.mark.parametrize(("state", "expected"), [(True, True), (False, False), (None, None)])
def test_secure_boot_is_read_from_pcr_7s_secureboot_variable(state: bool | None,
                                                             expected: bool | None) -> None:
    log = el.parse_event_log(mk.encode(mk.firmware_events(secure_boot=state)))
    assert el.secure_boot(log, SHA256) is expected


def test_a_secureboot_measurement_whose_data_was_rewritten_is_refused() -> None:
    """The firmware measured SecureBoot = 0; the node rewrote the event's data to 1 but kept the
    digests, so the log still replays. The digest no longer hashes the data: refused."""
    off = mk.encode(mk.firmware_events(secure_boot=False))
    lying = off.replace(mk.variable("SecureBoot", b"\x00"), mk.variable("SecureBoot", b"\x01"))
    assert lying != off
    log = el.parse_event_log(lying)
    assert el.replay(log, SHA256) == el.replay(el.parse_event_log(off), SHA256)
    with pytest.raises(AttestError, match="digest is not the hash of its data"):
        el.secure_boot(log, SHA256)


@pytest.mark.parametrize(("events", "message"), [
    ([mk.Ev(7, el.EV_EFI_VARIABLE_DRIVER_CONFIG, mk.variable("SecureBoot", b"\x01"))] * 2, "measured twice"),
    ([mk.Ev(7, el.EV_EFI_VARIABLE_DRIVER_CONFIG, mk.variable("SecureBoot", b"\x01\x00"))], "not one byte"),
    ([mk.Ev(7, el.EV_EFI_VARIABLE_DRIVER_CONFIG, mk.variable("SecureBoot", b"\x01")[:-1])], "VariableData"),
])
def test_odd_secureboot_measurements_are_refused(events: list[mk.Ev], message: str) -> None:
    with pytest.raises(AttestError, match=message):
        el.secure_boot(el.parse_event_log(mk.encode(events)), SHA256)


def test_a_variable_of_another_vendor_named_secureboot_is_not_secure_boot() -> None:
    other = mk.variable("SecureBoot", b"\x01", guid=uuid.UUID(int=7))
    log = el.parse_event_log(mk.encode([mk.Ev(7, el.EV_EFI_VARIABLE_DRIVER_CONFIG, other)]))
    assert el.secure_boot(log, SHA256) is None


def _record(pcr: int, kind: int, digests: list[tuple[int, bytes]], data: bytes) -> bytes:
    return (struct.pack("<III", pcr, kind, len(digests))
            + b"".join(struct.pack("<H", alg) + d for alg, d in digests)
            + struct.pack("<I", len(data)) + data)


def test_structural_lies_are_refused_with_the_place() -> None:
    header = mk.encode([])
    good = [(0x0004, bytes(20)), (SHA256, bytes(32))]
    cases = {
        "pcrIndex 24 is over 23": header + _record(24, 1, good, b""),
        "1 digests, the header names 2": header + _record(0, 1, good[1:], b""),
        "digest algorithm 0x000b not in the header, or repeated": header + _record(0, 1, [good[1]] * 2, b""),
        "eventSize 1048577 is over": header + struct.pack("<III", 0, 1, 2) + struct.pack("<H", 4) + bytes(20)
        + struct.pack("<H", SHA256) + bytes(32) + struct.pack("<I", (1 << 20) + 1),
        "not the crypto-agile 'Spec ID Event03' header": header.replace(b"Event03", b"Event02"),
        "not the Spec ID header": struct.pack("<I", 1) + header[4:],
        "StartupLocality event of 18 bytes":
            header + _record(0, el.EV_NO_ACTION, good, b"StartupLocality\0ab"),
    }
    for message, data in cases.items():
        with pytest.raises(AttestError, match=message.replace("(", r"\(").replace(")", r"\)")):
            el.parse_event_log(data)
    with pytest.raises(AttestError, match="no digests of algorithm 0x000c"):
        el.replay(el.parse_event_log(header), 0x000C)


def test_more_events_than_any_firmware_writes_are_refused() -> None:
    tiny = mk.Ev(1, 1, b"")
    with pytest.raises(AttestError, match="more than 10000 events"):
        el.parse_event_log(mk.encode([tiny] * (el.MAX_EVENTS + 1)))


def test_every_truncation_is_an_attest_error() -> None:
    data = mk.encode(mk.firmware_events(), locality=0)
    for n in range(len(data)):
        try:
            el.parse_event_log(data[:n])
        except AttestError:
            continue
        # a cut exactly between events is a shorter, well-formed log
        assert n >= len(mk.encode([]))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_parse_or_fail_cleanly(data: bytes) -> None:
    try:
        log = el.parse_event_log(data)
    except AttestError:
        return
    for alg in log.algorithms:
        el.replay(log, alg)
        if alg == SHA256:
            with contextlib.suppress(AttestError):
                el.secure_boot(log, alg)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=255))
def test_one_changed_byte_of_a_real_log_parses_or_fails_cleanly(where: int, value: int) -> None:
    data = bytearray(mk.encode(mk.firmware_events()))
    data[where % len(data)] = value
    with contextlib.suppress(AttestError):
        log = el.parse_event_log(bytes(data))
        el.replay(log, SHA256)
        el.secure_boot(log, SHA256)
