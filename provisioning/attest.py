"""TPM2 quote verification: the fleet's side of remote attestation, pure (no I/O, no TPM).

A node answers ``Node/Attest(nonce)`` with what ``TPM2_Quote`` returned (a marshalled
``TPMS_ATTEST`` and ``TPMT_SIGNATURE``), the values of the quoted PCRs and its attestation
key (AK) as a marshalled ``TPM2B_PUBLIC``.  :func:`verify_quote` checks, in this order, and
stops at the first failure:

1. the AK is a restricted signing key bound to its TPM (``fixedTPM``, ``fixedParent``,
   ``sensitiveDataOrigin``): only such a key cannot be made to sign a forged ``TPMS_ATTEST``;
2. the signature over the ``TPMS_ATTEST`` bytes, with ``cryptography`` (RSASSA-PKCS1-v1_5,
   RSA-PSS or ECDSA; SHA-256/384/512);
3. the structure: ``TPM_GENERATED_VALUE`` magic and type ``TPM_ST_ATTEST_QUOTE``;
4. ``extraData`` equals the nonce the verifier sent (freshness);
5. the claimed PCR values cover exactly the quoted selection and hash, in the quote's order,
   to its ``pcrDigest`` (with the signing scheme's hash, as TPM2_Quote does);
6. every expected PCR is quoted and equal; the first mismatch (lowest bank order, then index)
   is reported by index with both values.

Wire formats are those of the TPM 2.0 Library, Part 2 (Structures): big-endian integers,
``TPM2B_*`` as a UINT16 size and that many bytes.  Every length is checked against what is
left and against the structure's maximum; a message names the field that was wrong.
Whether the AK belongs to the node (its certificate from the site PKI) is the caller's check.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from provisioning import eventlog
from provisioning.errors import AttestError
from provisioning.image.measure import PHASES

__all__ = [
    "AK_CERTIFICATE_USAGE", "ALG_ECC", "ALG_ECDSA", "ALG_NULL", "ALG_RSA", "ALG_RSAPSS", "ALG_RSASSA",
    "ALG_SHA256", "ATTEST_QUOTE", "GENERATED_VALUE", "HASH_ALGS", "Answer", "Attest", "AttestError",
    "ClockInfo", "EccPoint", "PcrMismatch", "PcrSelection", "Policy", "Public", "QuoteResult", "RsaKey",
    "Signature", "Verdict", "check_ak_certificate", "check_attestation_key", "expected_images", "judge",
    "parse_attest", "parse_public", "parse_signature", "pcr_digest", "public_key", "split_pcr_values",
    "verify_quote",
]

GENERATED_VALUE = 0xFF544347  # TPM_GENERATED_VALUE: "\xffTCG", only the TPM writes it into TPMS_ATTEST
ATTEST_QUOTE = 0x8018  # TPM_ST_ATTEST_QUOTE

ALG_RSA = 0x0001
ALG_SHA1 = 0x0004
ALG_SHA256 = 0x000B
ALG_SHA384 = 0x000C
ALG_SHA512 = 0x000D
ALG_NULL = 0x0010
ALG_RSASSA = 0x0014
ALG_RSAES = 0x0015
ALG_RSAPSS = 0x0016
ALG_OAEP = 0x0017
ALG_ECDSA = 0x0018
ALG_ECDAA = 0x001A
ALG_ECC = 0x0023

# hash algorithm id -> (hashlib name, digest size); SHA-1 is parsed (a bank may use it) but never trusted
HASH_ALGS: dict[int, tuple[str, int]] = {
    ALG_SHA1: ("sha1", 20), ALG_SHA256: ("sha256", 32),
    ALG_SHA384: ("sha384", 48), ALG_SHA512: ("sha512", 64),
}
_SIGNING_HASHES: dict[int, hashes.HashAlgorithm] = {
    ALG_SHA256: hashes.SHA256(), ALG_SHA384: hashes.SHA384(), ALG_SHA512: hashes.SHA512(),
}
_CURVES: dict[int, ec.EllipticCurve] = {
    0x0003: ec.SECP256R1(), 0x0004: ec.SECP384R1(), 0x0005: ec.SECP521R1(),  # TPM_ECC_NIST_P256..P521
}

# TPMA_OBJECT bits an attestation key must have
ATTR_FIXED_TPM = 1 << 1
ATTR_FIXED_PARENT = 1 << 4
ATTR_SENSITIVE_DATA_ORIGIN = 1 << 5
ATTR_RESTRICTED = 1 << 16
ATTR_DECRYPT = 1 << 17
ATTR_SIGN = 1 << 18
FIRMWARE_PCRS = range(8)  # firmware, option ROMs, boot loader, Secure Boot policy (PCR 7)
# tcg-kp-AIKCertificate (TCG EK Credential Profile): this certificate is for an attestation key.
# The fleet requires it, so a certificate the same CA issued the node for TLS (a key outside
# the TPM) cannot vouch for a quote the node forged with that key.
AK_CERTIFICATE_USAGE = x509.ObjectIdentifier("2.23.133.8.3")
_AK_ATTRS = {"fixedTPM": ATTR_FIXED_TPM, "fixedParent": ATTR_FIXED_PARENT,
             "sensitiveDataOrigin": ATTR_SENSITIVE_DATA_ORIGIN, "restricted": ATTR_RESTRICTED,
             "sign": ATTR_SIGN}

# Maxima from the reference implementation's TPM profile (Part 2 leaves them to the platform);
# generous where a real TPM could exceed them, tight enough that nothing grows without bound.
MAX_NAME = 2 + 64  # TPMU_NAME: a nameAlg and a digest
MAX_DATA = 64  # TPM2B_DATA (extraData): sizeof(TPMT_HA) less the algorithm
MAX_DIGEST = 64
MAX_RSA_BYTES = 512  # 4096-bit keys
MAX_ECC_BYTES = 66  # P-521
MAX_PCR_BANKS = 16  # HASH_COUNT is 2..5 on real TPMs
MAX_SELECT = 4  # PCR_SELECT_MAX: 24 PCRs need 3 bytes, 32 need 4
MIN_SELECT = 3  # PCR_SELECT_MIN for the PC Client platform


class _Reader:
    """Big-endian TPM2 unmarshalling over one buffer; every read names the field it is for."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def _take(self, n: int, field: str) -> bytes:
        if n > len(self._data) - self._pos:
            raise AttestError(f"{self._what}: {field}: needs {n} bytes at offset {self._pos}, "
                              f"{len(self._data) - self._pos} left")
        out = self._data[self._pos:self._pos + n]
        self._pos += n
        return out

    def u8(self, field: str) -> int:
        return int(self._take(1, field)[0])

    def u16(self, field: str) -> int:
        return int(struct.unpack(">H", self._take(2, field))[0])

    def u32(self, field: str) -> int:
        return int(struct.unpack(">I", self._take(4, field))[0])

    def u64(self, field: str) -> int:
        return int(struct.unpack(">Q", self._take(8, field))[0])

    def tpm2b(self, field: str, maximum: int) -> bytes:
        size = self.u16(f"{field}.size")
        if size > maximum:
            raise AttestError(f"{self._what}: {field}: size {size} exceeds the maximum {maximum}")
        return self._take(size, field)

    def end(self) -> None:
        if self._pos != len(self._data):
            left = len(self._data) - self._pos
            raise AttestError(f"{self._what}: {left} trailing bytes after the structure")


