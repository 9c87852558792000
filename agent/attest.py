"""The node's side of remote attestation (issue #17): its attestation key, and a TPM2 quote for
Node/Attest.

Enrolment makes the AK once in the TPM (:func:`make_attestation_key`: by ``appliance-agent
attest-key`` from enroll.yml, or by Node/EnrolAttestation through :meth:`TpmQuoter.enrol`) and
hands out only its public area; the site CA's certificate for it comes back to agent.toml's
``[attest] ak_certificate`` or, over the API, to STATE/attest/ak.crt.

The node only moves bytes: tpm2-tools make the quote with the attestation key (AK) created at
enrolment and kept at a persistent handle, over sha256 PCRs 0-7 (firmware, Secure Boot) and 11
(the UKI), with the verifier's nonce as extraData; the answer carries the marshalled TPMS_ATTEST,
the TPMT_SIGNATURE, the PCR values, the AK's TPM2B_PUBLIC and certificate, and the boot's event
logs.  Nothing here judges them: the fleet verifies (``provisioning.attest``), so a node that
booted something else cannot talk its way through.

One quote at a time (the TPM serves one command stream per session; the kernel's resource
manager at /dev/tpmrm0 lets the tools' transient objects go when they exit).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_public_key

from agent.config import AttestSection
from agent.errors import ApplianceError, RequestError
from agent.fsutil import atomic_write_bytes

__all__ = ["INSTALLED_CERTIFICATE", "NONCE_BYTES", "PCR_SELECTION", "Enrolment", "NotEnrolledError", "Quote",
           "TpmQuoter", "handle_name", "make_attestation_key"]

PCR_SELECTION = "sha256:0,1,2,3,4,5,6,7,11"
NONCE_BYTES = (16, 64)  # a TPM2B_DATA extraData holds up to 64 bytes; fewer than 16 is guessable
USERSPACE_LOG = Path("/run/log/systemd/tpm2-measure.log")
# Event logs are tens of KiB; a bigger one is cut.  Both at their cap must fit, with the quote,
# in the 4 MiB a gRPC client takes by default (the fleet CLI's), or the answer would be refused.
_MAX_LOG = 1 << 20
INSTALLED_CERTIFICATE = Path("attest") / "ak.crt"  # under the state directory, from Node/EnrolAttestation


class NotEnrolledError(ApplianceError):
    """The node has no attestation key (not enrolled) or no TPM to use it with."""


@dataclass(frozen=True)
class Quote:
    """What Node/Attest answers (the fields of ``AttestResponse``)."""

    attest: bytes
    signature: bytes
    pcr_values: bytes
    ak_public: bytes
    ak_certificate: bytes
    event_log: bytes
    userspace_log: bytes


def _read_capped(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(_MAX_LOG)
    except OSError:  # no firmware log (no TPM event log from the firmware) or no systemd log yet
        return b""


def _load_certificate(data: bytes) -> x509.Certificate:
    """A certificate from DER or PEM bytes.

    Raises:
        ValueError: neither.
    """
    if data.lstrip().startswith(b"-----"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def _certificate(path: Path) -> bytes:
    """The AK certificate as DER (a PEM file is converted)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise NotEnrolledError(f"attestation key certificate {path}: {exc.strerror}") from None
    try:
        return _load_certificate(data).public_bytes(Encoding.DER)
    except ValueError as exc:
        raise NotEnrolledError(f"attestation key certificate {path}: not a certificate ({exc})") from None


