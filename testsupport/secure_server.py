"""A real grpc.aio server assembled the way the agent does it, for security and fuzz tests.

It serves the real gRPC health service and server reflection, a test-local
``appliance.v1.Node`` servicer that answers with empty replies (the interceptor is what is
under test), and raw-bytes handlers for a few ``inference.GRPCInferenceService`` methods.
Run as a process (``python -m testsupport.secure_server --config agent.toml --port-file F``) it
serves until SIGTERM; the fuzz tests use it that way so that its memory can be watched.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agent.config import AgentConfig, load_config
from agent.proto import node_pb2, node_pb2_grpc
from agent.security import interceptors, maximum_concurrent_rpcs, server_credentials, server_options

ROOT = Path(__file__).resolve().parent.parent
INFERENCE_METHODS = ("ServerLive", "ModelInfer", "RepositoryIndex", "RepositoryModelLoad",
                     "RepositoryModelUnload", "LogSettings")


class EmptyNode(node_pb2_grpc.NodeServicer):
    """Empty replies; GetEvents with ``kind_prefix="sleep:S"`` sleeps S seconds first."""

    async def GetHealth(self, request: Any, context: Any) -> Any:
        return node_pb2.HealthReport()

    async def WatchHealth(self, request: Any, context: Any) -> AsyncIterator[Any]:
        # interval_ms == 0 here means "forever, every 50 ms"; otherwise three reports.
        n = 0
        while request.interval_ms == 0 or n < 3:
            yield node_pb2.HealthReport(overall=node_pb2.PASS)
            n += 1
            await asyncio.sleep(0.05)

    async def GetInventory(self, request: Any, context: Any) -> Any:
        return node_pb2.Inventory(node_id="test")

    async def GetEvents(self, request: Any, context: Any) -> Any:
        if request.kind_prefix.startswith("sleep:"):
            with contextlib.suppress(ValueError):
                await asyncio.sleep(min(float(request.kind_prefix[6:]), 30.0))
        return node_pb2.GetEventsResponse()

    async def CheckUpdates(self, request: Any, context: Any) -> Any:
        return node_pb2.CheckUpdatesResponse()

    async def ApplyUpdate(self, request: Any, context: Any) -> Any:
        # A target named "refuse-me" is refused, as a node refuses a bad signature.
        return node_pb2.ApplyUpdateResponse(results=[
            node_pb2.UpdateResult(target=t, name=t, outcome="refused" if t == "refuse-me" else "applied",
                                  reason="signature does not verify" if t == "refuse-me" else "")
            for t in request.targets])

    async def Rollback(self, request: Any, context: Any) -> Any:
        return node_pb2.RollbackResponse()

    async def UpdateHistory(self, request: Any, context: Any) -> Any:
        return node_pb2.UpdateHistoryResponse()

    async def Attest(self, request: Any, context: Any) -> Any:
        return node_pb2.AttestResponse()

    async def EnrolAttestation(self, request: Any, context: Any) -> Any:
        return node_pb2.EnrolAttestationResponse()


async def _raw(request: bytes, context: Any) -> bytes:
    return b""


def _inference_handler() -> grpc.GenericRpcHandler:
    handlers = {name: grpc.unary_unary_rpc_method_handler(_raw) for name in INFERENCE_METHODS}
    return grpc.method_handlers_generic_handler("inference.GRPCInferenceService", handlers)


async def start(config: AgentConfig, ports: int = 1) -> tuple[grpc.aio.Server, int]:
    """Build and start the server on ``[server] listen:port``; return it and its bound port.

    With ``ports`` > 1 it listens on that many ports (``[server] port`` must be 0); the
    others are in ``server.extra_ports``.
    """
    server = grpc.aio.server(options=server_options(config), interceptors=interceptors(config),
                             maximum_concurrent_rpcs=maximum_concurrent_rpcs(config))
    node_pb2_grpc.add_NodeServicer_to_server(EmptyNode(), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_generic_rpc_handlers((_inference_handler(),))
    names = (node_pb2.DESCRIPTOR.services_by_name["Node"].full_name,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    creds = server_credentials(config)
    address = f"{config.server.listen}:{config.server.port}"
    bound = [server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
             for _ in range(ports)]
    port = bound[0]
    server.extra_ports = bound[1:]  # type: ignore[attr-defined]
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, port


async def _serve(config_path: Path, port_file: Path, ports: int) -> None:
    server, port = await start(load_config(config_path), ports)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text("\n".join(str(p) for p in [port, *server.extra_ports]))  # type: ignore[attr-defined]
    tmp.replace(port_file)
    await stop.wait()
    await server.stop(1.0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--ports", type=int, default=1, help="listen on this many ports")
    args = parser.parse_args()
    asyncio.run(_serve(args.config, args.port_file, args.ports))


if __name__ == "__main__":
    main()


@contextlib.contextmanager
def spawn(config: Path, ports: int = 1) -> Iterator[tuple[list[int], int]]:
    """Run the server as a separate process; yield its ports and pid; stop it afterwards."""
    port_file = config.with_name(f"{config.stem}.ports")
    port_file.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "testsupport.secure_server", "--config", str(config),
                             "--port-file", str(port_file), "--ports", str(ports)], env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"test server did not start (exit {proc.returncode})")
            time.sleep(0.05)
        yield [int(p) for p in port_file.read_text().split()], proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def roleless_client(pki: Path, ou: str | None) -> str:
    """A client certificate from the site CA whose OU is not one role (as another tool might make)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, "norole")]
    if ou:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name(attrs)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    name = f"norole-{ou}"
    d = pki / "issued" / name
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    (d / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return name


def mtls_config(workdir: Path, pki: Path, node: str = "node", extra: str = "") -> Path:
    """An agent.toml for loopback with mTLS from ``pki``'s node certificate ``node``."""
    d = pki / "issued" / node
    config = workdir / f"agent-{node}.toml"
    config.write_text(f'[server]\nlisten = "127.0.0.1"\nport = 0\n{extra}\n'
                      f'[tls]\ncert = "{d / f"{node}.crt"}"\nkey = "{d / f"{node}.key"}"\n'
                      f'ca = "{pki / "ca.crt"}"\ncrl = "{pki / "crl.pem"}"\n')
    return config


def loopback_site(workdir: Path) -> tuple[Path, Path, list[str]]:
    """A site PKI in ``workdir/pki`` with a node certificate for loopback (``localhost``,
    127.0.0.1) and an observer's client certificate.  Returns the PKI directory, an agent.toml
    for loopback mTLS (:func:`mtls_config`) and the fleet CLI's flags for the observer."""
    from provisioning.pki import init_pki, issue_client, issue_node

    pki = workdir / "pki"
    init_pki(pki, organization="Bench Site")
    issue_node(pki, "node", dns=["localhost"], ips=["127.0.0.1"])
    issue_client(pki, "observer", "observer")
    d = pki / "issued" / "observer"
    auth = ["--ca", str(pki / "ca.crt"), "--cert", str(d / "observer.crt"), "--key", str(d / "observer.key")]
    return pki, mtls_config(workdir, pki), auth