def _hash_name(alg: int, field: str, what: str) -> tuple[str, int]:
    try:
        return HASH_ALGS[alg]
    except KeyError:
        raise AttestError(f"{what}: {field}: unsupported hash algorithm 0x{alg:04x}") from None


@dataclass(frozen=True)
class PcrSelection:
    """One TPMS_PCR_SELECTION: a bank (hash algorithm) and the PCR indices selected in it, ascending."""

    hash_alg: int
    indices: tuple[int, ...]


@dataclass(frozen=True)
class ClockInfo:
    clock: int
    reset_count: int
    restart_count: int
    safe: bool


@dataclass(frozen=True)
class Attest:
    """A parsed TPMS_ATTEST of type quote."""

    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock_info: ClockInfo
    firmware_version: int
    pcr_select: tuple[PcrSelection, ...]
    pcr_digest: bytes


@dataclass(frozen=True)
class Signature:
    """A parsed TPMT_SIGNATURE: RSA signatures in ``rsa``, ECDSA as (r, s)."""

    sig_alg: int
    hash_alg: int
    rsa: bytes = b""
    ecdsa_r: bytes = b""
    ecdsa_s: bytes = b""


@dataclass(frozen=True)
class RsaKey:
    bits: int
    exponent: int
    modulus: bytes


