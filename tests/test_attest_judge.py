"""The fleet's verdict on one node's Node/Attest answer (provisioning.attest.judge): quotes made
here the way a TPM makes them (testsupport.tpm2, keys generated in the test), AK certificates
from a site CA made here, expected images as the build records them."""

from __future__ import annotations

import dataclasses
import datetime
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from provisioning import attest as a
from provisioning import pki
from provisioning.fleet import load_site_crl
from provisioning.image.measure import pcr11_record
from testsupport import attest_support, eventlog, tpm2
from testsupport.attest_support import manifest as _manifest
from testsupport.pe import pe_image

NOW = datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)
UKI_A = pe_image([(".linux", b"kernel A"), (".cmdline", b"roothash=" + b"a" * 64)])
UKI_B = pe_image([(".linux", b"kernel B"), (".cmdline", b"roothash=" + b"b" * 64)])
ROOT_A, ROOT_B = "a" * 64, "b" * 64
IMAGES = a.expected_images([_manifest(ROOT_A, UKI_A), _manifest(ROOT_B, UKI_B)], ["a.json", "b.json"])


def _ca(name: str = "site CA") -> attest_support.CA:
    return attest_support.site_ca(NOW, name)


SITE_KEY, SITE = _ca()


def _ak_certificate(ak: ec.EllipticCurvePrivateKey, node: str = "node1", *,
                    issuer: attest_support.CA = (SITE_KEY, SITE), days: int = 365,
                    san: bool = False, usage: x509.ObjectIdentifier | None = a.AK_CERTIFICATE_USAGE) -> bytes:
    return attest_support.ak_certificate(ak, node, issuer=issuer, now=NOW, days=days, san=san, usage=usage)


def _answer(nonce: bytes, uki: bytes, root_hash: str, *, ak: ec.EllipticCurvePrivateKey | None = None,
            certificate: bytes | None = None) -> a.Answer:
    """What a node that booted ``uki`` answers, naming ``root_hash``."""
    ak = ak or ec.generate_private_key(ec.SECP256R1())
    return attest_support.answer(nonce, uki, root_hash, ak=ak,
                                 certificate=certificate if certificate is not None else _ak_certificate(ak))


def _judge(answer: a.Answer, nonce: bytes, node: str = "node1", **policy: Any) -> a.Verdict:
    return a.judge(answer, nonce=nonce, node=node, policy=a.Policy(SITE, IMAGES, **policy), now=NOW)


def test_a_node_that_booted_a_known_image_attests() -> None:
    nonce = os.urandom(32)
    verdict = _judge(_answer(nonce, UKI_B, ROOT_B), nonce)
    assert verdict.ok and verdict.reason == "" and verdict.root_hash == ROOT_B
    assert verdict.to_json() == {"attested": True, "reason": "", "root_hash": ROOT_B, "image_version": "7",
                                 "secure_boot": True}


def test_the_ak_may_be_named_in_a_dns_subject_alternative_name() -> None:
    nonce = os.urandom(32)
    ak = ec.generate_private_key(ec.SECP256R1())
    assert _judge(_answer(nonce, UKI_A, ROOT_A, ak=ak, certificate=_ak_certificate(ak, san=True)), nonce).ok


def test_a_node_that_names_one_image_and_booted_another_is_caught_at_pcr_11() -> None:
    nonce = os.urandom(32)
    verdict = _judge(_answer(nonce, UKI_A, ROOT_B), nonce)  # booted A, claims B
    assert not verdict.ok and verdict.mismatch is not None and verdict.mismatch.index == 11
    assert "booted something else" in verdict.reason
    assert verdict.to_json()["mismatch"] == {"pcr": 11, "bank": "sha256", "expected": IMAGES[ROOT_B].hex(),
                                             "seen": IMAGES[ROOT_A].hex()}


def test_an_unknown_image_and_a_modified_uki_fail() -> None:
    nonce = os.urandom(32)
    unknown = _judge(_answer(nonce, UKI_A, "c" * 64), nonce)
    assert not unknown.ok and "no expected image" in unknown.reason
    modified = pe_image([(".linux", b"kernel A, patched"), (".cmdline", b"roothash=" + b"a" * 64)])
    verdict = _judge(_answer(nonce, modified, ROOT_A), nonce)
    assert not verdict.ok and verdict.mismatch is not None and verdict.mismatch.index == 11


