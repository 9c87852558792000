"""One appliance under test (a qemu machine or a real node) and how to wait for its agent.

hil/ (the acceptance suite) and bench/hil_boot.py use it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from provisioning.errors import ImageError
from provisioning.image.boot import ConsoleWatch, Machine
from provisioning.image.boot import load as load_machine
from provisioning.image.boot import stop as stop_machine
from provisioning.ports import free_loopback_port

__all__ = ["REGISTRY_GUEST_PORT", "Appliance", "appliance_cli", "free_port", "serving_status", "wait_serving"]

ROOT = Path(__file__).resolve().parent.parent
REGISTRY_GUEST_PORT = 18480  # images/hil.toml: [agent.updates] sources = ["http://10.0.2.100:18480"]


@dataclass
class Appliance:
    """One appliance under test: where its agent is and how to reach it with mTLS."""

    target: str
    credentials: grpc.ChannelCredentials
    tls_name: str | None = None
    console: Path | None = None
    image: Path | None = None
    state: Path | None = None  # qemu machine state directory
    ports: dict[int, int] = field(default_factory=dict)
    accel: str = "auto"
    serving_seconds: list[float] = field(default_factory=list)  # power-on -> SERVING, per boot
    hang_after: float | None = None  # console silence that means a hung guest (qemu only)
    # qemu only: console silence after the kernel's restart line that means the machine never
    # came back from its reset (power-cycled once; the evidence folders are listed here)
    reset_after: float | None = None
    firmware_resets: list[Path] = field(default_factory=list)
    # qemu only: a restricted user network whose frames are recorded (one pcap per power-on),
    # the guest's update source (10.0.2.100:REGISTRY_GUEST_PORT) forwarded to this host port
    record_network: bool = False
    registry_port: int = 0
    pcaps: list[Path] = field(default_factory=list)
    first_power_on: float | None = None  # time.monotonic() of the first power-on
    machine: Machine | None = None  # the running qemu
    # the client's CA, certificate and key files (PEM), for clients other than gRPC's
    tls_files: tuple[Path, Path, Path] | None = None
    tpm: bool = False  # qemu only: a software TPM (swtpm), kept in the state folder across power-ons
    cpu: str | None = None  # qemu only: ``appliance boot --cpu MODEL`` (default: its own choice)

    def channel(self) -> grpc.Channel:
        options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 64 << 20)]
        if self.tls_name:
            options.append(("grpc.ssl_target_name_override", self.tls_name))
        return grpc.secure_channel(self.target, self.credentials, options=options)

    def https_base(self) -> str:
        """The agent's HTTPS port (8000): the forwarded loopback port under qemu, else the
        gRPC target's host."""
        if 8000 in self.ports:
            return f"https://127.0.0.1:{self.ports[8000]}"
        host = self.target.rsplit(":", 1)[0]
        return f"https://{host}:8000"

    @property
    def manifest(self) -> dict[str, Any] | None:
        if self.image is None:
            return None
        path = self.image.parent / "image-manifest.json"
        return json.loads(path.read_text()) if path.is_file() else None

    # ------------------------------------------------------------ qemu only

    def power_on(self, *, keep_disk: bool, bound: float) -> float:
        """Start the machine (again) and wait for SERVING; return the seconds it took."""
        began = time.monotonic()
        if self.first_power_on is None:
            self.first_power_on = began
        self.start(keep_disk=keep_disk)
        seconds = wait_serving(self, began, bound)
        self.serving_seconds.append(seconds)
        return seconds

    def start(self, *, keep_disk: bool, keep_console: bool = False) -> None:
        """Start qemu (and swtpm) for this appliance without waiting for its agent.

        Raises:
            ImageError: ``appliance boot`` failed (its stderr in the message).
        """
        assert self.image is not None and self.state is not None
        args: list[str] = ["boot", str(self.image), "--state", str(self.state), "--accel", self.accel,
                           "--memory", "2048", "--detach", "--json"]
        pcap = self.state.parent / f"egress-boot{len(self.pcaps) + 1}.pcap"
        if self.record_network:
            # nothing the guest sends leaves this machine but to the registry (a guestfwd) and
            # as replies on the forwarded agent ports; every frame is kept for the egress check
            args += ["--pcap", str(pcap), "--restrict-net",
                     "--guest-forward", f"{REGISTRY_GUEST_PORT}={self.registry_port}"]
        for guest, host in sorted(self.ports.items()):
            args += ["--port", f"{guest}={host}"]
        if self.cpu is not None:
            args += ["--cpu", self.cpu]
        if keep_disk:
            args.append("--keep-disk")
        if keep_console:
            args.append("--keep-console")
        if self.tpm:
            args.append("--tpm")
        proc = appliance_cli(*args, timeout=120)
        if proc.returncode != 0:
            raise ImageError(f"appliance boot failed:\n{proc.stderr[-3000:]}")
        if self.record_network:
            self.pcaps.append(pcap)
        self.console = self.state / "console.log"
        self.machine = load_machine(self.state)

    def power_cycle(self) -> Machine:
        """Cut the running qemu's power and start it again on the same disk, UEFI variables and
        TPM state, its console log continued (what a BMC does to a node stuck in its firmware);
        returns the new machine. Used by :meth:`watch`, not counted as a power-on."""
        assert self.machine is not None
        stop_machine(self.machine, grace=0.0)
        self.start(keep_disk=True, keep_console=True)
        return self.machine

    def watch(self) -> ConsoleWatch | None:
        """A watch for a hung guest on the running qemu (None on a real node, or unasked); a
        machine stuck in its firmware is power-cycled."""
        if self.machine is None or self.hang_after is None:
            return None
        return ConsoleWatch(self.machine, self.hang_after, reset_after=self.reset_after,
                            resets=self.firmware_resets, power_cycle=self.power_cycle)

    def power_off(self) -> None:
        if self.console is not None and self.console.is_file() and self.state is not None:
            # `appliance boot` starts the next console log afresh: keep this boot's
            keep = self.state / f"console-boot{len(self.serving_seconds)}.log"
            shutil.copyfile(self.console, keep)
        if self.state is not None and (self.state / "machine.json").exists():
            appliance_cli("boot", "--stop", str(self.state), "--json", timeout=120)


def appliance_cli(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "provisioning.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def serving_status(node: Appliance, timeout: float = 5.0) -> str:
    """grpc.health.v1 status of the whole server, over mTLS ("" when unreachable)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with node.channel() as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""),
                                                         timeout=timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    except grpc.RpcError:
        return ""


def wait_serving(node: Appliance, began: float, bound: float) -> float:
    """Poll until SERVING; seconds since ``began``.

    Raises:
        TimeoutError: not SERVING after ``bound`` seconds.
        GuestHungError: under qemu, the console printed nothing for ``node.hang_after`` seconds.
    """
    watch = node.watch()
    while time.monotonic() - began < bound:
        if serving_status(node) == "SERVING":
            return time.monotonic() - began
        if watch is not None:
            watch.check()
        time.sleep(1.0)
    tail = node.console.read_text(errors="replace")[-3000:] if node.console else ""
    raise TimeoutError(f"agent not SERVING within {bound:.0f} s; console tail:\n{tail}")


def free_port() -> int:
    """A TCP port free on loopback right now (see :func:`provisioning.ports.free_loopback_port`)."""
    return free_loopback_port()
