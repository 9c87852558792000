"""mTLS, roles, revocation, audit and surface limits, on real grpc.aio servers on loopback.

Every certificate here is made by provisioning.pki; the server is assembled as the agent does
(tests/secure_server.py) with the real health and reflection services.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from agent.config import load_config
from agent.errors import ConfigError, NotFoundError, VerificationError
from agent.proto import node_pb2, node_pb2_grpc
from agent.security import (
    RevocationList,
    is_loopback,
    required_role,
    server_credentials,
    server_options,
)
from provisioning.pki import init_pki, issue_client, issue_node, revoke
from testsupport.secure_server import roleless_client, start

ROLES = ("observer", "operator", "admin")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site CA with a node certificate for localhost and one client per role, and more."""
    d = tmp_path_factory.mktemp("pki") / "site"
    init_pki(d, organization="Test Site")
    issue_node(d, "node1", dns=["localhost"], ips=["127.0.0.1"])
    for role in ROLES:
        issue_client(d, role, role)
    issue_client(d, "old", "admin", days=1,
                 valid_from=dt.datetime.now(dt.UTC) - dt.timedelta(days=10))
    issue_client(d, "gone", "admin")
    revoke(d, "gone", reason="key-compromise")
    other = tmp_path_factory.mktemp("pki") / "other"
    init_pki(other, organization="Someone Else")
    issue_client(other, "intruder", "admin", out=d / "issued" / "intruder")
    return d


def write_config(tmp_path: Path, pki: Path | None, *, listen: str = "127.0.0.1", server: str = "",
                 limits: str = "", tls: str = "") -> Path:
    text = f'[server]\nlisten = "{listen}"\nport = 0\n{server}\n'
    if pki is not None:
        node = pki / "issued" / "node1"
        text += (f'[tls]\ncert = "{node / "node1.crt"}"\nkey = "{node / "node1.key"}"\n'
                 f'ca = "{pki / "ca.crt"}"\ncrl = "{pki / "crl.pem"}"\n{tls}\n')
    elif tls:
        text += f"[tls]\n{tls}\n"
    text += f"[limits]\n{limits}\n"
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def client_creds(pki: Path, name: str | None) -> grpc.ChannelCredentials:
    ca = (pki / "ca.crt").read_bytes()
    if name is None:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    d = pki / "issued" / name
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=(d / f"{name}.key").read_bytes(),
                                        certificate_chain=(d / f"{name}.crt").read_bytes())


Scenario = Callable[[int], Awaitable[Any]]


def serve(config_path: Path, scenario: Scenario) -> Any:
    """Start the server, run ``scenario(port)`` against it, stop it; return what it returned."""

    async def main() -> Any:
        server, port = await start(load_config(config_path))
        try:
            return await scenario(port)
        finally:
            await server.stop(None)

    return asyncio.run(main())


