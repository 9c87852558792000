"""TPM2 structure encoders for tests: what a TPM marshals, made from a key the test generates.

The layouts are those of the TPM 2.0 Library, Part 2 (Structures), written out field by field
so that a test can build a valid quote and then break exactly one field of it.  Real quotes made
by swtpm + tpm2-tools lie in tests/data/tpm2 (see its README) and check these encoders too.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from provisioning import attest as a

# fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth | restricted | sign: what tpm2_createak sets
AK_ATTRIBUTES = 0x00050072
_CURVE_IDS = {"secp256r1": 0x0003, "secp384r1": 0x0004}
_HASHES = {a.ALG_SHA256: hashes.SHA256(), a.ALG_SHA384: hashes.SHA384()}


def u16(value: int) -> bytes:
    return struct.pack(">H", value)


def u32(value: int) -> bytes:
    return struct.pack(">I", value)


def tpm2b(data: bytes) -> bytes:
    return u16(len(data)) + data


def selection(banks: Mapping[int, Sequence[int]], size: int = 3) -> bytes:
    """A TPML_PCR_SELECTION: hash algorithm -> PCR indices."""
    out = u32(len(banks))
    for alg, indices in banks.items():
        bits = bytearray(size)
        for i in indices:
            bits[i // 8] |= 1 << (i % 8)
        out += u16(alg) + bytes([size]) + bytes(bits)
    return out


def public_area(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, *, attributes: int = AK_ATTRIBUTES,
                hash_alg: int = a.ALG_SHA256, scheme: int | None = None) -> bytes:
    """A TPM2B_PUBLIC for ``key``'s public half, as an AK with a fixed signing scheme."""
    head = u32(attributes) + tpm2b(b"") + u16(a.ALG_NULL)  # attributes, authPolicy, symmetric
    if isinstance(key, rsa.RSAPrivateKey):
        numbers = key.public_key().public_numbers()
        modulus = numbers.n.to_bytes(key.key_size // 8, "big")
        body = (u16(a.ALG_RSA) + u16(a.ALG_SHA256) + head + u16(scheme or a.ALG_RSASSA) + u16(hash_alg)
                + u16(key.key_size) + u32(0 if numbers.e == 65537 else numbers.e) + tpm2b(modulus))
    else:
        point = key.public_key().public_numbers()
        size = (key.curve.key_size + 7) // 8
        body = (u16(a.ALG_ECC) + u16(a.ALG_SHA256) + head + u16(scheme or a.ALG_ECDSA) + u16(hash_alg)
                + u16(_CURVE_IDS[key.curve.name]) + u16(a.ALG_NULL)
                + tpm2b(point.x.to_bytes(size, "big")) + tpm2b(point.y.to_bytes(size, "big")))
    return tpm2b(body)


@dataclass(frozen=True)
class QuoteFields:
    """The fields of a TPMS_ATTEST quote; change one with ``dataclasses.replace``."""

    nonce: bytes
    pcr_select: bytes
    pcr_digest: bytes
    magic: int = a.GENERATED_VALUE
    type: int = a.ATTEST_QUOTE
    signer: bytes = u16(a.ALG_SHA256) + bytes(32)
    clock: bytes = struct.pack(">QIIB", 123456, 7, 0, 1)
    firmware: int = 0x2019102300163636

    def encode(self) -> bytes:
        return (u32(self.magic) + u16(self.type) + tpm2b(self.signer) + tpm2b(self.nonce) + self.clock
                + struct.pack(">Q", self.firmware) + self.pcr_select + tpm2b(self.pcr_digest))


def quote_fields(nonce: bytes, pcrs: Mapping[int, bytes], hash_alg: int = a.ALG_SHA256) -> QuoteFields:
    """A quote over the sha256 bank's ``pcrs`` (index -> value), its digest made with ``hash_alg``."""
    digest = hashlib.new(a.HASH_ALGS[hash_alg][0], b"".join(pcrs[i] for i in sorted(pcrs))).digest()
    return QuoteFields(nonce, selection({a.ALG_SHA256: sorted(pcrs)}), digest)


def pcr_values(pcrs: Mapping[int, bytes]) -> bytes:
    """The values as ``tpm2_quote -F values`` writes them: the selection's order."""
    return b"".join(pcrs[i] for i in sorted(pcrs))


def sign(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, message: bytes, *,
         hash_alg: int = a.ALG_SHA256, pss: bool = False) -> bytes:
    """The TPMT_SIGNATURE a TPM would return for ``message`` signed by ``key``."""
    algorithm = _HASHES[hash_alg]
    if isinstance(key, rsa.RSAPrivateKey):
        if pss:
            pad: padding.AsymmetricPadding = padding.PSS(mgf=padding.MGF1(algorithm),
                                                          salt_length=algorithm.digest_size)
            return u16(a.ALG_RSAPSS) + u16(hash_alg) + tpm2b(key.sign(message, pad, algorithm))
        return u16(a.ALG_RSASSA) + u16(hash_alg) + tpm2b(key.sign(message, padding.PKCS1v15(), algorithm))
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(algorithm)))
    size = (key.curve.key_size + 7) // 8
    return u16(a.ALG_ECDSA) + u16(hash_alg) + tpm2b(r.to_bytes(size, "big")) + tpm2b(s.to_bytes(size, "big"))
