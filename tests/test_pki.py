"""`appliance pki`: the site CA, node and client certificates, revocation and the CRL."""

from __future__ import annotations

import ipaddress
import json
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.security import role_of
from provisioning import attest
from tests.conftest import CliResult
from testsupport import tpm2


def _json(result: CliResult) -> Any:
    assert result.code == 0, result.err
    return json.loads(result.out)


def test_init_issue_revoke_list(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    d = tmp_path / "pki"
    ca = _json(cli("pki", "init", "--dir", d, "-O", "Acme Plant 3", "--json"))
    assert ca["subject"] == "CN=Acme Plant 3 site CA,O=Acme Plant 3" and not ca["encrypted"]
    assert stat.S_IMODE((d / "ca.key").stat().st_mode) == 0o600
    ca_cert = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    node = _json(cli("pki", "issue-node", "edge-01", "--dir", d, "--dns", "edge-01.plant3",
                     "--ip", "10.0.0.7", "--ip", "fd00::7", "--json"))
    cert = x509.load_pem_x509_certificate(Path(node["cert_path"]).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["edge-01.plant3"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7"),
                                                        ipaddress.ip_address("fd00::7")]
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == \
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    cert.verify_directly_issued_by(ca_cert)
    assert stat.S_IMODE(Path(node["key_path"]).stat().st_mode) == 0o600

    alice = _json(cli("pki", "issue-client", "alice", "--role", "operator", "--days", "30",
                      "--dir", d, "--json"))
    acert = x509.load_pem_x509_certificate(Path(alice["cert_path"]).read_bytes())
    assert role_of(acert) == "operator"
    assert [a.value for a in acert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)] == \
        ["operator"]
    assert (acert.not_valid_after_utc - acert.not_valid_before_utc).days == 30

    revoked = _json(cli("pki", "revoke", alice["serial"], "--reason", "key-compromise", "--dir", d,
                        "--json"))
    assert [c["name"] for c in revoked["revoked"]] == ["alice"]
    crl = x509.load_pem_x509_crl((d / "crl.pem").read_bytes())
    assert crl.is_signature_valid(ca_cert.public_key())  # type: ignore[arg-type]
    entry = crl.get_revoked_certificate_by_serial_number(int(alice["serial"], 16))
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == \
        x509.ReasonFlags.key_compromise
    assert crl.get_revoked_certificate_by_serial_number(int(node["serial"], 16)) is None

    listing = _json(cli("pki", "list", "--dir", d, "--json"))
    status = {c["name"]: c["status"] for c in listing["certificates"]}
    assert status == {"edge-01": "valid", "alice": "revoked"}
    table = cli("pki", "list", "--dir", d)
    assert "revoked (key-compromise)" in table.out and "operator" in table.out

    before = crl.next_update_utc
    assert _json(cli("pki", "crl", "--dir", d, "--days", "90", "--json"))["days"] == 90
    renewed = x509.load_pem_x509_crl((d / "crl.pem").read_bytes())
    assert renewed.next_update_utc is not None and before is not None and renewed.next_update_utc > before
    assert renewed.get_revoked_certificate_by_serial_number(int(alice["serial"], 16)) is not None


def test_encrypted_ca_key(cli: Callable[..., CliResult], tmp_path: Path,
                          monkeypatch: Any) -> None:
    d = tmp_path / "pki"
    secret = tmp_path / "pass"
    secret.write_text("correct horse\n")
    info = _json(cli("pki", "init", "--dir", d, "--passphrase-file", secret, "--json"))
    assert info["encrypted"]
    assert b"ENCRYPTED PRIVATE KEY" in (d / "ca.key").read_bytes()

    missing = cli("pki", "issue-client", "bob", "--role", "admin", "--dir", d)
    assert missing.code == 6 and "encrypted; give its passphrase" in missing.err
    monkeypatch.setenv("CA_PASS", "wrong")
    wrong = cli("pki", "issue-client", "bob", "--role", "admin", "--dir", d, "--passphrase-env", "CA_PASS")
    assert wrong.code == 3 and "wrong passphrase" in wrong.err
    monkeypatch.setenv("CA_PASS", "correct horse")
    ok = cli("pki", "issue-client", "bob", "--role", "admin", "--dir", d, "--passphrase-env", "CA_PASS")
    assert ok.code == 0, ok.err
    assert json.loads((d / "index.json").read_text())["certificates"][0]["name"] == "bob"


def test_clear_errors_and_nothing_half_written(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    d = tmp_path / "pki"
    nothing = cli("pki", "list", "--dir", d)
    assert nothing.code == 4 and "run `appliance pki init` first" in nothing.err
    assert cli("pki", "init", "--dir", d).code == 0
    again = cli("pki", "init", "--dir", d)
    assert again.code == 6 and "already exists" in again.err
    index = (d / "index.json").read_bytes()
    for args, message in [
        (("issue-node", "Bad Name"), "name 'Bad Name'"),
        (("issue-node", "n1", "--ip", "10.0.0.300"), "--ip '10.0.0.300': not an IPv4 or IPv6 address"),
        (("issue-node", "n1", "--dns", "bad_host!"), "--dns 'bad_host!': not a DNS name"),
        (("issue-client", "c1", "--role", "observer", "--days", "0"), "--days = 0: must be positive"),
        (("issue-client", "c1", "--role", "observer", "--days", "99999"), "would outlive the site CA"),
        (("revoke", "nobody"), "no certificate with serial or name 'nobody'"),
    ]:
        result = cli("pki", *args, "--dir", d)
        assert result.code != 0 and message in result.err, (args, result.err)
    assert (d / "index.json").read_bytes() == index
    assert not (d / "issued").exists()


def test_issue_ak_certifies_only_an_attestation_key(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    """`pki issue-ak` reads the TPM2B_PUBLIC the node wrote: an AK gets a certificate for its key
    naming the node, with the AK usage; a key a TPM would let sign anything, a file that is no
    public area, or no file, gets a clear error and changes nothing."""
    d = tmp_path / "pki"
    assert cli("pki", "init", "--dir", d).code == 0
    ak = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ak.pub").write_bytes(tpm2.public_area(ak))
    issued = _json(cli("pki", "issue-ak", "node7", "--ak-public", tmp_path / "ak.pub", "--dir", d,
                       "--dns", "node7.plant3", "--json"))
    assert issued["kind"] == "ak" and issued["key_path"] == ""
    cert = x509.load_pem_x509_certificate((d / "issued" / "node7" / "node7.ak.crt").read_bytes())
    assert cert.public_key() == ak.public_key()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node7"
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.DNSName) == ["node7.plant3"]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == \
        [attest.AK_CERTIFICATE_USAGE]
    listed = _json(cli("pki", "list", "--dir", d, "--json"))
    assert [(c["kind"], c["name"]) for c in listed["certificates"]] == [("ak", "node7")]

    index = (d / "index.json").read_bytes()
    unrestricted = tpm2.AK_ATTRIBUTES & ~attest.ATTR_RESTRICTED
    (tmp_path / "signer.pub").write_bytes(tpm2.public_area(ak, attributes=unrestricted))
    (tmp_path / "junk.pub").write_bytes(b"\x00\x04junk")
    for file, code, message in [("signer.pub", 1, "signer.pub: attestation key: objectAttributes 0x00040072 "
                                                  "lack restricted"),
                                ("junk.pub", 1, "junk.pub: TPMT_PUBLIC"),
                                ("absent.pub", 4, "--ak-public ")]:
        result = cli("pki", "issue-ak", "node8", "--ak-public", tmp_path / file, "--dir", d)
        assert result.code == code and message in result.err, (file, result.code, result.err)
    assert (d / "index.json").read_bytes() == index
    assert not (d / "issued" / "node8").exists()
