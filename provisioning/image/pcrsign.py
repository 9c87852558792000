"""The site's signature over a UKI's PCR 11 policy: what lets sealed data follow signed updates.

A secret sealed to the TPM under a *signed* PCR 11 policy (systemd-repart's ``TPM2PublicKey=``,
``systemd-cryptenroll --tpm2-public-key=``) is released to any UKI that carries the site key's
signature of the PCR 11 value the TPM holds at that moment.  A new image the site signs therefore
unlocks the data partition without re-enrolment, while an unsigned UKI, or one signed by another
key, cannot satisfy the policy.  The seal stage has ukify sign (``--pcr-private-key``); ukify puts
the public key in ``.pcrpkey`` (measured into PCR 11 like every section, see
provisioning.image.measure) and the signatures in ``.pcrsig`` (never measured: it signs the result).

``.pcrsig`` is JSON, one list per bank: ``{"sha256": [{"pcrs": [11], "pkfp": ..., "pol": ...,
"sig": ...}]}``, one entry per signed phase, where

- ``pol`` is the TPM2 policy digest of ``TPM2_PolicyPCR`` over PCR 11 with the value the PCR has
  after that phase: ``H(0^n || TPM_CC_PolicyPCR || TPML_PCR_SELECTION || H(pcr value))``;
- ``pkfp`` is the SHA-256 of the public key as DER ``RSAPublicKey`` (PKCS #1);
- ``sig`` is base64 of RSASSA-PKCS1-v1_5 with SHA-256 over the bytes of ``pol``.

(Checked against systemd-measure 252 and the image's 257: tests/test_pcrsign.py and
tests/test_seal_system.py.)

Only the ``enter-initrd`` phase is signed (:data:`SIGNED_PHASES`): the data partition is unlocked
in the initrd, and once the initrd is left PCR 11 moves past every signed value, so no process of
the booted system, root included, can have the TPM unseal the key again.  The build checks what
ukify wrote against its own computation, so a UKI whose signature would not unlock (another key,
another PCR value, a phase too many) fails the build instead of a node's boot.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from agent.fsutil import atomic_write_bytes
from provisioning.errors import ImageError
from provisioning.image.measure import expected_pcr11, pe_sections

__all__ = ["SIGNED_PHASES", "check_pcr_signature", "key_fingerprint", "load_pcr_key", "new_pcr_key",
           "policy_pcr_digest", "public_pem"]

SIGNED_PHASES = ("enter-initrd",)
KEY_BITS = 2048  # what every TPM 2.0 loads for TPM2_PolicyAuthorize (3072/4096 are optional)
_TPM_CC_POLICY_PCR = 0x0000017F
_TPM_ALG_SHA256 = 0x000B
_MAX_PCRSIG = 1 << 20


def load_pcr_key(path: Path) -> rsa.RSAPrivateKey:
    """The site's PCR signing key: an unencrypted PEM RSA private key of :data:`KEY_BITS` bits.

    Raises:
        ImageError: the file is missing or unreadable, not a PEM private key, encrypted, or not
            RSA-2048 (the message names the file and what it is instead).
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"PCR signing key {path}: cannot read it: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ImageError(f"PCR signing key {path}: is encrypted; the build needs it unencrypted "
                         "(keep it on the offline build machine)") from None
    except ValueError as exc:
        raise ImageError(f"PCR signing key {path}: not a PEM private key ({exc})") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ImageError(f"PCR signing key {path}: an {_kind(key)} key; "
                         f"an RSA key of {KEY_BITS} bits is needed (the TPM verifies the policy "
                         "signature itself, and RSA-2048 is what every TPM 2.0 loads)")
    if key.key_size != KEY_BITS:
        raise ImageError(f"PCR signing key {path}: RSA of {key.key_size} bits; {KEY_BITS} bits are "
                         "needed (every TPM 2.0 loads RSA-2048; larger sizes are optional)")
    return key


def new_pcr_key(path: Path) -> rsa.RSAPrivateKey:
    """Make a PCR signing key of the kind :func:`load_pcr_key` takes; written 0600 at ``path``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    atomic_write_bytes(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()), mode=0o600)
    return key


def _kind(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "Ed25519"
    return type(key).__name__.removeprefix("_")


def public_pem(key: rsa.RSAPrivateKey) -> bytes:
    """The public half as PEM SubjectPublicKeyInfo (what ``.pcrpkey`` carries)."""
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def key_fingerprint(public: rsa.RSAPublicKey) -> str:
    """``pkfp`` of systemd's signature JSON: SHA-256 of the DER PKCS #1 RSAPublicKey, in hex."""
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    return hashlib.sha256(der).hexdigest()


