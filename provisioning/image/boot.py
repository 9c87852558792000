"""Boot a disk image under qemu with UEFI firmware, leaving the image untouched.

The plan (:class:`BootPlan` -> :func:`qemu_argv`) is pure, so its argv is tested without
starting anything; :func:`start` creates the state directory (a qcow2 overlay over the image,
a private copy of the OVMF variable store, the serial console log, qemu's pid file and QMP
socket), starts qemu daemonized through the tool gate, and returns a :class:`Machine`.
A machine is stopped by its pid (ACPI power-off over QMP first, then SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.cpu import DEFAULT_LEVEL, LEVELS
from agent.errors import NotFoundError
from provisioning.errors import ImageError, ToolError
from provisioning.image.disk import MANIFEST_NAME
from provisioning.tools import require_tool, run

__all__ = ["AGENT_PORTS", "GUEST_FORWARD_ADDR", "GUEST_MAC", "LOOPBACK_FORWARDS", "OVMF_CODE",
           "OVMF_CODE_SECBOOT", "OVMF_VARS", "OVMF_VARS_SNAKEOIL", "QEMU_CPU_LEVELS", "SNAKEOIL_CERT",
           "SNAKEOIL_KEY",
           "BootPlan", "ConsoleWatch", "GuestHungError", "Machine", "check_cpu_model",
           "image_cpu_level", "keep_evidence", "kvm_usable", "power_cycle", "qemu_argv", "start", "stop",
           "wait_for"]

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
# Secure Boot firmware (needs SMM) and Debian's variable store with its test ("snakeoil")
# keys enrolled; an operator passes a store with the site's own keys instead.
OVMF_CODE_SECBOOT = Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")
OVMF_VARS_SNAKEOIL = Path("/usr/share/OVMF/OVMF_VARS_4M.snakeoil.fd")
SNAKEOIL_KEY = Path("/usr/share/ovmf/PkKek-1-snakeoil.key")  # encrypted; passphrase "snakeoil"
SNAKEOIL_CERT = Path("/usr/share/ovmf/PkKek-1-snakeoil.pem")
AGENT_PORTS = (8000, 8001, 8002)  # HTTPS (OpenAI, KServe REST), gRPC (inference + node), metrics
# The default forwards to host loopback (guest port -> host port: 8001 -> 18001); the README's
# commands use them.
LOOPBACK_FORWARDS = {p: 10000 + p for p in AGENT_PORTS}
GUEST_MAC = "52:54:00:12:34:56"  # qemu's first NIC address, set explicitly: pcaps are read by it
# Where a guestfwd appears to the guest: in slirp's 10.0.2.0/24, and not the host (10.0.2.2)
# or DNS (10.0.2.3) addresses, which slirp refuses for forwards.
GUEST_FORWARD_ADDR = "10.0.2.100"
_RELAY = Path(__file__).with_name("_relay.py")
_STATE = "machine.json"
log = logging.getLogger(__name__)


# The x86-64 psABI level of common qemu CPU models (by their feature flags in qemu's
# target/i386/cpu.c); "host" and "max" pass everything the host (or TCG) has.
QEMU_CPU_LEVELS: dict[str, str] = {
    **dict.fromkeys(("qemu64", "qemu32", "kvm64", "kvm32", "pentium", "pentium2", "pentium3",
                     "486", "athlon", "phenom", "coreduo", "core2duo", "Conroe", "Penryn",
                     "Opteron_G1", "Opteron_G2", "Opteron_G3"), "x86-64"),
    **dict.fromkeys(("Nehalem", "Westmere", "SandyBridge", "IvyBridge", "Opteron_G4",
                     "Opteron_G5"), "x86-64-v2"),
    **dict.fromkeys(("Haswell", "Broadwell", "Skylake-Client", "EPYC", "EPYC-Rome",
                     "EPYC-Milan", "Dhyana"), "x86-64-v3"),
    **dict.fromkeys(("Skylake-Server", "Cascadelake-Server", "Cooperlake", "Icelake-Server",
                     "SapphireRapids", "GraniteRapids", "EPYC-Genoa"), "x86-64-v4"),
}
_PASS_THROUGH = ("host", "max")
# Variants of one model with the same instruction sets: Haswell-noTSX-IBRS, Icelake-Server-v2.
_VARIANT = re.compile(r"(-noTSX|-IBRS|-IBPB|-v\d+)+$")


def check_cpu_model(model: str, level: str) -> None:
    """Refuse qemu CPU ``model`` when it lacks x86-64 psABI ``level`` (the image's ``cpu_level``).

    ``host``, ``max`` and models not in :data:`QEMU_CPU_LEVELS`, or given extra features
    (``Nehalem,+avx2``), are let through: qemu or the node's own CPU check speaks for them.

    Raises:
        ImageError: the model is below the level (the message names both and what to use).
    """
    base, _, extra = model.partition(",")
    if base in _PASS_THROUGH or extra:
        return
    has = QEMU_CPU_LEVELS.get(_VARIANT.sub("", base))
    if has is None:
        log.warning("qemu CPU model %r: its x86-64 level is not known here; the image needs %s",
                    model, level)
        return
    order = list(LEVELS)
    if order.index(has) < order.index(level):
        fits = sorted(m for m, lv in QEMU_CPU_LEVELS.items() if lv == level)
        raise ImageError(f"--cpu {model}: qemu's {base} model is {has}, below the {level} this "
                         f"image needs (its numpy/ONNX Runtime would die with SIGILL); use "
                         f"--cpu host (KVM), --cpu max, or a model at {level} or above such as "
                         f"{', '.join(fits[:3])}")


def image_cpu_level(image: Path) -> str:
    """The ``cpu_level`` of the build manifest next to ``image``, else the default level."""
    try:
        doc = json.loads((image.parent / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return DEFAULT_LEVEL
    level = doc.get("cpu_level") if isinstance(doc, dict) else None
    return level if isinstance(level, str) and level in LEVELS else DEFAULT_LEVEL


def kvm_usable(path: Path = Path("/dev/kvm")) -> bool:
    """True when ``/dev/kvm`` opens read-write (the only test that does not start a guest)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


@dataclass(frozen=True)
class BootPlan:
    """Everything qemu is started with; ``state`` holds the files of one machine."""

    image: Path
    state: Path
    kvm: bool
    memory_mib: int = 2048
    cpus: int = 2
    ports: Mapping[int, int] = field(default_factory=dict)  # guest port -> host port on 127.0.0.1
    tpm_socket: Path | None = None
    firmware: Path = OVMF_CODE
    vars_template: Path = OVMF_VARS
    secure_boot: bool = False  # firmware is a Secure Boot build: SMM on, flash locked to SMM
    disk_size: int | None = None  # bytes the guest sees (>= the image: a bigger disk, as when flashed)
    keep_disk: bool = False  # reuse the state's overlay and UEFI variables: a power cycle, not a fresh disk
    keep_console: bool = False  # with keep_disk: append to the last power-on's console log, not a new one
    cpu_model: str | None = None  # qemu -cpu MODEL (default: host under KVM, max under TCG)
    pcap: Path | None = None  # record every frame on the guest's network here (qemu filter-dump)
    restrict_net: bool = False  # the guest reaches only the forwards: nothing on or beyond the host
    # port on GUEST_FORWARD_ADDR -> port on the host's 127.0.0.1 (a guestfwd; works restricted)
    guest_forwards: Mapping[int, int] = field(default_factory=dict)

    @property
    def overlay(self) -> Path:
        """The qcow2 overlay that takes every write (the image itself is opened read-only)."""
        return self.state / "overlay.qcow2"

    @property
    def vars(self) -> Path:
        """This machine's copy of the UEFI variable store."""
        return self.state / "OVMF_VARS.fd"

    @property
    def console(self) -> Path:
        """The serial console log."""
        return self.state / "console.log"

    @property
    def pidfile(self) -> Path:
        """qemu's pid file."""
        return self.state / "qemu.pid"

    @property
    def qmp(self) -> Path:
        """qemu's QMP socket (clean power-off)."""
        return self.state / "qmp.sock"


def qemu_argv(plan: BootPlan) -> list[str]:
    """The qemu-system-x86_64 command line for ``plan`` (daemonized, no display)."""
    if plan.kvm:
        accel = ["-machine", "q35,accel=kvm", "-cpu", plan.cpu_model or "host"]
    else:
        # One host thread runs every vCPU (not multi-threaded TCG): under MTTCG an x86 guest
        # that patches its own code while another vCPU runs it (the kernel's int3-based text
        # patching) can execute a stale translation. Seen here: "Oops: int3" in
        # sched_clock_cpu, a kernel panic at 12 s into a boot of the hil suite, which spent
        # one of the A/B trial boots.
        accel = ["-machine", "q35", "-accel", "tcg,thread=single", "-cpu", plan.cpu_model or "max"]
    forwards = "".join(f",hostfwd=tcp:127.0.0.1:{host}-:{guest}"
                       for guest, host in sorted(plan.ports.items()))
    # slirp runs the command per guest connection (argv split like a shell, no shell): a relay
    # to the host port, since a restricted network cannot reach the host by itself
    relay = f"{shlex.quote(sys.executable)} {shlex.quote(str(_RELAY))}"
    forwards += "".join(f",guestfwd=tcp:{GUEST_FORWARD_ADDR}:{guest}-cmd:{relay} 127.0.0.1 {host}"
                        for guest, host in sorted(plan.guest_forwards.items()))
    restrict = "on" if plan.restrict_net else "off"
    if plan.secure_boot:
        accel[1] += ",smm=on"
        accel += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    argv = [
        "qemu-system-x86_64", *accel, "-m", str(plan.memory_mib), "-smp", str(plan.cpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-daemonize",
        "-pidfile", str(plan.pidfile),
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={plan.firmware}",
        "-drive", f"if=pflash,format=raw,unit=1,file={plan.vars}",
        "-drive", f"if=virtio,format=qcow2,file={plan.overlay}",
        "-chardev", f"file,id=console,path={plan.console}{',append=on' if plan.keep_console else ''}",
        "-serial", "chardev:console",
        "-qmp", f"unix:{plan.qmp},server=on,wait=off",
        "-netdev", f"user,id=net0,restrict={restrict}{forwards}",
        "-device", f"virtio-net-pci,netdev=net0,mac={GUEST_MAC}",
        "-device", "virtio-rng-pci",
    ]
    if plan.pcap is not None:
        argv += ["-object", f"filter-dump,id=dump0,netdev=net0,file={plan.pcap}"]
    if plan.tpm_socket is not None:
        argv += ["-chardev", f"socket,id=tpmchr,path={plan.tpm_socket}",
                 "-tpmdev", "emulator,id=tpm0,chardev=tpmchr", "-device", "tpm-tis,tpmdev=tpm0"]
    return argv


def swtpm_argv(state: Path) -> list[str]:
    """A software TPM 2.0 for the machine in ``state`` (daemonized, its own pid file)."""
    tpm = state / "tpm"
    return ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={tpm}",
            "--ctrl", f"type=unixio,path={state / 'swtpm.sock'}", "--pid", f"file={state / 'swtpm.pid'}",
            "--log", f"file={state / 'swtpm.log'}", "--daemon"]


@dataclass(frozen=True)
class Machine:
    """A started machine: its plan and qemu's pid (and swtpm's, when it has a TPM)."""

    plan: BootPlan
    pid: int
    tpm_pid: int | None = None

    def to_json(self) -> dict[str, object]:
        """What ``appliance boot --json`` prints and ``machine.json`` holds."""
        return {"image": str(self.plan.image), "state": str(self.plan.state), "pid": self.pid,
                "tpm_pid": self.tpm_pid, "kvm": self.plan.kvm, "console": str(self.plan.console),
                "ports": {str(g): h for g, h in sorted(self.plan.ports.items())},
                "pcap": str(self.plan.pcap) if self.plan.pcap else None,
                "restrict_net": self.plan.restrict_net,
                "guest_forwards": {str(g): h for g, h in sorted(self.plan.guest_forwards.items())}}

    def alive(self) -> bool:
        """True while qemu's process exists."""
        return _alive(self.pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie of ours still "exists"; reap it if it is our child
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def _read_pid(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError) as exc:
        raise ImageError(f"{path}: no pid ({exc})") from exc


def start(plan: BootPlan, *, fallback_tcg: bool = False) -> Machine:
    """Prepare ``plan.state`` and start qemu (and swtpm) in the background.

    Under KVM, a qemu that cannot start, or dies at once with an empty console (KVM that
    cannot run OVMF, as under some nested virtualization), is started again under TCG when
    ``fallback_tcg``.

    Raises:
        NotFoundError: the image or firmware is missing. ImageError: the state directory
            holds a running machine, KVM cannot run the firmware (without ``fallback_tcg``), or
            the pcap file name has a comma (qemu would split it).
        ToolError: qemu-img, swtpm or qemu failed to start.
    """
    if plan.pcap is not None and "," in str(plan.pcap):
        raise ImageError(f"--pcap {plan.pcap}: qemu cannot take a file name with a comma")
    for label, path in (("image", plan.image), ("UEFI firmware (Debian package ovmf)", plan.firmware),
                        ("UEFI variable store (Debian package ovmf)", plan.vars_template)):
        if not path.is_file():
            raise NotFoundError(f"{label}: {path} does not exist")
    require_tool("qemu-system-x86_64")
    previous = plan.state / _STATE
    if previous.exists():
        with contextlib.suppress(ImageError, ValueError, KeyError, OSError):
            if _alive(int(json.loads(previous.read_text())["pid"])):
                raise ImageError(f"{plan.state}: a machine is still running there (stop it first)")
    plan.state.mkdir(parents=True, exist_ok=True)
    keep = plan.keep_disk and plan.overlay.is_file() and plan.vars.is_file()
    console = () if keep and plan.keep_console else (plan.console,)
    for stale in (*console, plan.pidfile, plan.qmp) if keep else (
            plan.overlay, plan.console, plan.pidfile, plan.qmp):
        stale.unlink(missing_ok=True)
    if not keep:
        shutil.rmtree(plan.state / "tpm", ignore_errors=True)  # a new machine, a new TPM
        shutil.copyfile(plan.vars_template, plan.vars)
        size = max(plan.image.stat().st_size, plan.disk_size or 0)
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", plan.image.resolve(),
             plan.overlay, str(size)])
    plan.console.touch()
    tpm_pid = None
    if plan.tpm_socket is not None:
        (plan.state / "tpm").mkdir(exist_ok=True)
        run(swtpm_argv(plan.state))
        tpm_pid = _read_pid(plan.state / "swtpm.pid")
    if _kvm_refused_start(plan, tpm_pid, fallback_tcg):
        return start(dataclasses.replace(plan, kvm=False))
    machine = Machine(plan, _read_pid(plan.pidfile), tpm_pid)
    (plan.state / _STATE).write_text(json.dumps(machine.to_json(), indent=2) + "\n")
    if plan.kvm and _kvm_failed(machine):
        stop(machine, grace=0)
        if fallback_tcg:
            log.warning("KVM stopped the guest before the firmware printed anything "
                        "(nested KVM that cannot run OVMF?): starting again under TCG")
            return start(dataclasses.replace(plan, kvm=False))
        raise ImageError("KVM stopped the guest before the firmware printed anything: this host's KVM "
                         "cannot run OVMF (seen under nested virtualization); use --accel tcg")
    return machine


