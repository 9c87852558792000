"""The node's side of attestation (agent.attest) against a real software TPM: an AK made as
enrolment makes it (under the EK, persisted at the configured handle), certified by a site PKI
made here, PCR 11 extended as a boot of a UKI extends it; the quote the node answers with
verifies with the fleet's verifier (provisioning.attest), and every way the node cannot attest is
a clear error.  System tier: swtpm and tpm2-tools are system-tier packages."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from agent.attest import NotEnrolledError, TpmQuoter, make_attestation_key
from agent.config import AgentConfig, AttestSection, HealthSection, load_config
from agent.context import AgentContext
from agent.errors import RequestError
from agent.health import service
from agent.proto import node_pb2, node_pb2_grpc
from provisioning import attest as a
from provisioning.image.measure import expected_pcr11, pcr11_events, pcr11_record
from provisioning.pki import init_pki, issue_attestation_key, list_certs
from tests.conftest import run_appliance
from tests.test_ansible import enroll_setup, playbook
from testsupport import tpm2
from testsupport.pe import pe_image
from testsupport.swtpm import swtpm_server, tpm

pytestmark = pytest.mark.system

HANDLE = 0x81010002
UKI = pe_image([(".linux", b"kernel" * 500), (".osrel", b"ID=appliance\nIMAGE_VERSION=7\n"),
                (".cmdline", b"roothash=00 ro"), (".initrd", b"initrd" * 800)])


@pytest.fixture
def booted(tmp_path: Path) -> Iterator[str]:
    """A node's TPM before enrolment: PCR 11 as after a boot of UKI, no attestation key."""
    with swtpm_server(tmp_path) as tcti:
        for ev in pcr11_events(UKI):
            tpm(tcti, "tpm2_pcrextend", f"11:sha256={ev.digest.hex()}")
        yield tcti


@pytest.fixture
def node(booted: str, tmp_path: Path) -> tuple[str, Path]:
    """An enrolled node's TPM, enrolled as enroll.yml does it: the AK made in the TPM at HANDLE
    (agent.attest.make_attestation_key), certified by a site PKI made here (`pki issue-ak`).
    Returns the TCTI and the directory with ak.crt and the site's ca.crt."""
    assert make_attestation_key(AttestSection(tcti=booted, ak_handle=HANDLE), tmp_path / "ak.pub")
    init_pki(tmp_path / "pki", organization="Attesting Site")
    issued = issue_attestation_key(tmp_path / "pki", "node1", (tmp_path / "ak.pub").read_bytes())
    shutil.copy(issued.cert_path, tmp_path / "ak.crt")
    shutil.copy(tmp_path / "pki" / "ca.crt", tmp_path / "ca.crt")
    return booted, tmp_path


def _expected(uki: bytes) -> dict[tuple[int, int], bytes]:
    firmware = {(a.ALG_SHA256, i): bytes(32) for i in range(8)}  # swtpm: no firmware extended them
    return firmware | {(a.ALG_SHA256, 11): expected_pcr11(uki)[-1].value}


def test_the_nodes_quote_verifies_and_carries_its_key_certificate_and_logs(node: tuple[str, Path]) -> None:
    tcti, tmp = node
    (tmp / "fw.log").write_bytes(b"firmware events" * 10)
    quoter = TpmQuoter(AttestSection(tcti=tcti, ak_handle=HANDLE, ak_certificate=tmp / "ak.crt",
                                     firmware_log=tmp / "fw.log"), userspace_log=tmp / "absent.log")
    nonce = os.urandom(32)
    q = quoter.quote(nonce)
    result = a.verify_quote(ak_public=q.ak_public, attest=q.attest, signature=q.signature,
                            pcr_values=q.pcr_values, nonce=nonce, expected=_expected(UKI))
    assert result.ok
    cert = x509.load_der_x509_certificate(q.ak_certificate)
    assert cert.public_key() == a.public_key(a.parse_public(q.ak_public))  # the certificate is the AK's
    assert q.event_log == b"firmware events" * 10 and q.userspace_log == b""
    # a replayed answer does not pass for a fresh nonce; another UKI is PCR 11's mismatch
    with pytest.raises(a.AttestError, match="nonce"):
        a.verify_quote(ak_public=q.ak_public, attest=q.attest, signature=q.signature,
                       pcr_values=q.pcr_values, nonce=os.urandom(32), expected=_expected(UKI))
    other = a.verify_quote(ak_public=q.ak_public, attest=q.attest, signature=q.signature,
                           pcr_values=q.pcr_values, nonce=nonce,
                           expected=_expected(pe_image([(".linux", b"another kernel")])))
    assert other.mismatch is not None and other.mismatch.index == 11


