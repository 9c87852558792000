"""hil/: one acceptance suite for a real appliance on a bench, or for an image under qemu.

    # an image under qemu (boots it with `appliance boot`, forwards the agent's ports)
    python -m pytest hil/ --qemu OUT/disk/disk.raw --pki SITE-PKI --registry REGISTRY-DIR

    # a real appliance (flashed, powered on by you; the power-on bound is then not measured)
    python -m pytest hil/ --target 192.0.2.10:8001 --ca ca.crt --cert admin.crt --key admin.key \\
        [--registry REGISTRY-DIR --registry-url http://SITE:PORT] [--console serial.log]

The registry checks need the registry's own directory (``appliance registry init``; its
``published/`` tree is what nodes trust): the suite copies it and publishes new bundle
versions into the copy, so the site registry is never changed. Under qemu the copy is served
on a free port of the host's loopback, which the guest reaches as 10.0.2.100:18480
(images/hil.toml's update source) through a qemu guestfwd: the guest's user network is
restricted, so nothing it sends leaves this machine, and every frame is recorded for the egress
check (test_egress.py, run last). On a real bench, serve it yourself and say
where with ``--registry-url``... or leave ``--registry`` out and those checks skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from provisioning.image.boot import AGENT_PORTS, GUEST_FORWARD_ADDR
from testsupport.appliance import REGISTRY_GUEST_PORT, Appliance, appliance_cli, free_port, wait_serving

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The egress check last: it reads what the guest sent while every other check ran."""
    last = [i for i in items if i.get_closest_marker("egress_last")]
    items[:] = [i for i in items if i not in last] + last


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "egress_last: run after every other hil check")


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("hil", "hardware-in-the-loop target")
    g.addoption("--target", metavar="HOST:PORT", help="a running appliance's agent")
    g.addoption("--tls-name", help="the name in the node's certificate, when not HOST")
    g.addoption("--qemu", type=Path, metavar="IMAGE", help="boot IMAGE (disk.raw) under qemu")
    g.addoption("--accel", default=os.environ.get("APPLIANCE_HIL_ACCEL", "auto"),
                choices=("auto", "kvm", "tcg"), help="qemu accelerator (default auto)")
    g.addoption("--ca", type=Path, help="site CA certificate")
    g.addoption("--cert", type=Path, help="admin client certificate")
    g.addoption("--key", type=Path, help="its key")
    g.addoption("--pki", type=Path, help="site PKI directory: issue an admin client certificate "
                "from it instead of --ca/--cert/--key")
    g.addoption("--registry", type=Path, help="the registry directory the image trusts "
                "(copied; the copy gets new versions)")
    g.addoption("--registry-port", type=int, default=0,
                help="qemu: host loopback port to serve the registry copy on (default: a free one; "
                "the guest reaches it as 10.0.2.100:18480 either way)")
    g.addoption("--console", type=Path, help="a real appliance's serial console log")
    g.addoption("--os-release", type=Path, help="an OS release file (`appliance os-release`) "
                "newer than the image: checks the A->B update through the registry")
    g.addoption("--broken-os-release", type=Path, help="an OS release newer still whose agent never "
                "serves (`python -m provisioning.demo.bench prepare --os-release`): checks the node "
                "falls back")
    g.addoption("--hang-after", type=float, default=float(os.environ.get(
        "APPLIANCE_HIL_HANG_AFTER", "300")), help="qemu: a guest whose console prints nothing for "
                "this many seconds while its agent does not answer is reported hung (default 300: TCG)")
    g.addoption("--reset-after", type=float, default=float(os.environ.get(
        "APPLIANCE_HIL_RESET_AFTER", "120")), help="qemu: a console silent this many seconds right "
                "after the kernel's 'reboot: Restarting system' or the firmware's 'BdsDxe: "
                "starting Boot...' is a machine stuck in its reset or firmware (seen under TCG): "
                "it is power-cycled once (disk, UEFI variables and TPM state kept), and that is "
                "reported (default 120; the firmware and the boot loader print within seconds)")
    g.addoption("--egress-watch", type=float, default=600.0,
                help="qemu: seconds after the first power-on whose guest traffic the egress check "
                "reads (default 600); the check waits only for what is left of them")
    g.addoption("--build", type=Path, help="the `appliance build --out` directory of the image the node "
                "runs, for its offline audit (default under --qemu: the image's OUT)")
    g.addoption("--scan-bound", type=float, default=float(os.environ.get(
        "APPLIANCE_HIL_SCAN_BOUND", "3600")), help="seconds the node's own scans ([diagnostics] "
                "console_scap, console_lynis) may still take when their check starts (default 3600: "
                "TCG, OpenSCAP then Lynis, one after the other)")
    g.addoption("--serving-bound", type=float, default=float(os.environ.get(
        "APPLIANCE_HIL_SERVING_BOUND", "900")), help="seconds from power-on to agent SERVING "
                "(default 900: TCG; a real appliance or KVM should take far less)")