def _kvm_refused_start(plan: BootPlan, tpm_pid: int | None, fallback_tcg: bool) -> bool:
    """Start qemu; True when it could not start under KVM and TCG is to be tried (the TPM
    emulator started for it is stopped then).

    Some hosts' KVM stops qemu before it starts at all (nested KVM refusing an MSR that
    ``-cpu host`` passes: "failed to set MSR 0x10a"), not only after the firmware starts.

    Raises:
        ToolError: qemu failed, and TCG is not to be tried.
    """
    try:
        run(qemu_argv(plan), timeout=60)
    except ToolError as exc:
        # the TPM emulator started for this qemu is stopped, whether qemu is tried again or not
        # (it once outlived a qemu that could not bind its forwarded port)
        if tpm_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(tpm_pid, signal.SIGTERM)
        if not (plan.kvm and fallback_tcg):
            raise
        log.warning("qemu could not start under KVM, starting again under TCG: %s",
                    str(exc).strip().splitlines()[-1] if str(exc).strip() else exc.tool)
        return True
    return False


def _kvm_failed(machine: Machine, settle: float = 8.0) -> bool:
    """True when, before the console shows anything, qemu exits or KVM stops the guest with an
    internal error (qemu then stays up, paused, with status ``internal-error``)."""
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline:
        if machine.plan.console.stat().st_size:
            return False
        if not machine.alive():
            return True
        with contextlib.suppress(OSError, ValueError):
            if _qmp(machine.plan.qmp, "query-status").get("status") == "internal-error":
                return True
        time.sleep(0.5)
    return False


