"""The agent's gRPC surface: mTLS with the site CA, roles from client certificates, limits.

The agent server calls three functions::

    server = grpc.aio.server(options=server_options(cfg), interceptors=interceptors(cfg),
                             maximum_concurrent_rpcs=maximum_concurrent_rpcs(cfg))
    creds = server_credentials(cfg)      # None: loopback without TLS
    address = f"{cfg.server.listen}:{cfg.server.port}"
    server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)

**Identity.** A client certificate must chain to the site CA (checked by the TLS layer, which
also refuses expired certificates and connections without one), carry the clientAuth extended
key usage, not be listed in the site's CRL, and carry exactly one role in its subject
*organizationalUnitName* (``OU=observer``, ``OU=operator`` or ``OU=admin``).  OU rather than a
private extension: any CA tool (openssl, step-ca, an enterprise CA) can issue it, every
certificate viewer shows it, and a private extension would need an enterprise OID arc that a
site does not have.  The CA is the site's own, so nothing outside the site can mint an OU.

**Authorization** is one interceptor (:class:`AccessInterceptor`) and one table
(:data:`METHOD_ROLES`); roles are ordered observer < operator < admin, and a method the table
does not name needs admin (configuration, and anything added later until it is classified).
Every decision is an audit line on the ``agent.audit`` logger: denials at WARNING, allowed
calls at DEBUG, naming the certificate subject, serial, method, peer and decision.

**Limits** (agent.toml ``[limits]``; message sizes are ``[server] max_message_bytes``):
enforced by gRPC core: message and metadata sizes (RESOURCE_EXHAUSTED), concurrent streams
per connection, total incoming connections, handshake timeout, keepalive and ping-abuse
policy (GOAWAY), idle connections, calls in progress or queued (``maximum_concurrent_rpcs``,
RESOURCE_EXHAUSTED).  Enforced by the interceptor: calls in progress per peer address
(RESOURCE_EXHAUSTED), calls in progress overall (again, for servers built without
``maximum_concurrent_rpcs``), and the deadline cap (DEADLINE_EXCEEDED).  Not enforced: the
number of *connections* per peer address; gRPC Python offers no hook at accept time, so that
belongs in the node's firewall (nftables ``ct count``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import inspect
import ipaddress
import logging
import ssl
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.config import AgentConfig, LimitsSection
from agent.errors import ApplianceError, ConfigError, NotFoundError, VerificationError
from agent.fsutil import atomic_write_bytes

__all__ = [
    "METHOD_ROLES",
    "ROLES",
    "ROLE_ATTRIBUTE",
    "X509_ERRORS",
    "AccessInterceptor",
    "CallLimits",
    "ClientTls",
    "CrlFacts",
    "CrlRollbackError",
    "Identity",
    "RevocationList",
    "admitted",
    "audit_decision",
    "caller_of",
    "check_listen",
    "client_identity",
    "client_tls",
    "crl_facts",
    "crl_rollback",
    "identity_of",
    "interceptors",
    "is_loopback",
    "maximum_concurrent_rpcs",
    "metrics_tls",
    "refusal",
    "required_role",
    "role_allows",
    "role_of",
    "server_credentials",
    "server_options",
]

log = logging.getLogger("agent.security")
audit = logging.getLogger("agent.audit")

ROLES: tuple[str, ...] = ("observer", "operator", "admin")
_RANK = {role: n for n, role in enumerate(ROLES)}
# Where a client certificate carries its role (see the module docstring for why OU).
ROLE_ATTRIBUTE = NameOID.ORGANIZATIONAL_UNIT_NAME

_INFERENCE = "/inference.GRPCInferenceService/"
_NODE = "/appliance.v1.Node/"

# Fully qualified method (or service prefix ending in "/") -> the least role that may call it.
METHOD_ROLES: Mapping[str, str] = {
    # KServe v2 / Triton: inference and model status for everyone with a role ...
    _INFERENCE: "observer",
    # ... changing what is loaded is an operator's job, server settings an admin's.
    _INFERENCE + "RepositoryModelLoad": "operator",
    _INFERENCE + "RepositoryModelUnload": "operator",
    _INFERENCE + "TraceSetting": "admin",
    _INFERENCE + "LogSettings": "admin",
    "/grpc.health.v1.Health/": "observer",
    "/grpc.reflection.v1alpha.ServerReflection/": "observer",
    "/grpc.reflection.v1.ServerReflection/": "observer",
    _NODE + "GetHealth": "observer",
    _NODE + "WatchHealth": "observer",
    _NODE + "GetInventory": "observer",
    _NODE + "GetEvents": "observer",
    _NODE + "UpdateHistory": "observer",
    _NODE + "Attest": "observer",  # a quote tells what the node booted: what inventory tells
    _NODE + "EnrolAttestation": "admin",  # sets what the node's quotes are trusted by
    _NODE + "Unseal": "admin",  # the recovery key: enrols the TPM to the data partition again
    _NODE + "CheckUpdates": "operator",
    _NODE + "ApplyUpdate": "operator",
    _NODE + "Rollback": "admin",
    # The HTTPS port's OpenAI-compatible routes (agent.web.openai_api): generation and
    # embeddings are inference, for everyone with a role.
    "/openai.v1/": "observer",
}


def required_role(method: str) -> str:
    """The least role allowed to call ``method`` (``/package.Service/Method``); unlisted: admin."""
    if method in METHOD_ROLES:
        return METHOD_ROLES[method]
    service = method[: method.rfind("/") + 1]
    return METHOD_ROLES.get(service, "admin") if service else "admin"


def role_of(cert: x509.Certificate) -> str | None:
    """The role a client certificate carries (exactly one known OU value), or None."""
    values = [a.value for a in cert.subject.get_attributes_for_oid(ROLE_ATTRIBUTE)]
    roles = [v for v in values if v in _RANK]
    return str(roles[0]) if len(roles) == 1 and len(values) == 1 else None


# What cryptography raises for malformed DER, much of it parsed lazily on first access:
# ValueError; InvalidVersion for a version other than v1/v3 (certificates) or v1/v2
# (CRLs); DuplicateExtension and UnsupportedGeneralNameType for extensions; TypeError for
# a name attribute of the wrong ASN.1 type; UnsupportedAlgorithm for a key of an unknown
# type or curve.  None of those but ValueError is a ValueError.
X509_ERRORS = (ValueError, TypeError, x509.InvalidVersion, x509.DuplicateExtension,
               x509.UnsupportedGeneralNameType, UnsupportedAlgorithm)


@dataclasses.dataclass(frozen=True)
class Identity:
    """Who is calling: from the client certificate, or the loopback stand-in without TLS."""

    subject: str
    serial: int | None
    role: str | None
    not_after: dt.datetime | None = None
    client_auth: bool = True
    problem: str = ""  # non-empty: refuse with UNAUTHENTICATED

    @property
    def serial_hex(self) -> str:
        return "-" if self.serial is None else f"{self.serial:x}"


def identity_of(cert: x509.Certificate) -> Identity:
    """The :class:`Identity` a certificate asserts (revocation is checked separately)."""
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        client_auth = ExtendedKeyUsageOID.CLIENT_AUTH in eku
    except x509.ExtensionNotFound:
        client_auth = False
    problem = "" if client_auth else "certificate is not for client authentication (no clientAuth usage)"
    return Identity(subject=cert.subject.rfc4514_string(), serial=cert.serial_number,
                    role=role_of(cert), not_after=cert.not_valid_after_utc,
                    client_auth=client_auth, problem=problem)


def role_allows(role: str | None, need: str) -> bool:
    """Whether ``role`` (None: no role) ranks at least ``need`` (observer < operator < admin)."""
    return role is not None and _RANK[role] >= _RANK[need]


def refusal(ident: Identity, method: str, *, tls: bool = True) -> tuple[str, str] | None:
    """Why ``ident`` may not call ``method``, as (status code name, reason), or None when it
    may: the one access decision of every port (``UNAUTHENTICATED`` for a certificate with a
    ``problem``, ``PERMISSION_DENIED`` for a missing or too low role).  ``tls`` False: the
    caller is a loopback client without TLS."""
    if ident.problem:
        return "UNAUTHENTICATED", ident.problem
    need = required_role(method)
    if ident.role is None:
        reason = (f"certificate carries no role (one OU of {', '.join(ROLES)})"
                  if tls else "loopback callers are refused ([tls] loopback_role = 'none')")
        return "PERMISSION_DENIED", reason
    if not role_allows(ident.role, need):
        return "PERMISSION_DENIED", f"role {ident.role} may not call {method} (needs {need})"
    return None


def admitted(ident: Identity, crl: RevocationList | None) -> Identity:
    """``ident`` with its ``problem`` set when the certificate has expired or the site CRL
    revokes it: the checks every port makes on every call, whatever the transport."""
    if ident.problem:
        return ident
    if ident.not_after is not None and ident.not_after < dt.datetime.now(dt.UTC):
        return dataclasses.replace(ident, problem=f"certificate expired at {ident.not_after}")
    if crl is not None and ident.serial is not None and crl.is_revoked(ident.serial):
        return dataclasses.replace(ident, problem="certificate is revoked")
    return ident


def audit_decision(level: int, decision: str, method: str, ident: Identity, peer: str, *,
                   reason: str) -> None:
    """The audit line of one access decision, the same for every port."""
    if audit.isEnabledFor(level):
        audit.log(level, "audit decision=%s method=%s subject=%r serial=%s role=%s peer=%s reason=%r",
                  decision, method, ident.subject, ident.serial_hex, ident.role or "-", peer, reason)


def caller_of(context: grpc.aio.ServicerContext) -> Identity:
    """Who made an RPC the interceptor already admitted (for accounting, not for decisions):
    the client certificate's identity, or the loopback caller when the port has no TLS."""
    pems = context.auth_context().get("x509_pem_cert") or []
    if not pems:
        return Identity(subject="loopback (no TLS)", serial=None, role=None)
    return client_identity(pems[0])