def _credentials(config: pytest.Config, work: Path) -> tuple[Path, Path, Path]:
    """The suite's client: CA, certificate and key files."""
    pki: Path | None = config.getoption("--pki")
    ca, cert, key = (config.getoption(o) for o in ("--ca", "--cert", "--key"))
    if pki is not None:
        from provisioning.pki import issue_client

        issued = issue_client(pki, "hil-suite", "admin", days=1, out=work / "client")
        ca, cert, key = pki / "ca.crt", Path(issued.cert_path), Path(issued.key_path)
    if not (ca and cert and key):
        raise pytest.UsageError("hil/: give --pki DIR, or --ca, --cert and --key")
    return Path(ca), Path(cert), Path(key)


@pytest.fixture(scope="session")
def appliance(request: pytest.FixtureRequest,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    config = request.config
    work = tmp_path_factory.mktemp("hil")
    files = _credentials(config, work)
    ca, cert, key = files
    creds = grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes(), cert.read_bytes())
    image: Path | None = config.getoption("--qemu")
    target: str | None = config.getoption("--target")
    bound = float(config.getoption("--serving-bound"))
    if image is not None:
        ports = {p: free_port() for p in AGENT_PORTS}
        node = Appliance(f"127.0.0.1:{ports[8001]}", creds, config.getoption("--tls-name"),
                         tls_files=files,
                         image=image.resolve(), state=work / "vm", ports=ports,
                         accel=config.getoption("--accel"),
                         hang_after=float(config.getoption("--hang-after")),
                         reset_after=float(config.getoption("--reset-after")), record_network=True,
                         registry_port=int(config.getoption("--registry-port")) or free_port(),
                         tpm=True)  # a TPM 2.0 as a node has: attestation (test_attest.py)
        try:
            seconds = node.power_on(keep_disk=False, bound=bound)
            print(f"\nhil: power-on to agent SERVING over mTLS: {seconds:.1f} s "
                  f"(qemu, accel {node.accel}; bound {bound:.0f} s)")
            yield node
        finally:
            node.power_off()
            if node.firmware_resets:
                print(f"\nhil: {len(node.firmware_resets)} time(s) the machine did not come back from "
                      "a warm reset or hung in its firmware (console silent after 'reboot: "
                      "Restarting system' or 'BdsDxe: starting'); it was power-cycled. Where "
                      "qemu's CPUs were:")
                for kept in node.firmware_resets:
                    state = (kept / "qemu-state.txt").read_text(errors="replace")
                    print(f"  {kept}:\n" + "\n".join(
                        "    " + line for line in state.splitlines()
                        if line.startswith(("RIP=", "EIP=", "R8 =", "CR0=", "==", "{", " \"status"))))
                    swtpm = kept / "swtpm.txt"
                    if swtpm.is_file():
                        print(f"    {swtpm.read_text().strip()}")
            if node.console is not None and node.console.is_file():
                keep = Path(os.environ.get("APPLIANCE_HIL_CONSOLE_COPY", work / "console-copy.log"))
                shutil.copyfile(node.console, keep)
        return
    if target is None:
        raise pytest.UsageError("hil/: give --qemu IMAGE or --target HOST:PORT")
    node = Appliance(target, creds, config.getoption("--tls-name"), console=config.getoption("--console"),
                     tls_files=files)
    wait_serving(node, time.monotonic(), bound)
    yield node