def load(state: Path) -> Machine:
    """The machine recorded in ``state`` (for ``appliance boot --stop``).

    Raises:
        NotFoundError: no machine was started there.
    """
    path = state / _STATE
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise NotFoundError(f"{path}: no machine recorded there ({exc})") from exc
    plan = BootPlan(Path(doc["image"]), state, bool(doc["kvm"]),
                    ports={int(g): int(h) for g, h in doc.get("ports", {}).items()},
                    tpm_socket=state / "swtpm.sock" if doc.get("tpm_pid") else None)
    return Machine(plan, int(doc["pid"]), doc.get("tpm_pid"))


class GuestHungError(ImageError):
    """The guest's console printed nothing for longer than a boot or reboot ever takes."""


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (None when /proc cannot say)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


# Lines after which a long silence means the machine is stuck before anything of the image
# runs: the kernel's last words before it resets the machine (the firmware prints within
# seconds of them, under TCG too), and the firmware's boot manager starting the boot loader
# (systemd-boot and the kernel print within seconds of it).  Both were seen followed by
# silence under TCG with qemu burning a core in OVMF's memory.
_STUCK_AFTER = re.compile(r"\breboot: Restarting system\s*$|\bBdsDxe: starting Boot[0-9A-Fa-f]{4}\b")