def channel(port: int, creds: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    if creds is None:
        return grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return grpc.aio.secure_channel(f"localhost:{port}", creds)


async def code_of(call: Awaitable[Any]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


# ------------------------------------------------------------------ who may connect


@pytest.mark.parametrize(("who", "expected"), [
    (None, {grpc.StatusCode.UNAVAILABLE}),                  # no client certificate: TLS refuses
    ("intruder", {grpc.StatusCode.UNAVAILABLE}),            # another CA: TLS refuses
    ("old", {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED}),  # expired
    ("gone", {grpc.StatusCode.UNAUTHENTICATED}),            # revoked: the CRL refuses
])
def test_untrusted_clients_are_refused(pki: Path, tmp_path: Path, who: str | None,
                                       expected: set[grpc.StatusCode]) -> None:
    async def scenario(port: int) -> grpc.StatusCode:
        async with channel(port, client_creds(pki, who)) as ch:
            stub = node_pb2_grpc.NodeStub(ch)
            return await code_of(stub.GetHealth(node_pb2.GetHealthRequest(), timeout=10))

    assert serve(write_config(tmp_path, pki), scenario) in expected


def test_revoked_certificate_is_audited(pki: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(port: int) -> grpc.StatusCode:
        async with channel(port, client_creds(pki, "gone")) as ch:
            return await code_of(node_pb2_grpc.NodeStub(ch).GetInventory(node_pb2.GetInventoryRequest()))

    with caplog.at_level(logging.WARNING, logger="agent.audit"):
        assert serve(write_config(tmp_path, pki), scenario) == grpc.StatusCode.UNAUTHENTICATED
    line = next(r.getMessage() for r in caplog.records if r.name == "agent.audit")
    assert "decision=deny" in line and "CN=gone" in line and "revoked" in line


def test_revocation_after_start_takes_effect(pki: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RevocationList, "_RECHECK_S", 0.0)
    issue_client(pki, "later", "observer")

    async def scenario(port: int) -> tuple[grpc.StatusCode, grpc.StatusCode]:
        async with channel(port, client_creds(pki, "later")) as ch:
            stub = node_pb2_grpc.NodeStub(ch)
            before = await code_of(stub.GetHealth(node_pb2.GetHealthRequest()))
            revoke(pki, "later")
            after = await code_of(stub.GetHealth(node_pb2.GetHealthRequest()))
            return before, after

    assert serve(write_config(tmp_path, pki), scenario) == (grpc.StatusCode.OK,
                                                            grpc.StatusCode.UNAUTHENTICATED)


def test_certificate_expiring_on_an_open_connection(pki: Path, tmp_path: Path) -> None:
    # Valid for 3 more seconds: the handshake accepts it, the interceptor refuses it later.
    brief = issue_client(pki, "brief", "observer", days=1,
                         valid_from=dt.datetime.now(dt.UTC) - dt.timedelta(days=1) + dt.timedelta(seconds=3))

    async def scenario(port: int) -> tuple[grpc.StatusCode, grpc.StatusCode]:
        async with channel(port, client_creds(pki, "brief")) as ch:
            stub = node_pb2_grpc.NodeStub(ch)
            before = await code_of(stub.GetHealth(node_pb2.GetHealthRequest()))
            left = (brief.not_after - dt.datetime.now(dt.UTC)).total_seconds()
            await asyncio.sleep(max(0.0, left) + 0.3)
            return before, await code_of(stub.GetHealth(node_pb2.GetHealthRequest()))

    assert serve(write_config(tmp_path, pki), scenario) == (grpc.StatusCode.OK,
                                                            grpc.StatusCode.UNAUTHENTICATED)


def test_certificate_without_a_role_or_for_servers(pki: Path, tmp_path: Path) -> None:
    clients = [roleless_client(pki, None), roleless_client(pki, "root"), "node1"]

    async def scenario(port: int) -> list[grpc.StatusCode]:
        codes = []
        for who in clients:
            async with channel(port, client_creds(pki, who)) as ch:
                codes.append(await code_of(node_pb2_grpc.NodeStub(ch).GetHealth(node_pb2.GetHealthRequest())))
        return codes

    no_role, bad_role, server_cert = serve(write_config(tmp_path, pki), scenario)
    assert no_role == bad_role == grpc.StatusCode.PERMISSION_DENIED
    # A node's certificate is for serving (serverAuth only): TLS refuses it as a client.
    assert server_cert in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED}


# ------------------------------------------------------------------ what each role may do


def _calls(ch: grpc.aio.Channel) -> dict[str, Callable[[], Awaitable[Any]]]:
    node = node_pb2_grpc.NodeStub(ch)

    async def watch() -> None:
        async for _ in node.WatchHealth(node_pb2.WatchHealthRequest(interval_ms=1)):
            pass

    async def reflect() -> None:
        async def requests() -> Any:
            yield reflection_pb2.ServerReflectionRequest(list_services="")
        async for _ in reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(requests()):
            pass

    def raw(method: str) -> Callable[[], Awaitable[Any]]:
        return lambda: ch.unary_unary(f"/inference.GRPCInferenceService/{method}")(b"")

    return {
        "/appliance.v1.Node/GetHealth": lambda: node.GetHealth(node_pb2.GetHealthRequest()),
        "/appliance.v1.Node/WatchHealth": watch,
        "/appliance.v1.Node/GetInventory": lambda: node.GetInventory(node_pb2.GetInventoryRequest()),
        "/appliance.v1.Node/GetEvents": lambda: node.GetEvents(node_pb2.GetEventsRequest()),
        "/appliance.v1.Node/UpdateHistory": lambda: node.UpdateHistory(node_pb2.UpdateHistoryRequest()),
        "/appliance.v1.Node/CheckUpdates": lambda: node.CheckUpdates(node_pb2.CheckUpdatesRequest()),
        "/appliance.v1.Node/ApplyUpdate": lambda: node.ApplyUpdate(node_pb2.ApplyUpdateRequest()),
        "/appliance.v1.Node/Rollback": lambda: node.Rollback(node_pb2.RollbackRequest()),
        "/appliance.v1.Node/Attest": lambda: node.Attest(node_pb2.AttestRequest()),
        "/appliance.v1.Node/EnrolAttestation":
            lambda: node.EnrolAttestation(node_pb2.EnrolAttestationRequest()),
        "/grpc.health.v1.Health/Check": lambda: health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest()),
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": reflect,
        **{f"/inference.GRPCInferenceService/{m}": raw(m)
           for m in ("ServerLive", "ModelInfer", "RepositoryModelLoad", "RepositoryModelUnload",
                     "LogSettings")},
    }


EXPECTED_ROLE = {
    "/appliance.v1.Node/GetHealth": "observer", "/appliance.v1.Node/WatchHealth": "observer",
    "/appliance.v1.Node/GetInventory": "observer", "/appliance.v1.Node/GetEvents": "observer",
    "/appliance.v1.Node/UpdateHistory": "observer", "/appliance.v1.Node/CheckUpdates": "operator",
    "/appliance.v1.Node/ApplyUpdate": "operator", "/appliance.v1.Node/Rollback": "admin",
    "/appliance.v1.Node/Attest": "observer", "/appliance.v1.Node/EnrolAttestation": "admin",
    "/grpc.health.v1.Health/Check": "observer",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": "observer",
    "/inference.GRPCInferenceService/ServerLive": "observer",
    "/inference.GRPCInferenceService/ModelInfer": "observer",
    "/inference.GRPCInferenceService/RepositoryModelLoad": "operator",
    "/inference.GRPCInferenceService/RepositoryModelUnload": "operator",
    "/inference.GRPCInferenceService/LogSettings": "admin",
}


def test_each_role_gets_exactly_its_calls(pki: Path, tmp_path: Path) -> None:
    async def scenario(port: int) -> dict[tuple[str, str], grpc.StatusCode]:
        got = {}
        for role in ROLES:
            async with channel(port, client_creds(pki, role)) as ch:
                for method, call in _calls(ch).items():
                    got[(role, method)] = await code_of(call())
        return got

    got = serve(write_config(tmp_path, pki), scenario)
    for (role, method), code in got.items():
        allowed = ROLES.index(role) >= ROLES.index(EXPECTED_ROLE[method])
        assert code == (grpc.StatusCode.OK if allowed else grpc.StatusCode.PERMISSION_DENIED), \
            (role, method, code)
    assert len(got) == 3 * len(EXPECTED_ROLE)


def test_observer_apply_update_denied_and_audited(pki: Path, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(port: int) -> tuple[grpc.StatusCode, str]:
        async with channel(port, client_creds(pki, "observer")) as ch:
            try:
                await node_pb2_grpc.NodeStub(ch).ApplyUpdate(node_pb2.ApplyUpdateRequest())
            except grpc.aio.AioRpcError as err:
                return err.code(), err.details() or ""
        return grpc.StatusCode.OK, ""

    with caplog.at_level(logging.DEBUG, logger="agent.audit"):
        code, details = serve(write_config(tmp_path, pki), scenario)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "needs operator" in details
    lines = [r for r in caplog.records if r.name == "agent.audit"]
    deny = [r for r in lines if "decision=deny" in r.getMessage()]
    assert len(deny) == 1 and deny[0].levelno == logging.WARNING
    msg = deny[0].getMessage()
    serial = next(c for c in __import__("provisioning.pki", fromlist=["x"]).list_certs(pki)
                  if c.name == "observer").serial
    assert "method=/appliance.v1.Node/ApplyUpdate" in msg
    assert "CN=observer" in msg and "OU=observer" in msg and f"serial={serial:x}" in msg


def test_allowed_calls_are_audited_at_debug(pki: Path, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(port: int) -> grpc.StatusCode:
        async with channel(port, client_creds(pki, "admin")) as ch:
            return await code_of(node_pb2_grpc.NodeStub(ch).Rollback(node_pb2.RollbackRequest()))

    with caplog.at_level(logging.DEBUG, logger="agent.audit"):
        assert serve(write_config(tmp_path, pki), scenario) == grpc.StatusCode.OK
    allow = [r for r in caplog.records if r.name == "agent.audit" and "decision=allow" in r.getMessage()]
    assert allow and allow[0].levelno == logging.DEBUG and "Rollback" in allow[0].getMessage()


def test_unclassified_methods_need_admin() -> None:
    assert required_role("/appliance.v1.Node/SetConfig") == "admin"
    assert required_role("/some.Other/Thing") == "admin"
    assert required_role("/inference.GRPCInferenceService/ModelStreamInfer") == "observer"


# ------------------------------------------------------------------ listening without TLS


def test_refuses_beyond_loopback_without_tls(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, None, listen="0.0.0.0"))
    with pytest.raises(ConfigError, match=r"listen = '0.0.0.0' is beyond loopback.*mTLS"):
        server_credentials(cfg)


def test_partial_tls_section_refused(tmp_path: Path, pki: Path) -> None:
    cfg = load_config(write_config(tmp_path, None, tls=f'cert = "{pki / "ca.crt"}"'))
    with pytest.raises(ConfigError, match="sets cert but not key, ca"):
        server_credentials(cfg)


def test_bad_tls_material_refused(tmp_path: Path, pki: Path) -> None:
    node = pki / "issued" / "node1"
    loose = tmp_path / "loose.key"
    loose.write_bytes((node / "node1.key").read_bytes())
    loose.chmod(0o644)
    cases: list[tuple[str, type[Exception], str]] = [
        (f'cert = "{node / "node1.crt"}"\nkey = "{loose}"\nca = "{pki / "ca.crt"}"',
         ConfigError, "readable by others"),
        (f'cert = "{node / "node1.crt"}"\nkey = "{pki / "issued/admin/admin.key"}"\nca = "{pki / "ca.crt"}"',
         ConfigError, "does not belong to certificate"),
        (f'cert = "{pki / "issued/intruder/intruder.crt"}"\nkey = "{pki / "issued/intruder/intruder.key"}"\n'
         f'ca = "{pki / "ca.crt"}"', VerificationError, "not issued by the CA"),
        (f'cert = "{node / "node1.crt"}"\nkey = "{node / "node1.key"}"\nca = "{tmp_path / "nope.crt"}"',
         NotFoundError, "nope.crt: .tls. ca: no such file"),
    ]
    for tls, exc, message in cases:
        cfg = load_config(write_config(tmp_path, None, listen="0.0.0.0", tls=tls))
        with pytest.raises(exc, match=message):
            server_credentials(cfg)


def test_loopback_without_tls_gets_the_configured_role(tmp_path: Path) -> None:
    async def scenario(port: int) -> tuple[grpc.StatusCode, grpc.StatusCode]:
        async with channel(port, None) as ch:
            node = node_pb2_grpc.NodeStub(ch)
            return (await code_of(node.GetHealth(node_pb2.GetHealthRequest())),
                    await code_of(node.ApplyUpdate(node_pb2.ApplyUpdateRequest())))

    cfg = write_config(tmp_path, None, tls='loopback_role = "observer"')
    assert serve(cfg, scenario) == (grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED)
    cfg = write_config(tmp_path, None)
    assert serve(cfg, scenario) == (grpc.StatusCode.OK, grpc.StatusCode.OK)


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("[::1]")
    assert is_loopback("localhost") and is_loopback("127.1.2.3")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("node.example")


# ------------------------------------------------------------------ surface limits


def test_oversized_message_is_refused(pki: Path, tmp_path: Path) -> None:
    async def scenario(port: int) -> tuple[grpc.StatusCode, grpc.StatusCode]:
        async with channel(port, client_creds(pki, "admin")) as ch:
            node = node_pb2_grpc.NodeStub(ch)
            small = await code_of(node.ApplyUpdate(node_pb2.ApplyUpdateRequest(targets=["x" * 100])))
            big = await code_of(node.ApplyUpdate(node_pb2.ApplyUpdateRequest(targets=["x" * 5000])))
            return small, big

    cfg = write_config(tmp_path, pki, server="max_message_bytes = 4096")
    assert serve(cfg, scenario) == (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED)


def test_malformed_requests_get_invalid_argument(pki: Path, tmp_path: Path) -> None:
    async def scenario(port: int) -> tuple[grpc.StatusCode, grpc.StatusCode, grpc.StatusCode]:
        async with channel(port, client_creds(pki, "observer")) as ch:
            garbage = b"\x0a\xff\xff\xff\xff\x0f"  # field 1, length far past the end
            unary = await code_of(ch.unary_unary("/appliance.v1.Node/GetEvents")(garbage))
            health = await code_of(ch.unary_unary("/grpc.health.v1.Health/Check")(garbage))
            stream = ch.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
            reflect = await code_of(_drain(stream(iter([garbage]))))
            return unary, health, reflect

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert serve(write_config(tmp_path, pki), scenario) == (invalid, invalid, invalid)


async def _drain(call: Any) -> None:
    async for _ in call:
        pass


def test_deadline_cap_applies_to_calls_without_deadline(pki: Path, tmp_path: Path) -> None:
    async def scenario(port: int) -> tuple[grpc.StatusCode, grpc.StatusCode]:
        async with channel(port, client_creds(pki, "observer")) as ch:
            node = node_pb2_grpc.NodeStub(ch)
            slow = await code_of(node.GetEvents(node_pb2.GetEventsRequest(kind_prefix="sleep:20")))
            quick = await code_of(node.GetEvents(node_pb2.GetEventsRequest(kind_prefix="sleep:0.01")))
            return slow, quick

    cfg = write_config(tmp_path, pki, limits="max_deadline_s = 0.3")
    assert serve(cfg, scenario) == (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.OK)


def test_stream_cap(pki: Path, tmp_path: Path) -> None:
    async def scenario(port: int) -> tuple[int, grpc.StatusCode]:
        async with channel(port, client_creds(pki, "observer")) as ch:
            received = 0
            try:
                async for _ in node_pb2_grpc.NodeStub(ch).WatchHealth(node_pb2.WatchHealthRequest()):
                    received += 1
            except grpc.aio.AioRpcError as err:
                return received, err.code()
            return received, grpc.StatusCode.OK

    received, code = serve(write_config(tmp_path, pki, limits="max_stream_s = 0.4"), scenario)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and received >= 1


def test_calls_per_peer_are_limited(pki: Path, tmp_path: Path) -> None:
    async def scenario(port: int) -> tuple[list[grpc.StatusCode], grpc.StatusCode]:
        async with channel(port, client_creds(pki, "observer")) as ch:
            node = node_pb2_grpc.NodeStub(ch)
            slow = [asyncio.ensure_future(code_of(node.GetEvents(
                node_pb2.GetEventsRequest(kind_prefix="sleep:1.5")))) for _ in range(2)]
            await asyncio.sleep(0.5)  # both are in progress on the server now
            third = await code_of(node.GetEvents(node_pb2.GetEventsRequest()))
            done = list(await asyncio.gather(*slow))
            after = await code_of(node.GetEvents(node_pb2.GetEventsRequest()))
            return [*done, third], after

    codes, after = serve(write_config(tmp_path, pki, limits="max_calls_per_peer = 2"), scenario)
    assert codes == [grpc.StatusCode.OK, grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert after == grpc.StatusCode.OK


def test_server_options_carry_the_limits(tmp_path: Path) -> None:
    limits = "max_concurrent_streams = 7\npermit_keepalive_without_calls = true"
    cfg = load_config(write_config(tmp_path, None, server="max_message_bytes = 1000", limits=limits))
    opts = dict(server_options(cfg))
    assert opts["grpc.max_receive_message_length"] == 1000
    assert opts["grpc.max_send_message_length"] == 1000
    assert opts["grpc.max_concurrent_streams"] == 7
    assert opts["grpc.keepalive_permit_without_calls"] == 1
    assert opts["grpc.http2.min_ping_interval_without_data_ms"] == 30_000
    assert opts["grpc.so_reuseport"] == 0


def test_limits_section_rejects_bad_values(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("[limits]\nmax_calls_per_peer = 0\n")
    with pytest.raises(ConfigError, match=r"\[limits\] max_calls_per_peer = 0: must be positive"):
        load_config(path)
    path.write_text('[tls]\nloopback_role = "root"\n')
    with pytest.raises(ConfigError, match="loopback_role = 'root': expected one of"):
        load_config(path)


# ---------------------------------------------------------------------- metrics port


def _scrape(port: int, pki: Path, name: str | None, *, https: bool = True) -> str:
    import ssl
    import urllib.request

    if not https:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            return f"{resp.status} {resp.headers['Content-Type']}"
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.check_hostname = False  # the node certificate names localhost; the scrape is by address
    if name is not None:
        d = pki / "issued" / name
        ctx.load_cert_chain(str(d / f"{name}.crt"), str(d / f"{name}.key"))
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", timeout=10, context=ctx) as resp:
        return f"{resp.status} {resp.headers['Content-Type']}"


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_the_https_ports_issue_no_session_ticket(pki: Path, tmp_path: Path, version: ssl.TLSVersion) -> None:
    """A ticket seals the session's secrets under a key the agent keeps for its lifetime, which
    undoes forward secrecy; the ports' clients never resume.  A real client, after a whole
    response (TLS 1.3 tickets come after the handshake), holds no ticket to resume with."""
    import socket

    from agent.metrics import start_metrics_server
    from agent.security import metrics_tls

    tls = metrics_tls(load_config(write_config(tmp_path, pki)))
    assert tls is not None
    server = start_metrics_server(0, "127.0.0.1", tls)
    try:
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        ctx.check_hostname = False
        ctx.minimum_version = ctx.maximum_version = version
        d = pki / "issued" / "observer"
        ctx.load_cert_chain(str(d / "observer.crt"), str(d / "observer.key"))
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as raw, \
                ctx.wrap_socket(raw) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
            reply = sock.recv(65536)  # a TLS 1.3 server sends its tickets before the response
            assert reply.startswith(b"HTTP/1.") and b" 200 " in reply.split(b"\r\n", 1)[0]
            names = {ssl.TLSVersion.TLSv1_3: "TLSv1.3", ssl.TLSVersion.TLSv1_2: "TLSv1.2"}
            assert sock.version() == names[version]
            assert sock.session is not None and not sock.session.has_ticket
    finally:
        server.shutdown()
        server.server_close()


def test_metrics_port_follows_the_grpc_ports_mtls_rules(pki: Path, tmp_path: Path) -> None:
    """With [tls] the metrics port is HTTPS too: a site certificate with a role, unexpired and not
    revoked, gets the metrics; plain HTTP, no certificate, another CA's, an expired or a revoked
    one get nothing."""
    import urllib.error

    from agent.metrics import start_metrics_server
    from agent.security import metrics_tls

    config = load_config(write_config(tmp_path, pki))
    tls = metrics_tls(config)
    assert tls is not None
    server = start_metrics_server(0, "127.0.0.1", tls)
    port = server.server_port
    try:
        assert _scrape(port, pki, "observer").startswith("200 text/plain")
        for name in (None, "intruder", "old", "gone"):
            with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
                _scrape(port, pki, name)
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            _scrape(port, pki, None, https=False)
        assert _scrape(port, pki, "admin").startswith("200 ")  # still serving after the refusals
    finally:
        server.shutdown()
        server.server_close()
    assert metrics_tls(load_config(write_config(tmp_path, None))) is None  # loopback: plain HTTP