def make_attestation_key(section: AttestSection, out: Path) -> bool:
    """At enrolment: make the node's attestation key in its TPM, once, and write the key's
    TPM2B_PUBLIC to ``out`` for the site CA to certify (``appliance pki issue-ak``).

    The AK is an ECDSA P-256 restricted signing key (``tpm2_createak``) under the TPM's
    endorsement key and is made persistent at ``section.ak_handle``; its private half never
    leaves the TPM.  A key already at the handle is kept, so enrolling again certifies the same
    key.  Making it persistent is the one step that commits: a failure before it leaves
    nothing in the TPM, and ``out`` is written only after it.  Returns whether a key was made.

    Raises:
        NotEnrolledError: no tpm2-tools, no TPM at ``section.tcti``, or a TPM command failed
            (the message names the tool and the TPM's complaint).
    """
    handle = handle_name(section)
    with tempfile.TemporaryDirectory(prefix="attest-key-") as tmp:
        work = Path(tmp)
        made = False
        if _has_key(section):
            _tool(section, "tpm2_readpublic", "-c", handle, "-o", str(work / "ak.pub"))
        else:
            # Each step's transient objects are flushed after it (the tools keep saved contexts
            # in files): with the kernel's resource manager that is a no-op, on a TPM reached
            # directly (swtpm, /dev/tpm0) it keeps the TPM's few object slots free.
            for step in (("tpm2_createek", "-c", str(work / "ek.ctx"), "-G", "ecc"),
                         ("tpm2_createak", "-C", str(work / "ek.ctx"), "-c", str(work / "ak.ctx"),
                          "-G", "ecc", "-g", "sha256", "-s", "ecdsa", "-u", str(work / "ak.pub")),
                         ("tpm2_evictcontrol", "-C", "o", "-c", str(work / "ak.ctx"), handle)):
                _tool(section, *step)
                _tool(section, "tpm2_flushcontext", "-t")
            made = True
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, (work / "ak.pub").read_bytes())
    return made


def handle_name(section: AttestSection) -> str:
    """The AK's persistent handle as tpm2-tools take and print it (``0x81010002``)."""
    return f"0x{section.ak_handle:08x}"


def _has_key(section: AttestSection) -> bool:
    """Whether the TPM holds a persistent object at the AK's handle."""
    return handle_name(section) in _tool(section, "tpm2_getcap", "handles-persistent").split()


def _tool(section: AttestSection, *argv: str) -> str:
    """Run one tpm2-tools command against ``section.tcti``; its standard output.  Every failure
    is NotEnrolledError."""
    env = dict(os.environ, TPM2TOOLS_TCTI=section.tcti)
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False,
                              timeout=section.timeout_s)
    except FileNotFoundError:
        raise NotEnrolledError(f"{argv[0]} is not installed: this image cannot attest") from None
    except subprocess.TimeoutExpired:
        raise NotEnrolledError(f"{argv[0]}: the TPM did not answer within {section.timeout_s:g} s "
                               f"({section.tcti})") from None
    if done.returncode != 0:
        detail = " ".join(done.stderr.split())[-400:]
        raise NotEnrolledError(f"{argv[0]} on {section.tcti} (AK handle {handle_name(section)}) "
                               f"failed: {detail}")
    return done.stdout


@dataclass(frozen=True)
class Enrolment:
    """What Node/EnrolAttestation answers: the AK's public area, whether this call made the key,
    and the certificate the node now quotes with (DER; empty: none yet)."""

    ak_public: bytes
    created: bool
    ak_certificate: bytes