def test_a_replayed_answer_fails_on_the_nonce() -> None:
    old = os.urandom(32)
    verdict = _judge(_answer(old, UKI_A, ROOT_A), os.urandom(32))
    assert not verdict.ok and "nonce" in verdict.reason


def test_ak_certificates_the_site_did_not_issue_for_this_key_and_node_fail() -> None:
    nonce = os.urandom(32)
    ak = ec.generate_private_key(ec.SECP256R1())
    other_ca = _ca("another CA")
    same_name_ca = _ca("site CA")  # the site CA's name, another key
    cases = {
        "not the site CA": _ak_certificate(ak, issuer=other_ca),
        "not signed by the site CA": _ak_certificate(ak, issuer=same_name_ca),
        "another key": _ak_certificate(ec.generate_private_key(ec.SECP256R1())),
        "not node node1": _ak_certificate(ak, "node2"),
        "not now": _ak_certificate(ak, days=-1),  # expired yesterday
        "lacks the attestation key usage": _ak_certificate(ak, usage=ExtendedKeyUsageOID.SERVER_AUTH),
        "lacks the attestation key usage (2.23": _ak_certificate(ak, usage=None),
        "not a certificate": b"\x30\x03\x02\x01\x01",
    }
    for reason, certificate in cases.items():
        verdict = _judge(_answer(nonce, UKI_A, ROOT_A, ak=ak, certificate=certificate), nonce)
        assert not verdict.ok and reason in verdict.reason, (reason, verdict.reason)


def test_a_broken_answer_is_a_verdict_not_an_exception() -> None:
    nonce = os.urandom(32)
    good = _answer(nonce, UKI_A, ROOT_A)
    for field in ("attest", "signature", "pcr_values", "ak_public"):
        broken = dataclasses.replace(good, **{field: getattr(good, field)[:-3]})
        verdict = _judge(broken, nonce)
        assert not verdict.ok and verdict.reason, field


def test_expected_images_come_from_the_builds_records(tmp_path: Path) -> None:
    assert IMAGES[ROOT_A] != IMAGES[ROOT_B] and len(IMAGES[ROOT_A]) == 32
    with pytest.raises(a.AttestError, match=r"old\.json: no roothash and pcr11"):
        a.expected_images([{"roothash": ROOT_A}], ["old.json"])
    with pytest.raises(a.AttestError, match="another expected PCR 11"):
        a.expected_images([_manifest(ROOT_A, UKI_A), _manifest(ROOT_A, UKI_B)], ["x", "y"])
    partial = {"roothash": ROOT_A, "pcr11": {"sha256": pcr11_record(UKI_A)["sha256"][:2]}}
    with pytest.raises(a.AttestError, match="does not end with the phase"):
        a.expected_images([partial], ["p.json"])


def test_only_a_certificate_from_pki_issue_ak_vouches_for_a_quote(tmp_path: Path) -> None:
    """The site's own PKI: the AK certificate `pki issue-ak` makes passes; the node's TLS
    certificate from the same CA, for the same name, does not, though a node could sign a
    quote with that key (it is a file on the node, not a key held in a TPM)."""
    pki_dir = tmp_path / "pki"
    pki.init_pki(pki_dir, organization="Attesting Site")
    site = x509.load_pem_x509_certificate((pki_dir / "ca.crt").read_bytes())
    nonce = os.urandom(32)
    ak = ec.generate_private_key(ec.SECP256R1())
    issued = pki.issue_attestation_key(pki_dir, "node1", tpm2.public_area(ak))
    assert issued.kind == "ak" and issued.cert_path.endswith("node1/node1.ak.crt") and not issued.key_path
    certificate = x509.load_pem_x509_certificate(Path(issued.cert_path).read_bytes()).public_bytes(
        Encoding.DER)
    answer = _answer(nonce, UKI_A, ROOT_A, ak=ak, certificate=certificate)
    assert a.judge(answer, nonce=nonce, node="node1", policy=a.Policy(site, IMAGES)).ok
    tls = pki.issue_node(pki_dir, "node1")
    tls_key = serialization.load_pem_private_key(Path(tls.key_path).read_bytes(), password=None)
    assert isinstance(tls_key, ec.EllipticCurvePrivateKey)
    tls_cert = x509.load_pem_x509_certificate(Path(tls.cert_path).read_bytes()).public_bytes(Encoding.DER)
    forged = _answer(nonce, UKI_A, ROOT_A, ak=tls_key, certificate=tls_cert)
    verdict = a.judge(forged, nonce=nonce, node="node1", policy=a.Policy(site, IMAGES))
    assert not verdict.ok and "lacks the attestation key usage" in verdict.reason


