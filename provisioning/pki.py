"""The site PKI: one CA (ECDSA P-256), node and client certificates, the certificates of nodes'
TPM attestation keys, a signed revocation list.

A PKI directory holds::

    ca.key        the CA's private key (PKCS#8 PEM, mode 0600, optionally passphrase-encrypted)
    ca.crt        the CA certificate: what nodes and fleet tools trust
    crl.pem       the signed revocation list; distribute it like any artifact (registry target)
    index.json    every certificate issued: serial, kind, name, role, validity, revocation
    issued/NAME/  NAME.crt, NAME.key (0600) and a copy of ca.crt, ready to install;
                  NAME.ak.crt for the node's attestation key (the key itself never leaves its TPM)

Client certificates carry their role in the subject OU (``OU=operator``); see
:mod:`agent.security` for why, and for how the agent checks it.  Changes to the directory
happen under an exclusive lock, and every file is written atomically.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fcntl
import ipaddress
import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.errors import ConfigError, NotFoundError, VerificationError
from agent.fsutil import atomic_write_bytes, atomic_write_text
from agent.security import ROLE_ATTRIBUTE, ROLES
from provisioning import attest

__all__ = [
    "REASONS",
    "CaInfo",
    "IssuedCert",
    "ca_info",
    "check_passphrase",
    "init_pki",
    "issue_attestation_key",
    "issue_client",
    "issue_node",
    "list_certs",
    "load_passphrase",
    "make_request",
    "revoke",
    "write_crl",
]

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_DNS = re.compile(r"^(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                  r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
REASONS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "key-compromise": x509.ReasonFlags.key_compromise,
    "superseded": x509.ReasonFlags.superseded,
    "cessation-of-operation": x509.ReasonFlags.cessation_of_operation,
    "affiliation-changed": x509.ReasonFlags.affiliation_changed,
}
CRL_DAYS = 30


@dataclasses.dataclass(frozen=True)
class CaInfo:
    directory: Path
    subject: str
    serial: int
    not_after: dt.datetime
    encrypted: bool
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"directory": str(self.directory), "subject": self.subject,
                "serial": f"{self.serial:x}", "not_after": _iso(self.not_after),
                "encrypted": self.encrypted, "sha256": self.sha256,
                "ca_cert": str(self.directory / "ca.crt"), "crl": str(self.directory / "crl.pem")}


@dataclasses.dataclass(frozen=True)
class IssuedCert:
    serial: int
    kind: str  # "node", "client" or "ak" (a node's TPM attestation key)
    name: str
    role: str | None
    subject: str
    not_before: dt.datetime
    not_after: dt.datetime
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    revoked_at: dt.datetime | None = None
    reason: str | None = None
    cert_path: str = ""
    key_path: str = ""

    def status(self, now: dt.datetime | None = None) -> str:
        now = now or dt.datetime.now(dt.UTC)
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if self.not_after < now else "valid"

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["serial"] = f"{self.serial:x}"
        out["dns"], out["ips"] = list(self.dns), list(self.ips)
        for k in ("not_before", "not_after", "revoked_at"):
            out[k] = _iso(out[k]) if out[k] is not None else None
        out["status"] = self.status()
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> IssuedCert:
        fields = dict(data)
        fields.pop("status", None)
        fields["serial"] = int(fields["serial"], 16)
        fields["dns"], fields["ips"] = tuple(fields["dns"]), tuple(fields["ips"])
        for k in ("not_before", "not_after", "revoked_at"):
            fields[k] = dt.datetime.fromisoformat(fields[k]) if fields[k] else None
        return cls(**fields)


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


# ------------------------------------------------------------------ passphrase and directory


def load_passphrase(file: Path | None = None, env: str | None = None) -> bytes | None:
    """The CA key's passphrase from a file (first line) or an environment variable, or None.

    Raises:
        NotFoundError: the file does not exist.
        ConfigError: both sources given, the variable is unset, or the passphrase is empty.
    """
    if file is not None and env is not None:
        raise ConfigError("give the passphrase by file or by environment variable, not both")
    if file is not None:
        try:
            text = file.read_text().splitlines()
        except FileNotFoundError:
            raise NotFoundError(f"{file}: passphrase file does not exist") from None
        value = text[0] if text else ""
        where = str(file)
    elif env is not None:
        if env not in os.environ:
            raise ConfigError(f"environment variable {env} (the passphrase) is not set")
        value, where = os.environ[env], f"${env}"
    else:
        return None
    if not value:
        raise ConfigError(f"{where}: the passphrase is empty")
    return value.encode()


@contextmanager
def _locked(directory: Path, *, new: bool = False) -> Iterator[None]:
    """Hold the directory's lock; unless ``new``, the directory must already hold a CA.

    Raises:
        NotFoundError: no CA in ``directory`` (and not ``new``).
    """
    if not new:
        _require(directory)  # before the lock file, which would otherwise need the directory
    with (directory / ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _require(directory: Path) -> None:
    if not (directory / "ca.crt").is_file() or not (directory / "ca.key").is_file():
        raise NotFoundError(f"{directory}: not a PKI directory (no ca.crt and ca.key); "
                            "run `appliance pki init` first")


def _read_index(directory: Path) -> dict[str, Any]:
    path = directory / "index.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFoundError(f"{path}: missing; the PKI directory is incomplete") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    return data


def _write_index(directory: Path, index: dict[str, Any]) -> None:
    atomic_write_text(directory / "index.json", json.dumps(index, indent=2, sort_keys=True) + "\n")


def _load_ca(directory: Path,
             passphrase: bytes | None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    _require(directory)
    cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    key_path = directory / "ca.key"
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=passphrase)
    except TypeError:
        if passphrase is None:
            raise ConfigError(f"{key_path}: the CA key is encrypted; give its passphrase "
                              "(--passphrase-file or --passphrase-env)") from None
        raise ConfigError(f"{key_path}: the CA key is not encrypted; drop the passphrase") from None
    except ValueError:
        raise VerificationError(f"{key_path}: wrong passphrase (or a damaged key file)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{key_path}: not an ECDSA key")
    return cert, key


def _key_pem(key: ec.EllipticCurvePrivateKey, passphrase: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase
        else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _ca_info(directory: Path) -> CaInfo:
    cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    return CaInfo(directory=directory, subject=cert.subject.rfc4514_string(),
                  serial=cert.serial_number, not_after=cert.not_valid_after_utc,
                  encrypted=b"ENCRYPTED" in (directory / "ca.key").read_bytes()[:64],
                  sha256=cert.fingerprint(hashes.SHA256()).hex())


# ------------------------------------------------------------------ operations


def init_pki(directory: Path, *, organization: str, days: int = 3650,
             passphrase: bytes | None = None) -> CaInfo:
    """Create the site CA (self-signed, path length 0) and an empty CRL in ``directory``.

    Raises:
        ConfigError: a CA already exists there, or ``days``/``organization`` is unusable.
    """
    if days <= 0:
        raise ConfigError(f"--days = {days}: must be positive")
    if not organization.strip():
        raise ConfigError("--organization must not be empty")
    if (directory / "ca.key").exists() or (directory / "ca.crt").exists():
        raise ConfigError(f"{directory}: a site CA already exists there; refusing to replace it")
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    with _locked(directory, new=True):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"{organization} site CA")])
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (x509.CertificateBuilder()
                .subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=True, crl_sign=True,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(ski, critical=False)
                .sign(key, hashes.SHA256()))
        atomic_write_bytes(directory / "ca.key", _key_pem(key, passphrase), mode=0o600)
        atomic_write_bytes(directory / "ca.crt", _pem(cert))
        _write_index(directory, {"organization": organization, "crl_number": 0, "certificates": []})
        _sign_crl(directory, cert, key, CRL_DAYS)
    return _ca_info(directory)


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ConfigError(f"name {name!r}: use 1-63 characters of [a-z0-9._-], starting with a "
                          "letter or digit")


_USAGE = {"node": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH,
          "ak": attest.AK_CERTIFICATE_USAGE}


def _issue(directory: Path, *, kind: str, name: str, role: str | None, dns: Sequence[str],
           ips: Sequence[str], days: int, passphrase: bytes | None, out: Path | None,
           valid_from: dt.datetime | None,
           requested: ec.EllipticCurvePublicKey | rsa.RSAPublicKey | None = None) -> IssuedCert:
    """A certificate of ``kind`` for ``requested`` (a key made elsewhere, whose private half this
    side never sees), or for a key made here and written beside it."""
    _check_name(name)
    if days <= 0:
        raise ConfigError(f"--days = {days}: must be positive")
    addresses = []
    for ip in ips:
        try:
            addresses.append(ipaddress.ip_address(ip))
        except ValueError:
            raise ConfigError(f"--ip {ip!r}: not an IPv4 or IPv6 address") from None
    for host in dns:
        if not _DNS.match(host) or len(host) > 253:
            raise ConfigError(f"--dns {host!r}: not a DNS name")
    with _locked(directory):
        ca_cert, ca_key = _load_ca(directory, passphrase)
        index = _read_index(directory)
        start = (valid_from or _now()).astimezone(dt.UTC)
        not_before, not_after = start - dt.timedelta(minutes=5), start + dt.timedelta(days=days)
        if not_after > ca_cert.not_valid_after_utc:
            raise ConfigError(f"--days = {days}: the certificate would outlive the site CA "
                              f"(valid until {_iso(ca_cert.not_valid_after_utc)})")
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, index["organization"])]
        if role is not None:
            attrs.append(x509.NameAttribute(ROLE_ATTRIBUTE, role))
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, name))
        key = None if requested is not None else ec.generate_private_key(ec.SECP256R1())
        public_key = requested if requested is not None else key.public_key()  # type: ignore[union-attr]
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name(attrs)).issuer_name(ca_cert.subject)
                   .public_key(public_key).serial_number(x509.random_serial_number())
                   .not_valid_before(not_before).not_valid_after(not_after)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                                key_encipherment=False, data_encipherment=False,
                                                key_agreement=False, key_cert_sign=False,
                                                crl_sign=False, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([_USAGE[kind]]), critical=False)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                                  critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       ca_key.public_key()), critical=False))
        sans: list[x509.GeneralName] = [x509.DNSName(h) for h in dns]
        sans += [x509.IPAddress(a) for a in addresses]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        dest = out or directory / "issued" / name
        dest.mkdir(parents=True, exist_ok=True)
        stem = f"{name}.ak" if kind == "ak" else name  # beside the same node's TLS certificate
        cert_path, key_path = dest / f"{stem}.crt", dest / f"{stem}.key"
        if key is not None:
            atomic_write_bytes(key_path, _key_pem(key), mode=0o600)
        atomic_write_bytes(cert_path, _pem(cert))
        atomic_write_bytes(dest / "ca.crt", _pem(ca_cert))
        issued = IssuedCert(serial=cert.serial_number, kind=kind, name=name, role=role,
                            subject=cert.subject.rfc4514_string(), not_before=not_before,
                            not_after=not_after, dns=tuple(dns), ips=tuple(str(a) for a in addresses),
                            cert_path=str(cert_path), key_path=str(key_path) if key is not None else "")
        index["certificates"].append(issued.to_json())
        _write_index(directory, index)
    return issued


def issue_node(directory: Path, name: str, *, dns: Sequence[str] = (), ips: Sequence[str] = (),
               days: int = 365, passphrase: bytes | None = None, out: Path | None = None,
               valid_from: dt.datetime | None = None, csr: bytes | None = None) -> IssuedCert:
    """Issue a node (server) certificate for ``name`` with DNS/IP subject alternative names.

    With no ``dns`` given, ``name`` itself is the one DNS name.  With ``csr`` (PEM, from
    :func:`make_request` on the node) the certificate is for the request's key, whose
    private half never left the node; no key is written.  The request's subject and
    extensions are ignored: the CA decides the names.

    Raises:
        ConfigError: bad name, DNS name, IP address or validity; wrong/missing passphrase.
        NotFoundError: ``directory`` holds no CA.
        VerificationError: the passphrase does not decrypt the CA key.
    """
    return _issue(directory, kind="node", name=name, role=None, dns=tuple(dns) or (name,),
                  ips=ips, days=days, passphrase=passphrase, out=out, valid_from=valid_from,
                  requested=_requested_key(csr) if csr is not None else None)


def issue_attestation_key(directory: Path, name: str, ak_public: bytes, *, dns: Sequence[str] = (),
                          days: int = 365, passphrase: bytes | None = None, out: Path | None = None,
                          valid_from: dt.datetime | None = None) -> IssuedCert:
    """Certify node ``name``'s TPM attestation key: ``ak_public`` is its TPM2B_PUBLIC as
    ``appliance agent attest-key`` wrote it on the node.  The key must be a restricted signing
    key bound to its TPM (:func:`provisioning.attest.check_attestation_key`): only such a key
    cannot be made to sign a quote the TPM did not make.  The certificate names the node (CN
    and DNS names) and carries the TCG's AK certificate usage, which ``fleet attest`` requires,
    so the node's TLS certificate (same CA, same name, a key outside the TPM) never passes for
    one.  Written as ``NAME.ak.crt``.

    Raises:
        AttestError: ``ak_public`` is no TPM2B_PUBLIC or no attestation key.
        ConfigError, NotFoundError, VerificationError: as :func:`issue_node`.
    """
    public = attest.parse_public(ak_public)
    attest.check_attestation_key(public)
    return _issue(directory, kind="ak", name=name, role=None, dns=tuple(dns) or (name,), ips=(),
                  days=days, passphrase=passphrase, out=out, valid_from=valid_from,
                  requested=attest.public_key(public))


def _requested_key(csr: bytes) -> ec.EllipticCurvePublicKey:
    try:
        request = x509.load_pem_x509_csr(csr)
    except ValueError as exc:
        raise ConfigError(f"--csr: not a PEM certificate signing request: {exc}") from None
    if not request.is_signature_valid:
        raise VerificationError("--csr: the request's signature does not verify")
    key = request.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ConfigError("--csr: the request's key must be ECDSA P-256 (what `appliance pki request` makes)")
    return key


def make_request(name: str, key_path: Path, csr_path: Path) -> bool:
    """On the node: a private key at ``key_path`` (mode 0600, made once, kept) and a
    certificate signing request for it at ``csr_path``.  Only the request leaves the node.
    Returns whether a new key was made.

    Raises:
        ConfigError: bad name, or ``key_path`` holds no usable P-256 key.
    """
    _check_name(name)
    made = False
    try:
        loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError:
        loaded = ec.generate_private_key(ec.SECP256R1())
        made = True
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{key_path}: not an unencrypted PEM private key: {exc}") from None
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{key_path}: not an ECDSA key")
    request = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .sign(loaded, hashes.SHA256()))
    # The request first: a new key is kept only once its request is written, so a failure
    # leaves neither (a request for a key that was never kept would be useless).
    atomic_write_bytes(csr_path, request.public_bytes(serialization.Encoding.PEM))
    if made:
        try:
            key_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(key_path, _key_pem(loaded), mode=0o600)
        except BaseException:
            csr_path.unlink(missing_ok=True)
            raise
    return made


def issue_client(directory: Path, name: str, role: str, *, days: int = 90,
                 passphrase: bytes | None = None, out: Path | None = None,
                 valid_from: dt.datetime | None = None) -> IssuedCert:
    """Issue a client certificate for person or tool ``name`` carrying ``role`` (subject OU).

    Raises:
        ConfigError: unknown role, bad name or validity; wrong/missing passphrase.
        NotFoundError: ``directory`` holds no CA.
        VerificationError: the passphrase does not decrypt the CA key.
    """
    if role not in ROLES:
        raise ConfigError(f"--role {role!r}: expected one of {', '.join(ROLES)}")
    return _issue(directory, kind="client", name=name, role=role, dns=(), ips=(), days=days,
                  passphrase=passphrase, out=out, valid_from=valid_from)


def list_certs(directory: Path) -> list[IssuedCert]:
    """Every certificate issued from ``directory``, oldest first.

    Raises:
        NotFoundError: no CA or index there.
        ConfigError: the index is damaged.
    """
    _require(directory)
    return [IssuedCert.from_json(c) for c in _read_index(directory)["certificates"]]


def _match(certs: list[dict[str, Any]], which: str) -> list[int]:
    """Indexes of the certificates ``which`` names: a hex serial, or a name (all its certs)."""
    by_serial = [i for i, c in enumerate(certs) if c["serial"] == which.lower().removeprefix("0x")]
    if by_serial:
        return by_serial
    return [i for i, c in enumerate(certs) if c["name"] == which]


def revoke(directory: Path, which: str, *, reason: str = "unspecified",
           passphrase: bytes | None = None, crl_days: int = CRL_DAYS) -> list[IssuedCert]:
    """Revoke the certificate with serial ``which`` (hex), or every one issued to name ``which``;
    re-sign the CRL.  Revoking an already revoked certificate changes nothing.

    Raises:
        NotFoundError: nothing issued matches ``which``; no CA in ``directory``.
        ConfigError: unknown reason; wrong/missing passphrase.
        VerificationError: the passphrase does not decrypt the CA key.
    """
    if reason not in REASONS:
        raise ConfigError(f"--reason {reason!r}: expected one of {', '.join(REASONS)}")
    with _locked(directory):
        ca_cert, ca_key = _load_ca(directory, passphrase)
        index = _read_index(directory)
        found = _match(index["certificates"], which)
        if not found:
            raise NotFoundError(f"{directory}: no certificate with serial or name {which!r} "
                                "(see `appliance pki list`)")
        now = _iso(_now())
        for i in found:
            entry = index["certificates"][i]
            if not entry.get("revoked_at"):
                entry["revoked_at"], entry["reason"] = now, reason
        _write_index(directory, index)
        _sign_crl(directory, ca_cert, ca_key, crl_days)
        return [IssuedCert.from_json(index["certificates"][i]) for i in found]


def write_crl(directory: Path, *, passphrase: bytes | None = None, days: int = CRL_DAYS) -> Path:
    """Re-sign ``crl.pem`` (fresh next-update time, same revocations); return its path.

    Raises:
        ConfigError, NotFoundError, VerificationError: as for :func:`revoke`.
    """
    if days <= 0:
        raise ConfigError(f"--days = {days}: must be positive")
    with _locked(directory):
        ca_cert, ca_key = _load_ca(directory, passphrase)
        return _sign_crl(directory, ca_cert, ca_key, days)


def _sign_crl(directory: Path, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
              days: int) -> Path:
    index = _read_index(directory)
    index["crl_number"] = int(index.get("crl_number", 0)) + 1
    now = _now()
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(ca_cert.subject).last_update(now)
               .next_update(now + dt.timedelta(days=days))
               .add_extension(x509.CRLNumber(index["crl_number"]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    for entry in index["certificates"]:
        if entry.get("revoked_at"):
            revoked = (x509.RevokedCertificateBuilder()
                       .serial_number(int(entry["serial"], 16))
                       .revocation_date(dt.datetime.fromisoformat(entry["revoked_at"]))
                       .add_extension(x509.CRLReason(REASONS[entry.get("reason") or "unspecified"]),
                                      critical=False)
                       .build())
            builder = builder.add_revoked_certificate(revoked)
    crl = builder.sign(ca_key, hashes.SHA256())
    path = directory / "crl.pem"
    atomic_write_bytes(path, crl.public_bytes(serialization.Encoding.PEM))
    _write_index(directory, index)
    return path


def check_passphrase(directory: Path, passphrase: bytes | None) -> None:
    """Fail now, not at the first of many issues, when the CA key cannot be opened.

    Raises:
        NotFoundError: no CA in ``directory``; ConfigError, VerificationError: as :func:`issue_node`.
    """
    _load_ca(directory, passphrase)


def ca_info(directory: Path) -> CaInfo:
    """Facts about the CA in ``directory``.

    Raises:
        NotFoundError: no CA there.
    """
    _require(directory)
    return _ca_info(directory)
