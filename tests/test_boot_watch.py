"""Fast tier for what hil/ boots with: a restricted, recorded guest network (qemu argv, the
guestfwd relay) and the watch that reports a hung guest within minutes."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from provisioning.commands.boot import register
from provisioning.errors import ImageError
from provisioning.image import boot as vm

ROOT = Path(__file__).resolve().parent.parent


def _plan(tmp_path: Path, **kw: object) -> vm.BootPlan:
    return vm.BootPlan(tmp_path / "disk.raw", tmp_path / "vm", False, ports={8001: 18001}, **kw)  # type: ignore[arg-type]


def test_qemu_argv_records_and_restricts_the_guest_network(tmp_path: Path) -> None:
    argv = vm.qemu_argv(_plan(tmp_path, pcap=tmp_path / "g.pcap", restrict_net=True,
                              guest_forwards={18480: 28480}))
    netdev = argv[argv.index("-netdev") + 1]
    assert netdev.startswith("user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:18001-:8001,")
    relay = str(ROOT / "provisioning/image/_relay.py")
    assert netdev.endswith(f",guestfwd=tcp:10.0.2.100:18480-cmd:{sys.executable} {relay} 127.0.0.1 28480")
    assert f"filter-dump,id=dump0,netdev=net0,file={tmp_path}/g.pcap" in argv
    assert "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56" in argv
    plain = vm.qemu_argv(_plan(tmp_path))
    assert "restrict=off" in plain[plain.index("-netdev") + 1] and "filter-dump" not in " ".join(plain)
    assert "guestfwd" not in " ".join(plain)


def test_boot_cli_takes_pcap_restrict_and_guest_forward(tmp_path: Path) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(), argparse.ArgumentParser(add_help=False))
    args = parser.parse_args(["boot", "d.raw", "--pcap", "x.pcap", "--restrict-net",
                              "--guest-forward", "18480=28480", "--hang-after", "300"])
    assert (args.pcap, args.restrict_net, args.guest_forward, args.hang_after) == \
        (Path("x.pcap"), True, [(18480, 28480)], 300.0)


def test_a_pcap_name_qemu_would_split_is_refused(tmp_path: Path) -> None:
    (tmp_path / "disk.raw").write_bytes(b"")
    with pytest.raises(ImageError, match="comma"):
        vm.start(_plan(tmp_path, pcap=tmp_path / "a,b.pcap"))


@pytest.mark.system  # the overlay is a real qemu-img one, and start() requires qemu's binary
def test_qemu_that_cannot_start_under_kvm_starts_again_under_tcg(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: qemu under KVM exits 1 at start (a host whose KVM refuses an MSR)."""
    from provisioning.errors import ToolError

    real_run = vm.run
    started: list[list[str]] = []

    def run(argv: list[str], **kw: object) -> object:
        if argv[0] != "qemu-system-x86_64":
            return real_run(argv, **kw)  # qemu-img: the real overlay
        started.append(argv)
        if "q35,accel=kvm" in argv:
            raise ToolError("qemu-system-x86_64", 1, "qemu-system-x86_64: error: failed to set "
                            "MSR 0x10a to 0x69")
        Path(argv[argv.index("-pidfile") + 1]).write_text(f"{os.getpid()}\n")
        return None

    monkeypatch.setattr(vm, "run", run)
    (tmp_path / "disk.raw").write_bytes(bytes(1 << 20))
    plan = vm.BootPlan(tmp_path / "disk.raw", tmp_path / "vm", True)
    machine = vm.start(plan, fallback_tcg=True)
    assert not machine.plan.kvm and [a[a.index("-machine") + 1] for a in started] == \
        ["q35,accel=kvm", "q35"]
    assert started[-1][started[-1].index("-accel") + 1] == "tcg,thread=single"
    with pytest.raises(ToolError, match="MSR 0x10a"):
        vm.start(dataclasses.replace(plan, state=tmp_path / "vm2"), fallback_tcg=False)