@dataclass(frozen=True)
class EccPoint:
    curve: int
    x: bytes
    y: bytes


@dataclass(frozen=True)
class Public:
    """A parsed TPMT_PUBLIC of an RSA or ECC key; ``scheme``/``scheme_hash`` as the key restricts them."""

    type: int
    name_alg: int
    attributes: int
    auth_policy: bytes
    scheme: int
    scheme_hash: int
    key: RsaKey | EccPoint
    raw: bytes  # the marshalled TPMT_PUBLIC, what the key's TPM name is a hash of

    def name(self) -> bytes:
        """The key's TPM name: nameAlg || H_nameAlg(TPMT_PUBLIC)."""
        hname, _ = _hash_name(self.name_alg, "nameAlg", "TPMT_PUBLIC")
        return struct.pack(">H", self.name_alg) + hashlib.new(hname, self.raw).digest()


@dataclass(frozen=True)
class PcrMismatch:
    hash_alg: int
    index: int
    expected: bytes
    seen: bytes | None  # None: the PCR was not in the quote


@dataclass(frozen=True)
class QuoteResult:
    """What a verified quote says: its PCR values by (bank, index), and the first mismatch if any."""

    attest: Attest
    pcrs: Mapping[tuple[int, int], bytes]
    mismatch: PcrMismatch | None

    @property
    def ok(self) -> bool:
        return self.mismatch is None


def _parse_selection(r: _Reader, what: str) -> tuple[PcrSelection, ...]:
    count = r.u32("pcrSelect.count")
    if count > MAX_PCR_BANKS:
        raise AttestError(f"{what}: pcrSelect.count {count} exceeds the maximum {MAX_PCR_BANKS}")
    out = []
    for i in range(count):
        field = f"pcrSelect[{i}]"
        alg = r.u16(f"{field}.hash")
        _hash_name(alg, f"{field}.hash", what)
        size = r.u8(f"{field}.sizeofSelect")
        if not MIN_SELECT <= size <= MAX_SELECT:
            raise AttestError(f"{what}: {field}.sizeofSelect {size} outside {MIN_SELECT}..{MAX_SELECT}")
        bits = r._take(size, f"{field}.pcrSelect")
        indices = tuple(8 * byte + bit for byte in range(size) for bit in range(8) if bits[byte] >> bit & 1)
        out.append(PcrSelection(alg, indices))
    if len({s.hash_alg for s in out}) != len(out):
        raise AttestError(f"{what}: pcrSelect names a bank more than once")
    return tuple(out)


def parse_attest(data: bytes) -> Attest:
    """Parse a marshalled TPMS_ATTEST that must be a quote.

    Raises:
        AttestError: a field is truncated, too long, or not what a quote holds.
    """
    what = "TPMS_ATTEST"
    r = _Reader(data, what)
    magic = r.u32("magic")
    if magic != GENERATED_VALUE:
        raise AttestError(f"{what}: magic 0x{magic:08x} is not TPM_GENERATED_VALUE 0x{GENERATED_VALUE:08x}")
    kind = r.u16("type")
    if kind != ATTEST_QUOTE:
        raise AttestError(f"{what}: type 0x{kind:04x} is not TPM_ST_ATTEST_QUOTE 0x{ATTEST_QUOTE:04x}")
    signer = r.tpm2b("qualifiedSigner", MAX_NAME)
    extra = r.tpm2b("extraData", MAX_DATA)
    clock = ClockInfo(r.u64("clockInfo.clock"), r.u32("clockInfo.resetCount"),
                      r.u32("clockInfo.restartCount"), bool(r.u8("clockInfo.safe")))
    firmware = r.u64("firmwareVersion")
    selection = _parse_selection(r, what)
    digest = r.tpm2b("pcrDigest", MAX_DIGEST)
    r.end()
    return Attest(magic, kind, signer, extra, clock, firmware, selection, digest)


