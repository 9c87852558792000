"""An older, genuine CRL must not un-revoke certificates (issue 19, finding 3).

Real CRLs signed by a real test CA (provisioning.pki, and cryptography for the odd ones),
checked by the agent's RevocationList and through a real mTLS gRPC server on loopback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.config import load_config
from agent.events import EventLog
from agent.proto import node_pb2, node_pb2_grpc
from agent.security import AccessInterceptor, RevocationList, crl_facts
from agent.state import StateLayout
from provisioning.pki import init_pki, issue_client, issue_node, revoke, write_crl
from tests.test_security import channel, client_creds, code_of, write_config
from testsupport.appliance import free_port
from testsupport.secure_server import start


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    d = tmp_path / "site"
    init_pki(d, organization="Test Site")
    issue_node(d, "node1", dns=["localhost"], ips=["127.0.0.1"])
    issue_client(d, "later", "observer")
    return d


def _ca(pki: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def _crl(pki: Path, number: int | None, this_update: dt.datetime, revoked: Sequence[int] = ()) -> bytes:
    """A CRL signed by the site CA with the given number and thisUpdate."""
    cert, key = _ca(pki)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(cert.subject)
               .last_update(this_update).next_update(this_update + dt.timedelta(days=30)))
    if number is not None:
        builder = builder.add_extension(x509.CRLNumber(number), critical=False)
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(this_update).build())
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _replace(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))  # a new stamp for sure


def _serial(pki: Path, name: str) -> int:
    return x509.load_pem_x509_certificate((pki / "issued" / name / f"{name}.crt").read_bytes()).serial_number


def test_pki_crl_numbers_increase(pki: Path) -> None:
    numbers = [crl_facts(x509.load_pem_x509_crl((pki / "crl.pem").read_bytes())).number]
    write_crl(pki)
    numbers.append(crl_facts(x509.load_pem_x509_crl((pki / "crl.pem").read_bytes())).number)
    revoke(pki, "later")
    numbers.append(crl_facts(x509.load_pem_x509_crl((pki / "crl.pem").read_bytes())).number)
    known = [n for n in numbers if n is not None]
    assert known == numbers and known == sorted(set(known)), numbers


def test_older_crl_written_over_the_file_does_not_unrevoke(pki: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(RevocationList, "_RECHECK_S", 0.0)
    crl_path = pki / "crl.pem"
    older = crl_path.read_bytes()  # genuine, signed before "later" was revoked
    revoke(pki, "later")

    async def main() -> tuple[grpc.StatusCode, grpc.StatusCode]:
        server, port = await start(load_config(write_config(tmp_path, pki)))
        try:
            async with channel(port, client_creds(pki, "later")) as ch:
                stub = node_pb2_grpc.NodeStub(ch)  # type: ignore[no-untyped-call]
                before = await code_of(stub.GetHealth(node_pb2.GetHealthRequest(), timeout=10))
                _replace(crl_path, older)
                after = await code_of(stub.GetHealth(node_pb2.GetHealthRequest(), timeout=10))
                return before, after
        finally:
            await server.stop(None)

    with caplog.at_level(logging.WARNING, logger="agent.security"):
        assert asyncio.run(main()) == (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED)
    refused = [r.getMessage() for r in caplog.records if "CRL refused" in r.getMessage()]
    assert refused and "older than the list in force" in refused[0], refused


def test_rollback_by_number_and_by_this_update_is_refused_with_an_event(pki: Path, tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    gone = _serial(pki, "later")
    crl_path = pki / "crl.pem"
    _replace(crl_path, _crl(pki, 10, now, [gone]))
    cert, _ = _ca(pki)
    events = EventLog()
    crl = RevocationList(crl_path, cert)
    crl.attach(events, StateLayout(tmp_path / "state").crl_in_force)
    crl._RECHECK_S = 0.0
    assert crl.is_revoked(gone)

    offers = {
        "lower number": _crl(pki, 9, now + dt.timedelta(hours=1)),
        "older thisUpdate": _crl(pki, 11, now - dt.timedelta(hours=1)),
        "no number": _crl(pki, None, now + dt.timedelta(hours=1)),
        "same number, other contents": _crl(pki, 10, now + dt.timedelta(minutes=1)),
    }
    for what, data in offers.items():
        _replace(crl_path, data)
        assert crl.is_revoked(gone), f"{what}: the older CRL un-revoked the certificate"
        event = events.recent(kind_prefix="tls.crl.refused")[-1]
        assert event.details["held_number"] == 10, (what, event.details)
        assert event.details["held_this_update"] == now.isoformat()
        assert event.details["offered_number"] == crl_facts(x509.load_pem_x509_crl(data)).number
    assert len(events.recent(kind_prefix="tls.crl.refused")) == len(offers)

    # a newer CRL is accepted (here: one that lifts the revocation)
    _replace(crl_path, _crl(pki, 11, now + dt.timedelta(hours=2)))
    assert not crl.is_revoked(gone)
    assert crl.facts is not None and crl.facts.number == 11


def test_a_restart_keeps_the_newest_crl_it_saw(pki: Path, tmp_path: Path) -> None:
    gone = _serial(pki, "later")
    crl_path = pki / "crl.pem"
    older = crl_path.read_bytes()
    revoke(pki, "later")
    state = tmp_path / "state"
    config = load_config(write_config(tmp_path, pki, server=f'state_dir = "{state}"'))
    first = AccessInterceptor(config)
    first.attach(EventLog(), StateLayout(state).crl_in_force)
    assert first._crl is not None and first._crl.is_revoked(gone)

    _replace(crl_path, older)  # rolled back while the agent was down
    events = EventLog()
    second = AccessInterceptor(config)
    second.attach(events, StateLayout(state).crl_in_force)
    assert second._crl is not None and second._crl.is_revoked(gone)
    (event,) = events.recent(kind_prefix="tls.crl.refused")
    assert event.details["offered_number"] < event.details["held_number"]


def test_the_metrics_port_enforces_the_grpc_ports_crl_in_force(pki: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The metrics port shares the gRPC port's revocation list: a CRL rolled back while the agent
    was down, or written over the file while it runs, un-revokes nothing there either."""
    import urllib.error

    from agent.context import AgentContext
    from agent.server import _start_metrics, build_server
    from tests.test_security import _scrape

    monkeypatch.setattr(RevocationList, "_RECHECK_S", 0.0)
    issue_client(pki, "fine", "observer")
    crl_path = pki / "crl.pem"
    older = crl_path.read_bytes()  # genuine, signed before "later" was revoked
    revoke(pki, "later")
    state = tmp_path / "state"
    config = load_config(write_config(tmp_path, pki, server=f'state_dir = "{state}"'))
    AccessInterceptor(config).attach(EventLog(), StateLayout(state).crl_in_force)  # a first run saw it
    _replace(crl_path, older)  # rolled back while the agent was down

    async def build() -> AgentContext:
        server, ctx, _ = await build_server(config)
        await server.stop(None)
        return ctx

    ctx = asyncio.run(build())
    assert ctx.revocation is not None and ctx.revocation.is_revoked(_serial(pki, "later"))
    metrics = _start_metrics(dataclasses.replace(
        config, server=dataclasses.replace(config.server, metrics_port=free_port())), ctx)
    try:
        port = metrics.server_port
        assert _scrape(port, pki, "fine").startswith("200 ")
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            _scrape(port, pki, "later")
        _replace(crl_path, older)  # and again while it runs
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            _scrape(port, pki, "later")
    finally:
        metrics.shutdown()
        metrics.server_close()