def test_relay_carries_a_guest_connection_both_ways(tmp_path: Path) -> None:
    """slirp gives the relay the guest's end as stdin/stdout (a socket pair): the same here."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def upstream() -> None:
        conn, _ = server.accept()
        with conn:
            data = b""
            while chunk := conn.recv(4096):
                data += chunk
            conn.sendall(b"got " + str(len(data)).encode())

    t = threading.Thread(target=upstream, daemon=True)
    t.start()
    guest, child = socket.socketpair()
    proc = subprocess.Popen([sys.executable, str(ROOT / "provisioning/image/_relay.py"), "127.0.0.1",
                             str(port)], stdin=child, stdout=child, env={})
    child.close()
    payload = os.urandom(300_000)
    guest.sendall(payload)
    guest.shutdown(socket.SHUT_WR)  # the guest's half-close reaches the server
    guest.settimeout(20)
    answer = b""
    while chunk := guest.recv(4096):
        answer += chunk
    assert answer == b"got 300000"
    assert proc.wait(timeout=20) == 0
    server.close()
    guest.close()


def test_relay_closes_the_guest_connection_quietly_when_nothing_listens() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        guest, child = socket.socketpair()
        proc = subprocess.Popen([sys.executable, str(ROOT / "provisioning/image/_relay.py"),
                                 "127.0.0.1", str(port)], stdin=child, stdout=child, stderr=child, env={})
        child.close()
        assert proc.wait(timeout=20) == 1
    guest.settimeout(5)
    assert guest.recv(100) == b""  # closed, and no traceback sent to the guest
    guest.close()


# --- a hung guest -------------------------------------------------------------------------

def _machine(tmp_path: Path) -> vm.Machine:
    plan = _plan(tmp_path)
    plan.state.mkdir(parents=True)
    plan.vars.write_bytes(b"uefi variables")
    plan.console.write_text("")
    return vm.Machine(plan, os.getpid())  # a live process stands for qemu


def _console_writer(path: Path, lines: list[str], gap: float) -> threading.Thread:
    def write() -> None:
        for line in lines:
            with path.open("a") as f:
                f.write(line + "\r\n")
            time.sleep(gap)

    t = threading.Thread(target=write, daemon=True)
    t.start()
    return t


def test_a_console_that_stops_growing_is_reported_hung(tmp_path: Path) -> None:
    machine = _machine(tmp_path)
    _console_writer(machine.plan.console, ["BdsDxe: starting Boot0001", "systemd-boot 257",
                                           "OVMF reset"], 0.1)
    began = time.monotonic()
    with pytest.raises(vm.GuestHungError) as caught:
        vm.wait_for(machine, "login:", timeout=60, poll=0.05, stall=1.0)
    took = time.monotonic() - began
    assert 1.0 <= took < 5, took  # the stall bound, not the 60 s timeout
    text = str(caught.value)
    assert "printed nothing for 1 s" in text and "stopped after: 'OVMF reset'" in text
    assert "systemd-boot 257" in text and f"pid {os.getpid()}" in text
    (kept,) = machine.plan.state.glob("hung-*")
    assert (kept / "OVMF_VARS.fd").read_bytes() == b"uefi variables"
    assert "OVMF reset" in (kept / "console.log").read_text()


def test_a_console_that_keeps_printing_is_not_hung(tmp_path: Path) -> None:
    machine = _machine(tmp_path)
    _console_writer(machine.plan.console, [f"line {i}" for i in range(25)] + ["login: "], 0.1)
    assert vm.wait_for(machine, "login:", timeout=30, poll=0.05, stall=1.0) == "login: "


def test_a_silent_guest_that_answers_another_way_is_not_hung(tmp_path: Path) -> None:
    machine = _machine(tmp_path)
    watch = vm.ConsoleWatch(machine, stall=0.5)
    watch.check()
    for _ in range(6):  # 1.2 s of silence, but the agent answered in between
        time.sleep(0.2)
        watch.alive()
        watch.check()
    time.sleep(0.6)
    with pytest.raises(vm.GuestHungError, match=r"nothing for [01] s"):
        watch.check()


# --- a machine that does not come back from its reset ---------------------------------------

class _FakeQmp:
    """A QMP server on the machine's socket, as strict as qemu's about the protocol: a greeting,
    no command before ``qmp_capabilities``, ``CommandNotFound`` for what it does not know.
    ``system_reset`` makes the "firmware" print its first line, as a reset that works does."""

    COMMANDS = ("query-status", "query-cpus-fast", "human-monitor-command", "system_reset")

    def __init__(self, machine: vm.Machine, *, firmware_comes_back: bool = True) -> None:
        self.machine, self.comes_back = machine, firmware_comes_back
        self.seen: list[tuple[str, object]] = []
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(machine.plan.qmp))
        self.server.listen(4)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import json

        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn, conn.makefile("rwb") as f:
                f.write(b'{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 22}}, '
                        b'"capabilities": ["oob"]}}\r\n')
                f.flush()
                negotiated = False
                for raw in f:
                    msg = json.loads(raw)
                    cmd = msg.get("execute")
                    self.seen.append((cmd, msg.get("arguments")))
                    reply: dict[str, object]
                    if cmd == "qmp_capabilities":
                        negotiated, reply = True, {"return": {}}
                    elif not negotiated or cmd not in self.COMMANDS:
                        reply = {"error": {"class": "CommandNotFound", "desc": f"{cmd} not found"}}
                    elif cmd == "query-status":
                        reply = {"return": {"status": "running", "running": True}}
                    elif cmd == "query-cpus-fast":
                        reply = {"return": [{"cpu-index": 0, "thread-id": 1, "target": "x86_64"}]}
                    elif cmd == "human-monitor-command":
                        reply = {"return": "CPU#0\r\nRIP=00000000fffffff0 RFL=00000002\r\n"}
                    else:
                        f.write(b'{"event": "RESET", "data": {"guest": false, '
                                b'"reason": "host-qmp-system-reset"}}\r\n')
                        reply = {"return": {}}
                        if self.comes_back:
                            with self.machine.plan.console.open("a") as c:
                                c.write("BdsDxe: loading Boot0001\r\n")
                    f.write(json.dumps(reply).encode() + b"\r\n")
                    f.flush()

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def short_machine() -> Iterator[vm.Machine]:
    """A machine whose state lies in a short folder: an AF_UNIX path is limited to 108 bytes,
    and pytest's tmp_path can be longer."""
    import shutil
    import tempfile

    short = Path(tempfile.mkdtemp(prefix="qmp-", dir="/tmp"))
    try:
        yield _machine(short)
    finally:
        shutil.rmtree(short)