@dataclass
class ConsoleWatch:
    """Notices a guest that stopped making progress: its serial console has not grown for
    ``stall`` seconds.  Callers that see life another way (the agent answering) call
    :meth:`alive`, since an idle, healthy guest prints nothing either.

    With ``reset_after``, a console silent that long right after the kernel's "reboot:
    Restarting system", or after the firmware's "BdsDxe: starting Boot...", is a machine that
    never came back from its reset or hung in the firmware (both seen under TCG in the hil
    suite, with qemu spinning in OVMF; nothing of the image runs by then). The watch keeps the
    evidence (console, UEFI variables, where qemu's CPUs were, whether swtpm ran) and brings
    the machine back once for that silence, as a node's BMC or an operator would:

    - with ``power_cycle`` (a callable that stops qemu and starts it again on the same disk,
      UEFI variables and TPM state, returning the new machine), a power cycle. A QMP
      ``system_reset`` brought none of the eight hangs kept from the CI and here back (qemu
      still spun in OVMF, in five of them with the TPM's TIS status register, 0xfed40018, in
      a register): what is stuck outlives a reset (qemu's TPM emulation, swtpm), and only new
      processes clear it, as removing power does a TPM chip;
    - without it, a reset pressed over QMP.

    Each recovery's evidence folder is listed in ``resets`` (shared by the watches of one
    machine). A second silence at the same place, or one after ``max_resets`` recoveries, is
    reported hung: a machine that never comes back fails, loudly."""

    machine: Machine
    stall: float
    reset_after: float | None = None
    resets: list[Path] = field(default_factory=list)
    max_resets: int = 3
    power_cycle: Callable[[], Machine] | None = None
    _size: int = -1
    _since: float = 0.0
    _cpu: float | None = None
    _recovered_at: int = -1  # console size when the machine was last reset or power-cycled

    def alive(self) -> None:
        """The guest showed life some other way: start the silent period again."""
        self._since, self._cpu = time.monotonic(), _cpu_seconds(self.machine.pid)

    def check(self) -> None:
        """Raise when the console has been silent for ``stall`` seconds while qemu runs.

        Raises:
            GuestHungError: the message has the last console lines, how long it was silent,
                qemu's CPU use meanwhile and where the UEFI variable store was kept.
        """
        try:
            size = self.machine.plan.console.stat().st_size
        except OSError:
            size = 0
        if size != self._size:
            self._size = size
            self.alive()
            return
        silent = time.monotonic() - self._since
        if not self.machine.alive():
            return
        if (self.reset_after is not None and silent >= self.reset_after and size != self._recovered_at
                and len(self.resets) < self.max_resets):
            last = _last_line(self.machine)
            if _STUCK_AFTER.search(last):
                self._bring_back(silent, size, last)
                return
        if silent < self.stall:
            return
        raise GuestHungError(self.report(silent))

    def _bring_back(self, silent: float, size: int, last: str) -> None:
        kept = keep_evidence(self.machine, "reset-hang")
        (kept / "qemu-state.txt").write_text(_qemu_state(self.machine))
        tpm = self.machine.tpm_pid
        if tpm is not None:
            (kept / "swtpm.txt").write_text(f"swtpm pid {tpm}: {'running' if _alive(tpm) else 'gone'}\n")
        self._recovered_at = size
        how = "power-cycled it"
        try:
            if self.power_cycle is not None:
                self.machine = self.power_cycle()
            else:
                how = "pressed reset over QMP"
                _qmp(self.machine.plan.qmp, "system_reset")
        except (OSError, ValueError, ImageError) as exc:
            raise GuestHungError(f"{self.report(silent)}\n({how} failed: {exc})") from exc
        self.resets.append(kept)
        log.warning("the machine is stuck before its boot: its console has been silent for %.0f s "
                    "since %r; %s (evidence in %s)", silent, last.strip(), how, kept)
        self.alive()

    def report(self, silent: float) -> str:
        """What a person needs to look into the hang; keeps the console and UEFI variables."""
        cpu_now, cpu_then = _cpu_seconds(self.machine.pid), self._cpu
        burnt = (f"qemu (pid {self.machine.pid}) used {cpu_now - cpu_then:.0f} s of CPU meanwhile"
                 if cpu_now is not None and cpu_then is not None else
                 f"qemu (pid {self.machine.pid}) still runs")
        kept = keep_evidence(self.machine, "hung")
        with contextlib.suppress(OSError):
            (kept / "qemu-state.txt").write_text(_qemu_state(self.machine))
        tail = _tail(self.machine)
        last = tail.splitlines()[-1] if tail else "(nothing)"
        pressed = (f"; the machine was reset or power-cycled {len(self.resets)} time(s) before "
                   f"({', '.join(str(r) for r in self.resets)})" if self.resets else "")
        return (f"guest hung: the console printed nothing for {silent:.0f} s (bound "
                f"{self.stall:.0f} s); {burnt}; it stopped after: {last!r}; console, UEFI "
                f"variables and qemu's CPU state kept in {kept}{pressed}; last console lines:\n{tail}")


