"""TPM2 quote verification (provisioning.attest) on real quotes from swtpm and on quotes built
here with a key generated in the test, each broken in one field at a time."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.proto import node_pb2
from provisioning import attest as a
from provisioning.errors import AttestError
from testsupport import tpm2

DATA = Path(__file__).parent / "data" / "tpm2"
SHA256 = a.ALG_SHA256
# The values tpm2_pcrread printed when the fixtures were made (tests/data/tpm2/README.md)
REAL_PCRS = {i: bytes(32) for i in range(1, 7)} | {
    0: bytes.fromhex("9782d12686e805aca819d7ba1b724fd9c4c2ab57f8ae4b36543ce74b8bab5daa"),
    7: bytes.fromhex("aefd212e911e24ab9571f6a84895dcdf69d90653c39582820209b5cf4ac5abfa"),
    11: bytes.fromhex("9d5e50f051082c52cba32af107c3b3fc238f7cd8a80bf63181c1d69cab2177d1"),
}
REAL_NONCES = {"ecc": bytes.fromhex("00112233445566778899aabbccddeeff" * 2), "rsa": bytes.fromhex("cafebabe")}
NONCE = bytes(range(32))
PCRS = {i: hashlib.sha256(f"pcr {i}".encode()).digest() for i in (*range(8), 11)}


def expected(pcrs: dict[int, bytes]) -> dict[tuple[int, int], bytes]:
    return {(SHA256, i): v for i, v in pcrs.items()}


def real(kind: str, **override: bytes) -> dict[str, bytes]:
    args = {"ak_public": (DATA / f"ak-{kind}.pub").read_bytes(),
            "attest": (DATA / f"quote-{kind}.msg").read_bytes(),
            "signature": (DATA / f"quote-{kind}.sig").read_bytes(),
            "pcr_values": (DATA / f"quote-{kind}.pcrs").read_bytes(), "nonce": REAL_NONCES[kind]}
    return args | override


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def made(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, fields: tpm2.QuoteFields | None = None,
         **override: bytes) -> dict[str, bytes]:
    """verify_quote's arguments for a quote signed by ``key`` (over PCRS unless ``fields`` say otherwise)."""
    message = (fields or tpm2.quote_fields(NONCE, PCRS)).encode()
    args = {"ak_public": tpm2.public_area(key), "attest": message, "signature": tpm2.sign(key, message),
            "pcr_values": tpm2.pcr_values(PCRS), "nonce": NONCE}
    return args | override


# -- real quotes (swtpm 0.7.1 + tpm2-tools 5.4) ---------------------------------------------------

@pytest.mark.parametrize("kind", ["ecc", "rsa"])
def test_a_real_quote_verifies_and_shows_the_pcrs_tpm2_pcrread_printed(kind: str) -> None:
    result = a.verify_quote(**real(kind), expected=expected(REAL_PCRS))
    assert result.ok
    assert result.pcrs == {(SHA256, i): v for i, v in REAL_PCRS.items()}
    assert result.attest.pcr_select == (a.PcrSelection(SHA256, (0, 1, 2, 3, 4, 5, 6, 7, 11)),)
    assert result.attest.extra_data == REAL_NONCES[kind]


def test_the_ak_name_is_the_one_tpm2_createak_printed() -> None:
    public = a.parse_public((DATA / "ak-rsa.pub").read_bytes())
    assert public.name().hex() == "000bf7743e8088e9956e44a7b4cdcc4f9321ca6b1569aad9cbedb6fa9678c6a3b9c5"
    assert isinstance(public.key, a.RsaKey) and public.key.bits == 2048


def test_a_real_quote_with_another_nonce_is_refused() -> None:
    with pytest.raises(AttestError, match="extraData cafebabe is not the nonce sent"):
        a.verify_quote(**real("rsa", nonce=b"\xca\xfe\xba\xbf"), expected={})


@pytest.mark.parametrize("kind", ["ecc", "rsa"])
def test_a_real_quote_with_one_bit_changed_fails_its_signature(kind: str) -> None:
    message = bytearray((DATA / f"quote-{kind}.msg").read_bytes())
    message[-1] ^= 1  # the last byte of pcrDigest
    with pytest.raises(AttestError, match="signature does not verify"):
        a.verify_quote(**real(kind, attest=bytes(message)), expected={})


def test_a_real_quote_with_another_pcr_value_claimed_fails_the_digest() -> None:
    values = bytearray((DATA / "quote-ecc.pcrs").read_bytes())
    values[32] ^= 1  # PCR 1
    with pytest.raises(AttestError, match="do not hash to the quoted pcrDigest"):
        a.verify_quote(**real("ecc", pcr_values=bytes(values)), expected={})