@dataclass
class SiteRegistry:
    """A copy of the site registry, served where the appliance's update source points."""

    directory: Path
    url: str

    def publish_bundle(self, version: str) -> str:
        from provisioning.demo.bench import affine_bundle
        from provisioning.registry import add_target, publish, target_path

        bundle = affine_bundle(self.directory.parent / "bundles", version)
        add_target(self.directory, bundle, kind="bundle")
        publish(self.directory)
        return target_path("bundle", "affine", version, bundle.name)

    def publish_os(self, release: Path) -> str:
        from agent.osrelease import read_release, registry_version
        from provisioning.registry import add_target, publish, target_path

        rel = read_release(release)
        version = registry_version(rel.version)
        add_target(self.directory, release, kind="os", name=rel.name, version=version)
        publish(self.directory)
        return target_path("os", rel.name, version, release.name)

    def tamper(self, target: str) -> list[Path]:
        """Flip one byte of every stored copy of ``target``'s file (same length)."""
        name = Path(target).name
        hit = [p for p in (self.directory / "published" / "targets").rglob("*")
               if p.is_file() and p.name.endswith(name)]
        for path in hit:
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            path.write_bytes(bytes(data))
        return hit


@pytest.fixture(scope="session")
def site_registry(request: pytest.FixtureRequest, appliance: Appliance,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[SiteRegistry]:
    source: Path | None = request.config.getoption("--registry")
    if source is None:
        pytest.skip("no --registry: the update checks need the registry the image trusts")
    copy = tmp_path_factory.mktemp("registry") / "registry"
    shutil.copytree(source, copy, symlinks=True)
    if appliance.image is None:
        pytest.skip("--registry on a real appliance: serve the copy yourself (not automated yet)")
    from provisioning.registry import make_server

    # the guest's 10.0.2.100:18480 is forwarded here (Appliance.power_on: a guestfwd)
    server = make_server(copy, appliance.registry_port, "127.0.0.1")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield SiteRegistry(copy, f"http://{GUEST_FORWARD_ADDR}:{REGISTRY_GUEST_PORT}")
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Attestation:
    """The node enrolled for attestation (`appliance fleet enrol-attest`, once per session) and
    how to ask the fleet CLI for its verdict."""

    inventory: Path
    client: tuple[str, ...]
    enrolled: dict[str, Any]  # enrol-attest's JSON answer for the node

    def attest(self, expect: Path) -> tuple[int, dict[str, Any]]:
        """`appliance fleet attest --expect EXPECT`: its exit status and the node's JSON verdict."""
        proc = _fleet("attest", *self.client, "--expect", str(expect), "--secure-boot", "optional")
        return proc.returncode, _one_node(proc)


def _fleet(*args: str) -> subprocess.CompletedProcess[str]:
    return appliance_cli("fleet", *args, timeout=900)


def _one_node(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    try:
        (node,) = json.loads(proc.stdout)["nodes"]
    except (ValueError, KeyError) as exc:
        raise AssertionError(f"no JSON answer ({exc}):\n{proc.stdout[-2000:]}\n"
                             f"{proc.stderr[-2000:]}") from None
    return node  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def attestation(request: pytest.FixtureRequest, appliance: Appliance,
                tmp_path_factory: pytest.TempPathFactory) -> Attestation:
    """Enrolment over the node's admin API: its TPM makes the attestation key, the site CA
    (--pki) certifies it for the inventory name, the node installs the certificate.  Under qemu
    the machine has a swtpm; OVMF has no Secure Boot keys there, so Secure Boot is optional."""
    pki: Path | None = request.config.getoption("--pki")
    if pki is None or appliance.tls_files is None or (appliance.image is not None and not appliance.tpm):
        pytest.skip("attestation needs --pki (the site CA certifies the node's attestation key) and a TPM")
    host, port = appliance.target.rsplit(":", 1)
    inventory = tmp_path_factory.mktemp("attest") / "nodes.toml"
    inventory.write_text(f'[[nodes]]\nname = "hil-node"\naddress = "{host}"\nport = {port}\n'
                         + (f'tls_name = "{appliance.tls_name}"\n' if appliance.tls_name else ""))
    ca, cert, key = (str(p) for p in appliance.tls_files)
    # a TPM makes keys slowly under emulation: the deadline is generous
    client = ("-i", str(inventory), "--ca", ca, "--cert", cert, "--key", key, "--deadline", "300", "--json")
    enrol = _fleet("enrol-attest", *client, "--pki-dir", str(pki))
    assert enrol.returncode == 0, enrol.stdout[-2000:] + enrol.stderr[-2000:]
    return Attestation(inventory, client, _one_node(enrol))
