"""Benchmark: `appliance fleet attest` over 1,000 simulated nodes on loopback, over mTLS (issue #17).

How the nodes are simulated: a swtpm per node is too heavy for one machine, so each node is a
grpc.aio server of its own (the agent's TLS credentials and interceptors, so handshakes and
role checks cost what they cost on a node), with its own attestation key: an ECDSA P-256 key in
software, certified by a site CA with the AK usage, that signs a TPMS_ATTEST quote built the way a
TPM builds it (testsupport.tpm2) over PCRs 0-7 and 11 of a booted UKI, with the fleet's nonce, and
the firmware event log of an OVMF-like boot with Secure Boot on (testsupport.eventlog), replayed.
The fleet side is the real CLI in its own process, judging every answer in full (certificate
chain, usage, key, signature, nonce, PCR digest, PCR 11 against the expected image).

Figures: wall time and CPU (the CLI's, from the kernel's accounting of children) of
`fleet attest` for all nodes, against a baseline in the same run: `fleet status` (two unary
calls per node) over the same servers.  In process: the median time of one `judge` (the fleet's
work per answer), and, when swtpm and tpm2-tools are here, the median time of one real quote on
a software TPM (a node's own share; a hardware TPM's ECDSA signature takes longer, tens to
hundreds of ms: not measured here).

    PYTHONPATH=. python bench/attest_fleet.py [--nodes 1000] [--processes 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from provisioning import attest as a  # noqa: E402
from provisioning.image.measure import expected_pcr11, pcr11_record  # noqa: E402
from testsupport import attest_support, eventlog, tpm2  # noqa: E402
from testsupport.pe import pe_image  # noqa: E402

UKI = pe_image([(".linux", b"kernel" * 4000), (".osrel", b"ID=appliance\nIMAGE_VERSION=7\n"),
                (".cmdline", b"roothash=" + b"7" * 64 + b" ro"), (".initrd", b"initrd" * 8000)])
ROOT_HASH = "7" * 64


# ------------------------------------------------------------------ the simulated nodes (server side)

def _servicer(name: str, ca: attest_support.CA) -> Any:
    from agent.proto import node_pb2
    from testsupport.secure_server import EmptyNode

    ak = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = attest_support.ak_certificate(ak, name, issuer=ca, now=now)
    firmware = eventlog.firmware_events()  # an OVMF-like boot with Secure Boot on
    pcrs = eventlog.pcrs(firmware) | {11: expected_pcr11(UKI)[-1].value}
    public, values, log = tpm2.public_area(ak), tpm2.pcr_values(pcrs), eventlog.encode(firmware)

    class SimulatedNode(EmptyNode):
        async def Attest(self, request: Any, context: Any) -> Any:  # noqa: N802
            quote = tpm2.quote_fields(request.nonce, pcrs).encode()
            return node_pb2.AttestResponse(attest=quote, signature=tpm2.sign(ak, quote), pcr_values=values,
                                           ak_public=public, ak_certificate=certificate,
                                           root_hash=ROOT_HASH, image_version="7", event_log=log)

    return SimulatedNode()


async def _serve(config_path: Path, ca_dir: Path, first: int, count: int, port_file: Path) -> None:
    import grpc

    from agent.config import load_config
    from agent.proto import node_pb2_grpc
    from agent.security import interceptors, server_credentials, server_options

    config = load_config(config_path)
    key = serialization.load_pem_private_key((ca_dir / "ak-ca.key").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    ca = (key, x509.load_pem_x509_certificate((ca_dir / "ak-ca.crt").read_bytes()))
    servers, ports = [], []
    for i in range(first, first + count):
        server = grpc.aio.server(options=server_options(config), interceptors=interceptors(config))
        node_pb2_grpc.add_NodeServicer_to_server(_servicer(f"n{i}", ca), server)  # type: ignore[no-untyped-call]
        ports.append(server.add_secure_port("127.0.0.1:0", server_credentials(config)))
        await server.start()
        servers.append(server)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    port_file.with_suffix(".tmp").write_text("\n".join(map(str, ports)))
    port_file.with_suffix(".tmp").replace(port_file)
    await stop.wait()
    await asyncio.gather(*(s.stop(0.5) for s in servers))


# ------------------------------------------------------------------ the fleet side

def _run_cli(argv: list[str]) -> tuple[float, float, dict[str, Any]]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "provisioning.cli", *argv], capture_output=True, text=True,
                          env=env, check=False)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"appliance {argv[:2]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, json.loads(proc.stdout)["summary"]


def _judge_us(ca: attest_support.CA, images: dict[str, bytes], n: int = 300) -> float:
    """Median microseconds of one judge() of a good answer (fresh nonce each)."""
    ak = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = attest_support.ak_certificate(ak, "n0", issuer=ca, now=now)
    times = []
    for _ in range(n):
        nonce = os.urandom(32)
        answer = attest_support.answer(nonce, UKI, ROOT_HASH, ak=ak, certificate=cert)
        t = time.perf_counter()
        verdict = a.judge(answer, nonce=nonce, node="n0", policy=a.Policy(ca[1], images))
        times.append(time.perf_counter() - t)
        assert verdict.ok, verdict.reason
    return statistics.median(times) * 1e6


def _swtpm_quote_ms(work: Path, repeat: int = 15) -> float | None:
    """Median ms of one real quote (agent.attest.TpmQuoter) on a swtpm; None without swtpm."""
    import shutil

    if shutil.which("swtpm") is None or shutil.which("tpm2_quote") is None:
        return None
    from agent.attest import TpmQuoter, make_attestation_key
    from agent.config import AttestSection
    from testsupport.swtpm import swtpm_server

    (work / "tpm").mkdir()
    with swtpm_server(work / "tpm") as tcti:
        make_attestation_key(AttestSection(tcti=tcti), work / "tpm" / "ak.pub")
        (work / "tpm" / "ak.crt").write_bytes(x509.load_der_x509_certificate(
            attest_support.ak_certificate(ec.generate_private_key(ec.SECP256R1()), "n0",
                                          issuer=attest_support.site_ca(datetime.datetime.now(datetime.UTC)),
                                          now=datetime.datetime.now(datetime.UTC)))
            .public_bytes(serialization.Encoding.PEM))
        quoter = TpmQuoter(AttestSection(tcti=tcti, ak_certificate=work / "tpm" / "ak.crt"))
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            quoter.quote(os.urandom(32))
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--deadline", type=float, default=60.0)
    parser.add_argument("--serve", nargs=5, metavar=("CONFIG", "CA_DIR", "FIRST", "COUNT", "PORT_FILE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        config, ca_dir, first, count, port_file = args.serve
        asyncio.run(_serve(Path(config), Path(ca_dir), int(first), int(count), Path(port_file)))
        return

    from testsupport.secure_server import loopback_site

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        work = Path(tmp)
        _pki, config, auth = loopback_site(work)
        ca = attest_support.site_ca(datetime.datetime.now(datetime.UTC), "Bench AK CA")
        (work / "ak-ca.key").write_bytes(ca[0].private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
        (work / "ak-ca.crt").write_bytes(ca[1].public_bytes(serialization.Encoding.PEM))
        manifest = work / "image-manifest.json"
        manifest.write_text(json.dumps({"roothash": ROOT_HASH, "pcr11": pcr11_record(UKI)}))

        t0 = time.monotonic()
        per = -(-args.nodes // args.processes)
        procs, port_files = [], []
        for p in range(args.processes):
            first, count = p * per, min(per, args.nodes - p * per)
            if count <= 0:
                break
            port_files.append(work / f"ports-{p}")
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "--serve", str(config), str(work), str(first), str(count),
                 str(port_files[-1])], env=dict(os.environ, PYTHONPATH=str(ROOT))))
        stack.callback(lambda: [(pr.send_signal(signal.SIGTERM), pr.wait(30)) for pr in procs])
        while not all(f.exists() for f in port_files):
            if any(pr.poll() is not None for pr in procs):
                raise SystemExit("a simulated-node process died while starting")
            time.sleep(0.2)
        ports = [int(x) for f in port_files for x in f.read_text().split()]
        print(f"{len(ports)} simulated nodes (one grpc.aio server and AK each) in {len(procs)} processes, "
              f"up in {time.monotonic() - t0:.1f} s")
        inventory = work / "nodes.toml"
        inventory.write_text("\n".join(f'[[nodes]]\nname = "n{i}"\naddress = "127.0.0.1"\nport = {port}\n'
                                       f'tls_name = "localhost"\n' for i, port in enumerate(ports)))

        common = ["-i", str(inventory), "--json", "--deadline", str(args.deadline), *auth]
        status = [_run_cli(["fleet", "status", *common]) for _ in range(args.repeat)]
        attest = [_run_cli(["fleet", "attest", *common, "--expect", str(manifest),
                            "--site-ca", str(work / "ak-ca.crt")]) for _ in range(args.repeat)]
        for label, runs in (("fleet status (baseline)", status), ("fleet attest", attest)):
            summary = runs[-1][2]
            print(f"{label:<24} wall median {statistics.median(r[0] for r in runs):6.2f} s  cpu median "
                  f"{statistics.median(r[1] for r in runs):6.2f} s  (runs: "
                  f"{', '.join(f'{r[0]:.2f}' for r in runs)} s)  {summary}")
            if summary.get("ok") != len(ports):
                raise SystemExit(f"{label}: not every node answered well: {summary}")
        s_wall, a_wall = statistics.median(r[0] for r in status), statistics.median(r[0] for r in attest)
        s_cpu, a_cpu = statistics.median(r[1] for r in status), statistics.median(r[1] for r in attest)
        print(f"attest / status: wall {a_wall / s_wall:.2f}x, fleet CPU {a_cpu / s_cpu:.2f}x; fleet CPU per "
              f"node: status {s_cpu / len(ports) * 1e3:.2f} ms, attest {a_cpu / len(ports) * 1e3:.2f} ms")
        images = a.expected_images([json.loads(manifest.read_text())], [str(manifest)])
        print(f"one judge() in process: median {_judge_us(ca, images):.0f} us")
        tpm_ms = _swtpm_quote_ms(work)
        print("one real quote on swtpm (tpm2_readpublic + tpm2_quote): "
              + (f"median {tpm_ms:.1f} ms" if tpm_ms is not None else "skipped (no swtpm or tpm2-tools)"))


if __name__ == "__main__":
    main()