def client_identity(pem: bytes) -> Identity:
    """The :class:`Identity` of a client's PEM certificate as TLS handed it over; one that
    cannot be parsed gives an identity with a ``problem`` (refused as UNAUTHENTICATED)."""
    try:
        return identity_of(x509.load_pem_x509_certificate(pem))
    except X509_ERRORS:
        return Identity(subject="(unparsable)", serial=None, role=None,
                        problem="client certificate cannot be parsed")


# ------------------------------------------------------------------ listening and credentials


def is_loopback(listen: str) -> bool:
    """True when ``listen`` (an address or host name) only reaches this machine."""
    host = listen.strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def _tls_files(config: AgentConfig) -> dict[str, Path | None]:
    tls = config.tls
    return {"cert": tls.cert, "key": tls.key, "ca": tls.ca}


def check_listen(config: AgentConfig) -> bool:
    """Whether the agent will use TLS; refuse a listener beyond loopback without it.

    Raises:
        ConfigError: ``[server] listen`` is beyond loopback and ``[tls]`` cert/key/ca are not
            all set, or only some of them are set.
    """
    files = _tls_files(config)
    missing = [name for name, path in files.items() if path is None]
    origin = config.origin
    if missing and len(missing) < len(files):
        raise ConfigError(f"{origin}: [tls] sets {', '.join(k for k in files if k not in missing)} "
                          f"but not {', '.join(missing)}: mTLS needs cert, key and ca")
    if missing and not is_loopback(config.server.listen):
        raise ConfigError(
            f"{origin}: [server] listen = {config.server.listen!r} is beyond loopback, and the agent "
            "refuses to listen there without mTLS: set [tls] cert, key and ca "
            "(`appliance pki issue-node`), or listen on 127.0.0.1")
    return not missing


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"{path}: [tls] {what}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: [tls] {what}: cannot read: {exc.strerror}") from None