def parse_signature(data: bytes) -> Signature:
    """Parse a marshalled TPMT_SIGNATURE (RSASSA, RSAPSS or ECDSA).

    Raises:
        AttestError: truncated, too long, or another signature algorithm.
    """
    what = "TPMT_SIGNATURE"
    r = _Reader(data, what)
    alg = r.u16("sigAlg")
    if alg not in (ALG_RSASSA, ALG_RSAPSS, ALG_ECDSA):
        raise AttestError(f"{what}: sigAlg 0x{alg:04x} is not RSASSA, RSAPSS or ECDSA")
    hash_alg = r.u16("signature.hash")
    if hash_alg not in _SIGNING_HASHES:
        raise AttestError(f"{what}: signature.hash 0x{hash_alg:04x} is not SHA-256, SHA-384 or SHA-512")
    if alg == ALG_ECDSA:
        sig_r = r.tpm2b("signature.signatureR", MAX_ECC_BYTES)
        sig_s = r.tpm2b("signature.signatureS", MAX_ECC_BYTES)
        r.end()
        return Signature(alg, hash_alg, ecdsa_r=sig_r, ecdsa_s=sig_s)
    sig = r.tpm2b("signature.sig", MAX_RSA_BYTES)
    r.end()
    return Signature(alg, hash_alg, rsa=sig)


def _parse_scheme(r: _Reader, field: str) -> tuple[int, int]:
    """A TPMT_*_SCHEME: (scheme, its hash or ALG_NULL); the details' layout depends on the scheme."""
    scheme = r.u16(field)
    if scheme in {ALG_NULL, ALG_RSAES}:
        return scheme, ALG_NULL
    hash_alg = r.u16(f"{field}.hashAlg")
    if scheme == ALG_ECDAA:
        r.u16(f"{field}.count")
    return scheme, hash_alg


def parse_public(data: bytes) -> Public:
    """Parse a marshalled TPM2B_PUBLIC holding an RSA or ECC key (as ``tpm2_createak -u`` writes it).

    Raises:
        AttestError: truncated, too long, or a key type other than RSA and ECC.
    """
    outer = _Reader(data, "TPM2B_PUBLIC")
    body = outer.tpm2b("size", 2048)
    outer.end()
    what = "TPMT_PUBLIC"
    r = _Reader(body, what)
    kind = r.u16("type")
    if kind not in (ALG_RSA, ALG_ECC):
        raise AttestError(f"{what}: type 0x{kind:04x} is not RSA or ECC")
    name_alg = r.u16("nameAlg")
    _hash_name(name_alg, "nameAlg", what)
    attributes = r.u32("objectAttributes")
    policy = r.tpm2b("authPolicy", MAX_DIGEST)
    symmetric = r.u16("parameters.symmetric.algorithm")
    if symmetric != ALG_NULL:
        r.u16("parameters.symmetric.keyBits")
        r.u16("parameters.symmetric.mode")
    scheme, scheme_hash = _parse_scheme(r, "parameters.scheme")
    key: RsaKey | EccPoint
    if kind == ALG_RSA:
        bits = r.u16("parameters.keyBits")
        exponent = r.u32("parameters.exponent") or 65537  # 0 means the default exponent
        modulus = r.tpm2b("unique.rsa", MAX_RSA_BYTES)
        if len(modulus) * 8 != bits:
            raise AttestError(f"{what}: unique.rsa is {len(modulus) * 8} bits, "
                              f"parameters.keyBits says {bits}")
        key = RsaKey(bits, exponent, modulus)
    else:
        curve = r.u16("parameters.curveID")
        if curve not in _CURVES:
            raise AttestError(f"{what}: parameters.curveID 0x{curve:04x} is not NIST P-256, P-384 or P-521")
        _parse_scheme(r, "parameters.kdf")
        key = EccPoint(curve, r.tpm2b("unique.ecc.x", MAX_ECC_BYTES), r.tpm2b("unique.ecc.y", MAX_ECC_BYTES))
    r.end()
    return Public(kind, name_alg, attributes, policy, scheme, scheme_hash, key, body)