def _last_line(machine: Machine) -> str:
    lines = _tail(machine, 1).splitlines()
    return lines[-1] if lines else ""


def _qemu_state(machine: Machine) -> str:
    """Where qemu's virtual CPUs are (QMP status, CPU list, registers), for a hang report;
    what QMP cannot answer is said in place."""
    parts = []
    for command, arguments in (("query-status", None), ("query-cpus-fast", None),
                               ("human-monitor-command", {"command-line": "info registers -a"})):
        try:
            answer = _qmp_any(machine.plan.qmp, command, arguments)
        except (OSError, ValueError) as exc:
            answer = f"(no answer: {exc})"
        shown = answer if isinstance(answer, str) else json.dumps(answer, indent=1)
        parts.append(f"== {command} {json.dumps(arguments) if arguments else ''}\n{shown}\n")
    return "".join(parts)


def keep_evidence(machine: Machine, label: str) -> Path:
    """Copy the console log and the UEFI variable store to a new folder in the machine's state
    (the next power-on starts both afresh); returns the folder."""
    keep = machine.plan.state / f"{label}-{time.strftime('%Y%m%dT%H%M%S')}"
    keep.mkdir(parents=True, exist_ok=True)
    for path in (machine.plan.console, machine.plan.vars):
        with contextlib.suppress(OSError):
            shutil.copyfile(path, keep / path.name)
    return keep