def policy_pcr_digest(value: bytes, pcr: int = 11) -> bytes:
    """The SHA-256 policy digest of one ``TPM2_PolicyPCR`` on a fresh session, over ``pcr`` of
    the sha256 bank holding ``value``."""
    if len(value) != 32:
        raise ImageError(f"PCR value of {len(value)} bytes: the sha256 bank holds 32")
    if not 0 <= pcr < 24:
        raise ImageError(f"PCR {pcr}: not one of 0-23")
    select = bytearray(3)
    select[pcr // 8] |= 1 << (pcr % 8)
    selection = struct.pack(">IHB", 1, _TPM_ALG_SHA256, 3) + bytes(select)
    return hashlib.sha256(bytes(32) + struct.pack(">I", _TPM_CC_POLICY_PCR) + selection
                          + hashlib.sha256(value).digest()).digest()


def _signature_entries(raw: bytes, what: str) -> list[dict[str, Any]]:
    if len(raw) > _MAX_PCRSIG:
        raise ImageError(f"{what}: .pcrsig of {len(raw)} bytes (at most {_MAX_PCRSIG})")
    try:
        doc = json.loads(raw.rstrip(b"\0").decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ImageError(f"{what}: .pcrsig is not JSON ({exc})") from None
    if not isinstance(doc, dict) or set(doc) != {"sha256"} or not isinstance(doc["sha256"], list):
        banks = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise ImageError(f"{what}: .pcrsig signs banks {banks}; the image signs the sha256 bank only")
    entries = doc["sha256"]
    for i, entry in enumerate(entries):
        fields = ("pkfp", "pol", "sig")
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in fields):
            raise ImageError(f"{what}: .pcrsig sha256[{i}] lacks pkfp, pol or sig: {str(entry)[:200]}")
        if entry.get("pcrs") != [11]:
            raise ImageError(f"{what}: .pcrsig sha256[{i}] signs PCRs {entry.get('pcrs')!r}; only [11]")
    return entries


def check_pcr_signature(uki: Path | bytes, public: bytes,
                        phases: tuple[str, ...] = SIGNED_PHASES) -> dict[str, Any]:
    """Check that ``uki`` carries ``public`` (PEM) as ``.pcrpkey`` and, in ``.pcrsig``, a valid
    signature by it of exactly the PCR 11 policies of ``phases`` (phase paths as systemd-measure
    names them, e.g. ``enter-initrd``); return the record the build keeps in seal.json.

    Raises:
        ImageError: a section is missing or malformed, the key differs, a phase is unsigned, a
            signature does not verify, or a policy is signed for no phase in ``phases``.
    """
    what = str(uki) if isinstance(uki, Path) else "UKI"
    data = uki.read_bytes() if isinstance(uki, Path) else uki
    sections = pe_sections(data, what)
    try:
        key = serialization.load_pem_public_key(public)
    except ValueError as exc:
        raise ImageError(f"PCR public key: not a PEM public key ({exc})") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ImageError(f"PCR public key: an {_kind(key)} key, not RSA")
    if ".pcrpkey" not in sections or ".pcrsig" not in sections:
        missing = [s for s in (".pcrpkey", ".pcrsig") if s not in sections]
        raise ImageError(f"{what}: no {' or '.join(missing)} section: the UKI's PCR policy is not signed")
    try:
        carried = serialization.load_pem_public_key(sections[".pcrpkey"].rstrip(b"\0"))
    except ValueError as exc:
        raise ImageError(f"{what}: .pcrpkey is not a PEM public key ({exc})") from None
    if not isinstance(carried, rsa.RSAPublicKey) or carried.public_numbers() != key.public_numbers():
        raise ImageError(f"{what}: .pcrpkey is another key than the site's PCR key "
                         f"({key_fingerprint(key)[:16]}...)")
    fingerprint = key_fingerprint(key)
    values = {p.phase: p.value for p in expected_pcr11(data)}
    unknown = [p for p in phases if p not in values]
    if unknown:
        raise ImageError(f"phase {unknown[0]!r}: not one of {', '.join(values)}")
    policies = {phase: policy_pcr_digest(value).hex() for phase, value in values.items()}
    phase_of = {policy: phase for phase, policy in policies.items()}
    signed: set[str] = set()
    for i, entry in enumerate(_signature_entries(sections[".pcrsig"], what)):
        phase = phase_of.get(entry["pol"].lower())
        if phase not in phases:
            raise ImageError(f"{what}: .pcrsig sha256[{i}] signs the policy of "
                             + (f"phase {phase!r}, which is not to be signed (only {', '.join(phases)}): "
                                "the key would unseal after the initrd" if phase else
                                f"PCR 11 = a value no phase of this UKI reaches ({entry['pol'][:16]}...)"))
        if entry["pkfp"].lower() != fingerprint:
            raise ImageError(f"{what}: .pcrsig sha256[{i}] ({phase}) is by key {entry['pkfp'][:16]}..., "
                             f"not the site's {fingerprint[:16]}...")
        try:
            key.verify(base64.b64decode(entry["sig"], validate=True), bytes.fromhex(entry["pol"]),
                       padding.PKCS1v15(), hashes.SHA256())
        except (InvalidSignature, binascii.Error, ValueError):
            raise ImageError(f"{what}: .pcrsig sha256[{i}] ({phase}): the signature does not verify "
                             "with the site's PCR key") from None
        signed.add(phase)
    missing = [p for p in phases if p not in signed]
    if missing:
        raise ImageError(f"{what}: .pcrsig signs no policy for phase {missing[0]!r} "
                         f"(PCR 11 = {values[missing[0]].hex()})")
    return {"bank": "sha256", "public_key_fingerprint": fingerprint, "phases": list(phases),
            "policies": {p: policies[p] for p in phases}}