@pytest.fixture
def fake_qmp(short_machine: vm.Machine) -> Iterator[Callable[..., _FakeQmp]]:
    made: list[_FakeQmp] = []

    def make(**kw: bool) -> _FakeQmp:
        made.append(_FakeQmp(short_machine, **kw))
        return made[-1]

    yield make
    for server in made:
        server.close()


def test_a_machine_silent_after_its_reset_gets_reset_pressed_once(
        short_machine: vm.Machine, fake_qmp: Callable[..., _FakeQmp]) -> None:
    machine = short_machine
    machine.plan.console.write_text("[   79.9] systemd-shutdown[1]: Unable to finalize\r\n"
                                    "[   79.97] reboot: Restarting system\r\n")
    qmp = fake_qmp()
    resets: list[Path] = []
    watch = vm.ConsoleWatch(machine, stall=5.0, reset_after=0.3, resets=resets)
    watch.check()
    time.sleep(0.4)
    watch.check()  # silent past reset_after, right after the restart line: pressed
    assert [c for c, _ in qmp.seen if c == "system_reset"] == ["system_reset"]
    assert ("human-monitor-command", {"command-line": "info registers -a"}) in qmp.seen
    (kept,) = resets
    assert kept.name.startswith("reset-hang-")
    state = (kept / "qemu-state.txt").read_text()
    assert "RIP=00000000fffffff0" in state and '"running": true' in state
    assert "reboot: Restarting system" in (kept / "console.log").read_text()
    assert (kept / "OVMF_VARS.fd").read_bytes() == b"uefi variables"
    assert machine.plan.console.read_bytes().endswith(b"BdsDxe: loading Boot0001\r\n")
    watch.check()  # the firmware printed: the guest lives again, nothing more is pressed
    time.sleep(0.4)
    watch.check()  # silent again, but no longer after the restart line
    assert [c for c, _ in qmp.seen].count("system_reset") == 1 and len(resets) == 1


def test_a_machine_silent_after_the_firmware_started_the_boot_loader_gets_reset_pressed(
        short_machine: vm.Machine, fake_qmp: Callable[..., _FakeQmp]) -> None:
    """The CI's hang of 2026-11-30: OVMF printed that it starts the boot entry, then nothing."""
    machine = short_machine
    machine.plan.console.write_text('BdsDxe: loading Boot0001 "UEFI Misc Device" from '
                                    'PciRoot(0x0)/Pci(0x3,0x0)\r\n'
                                    'BdsDxe: starting Boot0001 "UEFI Misc Device" from '
                                    'PciRoot(0x0)/Pci(0x3,0x0)\r\n')
    qmp = fake_qmp()
    watch = vm.ConsoleWatch(machine, stall=5.0, reset_after=0.3)
    watch.check()
    time.sleep(0.4)
    watch.check()
    assert [c for c, _ in qmp.seen if c == "system_reset"] == ["system_reset"] and len(watch.resets) == 1
    assert "BdsDxe: starting Boot0001" in (watch.resets[0] / "console.log").read_text()