def public_key(public: Public) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    """The ``cryptography`` key of a parsed TPM public area.

    Raises:
        AttestError: the numbers are not a valid key (an ECC point off its curve, say).
    """
    try:
        if isinstance(public.key, RsaKey):
            modulus = int.from_bytes(public.key.modulus, "big")
            return rsa.RSAPublicNumbers(public.key.exponent, modulus).public_key()
        point = ec.EllipticCurvePublicNumbers(int.from_bytes(public.key.x, "big"),
                                              int.from_bytes(public.key.y, "big"), _CURVES[public.key.curve])
        return point.public_key()
    except ValueError as exc:
        raise AttestError(f"TPMT_PUBLIC: unique is not a valid key: {exc}") from None


def check_attestation_key(public: Public) -> None:
    """Refuse a key that is not a restricted signing key bound to its TPM.

    Only a restricted key's TPM refuses to sign data that starts with TPM_GENERATED_VALUE
    unless the TPM made it; without ``restricted`` anyone with the key could forge a quote.

    Raises:
        AttestError: naming the attributes that are missing (or ``decrypt``, which an AK must not have).
    """
    missing = [name for name, bit in _AK_ATTRS.items() if not public.attributes & bit]
    if missing:
        raise AttestError(f"attestation key: objectAttributes 0x{public.attributes:08x} "
                          f"lack {', '.join(missing)}")
    if public.attributes & ATTR_DECRYPT:
        raise AttestError("attestation key: objectAttributes has decrypt; an attestation key only signs")


def _verify_signature(public: Public, signature: Signature, message: bytes) -> None:
    key = public_key(public)
    algorithm = _SIGNING_HASHES[signature.hash_alg]
    used = (signature.sig_alg, signature.hash_alg)
    if public.scheme != ALG_NULL and (public.scheme, public.scheme_hash) != used:
        raise AttestError(f"TPMT_SIGNATURE: scheme 0x{used[0]:04x}/0x{used[1]:04x} is not "
                          f"the key's 0x{public.scheme:04x}/0x{public.scheme_hash:04x}")
    try:
        if isinstance(key, rsa.RSAPublicKey):
            if signature.sig_alg == ALG_ECDSA:
                raise AttestError("TPMT_SIGNATURE: an ECDSA signature for an RSA key")
            pad: padding.AsymmetricPadding = padding.PKCS1v15()
            if signature.sig_alg == ALG_RSAPSS:
                # TPMs differ in the salt length they use (digest size or the most that fits)
                pad = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=padding.PSS.AUTO)
            key.verify(signature.rsa, message, pad, algorithm)
        else:
            if signature.sig_alg != ALG_ECDSA:
                raise AttestError("TPMT_SIGNATURE: an RSA signature for an ECC key")
            der = encode_dss_signature(int.from_bytes(signature.ecdsa_r, "big"),
                                       int.from_bytes(signature.ecdsa_s, "big"))
            key.verify(der, message, ec.ECDSA(algorithm))
    except InvalidSignature:
        raise AttestError("quote: the signature does not verify with the attestation key") from None


def split_pcr_values(selection: Sequence[PcrSelection], values: bytes) -> dict[tuple[int, int], bytes]:
    """Cut concatenated PCR values (``tpm2_quote -o FILE -F values``: the selection's order) by PCR.

    Raises:
        AttestError: the length is not what the selection needs.
    """
    sizes = [(sel.hash_alg, i, HASH_ALGS[sel.hash_alg][1]) for sel in selection for i in sel.indices]
    need = sum(size for _, _, size in sizes)
    if len(values) != need:
        raise AttestError(f"PCR values: {len(values)} bytes, the quoted selection needs {need}")
    out, pos = {}, 0
    for alg, index, size in sizes:
        out[(alg, index)] = values[pos:pos + size]
        pos += size
    return out


def pcr_digest(selection: Sequence[PcrSelection], pcrs: Mapping[tuple[int, int], bytes],
               hash_alg: int) -> bytes:
    """The digest TPM2_Quote puts in pcrDigest: H(selected values, in the selection's order).

    Raises:
        AttestError: a selected PCR has no value, or one of the wrong size.
    """
    hname, _ = _hash_name(hash_alg, "signature.hash", "quote")
    h = hashlib.new(hname)
    for sel in selection:
        bank, size = HASH_ALGS[sel.hash_alg]
        for index in sel.indices:
            value = pcrs.get((sel.hash_alg, index))
            if value is None:
                raise AttestError(f"PCR values: PCR {index} ({bank}) is quoted but has no value")
            if len(value) != size:
                raise AttestError(f"PCR values: PCR {index} ({bank}) is {len(value)} bytes, not {size}")
            h.update(value)
    return h.digest()