def test_the_first_mismatching_pcr_is_reported_by_index() -> None:
    want = expected(REAL_PCRS) | {(SHA256, 7): bytes(32), (SHA256, 11): bytes(32)}
    result = a.verify_quote(**real("ecc"), expected=want)
    assert not result.ok
    assert result.mismatch == a.PcrMismatch(SHA256, 7, bytes(32), REAL_PCRS[7])


# -- quotes built here -----------------------------------------------------------------------------

@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1()])
def test_ecdsa_quotes_verify(curve: ec.EllipticCurve) -> None:
    key = ec.generate_private_key(curve)
    assert a.verify_quote(**made(key), expected=expected(PCRS)).ok


def test_rsassa_and_rsapss_quotes_verify(rsa_key: rsa.RSAPrivateKey) -> None:
    assert a.verify_quote(**made(rsa_key), expected=expected(PCRS)).ok
    message = tpm2.quote_fields(NONCE, PCRS).encode()
    pss = made(rsa_key, ak_public=tpm2.public_area(rsa_key, scheme=a.ALG_RSAPSS),
               signature=tpm2.sign(rsa_key, message, pss=True))
    assert a.verify_quote(**pss, expected=expected(PCRS)).ok


def test_a_pcr_missing_from_the_quote_is_a_mismatch(ec_key: ec.EllipticCurvePrivateKey) -> None:
    want = expected(PCRS) | {(SHA256, 12): bytes(32)}
    result = a.verify_quote(**made(ec_key), expected=want)
    assert result.mismatch == a.PcrMismatch(SHA256, 12, bytes(32), None)


def test_a_quote_signed_by_another_key_is_refused(ec_key: ec.EllipticCurvePrivateKey) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(AttestError, match="signature does not verify"):
        a.verify_quote(**made(ec_key, ak_public=tpm2.public_area(other)), expected={})


def test_a_key_that_is_not_a_restricted_signing_key_is_refused(ec_key: ec.EllipticCurvePrivateKey) -> None:
    unrestricted = tpm2.public_area(ec_key, attributes=tpm2.AK_ATTRIBUTES & ~(1 << 16))
    with pytest.raises(AttestError, match="lack restricted"):
        a.verify_quote(**made(ec_key, ak_public=unrestricted), expected={})
    decrypting = tpm2.public_area(ec_key, attributes=tpm2.AK_ATTRIBUTES | 1 << 17)
    with pytest.raises(AttestError, match="has decrypt"):
        a.verify_quote(**made(ec_key, ak_public=decrypting), expected={})


def test_a_signature_outside_the_keys_scheme_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    message = tpm2.quote_fields(NONCE, PCRS).encode()
    with pytest.raises(AttestError, match="is not the key's"):
        a.verify_quote(**made(rsa_key, signature=tpm2.sign(rsa_key, message, pss=True)), expected={})
    with pytest.raises(AttestError, match="is not the key's"):
        a.verify_quote(**made(rsa_key, signature=tpm2.sign(ec.generate_private_key(ec.SECP256R1()), message)),
                       expected={})


@pytest.mark.parametrize(("change", "error"), [
    ({"magic": 0xFF544348}, "magic 0xff544348 is not TPM_GENERATED_VALUE"),
    ({"type": 0x8017}, "type 0x8017 is not TPM_ST_ATTEST_QUOTE"),
    ({"nonce": b"\x00" * 32}, "extraData 00000000"),
    ({"pcr_digest": bytes(32)}, "do not hash to the quoted pcrDigest"),
    ({"pcr_select": tpm2.selection({SHA256: [0, 1]})},
     "PCR values: 288 bytes, the quoted selection needs 64"),
])
def test_a_signed_quote_with_one_field_wrong_is_refused_naming_it(
        ec_key: ec.EllipticCurvePrivateKey, change: dict[str, object], error: str) -> None:
    fields = dataclasses.replace(tpm2.quote_fields(NONCE, PCRS), **change)  # type: ignore[arg-type]
    with pytest.raises(AttestError, match=re.escape(error)):
        a.verify_quote(**made(ec_key, fields), expected={})


# -- hostile structures ----------------------------------------------------------------------------

def test_every_truncation_of_every_structure_is_an_error_naming_a_field(
        ec_key: ec.EllipticCurvePrivateKey, rsa_key: rsa.RSAPrivateKey) -> None:
    message = tpm2.quote_fields(NONCE, PCRS).encode()
    cases = [(a.parse_attest, message), (a.parse_signature, tpm2.sign(ec_key, message)),
             (a.parse_signature, tpm2.sign(rsa_key, message)), (a.parse_public, tpm2.public_area(ec_key)),
             (a.parse_public, tpm2.public_area(rsa_key))]
    for parse, whole in cases:
        parse(whole)
        for cut in range(len(whole)):
            with pytest.raises(AttestError, match=r"(needs \d+ bytes at offset|trailing bytes)"):
                parse(whole[:cut])
        with pytest.raises(AttestError, match="1 trailing bytes"):
            parse(whole + b"\0")


