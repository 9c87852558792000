"""What a node answers to Node/Attest, made here: a site CA, AK certificates it issues, quotes
signed the way a TPM signs them (:mod:`testsupport.tpm2`), and the expected-image records a
build writes.  Shared by the verdict tests and the fleet's rollout tests."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from provisioning import attest as a
from provisioning.image.measure import expected_pcr11, pcr11_record
from testsupport import eventlog, tpm2

CA = tuple[ec.EllipticCurvePrivateKey, x509.Certificate]


def manifest(roothash: str, uki: bytes) -> dict[str, object]:
    """The two records of an image-manifest.json that expected images are read from."""
    return {"roothash": roothash, "pcr11": pcr11_record(uki)}


def site_ca(now: datetime.datetime, name: str = "site CA") -> CA:
    """A self-signed CA valid from a month before ``now`` for ten years."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=30))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def ak_certificate(ak: ec.EllipticCurvePrivateKey, node: str, *, issuer: CA, now: datetime.datetime,
                   days: int = 365, san: bool = False,
                   usage: x509.ObjectIdentifier | None = a.AK_CERTIFICATE_USAGE) -> bytes:
    """DER certificate for ``ak`` naming ``node`` (as CN, or as a DNS SAN with ``san``), valid from
    a day before ``now`` for ``days`` days, with extended key ``usage`` (none: no such extension)."""
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "AK" if san else node)]))
               .issuer_name(issuer[1].subject).public_key(ak.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=days)))
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(node)]), critical=False)
    return builder.sign(issuer[0], hashes.SHA256()).public_bytes(Encoding.DER)


def crl(issuer: CA, revoked: Sequence[int], *, now: datetime.datetime, days: float = 30) -> bytes:
    """A PEM revocation list by ``issuer`` revoking the ``revoked`` serials (a day before ``now``),
    due again in ``days`` days (negative: stale already, issued a day before it was due)."""
    due = now + datetime.timedelta(days=days)
    issued = min(now - datetime.timedelta(hours=1), due - datetime.timedelta(days=1))
    builder = (x509.CertificateRevocationListBuilder().issuer_name(issuer[1].subject)
               .last_update(issued).next_update(due))
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial)
            .revocation_date(now - datetime.timedelta(days=1)).build())
    return builder.sign(issuer[0], hashes.SHA256()).public_bytes(Encoding.PEM)


def answer(nonce: bytes, uki: bytes, root_hash: str, *, ak: ec.EllipticCurvePrivateKey,
           certificate: bytes, image_version: str = "7", firmware: Sequence[eventlog.Ev] | None = None,
           log: bytes | None = None) -> a.Answer:
    """What a node that booted ``uki`` answers to ``nonce``, naming ``root_hash``: PCRs 0-7 as
    the ``firmware`` events left them (default: an OVMF-like boot with Secure Boot on), PCR 11
    what a boot of ``uki`` reaches, quoted and signed by ``ak``; the firmware event log is those
    events (or ``log``, to send another)."""
    events = eventlog.firmware_events() if firmware is None else list(firmware)
    pcrs = eventlog.pcrs(events) | {11: expected_pcr11(uki)[-1].value}
    attest = tpm2.quote_fields(nonce, pcrs).encode()
    return a.Answer(attest, tpm2.sign(ak, attest), tpm2.pcr_values(pcrs), tpm2.public_area(ak),
                    certificate, root_hash, image_version, eventlog.encode(events) if log is None else log)


def policy(ca: CA, images: Mapping[str, bytes], **kw: Any) -> a.Policy:
    """The fleet's policy with the site CA ``ca`` (its certificate) and ``images``."""
    return a.Policy(ca[1], images, **kw)