def _first_mismatch(pcrs: Mapping[tuple[int, int], bytes],
                    expected: Mapping[tuple[int, int], bytes]) -> PcrMismatch | None:
    for alg, index in sorted(expected):
        seen = pcrs.get((alg, index))
        if seen != expected[(alg, index)]:
            return PcrMismatch(alg, index, expected[(alg, index)], seen)
    return None


def verify_quote(*, ak_public: bytes, attest: bytes, signature: bytes, pcr_values: bytes, nonce: bytes,
                 expected: Mapping[tuple[int, int], bytes]) -> QuoteResult:
    """Verify a quote end to end (see the module docstring for the order of checks).

    ``expected`` maps (bank hash algorithm, PCR index) to the value the node must show; a PCR
    outside it is reported in the result but not judged.  A PCR mismatch is a result (the node
    answered honestly about a boot we do not accept); everything else is an error.

    Raises:
        AttestError: a structure is malformed, the key is no attestation key, the signature or
            nonce is wrong, or the PCR values do not hash to the quoted digest.
    """
    public = parse_public(ak_public)
    check_attestation_key(public)
    sig = parse_signature(signature)
    _verify_signature(public, sig, attest)
    quote = parse_attest(attest)
    if quote.extra_data != nonce:
        raise AttestError(f"quote: extraData {quote.extra_data.hex()} is not the nonce sent ({nonce.hex()}): "
                          "a replayed or foreign quote")
    pcrs = split_pcr_values(quote.pcr_select, pcr_values)
    if pcr_digest(quote.pcr_select, pcrs, sig.hash_alg) != quote.pcr_digest:
        raise AttestError("quote: the PCR values sent do not hash to the quoted pcrDigest")
    return QuoteResult(quote, pcrs, _first_mismatch(pcrs, expected))


# ---------------------------------------------------------------------------------- a node's answer


@dataclass(frozen=True)
class Answer:
    """What a node sent back to ``Node/Attest`` (the fields of ``AttestResponse`` the verdict uses)."""

    attest: bytes
    signature: bytes
    pcr_values: bytes
    ak_public: bytes
    ak_certificate: bytes
    root_hash: str
    image_version: str = ""
    event_log: bytes = b""  # the firmware's (binary_bios_measurements); empty: none


@dataclass(frozen=True)
class Verdict:
    """One node's attestation: ``ok``, or the first reason it failed (and the PCR, for a mismatch)."""

    ok: bool
    reason: str
    root_hash: str
    image_version: str
    mismatch: PcrMismatch | None = None
    secure_boot: bool | None = None  # as the replayed event log shows it; None: not shown or not reached

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {"attested": self.ok, "reason": self.reason, "root_hash": self.root_hash,
                                  "image_version": self.image_version, "secure_boot": self.secure_boot}
        if self.mismatch is not None:
            doc["mismatch"] = {"pcr": self.mismatch.index, "bank": HASH_ALGS[self.mismatch.hash_alg][0],
                               "expected": self.mismatch.expected.hex(),
                               "seen": None if self.mismatch.seen is None else self.mismatch.seen.hex()}
        return doc