class TpmQuoter:
    """Quotes with the AK at ``section.ak_handle`` through tpm2-tools on ``section.tcti``, and
    enrols it over the agent's own API: the key made in the TPM, its certificate installed under
    ``state_dir`` (``attest/ak.crt``) unless agent.toml names one (``[attest] ak_certificate``,
    as enroll.yml sets it)."""

    def __init__(self, section: AttestSection, *, state_dir: Path | None = None,
                 userspace_log: Path = USERSPACE_LOG) -> None:
        self._section = section
        self._installed = state_dir / INSTALLED_CERTIFICATE if state_dir is not None else None
        self._firmware_log = section.firmware_log
        self._userspace_log = userspace_log
        self._lock = threading.Lock()

    def _certificate_path(self) -> Path | None:
        if self._section.ak_certificate is not None:
            return self._section.ak_certificate
        if self._installed is not None and self._installed.exists():
            return self._installed
        return None

    def enrol(self, certificate: bytes = b"") -> Enrolment:
        """Without ``certificate``: make the AK if the TPM has none at the handle
        (:func:`make_attestation_key`) and answer its public area for the site CA.  With one
        (DER or PEM): install it, once it is shown to be a certificate for this AK's key (the
        fleet judges the rest: issuer, names, validity).  Blocking: call it from a worker thread.

        Raises:
            RequestError: ``certificate`` is not a certificate, or is for another key.
            NotEnrolledError: no TPM or tools; or agent.toml names the certificate file, so it
                is not installed over the API.
        """
        s = self._section
        with self._lock, tempfile.TemporaryDirectory(prefix="attest-enrol-") as tmp:
            work = Path(tmp)
            if certificate:  # refused before anything changes, the TPM included
                created = False
                self._install(certificate, work)
            else:
                created = make_attestation_key(s, work / "ak.pub")
            path = self._certificate_path()
            current = _certificate(path) if path is not None else b""
            return Enrolment((work / "ak.pub").read_bytes(), created, current)

    def _install(self, certificate: bytes, work: Path) -> None:
        """Install ``certificate`` after checking it is for the AK; ``work/ak.pub`` gets the AK's
        public area."""
        s = self._section
        handle = handle_name(s)
        try:
            cert = _load_certificate(certificate)
            key = cert.public_key()
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise RequestError(f"ak_certificate: not a certificate ({exc})") from None
        if s.ak_certificate is not None or self._installed is None:
            raise NotEnrolledError(f"[attest] ak_certificate = {s.ak_certificate} in agent.toml: this node's "
                                   "certificate is installed the way it was configured (enroll.yml), not "
                                   "over the API")
        if not _has_key(s):
            raise NotEnrolledError(f"no attestation key at TPM handle {handle} yet: ask without a "
                                   "certificate first, so that the node makes it")
        _tool(s, "tpm2_readpublic", "-c", handle, "-o", str(work / "ak.pub"))
        _tool(s, "tpm2_readpublic", "-c", handle, "-f", "pem", "-o", str(work / "ak.pem"))
        if key != load_pem_public_key((work / "ak.pem").read_bytes()):
            raise RequestError(f"ak_certificate: it is for another key than this node's attestation key "
                               f"(TPM handle {handle})")
        self._installed.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_bytes(self._installed, cert.public_bytes(Encoding.DER))

    def quote(self, nonce: bytes) -> Quote:
        """A fresh quote over :data:`PCR_SELECTION` with ``nonce`` as its extraData (blocking:
        call it from a worker thread).

        Raises:
            RequestError: the nonce is not 16..64 bytes.
            NotEnrolledError: no AK certificate configured or readable, no TPM, or no key at
                the handle; the message says which.
        """
        low, high = NONCE_BYTES
        if not low <= len(nonce) <= high:
            raise RequestError(f"nonce: {len(nonce)} bytes; expected {low}..{high}")
        s = self._section
        path = self._certificate_path()
        if path is None:
            raise NotEnrolledError("this node has no attestation key certificate: [attest] ak_certificate "
                                   "is not set and none was installed (enrol the node: `appliance fleet "
                                   "enrol-attest`, or enroll.yml)")
        certificate = _certificate(path)
        with self._lock, tempfile.TemporaryDirectory(prefix="attest-") as tmp:
            work = Path(tmp)
            handle = handle_name(s)
            _tool(s, "tpm2_readpublic", "-c", handle, "-o", str(work / "ak.pub"))
            _tool(s, "tpm2_quote", "-c", handle, "-l", PCR_SELECTION, "-g", "sha256",
                  "-q", nonce.hex(), "-m", str(work / "quote.msg"), "-s", str(work / "quote.sig"),
                  "-o", str(work / "quote.pcrs"), "-F", "values")
            return Quote((work / "quote.msg").read_bytes(), (work / "quote.sig").read_bytes(),
                         (work / "quote.pcrs").read_bytes(), (work / "ak.pub").read_bytes(),
                         certificate, _read_capped(self._firmware_log), _read_capped(self._userspace_log))