def wait_for(machine: Machine, pattern: str, timeout: float, poll: float = 0.5,
             stall: float | None = None, *, watch: ConsoleWatch | None = None) -> str:
    """Block until the console log matches ``pattern`` (a regular expression); return the line.

    With ``stall``, a console that prints nothing for that many seconds ends the wait early.
    With ``watch`` (instead of ``stall``), that watch checks the console, and the wait follows
    the machine it holds: one it power-cycled goes on in the same console log.

    Raises:
        GuestHungError: the console was silent for ``stall`` seconds (or the watch's bound).
        ImageError: qemu exited first, or ``timeout`` seconds passed (the message has the
            console's last lines).
    """
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    if watch is None and stall is not None:
        watch = ConsoleWatch(machine, stall)
    offset, pending = 0, ""
    while True:
        with machine.plan.console.open("rb") as f:
            f.seek(offset)
            chunk = f.read()
        offset += len(chunk)
        pending += chunk.decode(errors="replace")
        lines = pending.split("\n")
        pending = lines.pop()
        for line in lines:
            if regex.search(line):
                return line.rstrip("\r")
        if regex.search(pending):
            return pending
        current = watch.machine if watch is not None else machine
        if not current.alive():
            raise ImageError(f"qemu exited before the console printed {pattern!r}:\n{_tail(current)}")
        if time.monotonic() > deadline:
            raise ImageError(f"no {pattern!r} on the console within {timeout:.0f} s:\n{_tail(current)}")
        if watch is not None:
            watch.check()
        time.sleep(poll)