def expected_images(records: Iterable[Mapping[str, object]], origin: Sequence[str]) -> dict[str, bytes]:
    """Root hash -> the sha256 PCR 11 a boot of that image reaches ("ready", all four phases),
    from image-manifest.json or release.json documents (``origin[i]`` names ``records[i]`` in
    errors).

    Raises:
        AttestError: a document has no ``roothash`` or no ``pcr11`` record of the shape the build
            writes (an image built before it recorded PCR 11), or two disagree on one root hash.
    """
    out: dict[str, bytes] = {}
    for doc, where in zip(records, origin, strict=True):
        roothash = doc.get("roothash")
        record = doc.get("pcr11")
        phases = record.get("sha256") if isinstance(record, dict) else None
        if not isinstance(roothash, str) or not isinstance(phases, list) or not phases:
            raise AttestError(f"{where}: no roothash and pcr11.sha256 record (built before images "
                              "recorded their expected PCR 11?)")
        last = phases[-1]
        value = last.get("hash") if isinstance(last, dict) else None
        if not isinstance(last, dict) or last.get("phase") != ":".join(PHASES) or not isinstance(value, str):
            raise AttestError(f"{where}: pcr11.sha256 does not end with the phase {':'.join(PHASES)}")
        try:
            pcr = bytes.fromhex(value)
        except ValueError:
            raise AttestError(f"{where}: pcr11.sha256 hash {value!r} is not hex") from None
        if len(pcr) != 32:
            raise AttestError(f"{where}: pcr11.sha256 hash has {len(pcr)} bytes, expected 32")
        if out.get(roothash, pcr) != pcr:
            raise AttestError(f"{where}: root hash {roothash} has another expected PCR 11 than an "
                              "earlier document gave")
        out[roothash] = pcr
    return out


def check_ak_certificate(der: bytes, public: Public, site_ca: x509.Certificate, node: str, *,
                          now: datetime.datetime, crl: x509.CertificateRevocationList | None) -> str:
    """"" when ``der`` is a certificate the site CA issued for this AK and node, valid at ``now``,
    with the AK usage and not in ``crl``; else why not."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        return f"the AK certificate is not a certificate ({exc})"
    try:  # the node's bytes: cryptography parses names, extensions and keys when first read
        return (_issued_by_site(cert, site_ca, now) or _not_revoked(cert, crl)
                or _for_this_key_and_node(cert, public, node))
    except AttestError as exc:  # the AK's public area holds no valid key
        return str(exc)
    except (ValueError, UnsupportedAlgorithm) as exc:
        return f"the AK certificate cannot be read ({exc})"


def _issued_by_site(cert: x509.Certificate, site_ca: x509.Certificate, now: datetime.datetime) -> str:
    if cert.issuer != site_ca.subject:
        return f"the AK certificate's issuer is {cert.issuer.rfc4514_string()}, not the site CA"
    try:
        cert.verify_directly_issued_by(site_ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        return f"the AK certificate is not signed by the site CA ({exc or type(exc).__name__})"
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        return (f"the AK certificate is valid {cert.not_valid_before_utc:%Y-%m-%d} to "
                f"{cert.not_valid_after_utc:%Y-%m-%d}, not now")
    return ""


def _not_revoked(cert: x509.Certificate, crl: x509.CertificateRevocationList | None) -> str:
    entry = None if crl is None else crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    if entry is None:
        return ""
    return (f"the AK certificate (serial {cert.serial_number:x}) was revoked by the site CRL on "
            f"{entry.revocation_date_utc:%Y-%m-%d}")


def _for_this_key_and_node(cert: x509.Certificate, public: Public, node: str) -> str:
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = x509.ExtendedKeyUsage([])
    if AK_CERTIFICATE_USAGE not in usage:
        return ("the AK certificate lacks the attestation key usage (2.23.133.8.3): it was not "
                "issued for a TPM key (`appliance pki issue-ak`)")
    if cert.public_key() != public_key(public):
        return "the AK certificate is for another key than the one that signed the quote"
    names = {a.value for a in cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)}
    with contextlib.suppress(x509.ExtensionNotFound):
        names |= set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                     .get_values_for_type(x509.DNSName))
    if node not in names:
        return f"the AK certificate names {', '.join(sorted(map(str, names))) or 'nothing'}, not node {node}"
    return ""


@dataclass(frozen=True)
class Policy:
    """What the fleet accepts from a node: an AK certificate from ``site_ca`` (and not in its
    ``crl``, checked by the caller: :func:`provisioning.fleet.load_site_crl`), a boot of one of
    ``images`` (root hash -> expected PCR 11), and, with ``secure_boot`` (the default), firmware
    that booted with Secure Boot on, as the node's event log shows."""

    site_ca: x509.Certificate
    images: Mapping[str, bytes]
    crl: x509.CertificateRevocationList | None = None
    secure_boot: bool = True