def test_a_machine_still_silent_after_the_press_is_reported_hung(
        short_machine: vm.Machine, fake_qmp: Callable[..., _FakeQmp]) -> None:
    machine = short_machine
    machine.plan.console.write_text("[   79.97] reboot: Restarting system\r\n")
    qmp = fake_qmp(firmware_comes_back=False)
    watch = vm.ConsoleWatch(machine, stall=0.8, reset_after=0.2)
    watch.check()
    time.sleep(0.3)
    watch.check()  # pressed once
    assert len(watch.resets) == 1
    deadline = time.monotonic() + 5
    with pytest.raises(vm.GuestHungError) as caught:
        while time.monotonic() < deadline:
            time.sleep(0.1)
            watch.check()  # never pressed twice for the same silence
    assert [c for c, _ in qmp.seen].count("system_reset") == 1
    text = str(caught.value)
    assert "reset or power-cycled 1 time(s) before" in text
    assert "stopped after: '[   79.97] reboot: Restarting system'" in text


def test_a_silence_after_any_other_line_is_not_a_reset_hang(
        short_machine: vm.Machine, fake_qmp: Callable[..., _FakeQmp]) -> None:
    machine = short_machine
    machine.plan.console.write_text("[   12.0] appliance-agent[512]: serving on :8001\r\n")
    qmp = fake_qmp()
    watch = vm.ConsoleWatch(machine, stall=2.0, reset_after=0.1)
    watch.check()
    time.sleep(0.3)
    watch.check()  # silent past reset_after, but the kernel did not restart: nothing pressed
    assert watch.resets == [] and qmp.seen == []
    time.sleep(2.0)
    with pytest.raises(vm.GuestHungError):
        watch.check()


def test_presses_stop_at_max_resets(short_machine: vm.Machine, fake_qmp: Callable[..., _FakeQmp]) -> None:
    """A reset that hangs every time is not pressed forever: past ``max_resets`` it is a hang."""
    machine = short_machine
    machine.plan.console.write_text("[   79.97] reboot: Restarting system\r\n")
    qmp = fake_qmp()
    earlier = [machine.plan.state / "reset-hang-1", machine.plan.state / "reset-hang-2"]
    watch = vm.ConsoleWatch(machine, stall=0.5, reset_after=0.1, resets=earlier, max_resets=2)
    watch.check()
    time.sleep(0.6)
    with pytest.raises(vm.GuestHungError, match="reset or power-cycled 2 time"):
        watch.check()
    assert "system_reset" not in [c for c, _ in qmp.seen]


def test_a_machine_stuck_after_its_reset_is_power_cycled_when_the_caller_can(
        short_machine: vm.Machine, fake_qmp: Callable[..., _FakeQmp]) -> None:
    """The hil suite's hang: a QMP reset never brought it back, a new qemu does. The watch
    hands the stuck machine to ``power_cycle`` and follows the machine it returns."""
    machine = dataclasses.replace(short_machine, tpm_pid=os.getpid())  # a live swtpm
    machine.plan.console.write_text("[  222.13] reboot: Restarting system\r\n")
    qmp = fake_qmp()
    reborn = dataclasses.replace(machine, pid=os.getppid())
    cycled: list[vm.Machine] = []

    def power_cycle() -> vm.Machine:
        cycled.append(watch.machine)
        with machine.plan.console.open("a") as c:  # the new qemu's firmware, appended
            c.write("BdsDxe: loading Boot0001\r\n")
        return reborn

    watch = vm.ConsoleWatch(machine, stall=5.0, reset_after=0.2, power_cycle=power_cycle)
    watch.check()
    time.sleep(0.3)
    watch.check()
    assert cycled == [machine] and watch.machine is reborn
    assert "system_reset" not in [c for c, _ in qmp.seen]  # no QMP reset: it never helped
    (kept,) = watch.resets
    assert (kept / "swtpm.txt").read_text() == f"swtpm pid {os.getpid()}: running\n"
    assert "RIP=00000000fffffff0" in (kept / "qemu-state.txt").read_text()
    watch.check()  # the firmware printed: alive, nothing more happens
    assert len(cycled) == 1