def test_an_ak_the_site_revoked_does_not_attest(tmp_path: Path) -> None:
    """`appliance pki revoke NODE` revokes its AK certificate too; the crl.pem the PKI writes is
    what `fleet attest --crl` loads, and the node's good quote no longer passes."""
    pki_dir = tmp_path / "pki"
    pki.init_pki(pki_dir, organization="Attesting Site")
    site = x509.load_pem_x509_certificate((pki_dir / "ca.crt").read_bytes())
    ak = ec.generate_private_key(ec.SECP256R1())
    issued = pki.issue_attestation_key(pki_dir, "node1", tpm2.public_area(ak))
    certificate = x509.load_pem_x509_certificate(Path(issued.cert_path).read_bytes()).public_bytes(
        Encoding.DER)
    nonce = os.urandom(32)
    answer = _answer(nonce, UKI_A, ROOT_A, ak=ak, certificate=certificate)
    crl = load_site_crl(pki_dir / "crl.pem", site)
    assert a.judge(answer, nonce=nonce, node="node1", policy=a.Policy(site, IMAGES, crl)).ok
    pki.revoke(pki_dir, "node1", reason="key-compromise")
    crl = load_site_crl(pki_dir / "crl.pem", site)
    verdict = a.judge(answer, nonce=nonce, node="node1", policy=a.Policy(site, IMAGES, crl))
    assert not verdict.ok and f"serial {issued.serial:x}) was revoked by the site CRL" in verdict.reason


def test_the_firmware_event_log_must_replay_and_show_secure_boot_on() -> None:
    """PCRs 0-7 are judged through the node's firmware event log: it must replay to the quoted
    values, and it must show Secure Boot on unless the policy waives that (then it is reported)."""
    nonce = os.urandom(32)
    ak = ec.generate_private_key(ec.SECP256R1())
    cert = _ak_certificate(ak)

    def answer(**kw: Any) -> a.Answer:
        return attest_support.answer(nonce, UKI_A, ROOT_A, ak=ak, certificate=cert, **kw)

    off = answer(firmware=eventlog.firmware_events(secure_boot=False))
    verdict = _judge(off, nonce)
    assert not verdict.ok and "Secure Boot was off" in verdict.reason and verdict.secure_boot is False
    waived = _judge(off, nonce, secure_boot=False)
    assert waived.ok and waived.to_json()["secure_boot"] is False
    unmeasured = answer(firmware=eventlog.firmware_events(secure_boot=None))
    assert "does not show Secure Boot's state" in _judge(unmeasured, nonce).reason
    assert _judge(unmeasured, nonce, secure_boot=False).ok
    # swtpm or a machine without firmware measurements: no log, PCRs 0-7 never extended
    assert _judge(answer(firmware=[]), nonce, secure_boot=False).ok
    # a log of another boot (Secure Boot on, as the fleet wants) with this boot's quote: PCR 7 differs
    other = eventlog.encode(eventlog.firmware_events(secure_boot=True))
    swapped = _judge(dataclasses.replace(off, event_log=other), nonce, secure_boot=False)
    assert not swapped.ok and "does not replay to the quoted PCR 7" in swapped.reason
    assert swapped.mismatch is not None and swapped.mismatch.index == 7
    # no log at all for a boot that measured the firmware: PCR 0 is not that of nothing measured
    withheld = _judge(dataclasses.replace(off, event_log=b""), nonce, secure_boot=False)
    assert not withheld.ok and "does not replay to the quoted PCR 0" in withheld.reason
    # a log rewritten to say Secure Boot was on, digests kept so that it still replays
    lying = dataclasses.replace(off, event_log=off.event_log.replace(
        eventlog.variable("SecureBoot", b"\x00"), eventlog.variable("SecureBoot", b"\x01")))
    assert "digest is not the hash of its data" in _judge(lying, nonce).reason
    assert "event log" in _judge(dataclasses.replace(off, event_log=b"junk"), nonce).reason