def judge(answer: Answer, *, nonce: bytes, node: str, policy: Policy,
          now: datetime.datetime | None = None) -> Verdict:
    """Whether ``answer`` proves that ``node`` booted one of the policy's images: the AK
    certificate is the site CA's, current, not revoked, for the quote's key and for this node;
    the quote verifies (:func:`verify_quote`) with ``nonce``; the root hash the node names is a
    known image's, and PCR 11 is that image's value (the UKI it measures carries the root hash
    on its command line, so a node cannot claim another image than the one it booted); the
    firmware event log replays to the quoted PCRs 0-7, and (unless the policy waives it) shows
    Secure Boot on.  Never raises: every failure is a verdict with its reason."""
    try:
        secure_boot = _judged(answer, nonce, node, policy, now or datetime.datetime.now(datetime.UTC))
    except _RefusedError as exc:
        return Verdict(False, str(exc), answer.root_hash, answer.image_version, exc.mismatch, exc.secure_boot)
    return Verdict(True, "", answer.root_hash, answer.image_version, secure_boot=secure_boot)


class _RefusedError(Exception):
    def __init__(self, reason: str, mismatch: PcrMismatch | None = None,
                 secure_boot: bool | None = None) -> None:
        super().__init__(reason)
        self.mismatch = mismatch
        self.secure_boot = secure_boot


def _judged(answer: Answer, nonce: bytes, node: str, policy: Policy, now: datetime.datetime) -> bool | None:
    """:func:`judge`'s checks in order; returns Secure Boot's state, raises _RefusedError."""
    try:
        public = parse_public(answer.ak_public)
        why = check_ak_certificate(answer.ak_certificate, public, policy.site_ca, node, now=now,
                                    crl=policy.crl)
        if why:
            raise _RefusedError(why)
        expected = policy.images.get(answer.root_hash)
        if expected is None:
            raise _RefusedError(f"runs root hash {answer.root_hash or '(none)'}, which no expected image has")
        result = verify_quote(ak_public=answer.ak_public, attest=answer.attest, signature=answer.signature,
                              pcr_values=answer.pcr_values, nonce=nonce,
                              expected={(ALG_SHA256, 11): expected})
        if result.mismatch is not None:
            m = result.mismatch
            seen = "not quoted" if m.seen is None else m.seen.hex()
            raise _RefusedError(f"PCR {m.index} is {seen}, expected {m.expected.hex()} (the image with root "
                                f"hash {answer.root_hash}): it booted something else", m)
        secure_boot = _firmware(answer.event_log, result.pcrs)
    except AttestError as exc:
        raise _RefusedError(str(exc)) from None
    if policy.secure_boot and not secure_boot:
        raise _RefusedError("Secure Boot was off (PCR 7 measured SecureBoot = 0)" if secure_boot is False else
                            "the event log does not show Secure Boot's state (no SecureBoot variable in "
                            "PCR 7)", secure_boot=secure_boot)
    return secure_boot


def _firmware(log_bytes: bytes, quoted: Mapping[tuple[int, int], bytes]) -> bool | None:
    """Secure Boot's state from the node's firmware event log, once the log is shown to be the
    history of the quoted PCRs 0-7 (an empty log: none of them extended).

    Raises:
        AttestError: the log is malformed, or a PCR 0-7 is not quoted in sha256.
        _RefusedError: the log replays to another value than a quoted PCR's.
    """
    log = eventlog.parse_event_log(log_bytes) if log_bytes else eventlog.EventLog({ALG_SHA256: 32}, ())
    replayed = eventlog.replay(log, ALG_SHA256)
    for index in FIRMWARE_PCRS:
        seen = quoted.get((ALG_SHA256, index))
        if seen is None:
            raise AttestError(f"quote: PCR {index} (firmware) is not quoted in sha256")
        value = replayed.get(index, eventlog.initial(log, index, 32))
        if value != seen:
            raise _RefusedError(f"the firmware event log does not replay to the quoted PCR {index} (log "
                                f"{value.hex()}, quote {seen.hex()}): the log is not this boot's",
                                PcrMismatch(ALG_SHA256, index, value, seen))
    return eventlog.secure_boot(log, ALG_SHA256)