@pytest.mark.parametrize(("data", "error"), [
    (tpm2.u32(a.GENERATED_VALUE) + tpm2.u16(a.ATTEST_QUOTE) + tpm2.u16(67),
     "qualifiedSigner: size 67 exceeds"),
    (tpm2.u32(a.GENERATED_VALUE) + tpm2.u16(a.ATTEST_QUOTE) + tpm2.tpm2b(b"") + tpm2.u16(65) + bytes(65),
     "extraData: size 65 exceeds the maximum 64"),
])
def test_oversized_fields_are_named(data: bytes, error: str) -> None:
    with pytest.raises(AttestError, match=re.escape(error)):
        a.parse_attest(data)


def _quote_with_selection(select: bytes) -> bytes:
    return dataclasses.replace(tpm2.quote_fields(NONCE, PCRS), pcr_select=select).encode()


@pytest.mark.parametrize(("select", "error"), [
    (tpm2.u32(17), "pcrSelect.count 17 exceeds the maximum 16"),
    (tpm2.u32(1) + tpm2.u16(0x0099) + b"\x03\xff\xff\xff",
     "pcrSelect[0].hash: unsupported hash algorithm 0x0099"),
    (tpm2.selection({SHA256: [0]}, size=2), "pcrSelect[0].sizeofSelect 2 outside 3..4"),
    (tpm2.selection({SHA256: [0]}, size=5), "pcrSelect[0].sizeofSelect 5 outside 3..4"),
    (tpm2.u32(2) + (tpm2.selection({SHA256: [0]})[4:]) * 2, "names a bank more than once"),
])
def test_bad_pcr_selections_are_named(select: bytes, error: str) -> None:
    with pytest.raises(AttestError, match=re.escape(error)):
        a.parse_attest(_quote_with_selection(select))


def test_keys_signatures_and_curves_outside_what_is_supported_are_named(
        ec_key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(AttestError, match="sigAlg 0x001c is not RSASSA"):
        a.parse_signature(tpm2.u16(0x001C) + tpm2.u16(SHA256))
    with pytest.raises(AttestError, match=r"signature.hash 0x0004 is not SHA-256"):
        a.parse_signature(tpm2.u16(a.ALG_ECDSA) + tpm2.u16(0x0004))
    area = bytearray(tpm2.public_area(ec_key))
    area[2:4] = tpm2.u16(0x0008)  # TPM_ALG_KEYEDHASH
    with pytest.raises(AttestError, match="type 0x0008 is not RSA or ECC"):
        a.parse_public(bytes(area))
    off_curve = bytearray(tpm2.public_area(ec_key))
    off_curve[-1] ^= 1
    with pytest.raises(AttestError, match="unique is not a valid key"):
        a.public_key(a.parse_public(bytes(off_curve)))


def test_rsa_modulus_length_must_match_key_bits(rsa_key: rsa.RSAPrivateKey) -> None:
    area = bytearray(tpm2.public_area(rsa_key))
    # the modulus's TPM2B size sits right before its 256 bytes
    area[-258:-256] = tpm2.u16(255)
    area[0:2] = tpm2.u16(len(area) - 3)  # the outer TPM2B_PUBLIC size, one byte shorter too
    with pytest.raises(AttestError, match=r"unique\.rsa is 2040 bits, parameters\.keyBits says 2048"):
        a.parse_public(bytes(area[:-1]))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_attest_errors(data: bytes) -> None:
    for parse in (a.parse_attest, a.parse_signature, a.parse_public):
        with contextlib.suppress(AttestError):
            parse(data)


def test_the_attest_response_message_carries_what_the_verifier_needs() -> None:
    parts = real("ecc")
    sent = node_pb2.AttestResponse(attest=parts["attest"], signature=parts["signature"],
                                   pcr_values=parts["pcr_values"], ak_public=parts["ak_public"])
    got = node_pb2.AttestResponse.FromString(sent.SerializeToString())
    request = node_pb2.AttestRequest(nonce=parts["nonce"]).SerializeToString()
    nonce = node_pb2.AttestRequest.FromString(request).nonce
    result = a.verify_quote(ak_public=got.ak_public, attest=got.attest, signature=got.signature,
                            pcr_values=got.pcr_values, nonce=nonce, expected=expected(REAL_PCRS))
    assert result.ok