def _load_cert(path: Path, what: str) -> x509.Certificate:
    try:
        cert = x509.load_pem_x509_certificate(_read(path, what))
        cert.public_key()  # parsed lazily: a key the certificate cannot hold fails here
    except X509_ERRORS as exc:
        raise ConfigError(f"{path}: [tls] {what}: not a PEM certificate ({exc})") from None
    return cert


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (*X509_ERRORS, InvalidSignature):
        return False
    return True


def _check_material(config: AgentConfig) -> tuple[bytes, bytes, bytes]:
    """Read and cross-check cert, key and CA; return their PEM bytes."""
    tls = config.tls
    assert tls.cert is not None and tls.key is not None and tls.ca is not None
    ca = _load_cert(tls.ca, "ca")
    cert = _load_cert(tls.cert, "cert")
    key_pem = _read(tls.key, "key")
    mode = stat.S_IMODE(tls.key.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(f"{tls.key}: [tls] key is readable by others (mode {mode:04o}); "
                          "chmod 600 it")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{tls.key}: [tls] key: not an unencrypted PEM private key ({exc})") from None
    if key.public_key().public_bytes(serialization.Encoding.DER,
                                     serialization.PublicFormat.SubjectPublicKeyInfo) != \
            cert.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo):
        raise ConfigError(f"{tls.key}: [tls] key does not belong to certificate {tls.cert}")
    if not _signed_by(cert, ca):
        raise VerificationError(f"{tls.cert}: [tls] cert is not issued by the CA in {tls.ca}")
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise VerificationError(
            f"{tls.cert}: [tls] cert is valid from {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} "
            f"to {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}, not now ({now:%Y-%m-%dT%H:%M:%SZ})")
    return cert.public_bytes(serialization.Encoding.PEM), key_pem, _read(tls.ca, "ca")