def test_wait_for_follows_the_machine_its_watch_power_cycled(
        short_machine: vm.Machine, fake_qmp: Callable[..., _FakeQmp]) -> None:
    """``appliance boot --wait-for --reset-after``: the stuck qemu is gone after the power cycle,
    and the wait goes on with the new one, on the same console, to the line it waits for."""
    fake_qmp()
    old = subprocess.Popen(["sleep", "60"])
    new = subprocess.Popen(["sleep", "60"])
    try:
        stuck = dataclasses.replace(short_machine, pid=old.pid)
        stuck.plan.console.write_text("[   79.97] reboot: Restarting system\r\n")

        def power_cycle() -> vm.Machine:
            old.kill()
            old.wait()
            _console_writer(stuck.plan.console, ["BdsDxe: loading Boot0001", "[    0.0] Linux",
                                                 "dm-verity root OK slot=A"], 0.1)
            return dataclasses.replace(stuck, pid=new.pid)

        watch = vm.ConsoleWatch(stuck, stall=5.0, reset_after=0.2, power_cycle=power_cycle)
        line = vm.wait_for(stuck, "root OK", timeout=20, poll=0.05, watch=watch)
        assert line == "dm-verity root OK slot=A"
        assert watch.machine.pid == new.pid and len(watch.resets) == 1
    finally:
        for proc in (old, new):
            proc.kill()
            proc.wait()


def test_boot_cli_refuses_reset_after_without_wait_for(tmp_path: Path) -> None:
    for extra in ([], ["--wait-for", "login:", "--reset-after", "0"]):
        proc = subprocess.run([sys.executable, "-m", "provisioning.cli", "boot", str(tmp_path / "d.raw"),
                               "--reset-after", "120", *extra], cwd=ROOT, capture_output=True, text=True,
                              check=False)
        assert proc.returncode != 0 and "--reset-after" in proc.stderr and "--wait-for" in proc.stderr, \
            proc.stderr
        assert not (tmp_path / "d.raw.vm").exists()  # nothing started


def test_a_power_cycle_that_fails_is_reported_hung(
        short_machine: vm.Machine, fake_qmp: Callable[..., _FakeQmp]) -> None:
    machine = short_machine
    machine.plan.console.write_text("[   79.97] reboot: Restarting system\r\n")
    fake_qmp()

    def power_cycle() -> vm.Machine:
        raise ImageError("appliance boot failed: swtpm: TPM is locked")

    watch = vm.ConsoleWatch(machine, stall=5.0, reset_after=0.1, power_cycle=power_cycle)
    watch.check()
    time.sleep(0.2)
    with pytest.raises(vm.GuestHungError, match="power-cycled it failed: appliance boot failed: swtpm"):
        watch.check()


def test_stop_ends_the_machine_and_waits_for_its_swtpm(tmp_path: Path) -> None:
    """The next power-on of the same state starts swtpm on the same TPM folder: the old one must
    be gone by then (it holds the folder's lock)."""
    qemu = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    swtpm = subprocess.Popen([sys.executable, "-c",
                              "import signal, time; signal.signal(signal.SIGTERM, "
                              "lambda *a: (time.sleep(1), exit(0))); time.sleep(60)"])
    try:
        plan = _plan(tmp_path)
        plan.state.mkdir(parents=True)
        machine = vm.Machine(plan, qemu.pid, swtpm.pid)
        assert vm.stop(machine, grace=0.0) == "terminated"
        assert qemu.poll() is not None
        assert swtpm.poll() == 0  # exited (after its 1 s of cleanup) before stop returned
    finally:
        for proc in (qemu, swtpm):
            proc.kill()
            proc.wait()


def test_keep_console_appends_to_the_last_console(tmp_path: Path) -> None:
    argv = vm.qemu_argv(_plan(tmp_path, keep_disk=True, keep_console=True))
    assert f"file,id=console,path={tmp_path}/vm/console.log,append=on" in argv
    assert f"file,id=console,path={tmp_path}/vm/console.log" in vm.qemu_argv(_plan(tmp_path))