def _tail(machine: Machine, lines: int = 15) -> str:
    text = machine.plan.console.read_bytes()[-8192:].decode(errors="replace")
    return "\n".join(text.replace("\r", "").splitlines()[-lines:])


def _qmp(sock_path: Path, command: str) -> dict[str, object]:
    """Run one QMP command; return its ``return`` object ({} when it is not an object).

    Raises:
        OSError: no QMP socket. ValueError: qemu answered with an error.
    """
    result = _qmp_any(sock_path, command)
    return result if isinstance(result, dict) else {}


def _qmp_any(sock_path: Path, command: str, arguments: Mapping[str, object] | None = None) -> object:
    """Run one QMP command with ``arguments``; return what it returned (events in between are
    skipped).

    Raises:
        OSError: no QMP socket. ValueError: qemu answered with an error.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(sock_path))
        return _qmp_exchange(sock, command, arguments)


def _qmp_exchange(sock: socket.socket, command: str, arguments: Mapping[str, object] | None) -> object:
    with sock.makefile("rwb") as f:
        f.readline()  # greeting
        answer: dict[str, object] = {}
        for cmd, args in (("qmp_capabilities", None), (command, arguments)):
            message: dict[str, object] = {"execute": cmd}
            if args is not None:
                message["arguments"] = dict(args)
            f.write(json.dumps(message).encode() + b"\n")
            f.flush()
            while True:
                answer = json.loads(f.readline() or b"{}")
                if "event" not in answer:
                    break
            if "error" in answer or "return" not in answer:
                raise ValueError(f"qmp {cmd}: {answer}")
        return answer["return"]


def power_cycle(machine: Machine) -> Machine:
    """Cut ``machine``'s power (qemu and swtpm end at once) and start it again on the same disk,
    UEFI variables and TPM state, its console log continued; returns the new machine. What a
    :class:`ConsoleWatch` does to a machine stuck in its firmware."""
    stop(machine, grace=0.0)
    return start(dataclasses.replace(machine.plan, keep_disk=True, keep_console=True))


def stop(machine: Machine, grace: float = 30.0) -> str:
    """Stop the machine: ACPI power-off, then SIGTERM, then SIGKILL; returns how it ended.
    Its swtpm is ended too, and waited for: the state's next power-on takes the TPM's lock."""
    how = "already stopped"
    if machine.alive():
        with contextlib.suppress(OSError, ValueError):
            _qmp(machine.plan.qmp, "system_powerdown")
        how = _end(machine.pid, grace)
    if machine.tpm_pid is not None:
        _end(machine.tpm_pid, 0.0)
    return how


def _end(pid: int, grace: float) -> str:
    """Wait ``grace`` seconds for ``pid`` to exit, then SIGTERM it, then SIGKILL (5 s each);
    says which ended it."""
    how = "powered off"
    for sig, wait in ((None, grace), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if sig is not None:
            how = "terminated" if sig == signal.SIGTERM else "killed"
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _alive(pid):
            break
    return how