def server_credentials(config: AgentConfig) -> grpc.ServerCredentials | None:
    """mTLS credentials (client certificate required, site CA), or None on plain loopback.

    Raises:
        ConfigError: listening beyond loopback without TLS material, a partial [tls] section,
            unreadable or malformed files, a key readable by others or not matching the cert.
        NotFoundError: a [tls] file does not exist.
        VerificationError: the node certificate is not from the CA, or expired / not yet valid.
    """
    if not check_listen(config):
        return None
    cert_pem, key_pem, ca_pem = _check_material(config)
    if config.tls.crl is not None:
        RevocationList(config.tls.crl, x509.load_pem_x509_certificate(ca_pem))  # fail early
    return grpc.ssl_server_credentials([(key_pem, cert_pem)], root_certificates=ca_pem,
                                       require_client_auth=True)


@dataclasses.dataclass(frozen=True)
class ClientTls:
    """An HTTPS port's TLS with the gRPC port's rules: ``context`` (TLS 1.2+, a client
    certificate from the site CA required) and :meth:`identify`, the identity a client
    certificate gives, expiry and the site CRL checked (:func:`admitted`)."""

    context: ssl.SSLContext
    crl: RevocationList | None

    @staticmethod
    def parse(der: bytes | None) -> Identity:
        """The :class:`Identity` a client certificate (DER, as TLS handed it over) asserts;
        ``problem`` is set when it is missing, unparsable or not for clients."""
        if der is None:
            return Identity(subject="(no certificate)", serial=None, role=None,
                            problem="no client certificate")
        try:
            return identity_of(x509.load_der_x509_certificate(der))
        except X509_ERRORS:
            return Identity(subject="(unparsable)", serial=None, role=None,
                            problem="client certificate cannot be parsed")

    def identify(self, der: bytes | None) -> Identity:
        """:meth:`parse`, then expiry and the site CRL checked now (:func:`admitted`)."""
        return admitted(self.parse(der), self.crl)