@pytest.mark.parametrize("size", [0, 15, 65])
def test_a_nonce_outside_16_to_64_bytes_is_refused(node: tuple[str, Path], size: int) -> None:
    tcti, tmp = node
    quoter = TpmQuoter(AttestSection(tcti=tcti, ak_handle=HANDLE, ak_certificate=tmp / "ak.crt"))
    with pytest.raises(RequestError, match=f"nonce: {size} bytes; expected 16..64"):
        quoter.quote(os.urandom(size))


def test_each_way_of_not_being_able_to_attest_says_which(node: tuple[str, Path]) -> None:
    tcti, tmp = node
    nonce = os.urandom(32)
    with pytest.raises(NotEnrolledError, match="ak_certificate is not set"):
        TpmQuoter(AttestSection(tcti=tcti, ak_handle=HANDLE)).quote(nonce)
    with pytest.raises(NotEnrolledError, match=r"missing\.crt"):
        TpmQuoter(AttestSection(tcti=tcti, ak_handle=HANDLE, ak_certificate=tmp / "missing.crt")).quote(nonce)
    (tmp / "junk.crt").write_bytes(b"not a certificate")
    with pytest.raises(NotEnrolledError, match=r"junk\.crt: not a certificate"):
        TpmQuoter(AttestSection(tcti=tcti, ak_handle=HANDLE, ak_certificate=tmp / "junk.crt")).quote(nonce)
    with pytest.raises(NotEnrolledError, match="0x81010003"):  # no key persisted there
        TpmQuoter(AttestSection(tcti=tcti, ak_handle=HANDLE + 1, ak_certificate=tmp / "ak.crt")).quote(nonce)
    with pytest.raises(NotEnrolledError, match=r"swtpm:host=127\.0\.0\.1,port=1\b"):  # no TPM there
        TpmQuoter(AttestSection(tcti="swtpm:host=127.0.0.1,port=1", ak_handle=HANDLE,
                                ak_certificate=tmp / "ak.crt", timeout_s=10)).quote(nonce)