def test_boot_cli_refuses_keep_console_without_keep_disk(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "provisioning.cli", "boot", str(tmp_path / "d.raw"),
                           "--keep-console"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and "--keep-console" in proc.stderr and "--keep-disk" in proc.stderr


@pytest.mark.system  # a real qemu (OVMF alone, no image to boot) and a real swtpm
def test_the_hil_power_cycle_starts_qemu_and_swtpm_again_on_the_same_state(tmp_path: Path) -> None:
    """What the hil suite does to a machine stuck in its firmware: the old qemu and swtpm are
    gone, new ones run on the same disk and TPM folder, and the console continues."""
    import shutil

    import grpc

    from testsupport.appliance import Appliance, free_port

    if any(shutil.which(t) is None for t in ("qemu-system-x86_64", "swtpm", "qemu-img")) \
            or not vm.OVMF_CODE.is_file():
        pytest.skip("needs qemu, swtpm and OVMF")
    image = tmp_path / "blank.raw"
    image.write_bytes(bytes(1 << 20))  # nothing to boot: OVMF says so within seconds of starting
    node = Appliance("127.0.0.1:1", grpc.local_channel_credentials(), image=image, state=tmp_path / "vm",
                     ports={8001: free_port()}, accel="tcg", tpm=True)
    marker = "BdsDxe: failed to load"  # each power-on's first boot entry fails within seconds

    def firmware_lines(since: int) -> str:
        """The console once the firmware printed ``marker`` past its first ``since`` characters."""
        assert node.console is not None
        deadline = time.monotonic() + 180
        while marker not in (text := node.console.read_text(errors="replace"))[since:]:
            assert time.monotonic() < deadline, f"no {marker!r} after character {since}:\n{text[-2000:]}"
            time.sleep(0.5)
        return text

    node.start(keep_disk=False)
    try:
        first = node.machine
        assert first is not None and first.tpm_pid is not None
        before = firmware_lines(0)
        permall = tmp_path / "vm/tpm/tpm2-00.permall"
        assert permall.is_file()  # swtpm made the TPM's persistent state
        again = node.power_cycle()
        assert again is node.machine and again.pid != first.pid and again.tpm_pid not in (None, first.tpm_pid)
        assert not first.alive() and not vm._alive(first.tpm_pid)
        assert again.alive() and vm._alive(again.tpm_pid)  # type: ignore[arg-type]
        after = firmware_lines(len(before))
        assert after.startswith(before)  # one console, continued
        assert permall.is_file() and (tmp_path / "vm/overlay.qcow2").is_file()
        assert len(node.pcaps) == 0  # no recording was asked for
    finally:
        node.power_off()
    assert node.machine is not None and not node.machine.alive()


@pytest.mark.system  # a real qemu (OVMF alone, no image to boot) and a real swtpm
def test_power_cycle_starts_qemu_and_swtpm_again_on_the_same_state(tmp_path: Path) -> None:
    """What ``appliance boot --reset-after`` and the seal tests do to a machine stuck in its
    firmware: new qemu and swtpm processes, the same overlay and TPM folder, one console."""
    import shutil

    if any(shutil.which(t) is None for t in ("qemu-system-x86_64", "swtpm", "qemu-img")) \
            or not vm.OVMF_CODE.is_file():
        pytest.skip("needs qemu, swtpm and OVMF")
    image = tmp_path / "blank.raw"
    image.write_bytes(bytes(1 << 20))  # nothing to boot: OVMF says so within seconds of starting
    plan = vm.BootPlan(image, tmp_path / "vm", False, 256, 1, {8001: 0},
                       tpm_socket=tmp_path / "vm/swtpm.sock")
    first = vm.start(plan)
    again = first
    try:
        before = vm.wait_for(first, "BdsDxe: failed to load", timeout=180)
        text = plan.console.read_text(errors="replace")
        overlay = plan.overlay.stat().st_ino
        again = vm.power_cycle(first)
        assert again.pid != first.pid and again.tpm_pid not in (None, first.tpm_pid)
        assert not first.alive() and first.tpm_pid is not None and not vm._alive(first.tpm_pid)
        assert again.alive() and again.tpm_pid is not None and vm._alive(again.tpm_pid)
        deadline = time.monotonic() + 180
        while (now := plan.console.read_text(errors="replace")).count(before.strip()) < 2:
            assert time.monotonic() < deadline, now[-2000:]
            time.sleep(0.5)
        assert now.startswith(text)  # one console, continued
        assert plan.overlay.stat().st_ino == overlay  # the same disk overlay, not a new one
        assert (plan.state / "tpm/tpm2-00.permall").is_file()
    finally:
        vm.stop(again, grace=0.0)