def client_tls(config: AgentConfig, crl: RevocationList | None = None) -> ClientTls | None:
    """TLS for an HTTPS port (metrics, the HTTP API) with the gRPC port's rules, or None on
    loopback without TLS.  ``crl`` is the gRPC port's revocation list
    (:attr:`AccessInterceptor.revocation`), so that every port enforces the one list in force,
    rollback refusal and its persistence included; without it the file is read afresh.

    Raises:
        the errors of :func:`server_credentials`.
    """
    if server_credentials(config) is None:
        return None
    tls = config.tls
    assert tls.cert is not None and tls.key is not None and tls.ca is not None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # No session tickets (TLS 1.3's num_tickets, TLS 1.2's OP_NO_TICKET): a ticket is the
    # session's secrets sealed under a key this process holds for its lifetime, so whoever
    # reads that key can decrypt recorded sessions (no forward secrecy).  The clients of these
    # ports (the openai and Triton clients, scrapers) never resume one, and issuing two per
    # connection cost a quarter of the server's handshake CPU (0.3 of 1.26 ms here).
    ctx.num_tickets = 0
    ctx.options |= ssl.OP_NO_TICKET
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    ctx.load_verify_locations(cafile=str(tls.ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    if crl is None and tls.crl is not None:
        crl = RevocationList(tls.crl, _load_cert(tls.ca, "ca"))
    return ClientTls(ctx, crl)


def metrics_tls(config: AgentConfig, crl: RevocationList | None = None,
                ) -> tuple[ssl.SSLContext, Callable[[bytes], str | None]] | None:
    """What the metrics port needs to speak HTTPS with the gRPC port's rules, or None on loopback.

    Returns an SSL context and an admission check for the client certificate (DER): the
    reason it is refused (expired, revoked by the site CRL, no role), or None; see
    :func:`client_tls` for ``crl``.

    Raises:
        the errors of :func:`server_credentials`.
    """
    tls = client_tls(config, crl)
    if tls is None:
        return None

    def admit(der: bytes) -> str | None:
        ident = tls.identify(der)
        if ident.problem:
            return ident.problem
        if ident.role is None:
            return f"certificate carries no role (one OU of {', '.join(ROLES)})"
        return None

    return tls.context, admit


def server_options(config: AgentConfig, *, shared_port: bool = False) -> list[tuple[str, Any]]:
    """gRPC core channel arguments for the server, from ``[server]`` and ``[limits]``;
    ``shared_port``: one of the agent's worker processes, which all bind the gRPC port."""
    lim = config.limits
    size = config.server.max_message_bytes

    def ms(seconds: float) -> int:
        return int(seconds * 1000)

    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.max_metadata_size", lim.max_metadata_bytes),
        ("grpc.absolute_max_metadata_size", lim.max_metadata_bytes),
        ("grpc.max_allowed_incoming_connections", lim.max_connections),
        ("grpc.max_concurrent_streams", lim.max_concurrent_streams),
        ("grpc.server_handshake_timeout_ms", ms(lim.handshake_timeout_s)),
        ("grpc.keepalive_time_ms", ms(lim.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", ms(lim.keepalive_timeout_s)),
        ("grpc.http2.min_ping_interval_without_data_ms", ms(lim.min_ping_interval_s)),
        ("grpc.http2.max_ping_strikes", lim.max_ping_strikes),
        ("grpc.keepalive_permit_without_calls", int(lim.permit_keepalive_without_calls)),
        # Without this, a second process of the same user could bind the port beside us; the
        # agent's own worker processes (agent.workers) share it on purpose.
        ("grpc.so_reuseport", int(shared_port)),
    ]
    if lim.max_connection_idle_s:
        options.append(("grpc.max_connection_idle_ms", ms(lim.max_connection_idle_s)))
    return options


def maximum_concurrent_rpcs(config: AgentConfig) -> int:
    """The ``maximum_concurrent_rpcs`` argument of ``grpc.aio.server`` (queue depth)."""
    return config.limits.max_concurrent_rpcs


def interceptors(config: AgentConfig) -> list[grpc.aio.ServerInterceptor]:
    """The server's interceptors: one, doing identity, revocation, roles, audit and limits.

    Raises:
        ConfigError, NotFoundError, VerificationError: the CA or CRL cannot be loaded.
    """
    return [AccessInterceptor(config)]


# ------------------------------------------------------------------ revocation


@dataclasses.dataclass(frozen=True)
class CrlFacts:
    """What orders two CRLs of one CA: the CRL Number extension, then thisUpdate."""

    number: int | None
    this_update: dt.datetime
    digest: str  # sha256 of the DER

    def describe(self) -> str:
        number = "no CRL number" if self.number is None else f"CRL number {self.number}"
        return f"{number}, thisUpdate {self.this_update.isoformat()}"


def crl_facts(crl: x509.CertificateRevocationList) -> CrlFacts:
    try:
        number: int | None = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = None
    return CrlFacts(number, crl.last_update_utc,
                    hashlib.sha256(crl.public_bytes(serialization.Encoding.DER)).hexdigest())


def crl_rollback(offered: CrlFacts, held: CrlFacts) -> str | None:
    """Why ``offered`` must not replace ``held`` (it is older, or a second list under the same
    number), or None when it may.  An older genuine CRL would un-revoke certificates."""
    if offered.digest == held.digest:
        return None
    if held.number is not None and (offered.number is None or offered.number < held.number):
        return f"it is older than the list in force ({offered.describe()} < {held.describe()})"
    if offered.this_update < held.this_update:
        return f"it was issued before the list in force ({offered.describe()} < {held.describe()})"
    if offered.number is not None and offered.number == held.number:
        return (f"it carries the CRL number of the list in force with other contents "
                f"({offered.describe()} vs {held.describe()})")
    return None


class CrlRollbackError(VerificationError):
    """A genuine CRL older than the one in force (refused: it would un-revoke certificates)."""

    def __init__(self, message: str, offered: CrlFacts, held: CrlFacts) -> None:
        super().__init__(message)
        self.offered = offered
        self.held = held




class RevocationList:
    """The site CRL: signature checked against the CA; re-read when the file changes.

    A stale CRL (past its next update) is still enforced, with a warning: the revoked
    serials it lists stay revoked, and an offline node must not lock its managers out.
    A replacement that fails to parse or verify is ignored (logged) and the old list kept;
    so is a genuine one older than the list in force (lower CRL number, or earlier
    thisUpdate: :func:`crl_rollback`), which is also an event ``tls.crl.refused``.  With
    :meth:`attach`, the list in force is kept under the state directory too, so a restart
    does not forget it.
    """

    _RECHECK_S = 2.0

    def __init__(self, path: Path, ca: x509.Certificate) -> None:
        self.path = path
        self._ca = ca
        self._revoked: frozenset[int] = frozenset()
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self.next_update: dt.datetime | None = None
        self.facts: CrlFacts | None = None
        self._in_force: x509.CertificateRevocationList | None = None
        self._events: Any = None
        self._held_path: Path | None = None
        self._load()  # raises on the first load: a bad CRL at start-up is a config error

    def _parse(self, data: bytes, where: Path) -> x509.CertificateRevocationList:
        public = self._ca.public_key()
        try:
            crl = x509.load_pem_x509_crl(data)
            # The issuer and the signature algorithm are parsed lazily: malformed ones fail here.
            genuine = crl.issuer == self._ca.subject and isinstance(public, ec.EllipticCurvePublicKey) \
                and crl.is_signature_valid(public)
        except X509_ERRORS as exc:
            raise ConfigError(f"{where}: [tls] crl: not a PEM revocation list ({exc})") from None
        if not genuine:
            raise VerificationError(f"{where}: [tls] crl is not signed by the site CA "
                                    f"({self._ca.subject.rfc4514_string()})")
        return crl

    def _adopt(self, crl: x509.CertificateRevocationList, where: Path) -> None:
        facts = crl_facts(crl)
        if self.facts is not None:
            why = crl_rollback(facts, self.facts)
            if why is not None:
                raise CrlRollbackError(f"{where}: CRL refused: {why}", facts, self.facts)
        changed = facts != self.facts
        self._revoked = frozenset(r.serial_number for r in crl)
        self.next_update = crl.next_update_utc
        self.facts = facts
        self._in_force = crl
        if changed:
            log.info("loaded CRL %s: %s, %d revoked, next update %s", where, facts.describe(),
                     len(self._revoked), self.next_update)
            self._keep(crl)

    def _load(self) -> None:
        st = self.path.stat() if self.path.exists() else None
        if st is None:
            raise NotFoundError(f"{self.path}: [tls] crl: no such file")
        self._stamp = (st.st_mtime_ns, st.st_size)
        self._adopt(self._parse(self.path.read_bytes(), self.path), self.path)

    def _keep(self, crl: x509.CertificateRevocationList) -> None:
        if self._held_path is None:
            return
        try:
            self._held_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self._held_path, crl.public_bytes(serialization.Encoding.PEM))
        except OSError as exc:
            log.warning("cannot keep the CRL in force at %s (%s): a restart may forget it",
                        self._held_path, exc)

    def _refused(self, exc: CrlRollbackError) -> None:
        log.warning("%s; keeping the list in force", exc)
        if self._events is None:
            return
        held, offered = exc.held, exc.offered
        try:
            self._events.record("tls.crl.refused", "warning", str(self.path),
                                f"{exc}; keeping the list in force",
                                held_number=held.number, held_this_update=held.this_update.isoformat(),
                                offered_number=offered.number,
                                offered_this_update=offered.this_update.isoformat())
        except ApplianceError as failure:  # a full disk must not stop the revocation check
            log.error("event tls.crl.refused not persisted: %s", failure)  # noqa: TRY400 - expected

    def attach(self, events: Any, held_path: Path | None) -> None:
        """Report refusals to ``events`` (an :class:`agent.events.EventLog`) and keep the list
        in force at ``held_path``; a kept list newer than the file's stays in force."""
        self._events = events
        self._held_path = held_path
        if held_path is None:
            return
        kept: x509.CertificateRevocationList | None = None
        try:
            kept = self._parse(held_path.read_bytes(), held_path)
        except FileNotFoundError:
            pass
        except (OSError, ConfigError, VerificationError) as exc:
            log.warning("kept CRL %s unusable (%s); the file's list is in force", held_path, exc)
        assert self.facts is not None and self._in_force is not None
        if kept is not None:
            offered, kept_facts = self.facts, crl_facts(kept)
            why = crl_rollback(offered, kept_facts)
            if why is not None:
                self.facts = None
                self._adopt(kept, held_path)
                self._refused(CrlRollbackError(f"{self.path}: CRL refused: {why}", offered, kept_facts))
                return
        self._keep(self._in_force)

    def refresh(self) -> None:
        """Re-read the file if it changed (checked at most every couple of seconds)."""
        now = time.monotonic()
        if now - self._checked < self._RECHECK_S:
            return
        self._checked = now
        try:
            st = self.path.stat()
        except OSError as exc:
            log.warning("CRL %s unreadable (%s); keeping the loaded list", self.path, exc)
            return
        if (st.st_mtime_ns, st.st_size) == self._stamp:
            return
        try:
            self._load()
        except CrlRollbackError as exc:
            self._refused(exc)
        except (ConfigError, NotFoundError, VerificationError, OSError) as exc:
            log.warning("new CRL refused, keeping the loaded list: %s", exc)
            self._stamp = (st.st_mtime_ns, st.st_size)
        if self.next_update is not None and self.next_update < dt.datetime.now(dt.UTC):
            log.warning("CRL %s is past its next update (%s); still enforcing it", self.path,
                        self.next_update)

    def is_revoked(self, serial: int) -> bool:
        self.refresh()
        return serial in self._revoked


# ------------------------------------------------------------------ the interceptor


class _DeniedError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _peer_host(peer: str) -> str:
    """``ipv4:1.2.3.4:5`` -> ``1.2.3.4``; ``ipv6:[::1]:5`` -> ``::1``; anything else as is."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return peer


Behavior = Callable[..., Any]


class _Malformed:
    """What a request that does not parse becomes, so that it is refused as INVALID_ARGUMENT.

    grpc.aio answers a deserializer's exception with UNKNOWN, which tells the caller nothing
    and reads like a crash; the interceptor turns it into a proper status instead.
    """

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def load(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the caller's fault
            return _Malformed(f"request does not parse: {type(exc).__name__}: {exc}")
    return load


class _MalformedStreamError(Exception):
    """Raised by a checked request stream at its first malformed message.

    The servicer may read its request stream in a task of its own; aborting the call from
    there races the task that writes responses (and can leave the call hanging), so the
    error travels out through the servicer and the interceptor aborts from the call's task.
    """


async def _checked(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    """A request stream that ends the call with INVALID_ARGUMENT at the first malformed message."""
    async for request in requests:
        if isinstance(request, _Malformed):
            raise _MalformedStreamError(request.message)
        yield request


class CallLimits:
    """Calls in progress per peer address and overall, against ``[limits]``'s
    ``max_calls_per_peer`` and ``max_concurrent_rpcs``.  One count for the process's ports:
    the gRPC port's interceptor makes it and the HTTPS port's :class:`~agent.web.app.Surface`
    takes it (``AgentContext.call_limits``), so a peer's calls on both ports add up.  Used on
    the event loop only."""

    def __init__(self, limits: LimitsSection) -> None:
        self._per_peer = limits.max_calls_per_peer
        self._overall = limits.max_concurrent_rpcs
        self._calls: dict[str, int] = {}
        self._total = 0

    def busy(self, host: str) -> str | None:
        """Why a new call from ``host`` may not start now, or None."""
        if self._calls.get(host, 0) >= self._per_peer:
            return f"peer {host} already has {self._per_peer} calls in progress"
        if self._total >= self._overall:
            return f"the node already has {self._overall} calls in progress"
        return None

    @contextlib.contextmanager
    def counted(self, host: str) -> Iterator[None]:
        """Count a call from ``host`` while the block runs."""
        self._calls[host] = self._calls.get(host, 0) + 1
        self._total += 1
        try:
            yield
        finally:
            self._total -= 1
            left = self._calls[host] - 1
            if left:
                self._calls[host] = left
            else:
                del self._calls[host]


class AccessInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Identity, revocation, role check, audit, per-peer and overall call limits, deadline cap."""

    _CACHE_MAX = 1024

    def __init__(self, config: AgentConfig) -> None:
        self._tls = check_listen(config)
        self._loopback_role = None if config.tls.loopback_role == "none" else config.tls.loopback_role
        self._crl: RevocationList | None = None
        if self._tls and config.tls.crl is not None:
            assert config.tls.ca is not None
            self._crl = RevocationList(config.tls.crl, _load_cert(config.tls.ca, "ca"))
        lim = config.limits
        self._limits = CallLimits(lim)
        self._max_deadline = lim.max_deadline_s
        self._max_stream = lim.max_stream_s or None
        self._identities: dict[bytes, Identity] = {}
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    @property
    def revocation(self) -> RevocationList | None:
        """The site CRL this interceptor enforces (None without TLS or without a CRL)."""
        return self._crl

    @property
    def call_limits(self) -> CallLimits:
        """The calls in progress this interceptor counts (the HTTPS port counts into it too)."""
        return self._limits

    def attach(self, events: Any, held_path: Path) -> None:
        """Once the agent's event log exists: CRL refusals become events, and the CRL in force
        is kept at ``held_path`` (:attr:`agent.state.StateLayout.crl_in_force`; see
        :meth:`RevocationList.attach`)."""
        if self._crl is not None:
            self._crl.attach(events, held_path)

    # -- identity and decision

    def _identify(self, context: grpc.aio.ServicerContext) -> Identity:
        if not self._tls:
            return Identity(subject="loopback (no TLS)", serial=None, role=self._loopback_role)
        pems = context.auth_context().get("x509_pem_cert") or []
        if not pems:
            return Identity(subject="(no certificate)", serial=None, role=None,
                            problem="no client certificate")
        pem = pems[0]
        ident = self._identities.get(pem)
        if ident is None:
            ident = client_identity(pem)
            if len(self._identities) >= self._CACHE_MAX:
                self._identities.clear()
            self._identities[pem] = ident
        return admitted(ident, self._crl)

    def _decide(self, method: str, context: grpc.aio.ServicerContext) -> tuple[Identity, str]:
        """Return who calls and the peer key, or raise :class:`_DeniedError` (audited)."""
        ident = self._identify(context)
        peer = context.peer()
        denied = refusal(ident, method, tls=self._tls)
        if denied is not None:
            code, reason = denied
            self._audit(logging.WARNING, "deny", method, ident, peer, reason=reason)
            raise _DeniedError(getattr(grpc.StatusCode, code), reason)
        host = _peer_host(peer)
        busy = self._limits.busy(host)
        if busy is not None:
            self._audit(logging.WARNING, "deny", method, ident, peer, reason=busy)
            raise _DeniedError(grpc.StatusCode.RESOURCE_EXHAUSTED, busy)
        self._audit(logging.DEBUG, "allow", method, ident, peer, reason=f"role {ident.role}")
        return ident, host

    _audit = staticmethod(audit_decision)

    def _cap(self, context: grpc.aio.ServicerContext, cap: float | None) -> float | None:
        """Seconds to allow this call, when the client's deadline is missing or longer than ``cap``."""
        if cap is None:
            return None
        remaining = context.time_remaining()
        return cap if remaining is None or remaining > cap else None

    # -- wrapping handlers

    async def _admit(self, method: str, request: Any, context: grpc.aio.ServicerContext,
                     streaming: bool) -> tuple[str, Any]:
        """Decide (aborting on a denial), then refuse a malformed request with INVALID_ARGUMENT.

        Returns the peer key and the request (a checking iterator for request streams).
        """
        try:
            _, host = self._decide(method, context)
        except _DeniedError as denied:
            await context.abort(denied.code, str(denied))
        if streaming:
            return host, _checked(request, context)
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return host, request

    def _wrap_unary_response(self, method: str, behavior: Behavior, streaming: bool) -> Behavior:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            host, request = await self._admit(method, request, context, streaming)
            with self._limits.counted(host):
                limit = self._cap(context, self._max_deadline)
                try:
                    async with asyncio.timeout(limit):
                        result = behavior(request, context)
                        if inspect.isawaitable(result):
                            result = await result
                        return result
                except TimeoutError:
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                        f"call ran past the node's cap of {self._max_deadline:g} s")
                except _MalformedStreamError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return call

    def _wrap_stream_response(self, method: str, behavior: Behavior, streaming: bool) -> Behavior:
        if inspect.isasyncgenfunction(behavior) or inspect.isgeneratorfunction(behavior):
            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                host, request = await self._admit(method, request, context, streaming)
                with self._limits.counted(host):
                    limit = self._cap(context, self._max_stream)
                    deadline = None if limit is None else time.monotonic() + limit
                    responses = behavior(request, context)
                    if not inspect.isasyncgen(responses):
                        for item in responses:
                            yield item
                        return
                    while True:
                        try:
                            left = None if deadline is None else max(0.0, deadline - time.monotonic())
                            async with asyncio.timeout(left):
                                item = await anext(responses)
                        except StopAsyncIteration:
                            return
                        except TimeoutError:
                            await responses.aclose()
                            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                                f"stream ran past the node's cap of {self._max_stream:g} s")
                        except _MalformedStreamError as exc:
                            await responses.aclose()
                            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                        yield item
            return stream

        async def writer(request: Any, context: grpc.aio.ServicerContext) -> None:
            host, request = await self._admit(method, request, context, streaming)
            with self._limits.counted(host):
                limit = self._cap(context, self._max_stream)
                try:
                    async with asyncio.timeout(limit):
                        result = behavior(request, context)
                        if inspect.isawaitable(result):
                            await result
                except TimeoutError:
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                        f"stream ran past the node's cap of {self._max_stream:g} s")
                except _MalformedStreamError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return writer

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        fields = {"request_deserializer": _tolerant(handler.request_deserializer),
                  "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary_response(method, handler.unary_unary, False), **fields)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary_response(method, handler.stream_unary, True), **fields)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream_response(method, handler.unary_stream, False), **fields)
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream_response(method, handler.stream_stream, True), **fields)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # UNIMPLEMENTED; only peers that passed the TLS handshake get this far
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