@contextmanager
def _serving(tcti: str, tmp: Path, monkeypatch: pytest.MonkeyPatch, root_hash: str = "",
             section: AttestSection | None = None) -> Iterator[int]:
    """The agent's Node servicer on a real grpc.aio server (insecure, loopback) with the swtpm's
    AK enrolled; the kernel command line it reports names ``root_hash``.  Yields the port."""
    state = tmp / "agent-state"
    state.mkdir(exist_ok=True)
    cmdline = tmp / "cmdline"
    cmdline.write_text(f"ro roothash={root_hash}\n" if root_hash else "ro\n")
    real = service.collect_inventory
    monkeypatch.setattr(service, "collect_inventory",
                        lambda state_dir, **kw: real(state_dir, **kw, cmdline=cmdline))
    enrolled = section or AttestSection(tcti=tcti, ak_handle=HANDLE, ak_certificate=tmp / "ak.crt")
    cfg = AgentConfig()
    cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, state_dir=state),
                              health=HealthSection(interval_s=3600), attest=enrolled)
    ctx = AgentContext(config=cfg)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def serve() -> tuple[Any, int]:
        server = grpc.aio.server()
        await service.attach(server, ctx)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(serve(), loop).result(60)
    try:
        yield port
    finally:
        asyncio.run_coroutine_threadsafe(service.close(ctx), loop).result(30)
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_node_attest_over_grpc_answers_a_quote_the_fleet_verifies(
        node: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """appliance.v1.Node/Attest on a real grpc.aio server, the agent's own servicer over the
    swtpm: the answer verifies and carries the running root hash from the kernel command line."""
    tcti, tmp = node
    with _serving(tcti, tmp, monkeypatch, "ab" * 32) as port, \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        nonce = os.urandom(48)
        r = node_pb2_grpc.NodeStub(channel).Attest(node_pb2.AttestRequest(nonce=nonce), timeout=60)
    result = a.verify_quote(ak_public=r.ak_public, attest=r.attest, signature=r.signature,
                            pcr_values=r.pcr_values, nonce=nonce, expected=_expected(UKI))
    assert result.ok and r.root_hash == "ab" * 32
    assert x509.load_der_x509_certificate(r.ak_certificate).public_key() == \
        a.public_key(a.parse_public(r.ak_public))


def test_fleet_attest_passes_the_image_the_node_booted_and_fails_another(
        node: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """`appliance fleet attest` (the CLI, its own process) against the node: it attests against
    the manifest of the image whose UKI PCR 11 measured; against a manifest whose UKI differs it
    does not, naming PCR 11; a node the certificate does not name does not either."""
    tcti, tmp = node
    root = "cd" * 32
    good = tmp / "image-manifest.json"
    good.write_text(json.dumps({"roothash": root, "pcr11": pcr11_record(UKI)}))
    other = tmp / "other-manifest.json"
    other.write_text(json.dumps({"roothash": root, "pcr11": pcr11_record(pe_image([(".linux", b"other")]))}))
    with _serving(tcti, tmp, monkeypatch, root) as port:
        for name in ("node1", "node2"):
            (tmp / f"{name}.toml").write_text(
                f'[[nodes]]\nname = "{name}"\naddress = "127.0.0.1"\nport = {port}\n')
        # --insecure: the agent here is on loopback without TLS; the AK certificates' CA is --site-ca;
        # swtpm has no firmware, so no event log shows Secure Boot: --secure-boot optional
        runs = {label: run_appliance("fleet", "attest", "-i", tmp / f"{name}.toml", "--insecure", "--expect",
                                     manifest, "--site-ca", tmp / "ca.crt", "--deadline", "60", "--json",
                                     "--secure-boot", "optional")
                for label, name, manifest in (("good", "node1", good), ("other", "node1", other),
                                              ("renamed", "node2", good))}
    done = runs["good"]
    assert done.returncode == 0, done.stderr
    (ok,) = json.loads(done.stdout)["nodes"]
    assert ok["ok"] and ok["data"]["attested"] and ok["data"]["root_hash"] == root
    for label in ("other", "renamed"):
        assert runs[label].returncode == 1, runs[label].stderr
    (bad,) = json.loads(runs["other"].stdout)["nodes"]
    assert not bad["ok"] and bad["data"]["mismatch"]["pcr"] == 11 and "not attested" in bad["reason"]
    (renamed,) = json.loads(runs["renamed"].stdout)["nodes"]
    assert "not node node2" in renamed["reason"]


def _verdict(section: AttestSection, site_ca: Path, node: str = "node1") -> a.Verdict:
    """The fleet's verdict on a quote made with ``section`` (the image UKI, root hash "ef"*32)."""
    nonce = os.urandom(32)
    q = TpmQuoter(section).quote(nonce)
    answer = a.Answer(q.attest, q.signature, q.pcr_values, q.ak_public, q.ak_certificate, "ef" * 32, "7")
    # swtpm: no firmware measured anything, so there is no event log and no Secure Boot state
    policy = a.Policy(x509.load_pem_x509_certificate(site_ca.read_bytes()),
                      {"ef" * 32: expected_pcr11(UKI)[-1].value}, secure_boot=False)
    return a.judge(answer, nonce=nonce, node=node, policy=policy)


def test_enrolment_makes_the_key_in_the_tpm_once_and_the_site_ca_certifies_it(booted: str,
                                                                             tmp_path: Path) -> None:
    """`appliance agent attest-key` on the node, `appliance pki issue-ak` on the control machine:
    the node then attests; a second run keeps the key (the certificate stays good)."""
    first = run_appliance("agent", "attest-key", "--tcti", booted, "--ak-handle", "0x81010005",
                          "--out", tmp_path / "node" / "ak.pub", "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {"ak_public": str(tmp_path / "node" / "ak.pub"),
                                        "handle": "0x81010005", "new_key": True}
    public = (tmp_path / "node" / "ak.pub").read_bytes()
    again = run_appliance("agent", "attest-key", "--tcti", booted, "--ak-handle", "0x81010005",
                          "--out", tmp_path / "node" / "ak.pub")
    assert again.returncode == 0 and "kept attestation key at TPM handle 0x81010005" in again.stdout
    assert (tmp_path / "node" / "ak.pub").read_bytes() == public
    pki = tmp_path / "pki"
    init_pki(pki, organization="Attesting Site")
    issued = run_appliance("pki", "issue-ak", "node1", "--ak-public", tmp_path / "node" / "ak.pub",
                           "--dir", pki)
    assert issued.returncode == 0, issued.stderr
    section = AttestSection(tcti=booted, ak_handle=0x81010005,
                            ak_certificate=pki / "issued/node1/node1.ak.crt")
    assert _verdict(section, pki / "ca.crt").ok
    no_tpm = run_appliance("agent", "attest-key", "--tcti", "swtpm:host=127.0.0.1,port=1",
                           "--timeout-s", "10", "--out", tmp_path / "elsewhere" / "ak.pub")
    assert no_tpm.returncode != 0 and "tpm2_getcap on swtpm:host=127.0.0.1,port=1" in no_tpm.stderr
    assert not (tmp_path / "elsewhere").exists()


def test_enroll_playbook_enrols_the_tpm_for_attestation(booted: str, tmp_path: Path) -> None:
    """enroll.yml with appliance_attest on: besides the TLS certificate, an AK in the node's TPM
    certified by the site CA and agent.toml's [attest] pointing at it; the agent's quote passes
    the fleet's judgement.  Re-running changes nothing."""
    pki, tls, config, inventory, extra = enroll_setup(
        tmp_path, "node1", f'[server]\nlisten = "127.0.0.1"\nport = 0\n\n[attest]\ntcti = "{booted}"\n',
        attest=True)
    first = playbook(tmp_path, "enroll.yml", inventory, extra)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
    settings = load_config(config)
    assert settings.attest.ak_certificate == tls / "ak.crt" and settings.attest.tcti == booted
    assert sorted(p.name for p in (pki / "requests").iterdir()) == ["node1.ak.pub", "node1.csr"]
    assert _verdict(settings.attest, pki / "ca.crt").ok
    again = playbook(tmp_path, "enroll.yml", inventory, extra)
    assert again.returncode == 0 and "changed=0" in again.stdout, again.stdout[-2000:]
    assert _verdict(load_config(config).attest, pki / "ca.crt").ok


def test_fleet_enrol_attest_enrols_a_node_over_its_api(booted: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`appliance fleet enrol-attest` against the agent's servicer on a TPM with no key yet: the
    node makes its AK, the site CA certifies it, the node installs the certificate in its state
    directory and from then on attests; a second run keeps the certificate (nothing issued)."""
    root = "ab" * 32
    manifest = tmp_path / "image-manifest.json"
    manifest.write_text(json.dumps({"roothash": root, "pcr11": pcr11_record(UKI)}))
    pki = tmp_path / "pki"
    init_pki(pki, organization="Enrolling Site")
    fresh = AttestSection(tcti=booted, ak_handle=HANDLE)  # no ak_certificate in agent.toml
    with _serving(booted, tmp_path, monkeypatch, root, section=fresh) as port:
        inventory = tmp_path / "nodes.toml"
        inventory.write_text(f'[[nodes]]\nname = "node7"\naddress = "127.0.0.1"\nport = {port}\n')
        before = run_appliance("fleet", "attest", "-i", inventory, "--insecure", "--expect", manifest,
                               "--site-ca", pki / "ca.crt", "--secure-boot", "optional", "--json")
        enrol = [run_appliance("fleet", "enrol-attest", "-i", inventory, "--insecure", "--pki-dir", pki,
                               "--json") for _ in range(2)]
        after = run_appliance("fleet", "attest", "-i", inventory, "--insecure", "--expect", manifest,
                              "--site-ca", pki / "ca.crt", "--secure-boot", "optional", "--json")
    assert before.returncode == 1 and "none was installed" in json.loads(before.stdout)["nodes"][0]["reason"]
    assert enrol[0].returncode == 0, enrol[0].stderr
    first, second = (json.loads(r.stdout)["nodes"][0]["data"] for r in enrol)
    assert first["key"] == "made" and first["certificate"] == "installed"
    assert second == {"key": "kept", "certificate": "kept", "serial": first["serial"]}
    assert [c.kind for c in list_certs(pki)] == ["ak"]  # the second run issued nothing
    cert = x509.load_der_x509_certificate((tmp_path / "agent-state" / "attest" / "ak.crt").read_bytes())
    assert f"{cert.serial_number:x}" == first["serial"]
    assert after.returncode == 0, after.stdout + after.stderr
    assert json.loads(after.stdout)["nodes"][0]["data"]["root_hash"] == root


def test_the_node_installs_only_a_certificate_for_its_own_key(booted: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Node/EnrolAttestation over gRPC: junk and a certificate for another key are INVALID_ARGUMENT
    and install nothing; a certificate before the key exists is FAILED_PRECONDITION and makes no
    key; a node whose agent.toml names its certificate file is FAILED_PRECONDITION."""
    pki = tmp_path / "pki"
    init_pki(pki, organization="Enrolling Site")
    other = issue_attestation_key(pki, "node7", tpm2.public_area(ec.generate_private_key(ec.SECP256R1())))
    other_der = x509.load_pem_x509_certificate(Path(other.cert_path).read_bytes()).public_bytes(Encoding.DER)
    fresh = AttestSection(tcti=booted, ak_handle=HANDLE)
    with _serving(booted, tmp_path, monkeypatch, section=fresh) as port, \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = node_pb2_grpc.NodeStub(channel)

        def refused(certificate: bytes) -> grpc.RpcError:
            with pytest.raises(grpc.RpcError) as caught:
                stub.EnrolAttestation(node_pb2.EnrolAttestationRequest(ak_certificate=certificate),
                                      timeout=60)
            return caught.value

        junk = refused(b"junk")
        assert junk.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a certificate" in junk.details()
        early = refused(other_der)
        assert early.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "ask without a certificate first" in early.details()
        answer = stub.EnrolAttestation(node_pb2.EnrolAttestationRequest(), timeout=60)
        assert answer.created is True and answer.ak_public and not answer.ak_certificate  # not before
        wrong = refused(other_der)
        assert wrong.code() == grpc.StatusCode.INVALID_ARGUMENT and "for another key" in wrong.details()
        assert not (tmp_path / "agent-state" / "attest" / "ak.crt").exists()
    configured = AttestSection(tcti=booted, ak_handle=HANDLE, ak_certificate=tmp_path / "configured.crt")
    with _serving(booted, tmp_path, monkeypatch, section=configured) as port, \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.RpcError) as caught:
            node_pb2_grpc.NodeStub(channel).EnrolAttestation(
                node_pb2.EnrolAttestationRequest(ak_certificate=other_der), timeout=60)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "installed the way it was configured" in caught.value.details()
