"""Fast tier for the bench parts of the image: baked node certificates, image metadata,
the console listening report, the inventory's root hash and slot, hil/'s console parser."""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509

from agent.health.inventory import collect_inventory
from provisioning.demo.bench import hil_profile_text
from provisioning.errors import ImageError, ProfileError
from provisioning.image.configure import bake_node_tls, write_image_metadata
from provisioning.image.plan import (
    BOOT_TIMES_PREFIX,
    BOOT_TIMES_SCRIPT,
    BOOT_TIMES_UNIT,
    LISTEN_PREFIX,
    LISTEN_REPORT_SCRIPT,
    LISTEN_REPORT_UNIT,
    LYNIS_PREFIX,
    LYNIS_TIMER,
    LYNIS_UNIT,
    SCAP_PREFIX,
    SCAP_TIMER,
    SCAP_UNIT,
    STATE_PREFIX,
    configure_plan,
    lynis_script,
    scap_script,
)
from provisioning.image.profile import load_profile
from provisioning.image.stage import version_from_epoch
from provisioning.pki import init_pki

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    init_pki(tmp_path / "pki", organization="Test Site")
    return tmp_path / "pki"


def _hil_profile(tmp_path: Path, pki: Path, extra: str = "") -> Path:
    text = hil_profile_text(pki)
    path = tmp_path / "images" / "hil.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text + extra)
    return path


def _scanning_profile(tmp_path: Path, pki: Path) -> Path:
    """images/hil.toml with the node's own scans on (a bench with KVM or real hardware)."""
    path = _hil_profile(tmp_path, pki)
    text = path.read_text()
    assert "\nconsole_journal = true" in text
    scans = "\nconsole_journal = true\nconsole_lynis = true\nconsole_scap = true"
    path.write_text(text.replace("\nconsole_journal = true", scans, 1))
    return path


def test_minimal_profile_stays_on_loopback_without_a_certificate() -> None:
    p = load_profile(ROOT / "images/minimal.toml")
    assert p.agent.server.listen == "127.0.0.1"
    assert p.pki_dir is None and p.agent.tls.cert is None
    assert not p.diagnostics.console_listeners


def test_pki_section_points_the_agent_at_the_baked_files(tmp_path: Path, pki: Path) -> None:
    p = load_profile(_hil_profile(tmp_path, pki))
    assert p.agent.server.listen == "0.0.0.0"
    assert str(p.agent.tls.cert) == "/etc/appliance/tls/node.crt"
    assert str(p.agent.tls.key) == "/etc/appliance/tls/node.key"
    assert str(p.agent.tls.ca) == "/etc/appliance/tls/ca.crt"
    assert p.pki.ips == ("127.0.0.1", "10.0.2.15")


def test_pki_with_explicit_tls_files_is_refused(tmp_path: Path, pki: Path) -> None:
    with pytest.raises(ProfileError, match=r"\[pki\] dir is set.*cert"):
        load_profile(_hil_profile(tmp_path, pki, '\n[agent.tls]\ncert = "/etc/x.crt"\n'))


def test_pki_dir_without_a_ca_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProfileError, match=r"hil.toml: \[pki\] dir = .*no site CA"):
        load_profile(_hil_profile(tmp_path, tmp_path / "empty"))


def test_bad_san_address_names_the_key(tmp_path: Path, pki: Path) -> None:
    path = _hil_profile(tmp_path, pki)
    path.write_text(path.read_text().replace('"10.0.2.15"', '"10.0.2.300"'))
    with pytest.raises(ProfileError, match=r"\[pki\].*10\.0\.2\.300"):
        load_profile(path)


def test_bake_node_tls_issues_a_certificate_for_the_agent(tmp_path: Path, pki: Path) -> None:
    p = load_profile(_hil_profile(tmp_path, pki))
    root = tmp_path / "root"
    serial = bake_node_tls(p, root)
    tls = root / "etc/appliance/tls"
    cert = x509.load_pem_x509_certificate((tls / "node.crt").read_bytes())
    assert f"{cert.serial_number:x}" == serial
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["appliance-hil"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("127.0.0.1"),
                                                           ipaddress.ip_address("10.0.2.15")}
    ca = x509.load_pem_x509_certificate((tls / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert (tls / "ca.crt").read_bytes() == (pki / "ca.crt").read_bytes()
    assert (tls / "node.key").stat().st_mode & 0o777 == 0o600
    assert (tls / "node.key").stat().st_uid == 800  # the agent's user; it refuses looser keys
    assert (tls / "crl.pem").read_bytes().startswith(b"-----BEGIN X509 CRL-----")
    index = json.loads((pki / "index.json").read_text())
    assert any(c["name"] == "appliance-hil" and c["kind"] == "node" for c in index["certificates"])


def test_image_metadata_carries_the_version_the_uki_is_named_with(tmp_path: Path) -> None:
    p = load_profile(ROOT / "images/minimal.toml")
    doc = write_image_metadata(p, tmp_path, 1767225600)
    assert doc["version"] == version_from_epoch(1767225600)
    on_disk = json.loads((tmp_path / "usr/lib/appliance/image.json").read_text())
    assert on_disk == doc and on_disk["name"] == "minimal"


def test_listening_report_unit_only_when_asked(tmp_path: Path, pki: Path) -> None:
    plan = configure_plan(load_profile(_hil_profile(tmp_path, pki)), pip_wheel="/w/pip.whl")
    unit = plan.file(f"/etc/systemd/system/{LISTEN_REPORT_UNIT}").content
    assert "After=appliance-agent.service" in unit and f"ExecStart={LISTEN_REPORT_SCRIPT}\n" in unit
    assert plan.file(LISTEN_REPORT_SCRIPT).mode == 0o755
    assert LISTEN_REPORT_UNIT in plan.enable
    plain = configure_plan(load_profile(ROOT / "images/minimal.toml"), pip_wheel="/w/pip.whl")
    assert LISTEN_REPORT_UNIT not in plain.enable
    with pytest.raises(KeyError):
        plain.file(f"/etc/systemd/system/{LISTEN_REPORT_UNIT}")


def test_the_report_script_prints_unit_states_audit_status_then_sockets(tmp_path: Path, pki: Path) -> None:
    """The report script, run for real under sh with stand-ins for systemctl, auditctl and ss
    that answer as on a node: one line per failed unit, one per reported unit, the kernel's
    audit status, then the sockets and the end line the bench waits for."""
    plan = configure_plan(load_profile(_hil_profile(tmp_path, pki)), pip_wheel="/w/pip.whl")
    script = tmp_path / "report"
    script.write_text(plan.file(LISTEN_REPORT_SCRIPT).content)
    tools = tmp_path / "bin"
    tools.mkdir()
    stand_ins = {
        "systemctl": 'case "$1" in --failed) echo "getty@tty1.service loaded failed failed Getty";;\n'
                     '  is-active) [ "$2" = dbus.service ] && echo failed || echo active;; esac',
        "auditctl": 'echo "enabled 2"; echo "failure 1"; echo "pid 700"',
        "ss": 'echo "tcp LISTEN 0 4096 0.0.0.0:8001 0.0.0.0:*"',
    }
    for name, body in stand_ins.items():
        (tools / name).write_text(f"#!/bin/sh\n{body}\n")
        (tools / name).chmod(0o755)
    out = subprocess.run(["sh", str(script)], capture_output=True, text=True, check=True,
                         env={"PATH": f"{tools}:/usr/bin:/bin"}).stdout.splitlines()
    assert out == [
        f"{STATE_PREFIX} failed getty@tty1.service loaded failed failed Getty",
        f"{STATE_PREFIX} active dbus.service failed",
        f"{STATE_PREFIX} active systemd-udevd.service active",
        f"{STATE_PREFIX} active systemd-logind.service active",
        f"{STATE_PREFIX} active auditd.service active",
        f"{STATE_PREFIX} audit enabled 2",
        f"{LISTEN_PREFIX} tcp LISTEN 0 4096 0.0.0.0:8001 0.0.0.0:*",
        f"{LISTEN_PREFIX} end",
    ]


def test_boot_times_unit_only_when_asked_and_it_does_not_hold_the_boot(tmp_path: Path, pki: Path) -> None:
    from provisioning.image.audit import unit_exposure

    plan = configure_plan(load_profile(_hil_profile(tmp_path, pki)), pip_wheel="/w/pip.whl")
    assert BOOT_TIMES_UNIT in plan.enable
    unit = plan.file(f"/etc/systemd/system/{BOOT_TIMES_UNIT}").content
    # a oneshot's job would keep the boot from finishing, and the script waits for that
    assert "Type=exec" in unit and "After=appliance-agent.service" in unit
    plain = configure_plan(load_profile(ROOT / "images/minimal.toml"), pip_wheel="/w/pip.whl")
    assert BOOT_TIMES_UNIT not in plain.enable
    # a running service of the bench image: sandboxed within #16's goal (real systemd-analyze)
    root = tmp_path / "root"
    for spec in plan.files:
        if spec.path in (f"/etc/systemd/system/{BOOT_TIMES_UNIT}", BOOT_TIMES_SCRIPT):
            (root / spec.path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            (root / spec.path.lstrip("/")).write_text(spec.content)
    assert unit_exposure(root, BOOT_TIMES_UNIT)["exposure"] <= 5.0


def _boot_times(tmp_path: Path, pki: Path, state: str, code: int) -> list[str]:
    """The boot-times script run under sh with a stand-in systemctl that reports ``state``
    (exit ``code``) and a stand-in systemd-analyze that answers each query with two lines."""
    plan = configure_plan(load_profile(_hil_profile(tmp_path, pki)), pip_wheel="/w/pip.whl")
    script = tmp_path / "boot-times"
    script.write_text(plan.file(BOOT_TIMES_SCRIPT).content)
    tools = tmp_path / "bin"
    tools.mkdir(exist_ok=True)
    (tools / "systemctl").write_text(f'#!/bin/sh\necho {state}\nexit {code}\n')
    (tools / "systemd-analyze").write_text('#!/bin/sh\necho "$1 one"\necho "9s dev-vda1.device"\n'
                                           'echo "$1 two"\n')
    (tools / "journalctl").write_text('#!/bin/sh\necho "[ 1.0] Starting initrd"\n'
                                      'echo "[ 2.0] Switching root."\necho "[ 9.0] after the switch"\n')
    for name in ("systemctl", "systemd-analyze", "journalctl"):
        (tools / name).chmod(0o755)
    done = subprocess.run(["sh", str(script)], capture_output=True, text=True, check=False,
                          env={"PATH": f"{tools}:/usr/bin:/bin"})
    return [*done.stdout.splitlines(), f"rc={done.returncode}"]


@pytest.mark.parametrize("state", ["running", "degraded"])
def test_boot_times_are_printed_once_the_boot_has_finished(tmp_path: Path, pki: Path, state: str) -> None:
    p = BOOT_TIMES_PREFIX
    assert _boot_times(tmp_path, pki, state, 0 if state == "running" else 1) == [
        f"{p} time time one", f"{p} time 9s dev-vda1.device", f"{p} time time two",
        f"{p} chain critical-chain one", f"{p} chain 9s dev-vda1.device", f"{p} chain critical-chain two",
        f"{p} blame blame one", f"{p} blame blame two",  # a device's wait is not a cost
        f"{p} initrd [ 1.0] Starting initrd", f"{p} initrd [ 2.0] Switching root.",
        f"{p} gap [ 2.0] Switching root.", f"{p} gap [ 9.0] after the switch",
        f"{p} end", "rc=0"]


def test_a_boot_that_never_finishes_is_reported_not_timed(tmp_path: Path, pki: Path) -> None:
    out = _boot_times(tmp_path, pki, "starting", 1)
    assert out == [f"{BOOT_TIMES_PREFIX} failed: the boot had not finished after 1800 s (starting)", "rc=1"]


@pytest.mark.parametrize(("package", "timer", "unit"), [("lynis", LYNIS_TIMER, LYNIS_UNIT),
                                                     ("openscap-scanner", SCAP_TIMER, SCAP_UNIT)])
def test_the_scanners_run_on_the_bench_image_only_in_the_background(
        tmp_path: Path, pki: Path, package: str, timer: str, unit: str) -> None:
    from provisioning.image.profile import package_set

    hil, minimal = load_profile(_scanning_profile(tmp_path, pki)), load_profile(ROOT / "images/minimal.toml")
    assert package in package_set(hil) and package not in package_set(minimal)
    assert package not in package_set(load_profile(_hil_profile(tmp_path, pki)))  # off on the CI bench
    plan = configure_plan(hil, pip_wheel="/w/pip.whl")
    assert timer in plan.enable and unit not in plan.enable  # it does not hold the boot
    service = plan.file(f"/etc/systemd/system/{unit}").content
    assert "Type=oneshot" in service and "CPUSchedulingPolicy=idle" in service
    assert "WantedBy=timers.target" in plan.file(f"/etc/systemd/system/{timer}").content
    assert timer not in configure_plan(minimal, pip_wheel="/w/pip.whl").enable
    if package == "lynis":  # Debian's daily run of the whole audit: ours runs once per image
        assert "lynis.timer" in plan.mask


def test_the_nodes_own_scan_needs_the_builds_audit(tmp_path: Path, pki: Path) -> None:
    path = _scanning_profile(tmp_path, pki)
    text = re.sub(r"^audit = true\n(baseline = .*\n)?", "audit = false\n", path.read_text(), flags=re.M)
    path.write_text(text)
    with pytest.raises(ProfileError, match=re.escape(f"{path}: [diagnostics] console_scap = true needs "
                                                     "[compliance] audit = true")):
        load_profile(path)


def test_an_os_release_builds_on_the_first_builds_root(tmp_path: Path, pki: Path) -> None:
    """A release is not audited again, so its node does not scan itself; its root keeps the
    scanner all the same, so the first build's rootfs stage (keyed by the package set) serves."""
    from provisioning.demo.bench import NEVER_SERVES, release_profile
    from provisioning.image.profile import package_set

    first = _scanning_profile(tmp_path, pki)
    release = first.with_name("hil-9.1.toml")
    release.write_text(release_profile(first.read_text(), "9.1", NEVER_SERVES))
    a, b = load_profile(first), load_profile(release)
    assert package_set(a) == package_set(b)
    assert not b.compliance.audit and not b.diagnostics.console_scap and not b.diagnostics.console_lynis
    assert b.image.version == "9.1" and b.boot.cmdline == NEVER_SERVES
    assert not {SCAP_TIMER, LYNIS_TIMER} & set(configure_plan(b, pip_wheel="/w/pip.whl").enable)


def test_an_enabled_lynis_timer_adds_no_service_to_the_exposure_report(tmp_path: Path) -> None:
    from provisioning.image.audit import enabled_services
    from provisioning.image.plan import lynis_units

    units = tmp_path / "etc/systemd/system"
    (units / "timers.target.wants").mkdir(parents=True)
    for name, text in lynis_units().items():
        (units / name).write_text(text)
    (units / "timers.target.wants" / LYNIS_TIMER).symlink_to(f"/etc/systemd/system/{LYNIS_TIMER}")
    assert enabled_services(tmp_path) == []  # a oneshot that runs and exits serves nothing


def test_the_nodes_scans_run_one_after_the_other() -> None:
    """Both timers fire together; Lynis waits for OpenSCAP, whose systemd probes got no D-Bus
    answer in time beside it on one emulated CPU (and read "fail"), and never the reverse."""
    from provisioning.image.plan import LYNIS_UNIT, SCAP_UNIT, lynis_units, scap_units

    def after(text: str) -> list[str]:
        return next(line for line in text.splitlines() if line.startswith("After=")).split("=")[1].split()

    assert SCAP_UNIT in after(lynis_units()[LYNIS_UNIT])
    assert LYNIS_UNIT not in after(scap_units()[SCAP_UNIT])


def _stand_in(tmp_path: Path, name: str, body: str) -> dict[str, str]:
    """``name`` as a shell script running ``body``, in ``tmp_path/bin``; the environment that
    finds it first."""
    tools = tmp_path / "bin"
    tools.mkdir(exist_ok=True)
    (tools / name).write_text(f"#!/bin/sh\n{body}\n")
    (tools / name).chmod(0o755)
    return {"PATH": f"{tools}:/usr/bin:/bin"}


def _lynis_node(tmp_path: Path, lynis: str, roothash: str = "ab12") -> tuple[Path, dict[str, str], Path]:
    """The Lynis script with its node paths moved under ``tmp_path``, and a stand-in ``lynis``."""
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(f"BOOT_IMAGE=x roothash={roothash} ro quiet\n")
    state = tmp_path / "lynis-state"
    script = tmp_path / "lynis-report"
    script.write_text(lynis_script().replace("/proc/cmdline", str(cmdline))
                      .replace("/var/lib/appliance-lynis", str(state)))
    return script, _stand_in(tmp_path, "lynis", lynis), state


# A stand-in that writes a report as Lynis does (key=value lines) and counts its runs.
_LYNIS_WRITES = """echo run >> "$(dirname "$0")/runs"
while [ $# -gt 0 ]; do [ "$1" = --report-file ] && report=$2; shift; done
printf '%s\\n' lynis_version=3.1.4 lynis_tests_done=251 'warning[]=AUTH-9262|No PAM module|-|-|' \\
  'suggestion[]=KRNL-6000|sysctl|-|-|' 'suggestion[]=PKGS-7346|purge|-|-|' hardening_index=64 > "$report"
"""


def test_the_lynis_script_prints_the_running_nodes_figures_once_per_image(tmp_path: Path) -> None:
    script, env, state = _lynis_node(tmp_path, _LYNIS_WRITES)
    first = subprocess.run(["sh", str(script)], capture_output=True, text=True, check=True, env=env)
    assert first.stdout.splitlines() == [
        f"{LYNIS_PREFIX} hardening_index=64 tests=251 warnings=1 suggestions=2 version=3.1.4",
        f"{LYNIS_PREFIX} warning AUTH-9262|No PAM module|-|-|",
        f"{LYNIS_PREFIX} end",
    ]
    assert (state / "report-ab12.dat").is_file() and not (state / "report-ab12.dat.part").exists()
    assert (state.stat().st_mode & 0o777) == 0o700
    again = subprocess.run(["sh", str(script)], capture_output=True, text=True, check=True, env=env)
    assert again.stdout == first.stdout  # the same report, printed again (a power cycle)
    assert (tmp_path / "bin/runs").read_text().count("run") == 1
    other, env, _ = _lynis_node(tmp_path, _LYNIS_WRITES, roothash="cd34")  # an OS update: a new root
    subprocess.run(["sh", str(other)], capture_output=True, text=True, check=True, env=env)
    assert (tmp_path / "bin/runs").read_text().count("run") == 2


def test_the_nodes_lynis_reads_the_images_profile_which_skips_only_the_pointless_slow_test(
        tmp_path: Path, pki: Path) -> None:
    from provisioning.image.plan import LYNIS_PROFILE

    script, env, _ = _lynis_node(tmp_path, 'echo "$@" > "$(dirname "$0")/args"\n' + _LYNIS_WRITES)
    subprocess.run(["sh", str(script)], capture_output=True, text=True, check=True, env=env)
    args = (tmp_path / "bin/args").read_text().split()
    assert args[args.index("--profile") + 1] == LYNIS_PROFILE
    plan = configure_plan(load_profile(_scanning_profile(tmp_path, pki)), pip_wheel="/w/pip.whl")
    settings = [ln for ln in plan.file(LYNIS_PROFILE).content.splitlines() if ln and not ln.startswith("#")]
    assert settings == ["skip-test=BOOT-5264"]


def test_a_lynis_run_cut_short_reports_failure_and_runs_again(tmp_path: Path) -> None:
    script, env, state = _lynis_node(tmp_path, 'echo run >> "$(dirname "$0")/runs"\n'
                                     'while [ $# -gt 0 ]; do [ "$1" = --report-file ] && r=$2; shift; done\n'
                                     'echo lynis_version=3.1.4 > "$r"; exit 3')
    proc = subprocess.run(["sh", str(script)], capture_output=True, text=True, check=False, env=env)
    assert proc.returncode == 1
    assert proc.stdout.strip() == (f"{LYNIS_PREFIX} failed: lynis exited 3 without a hardening index "
                                   f"(see {state}/lynis.log)")
    assert not (state / "report-ab12.dat").exists()  # nothing counts as this image's report
    script, env, _ = _lynis_node(tmp_path, _LYNIS_WRITES)
    proc = subprocess.run(["sh", str(script)], capture_output=True, text=True, check=True, env=env)
    assert "hardening_index=64" in proc.stdout and (state / "report-ab12.dat").is_file()


def _sys_block(base: Path, partname: str) -> Path:
    dm = base / "block" / "dm-0"
    (dm / "dm").mkdir(parents=True)
    (dm / "dm" / "name").write_text("root\n")
    for dev, name in (("vda3", partname), ("vda4", f"{partname}-verity")):
        (dm / "slaves" / dev).mkdir(parents=True)
        (dm / "slaves" / dev / "uevent").write_text(f"MAJOR=253\nDEVTYPE=partition\nPARTNAME={name}\n")
    other = base / "block" / "dm-1"
    (other / "dm").mkdir(parents=True)
    (other / "dm" / "name").write_text("swap\n")
    return base / "block"


@pytest.mark.parametrize(("partname", "slot"), [("root-a", "A"), ("root-b", "B")])
def test_inventory_reads_root_hash_and_slot(tmp_path: Path, partname: str, slot: str) -> None:
    cmdline = tmp_path / "cmdline"
    roothash = "ab" * 32
    cmdline.write_text(f"roothash={roothash} root=/dev/mapper/root ro console=ttyS0\n")
    inv = collect_inventory(tmp_path / "state", image_metadata=tmp_path / "none.json",
                            os_release=tmp_path / "none", cmdline=cmdline,
                            sys_block=_sys_block(tmp_path / "sys", partname))
    assert (inv.root_hash, inv.active_slot) == (roothash, slot)


def test_inventory_off_an_image_has_no_root_hash_or_slot(tmp_path: Path) -> None:
    (tmp_path / "cmdline").write_text("BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro\n")
    inv = collect_inventory(tmp_path / "state", image_metadata=tmp_path / "none.json",
                            os_release=tmp_path / "none", cmdline=tmp_path / "cmdline",
                            sys_block=tmp_path / "nosys")
    assert (inv.root_hash, inv.active_slot) == ("", "")


def test_hil_console_parser_reads_the_report(tmp_path: Path) -> None:
    from hil.test_appliance import _listeners, _port_and_host

    console = tmp_path / "console.log"
    console.write_text("[  OK  ] Started appliance-agent.service\n"
                       "appliance-listen: tcp LISTEN 0 4096 0.0.0.0:8001 0.0.0.0:*\n"
                       "appliance-listen: tcp LISTEN 0 4096 [::1]:5000 [::]:*\n"
                       "appliance-listen: udp UNCONN 0 0 10.0.2.15%enp0s2:68 0.0.0.0:*\n"
                       "appliance-listen: end\n")
    found = _listeners(console, bound=0)
    assert found == [("tcp", "0.0.0.0:8001"), ("tcp", "[::1]:5000"), ("udp", "10.0.2.15%enp0s2:68")]
    assert _port_and_host("[::1]:5000") == ("::1", 5000)
    assert _port_and_host("10.0.2.15%enp0s2:68") == ("10.0.2.15", 68)
    console.write_text("appliance-listen: tcp LISTEN 0 1 0.0.0.0:8001 0.0.0.0:*\n")  # cut short
    with pytest.raises(AssertionError, match="within 0 s"):
        _listeners(console, bound=0)


def test_hil_console_parser_waits_for_a_report_still_being_written(tmp_path: Path) -> None:
    """The report unit runs after the agent's READY=1, so it may land after the first RPC."""
    from hil.test_appliance import _listeners

    console = tmp_path / "console.log"
    console.write_text("[  OK  ] Started appliance-agent.service\n")

    def finish() -> None:
        time.sleep(1)
        with console.open("a") as f:
            f.write("appliance-listen: tcp LISTEN 0 4096 0.0.0.0:8001 0.0.0.0:*\n"
                    "appliance-listen: end\n")

    writer = threading.Thread(target=finish)
    writer.start()
    try:
        assert _listeners(console, bound=60) == [("tcp", "0.0.0.0:8001")]
    finally:
        writer.join()


def test_the_bench_site_signs_its_ukis_pcr_policy(tmp_path: Path) -> None:
    """The hil bench's profile names a PCR key of its own, kept outside the baked PKI folder."""
    import stat
    import tomllib

    from provisioning.demo.bench import bench_paths, ensure_pki, write_profile
    from provisioning.image.pcrsign import load_pcr_key

    bench = bench_paths(tmp_path / "bench")
    ensure_pki(bench)
    key = load_pcr_key(bench.pcr_key)
    assert stat.S_IMODE(bench.pcr_key.stat().st_mode) == 0o600
    assert not bench.pcr_key.is_relative_to(bench.pki)
    profile = tomllib.loads(write_profile(bench).read_text())
    assert profile["tpm"] == {"pcr_key": str(bench.pcr_key)}
    ensure_pki(bench)  # a second run keeps the key: images it signed still unlock
    assert load_pcr_key(bench.pcr_key).private_numbers() == key.private_numbers()


@pytest.mark.parametrize("boot", ["", "\n[boot]\ntries = 1\n"])
def test_an_os_release_profile_keeps_the_hil_profiles_boot_section(boot: str) -> None:
    """The broken release's kernel arguments join hil.toml's own [boot] (TOML refuses a second
    [boot] table), and the release is not audited again."""
    import tomllib

    from provisioning.demo.bench import NEVER_SERVES, release_profile

    hil = (Path(__file__).resolve().parent.parent / "images/hil.toml").read_text()
    hil = re.sub(r"^\[boot\]\n(.+\n)*\n", "", hil, flags=re.M)  # its own [boot], then none
    assert "[boot]" not in hil
    doc = tomllib.loads(release_profile(hil.replace("\n[bundles]\n", f"{boot}\n[bundles]\n"), "9.1",
                                        NEVER_SERVES))
    assert doc["image"]["version"] == "9.1" and doc["compliance"]["audit"] is False
    assert "baseline" not in doc["compliance"]
    assert doc["boot"]["cmdline"] == list(NEVER_SERVES)
    assert doc["boot"].get("tries") == (1 if boot else None)
    plain = tomllib.loads(release_profile(hil, "9.2"))
    assert "boot" not in plain and plain["image"]["version"] == "9.2"


def test_hil_reads_the_last_complete_lynis_report_the_script_printed(tmp_path: Path) -> None:
    """The bench's parser on what the node's script prints, among other console lines: a run cut
    short by the power cycle (no end line), then a complete one; a failure after it is reported."""
    from provisioning.image.booted import lynis_report

    script, env, _ = _lynis_node(tmp_path, _LYNIS_WRITES)
    printed = subprocess.run(["sh", str(script)], capture_output=True, text=True, check=True,
                             env=env).stdout
    assert lynis_report("[  OK  ] Started appliance-agent.service\n") is None
    cut = "appliance-lynis: hardening_index=12 tests=3 warnings=0 suggestions=0 version=3.1.4\n"
    assert lynis_report(cut) is None  # no end line yet
    console = f"{cut}[  OK  ] Reached target reboot.target\n{printed}[ 9.1] audit: type=1400\n"
    figures, warnings = lynis_report(console) or ({}, [])
    assert figures == {"hardening_index": "64", "tests": "251", "warnings": "1", "suggestions": "2",
                       "version": "3.1.4"}
    assert warnings == ["AUTH-9262|No PAM module|-|-|"]
    failed = "appliance-lynis: failed: lynis exited 3 without a hardening index (see x)\n"
    with pytest.raises(ImageError, match="Lynis on the node: failed: lynis exited 3"):
        lynis_report(console + failed)


def _scap_node(tmp_path: Path, oscap: str, profiles: str,
               same: str = "") -> tuple[Path, dict[str, str], Path]:
    """The OpenSCAP script with its node paths under ``tmp_path``, and a stand-in ``oscap``."""
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("BOOT_IMAGE=x roothash=ab12 ro\n")
    content, state = tmp_path / "content", tmp_path / "scap-state"
    content.mkdir(exist_ok=True)
    (content / "profiles").write_text(profiles)
    (content / "same").write_text(same)
    script = tmp_path / "scap-report"
    script.write_text(scap_script().replace("/proc/cmdline", str(cmdline))
                      .replace("/usr/share/appliance/scap", str(content))
                      .replace("/var/lib/appliance-scap", str(state)))
    return script, _stand_in(tmp_path, "oscap", oscap), state


# A stand-in that prints as oscap 1.4 does ("Rule\r\tID", "Result\r\tRESULT"), logs its
# arguments, and fails every rule whose name holds "bad".
_OSCAP_PRINTS = r"""echo "$*" >> "$(dirname "$0")/calls"
for a; do case $a in xccdf_org.ssgproject.content_rule_*)
  printf 'Title\r\tSome rule\nRule\r\t%s\n' "$a"
  case $a in *bad*) printf 'Result\r\tfail\n\n';; *) printf 'Result\r\tpass\n\n';; esac;; esac; done
case "$*" in *bad*) exit 2;; esac"""


def test_the_scap_script_evaluates_each_profiles_failed_rules_on_the_node_once(tmp_path: Path) -> None:
    script, env, state = _scap_node(tmp_path, _OSCAP_PRINTS,
                                    "anssi_bp28_high xccdf_site_profile_anssi_bp28_high sysctl_a bad_b\n"
                                    "cis_level1_server xccdf_site_profile_cis_l1 partition_for_var\n")
    out = subprocess.run(["sh", str(script)], capture_output=True, text=True, check=True, env=env).stdout
    assert out.splitlines() == [f"{SCAP_PREFIX} anssi_bp28_high sysctl_a pass",
                                f"{SCAP_PREFIX} anssi_bp28_high bad_b fail",
                                f"{SCAP_PREFIX} cis_level1_server partition_for_var pass",
                                f"{SCAP_PREFIX} end"]
    calls = (tmp_path / "bin/calls").read_text().splitlines()
    content = tmp_path / "content"
    assert calls[0].split() == [
        "xccdf", "eval", "--profile", "xccdf_site_profile_anssi_bp28_high", "--tailoring-file",
        f"{content}/tailoring.xml", "--rule", "xccdf_org.ssgproject.content_rule_sysctl_a",
        "--rule", "xccdf_org.ssgproject.content_rule_bad_b", f"{content}/ssg-debian13-ds.xml"]
    assert len(calls) == 2 and (state / "results-ab12.txt").is_file()
    again = subprocess.run(["sh", str(script)], capture_output=True, text=True, check=True, env=env).stdout
    assert again == out and len((tmp_path / "bin/calls").read_text().splitlines()) == 2  # once per image

    from provisioning.image.booted import scap_report

    console = f"appliance-scap: end\n[  OK  ] Started x\n{out}"  # an earlier boot's report, then this one
    assert scap_report(console) == {"anssi_bp28_high": {"sysctl_a": "pass", "bad_b": "fail"},
                                    "cis_level1_server": {"partition_for_var": "pass"}}
    assert scap_report("appliance-scap: anssi_bp28_high sysctl_a pass\n") is None  # not complete yet


def test_a_rule_that_takes_no_value_is_evaluated_once_for_every_profile_that_failed_it(
        tmp_path: Path) -> None:
    script, env, _ = _scap_node(tmp_path, _OSCAP_PRINTS,
                                "anssi_bp28_high xccdf_site_profile_anssi_bp28_high walk_a bad_b\n"
                                "cis_level2_server xccdf_site_profile_cis_l2 sysctl_c\n",
                                "cis_level2_server walk_a anssi_bp28_high\n"
                                "cis_level2_server bad_b anssi_bp28_high\n"
                                "cis_level1_server gone_d anssi_bp28_high\n")  # never evaluated
    out = subprocess.run(["sh", str(script)], capture_output=True, text=True, check=True, env=env).stdout
    assert out.splitlines() == [f"{SCAP_PREFIX} anssi_bp28_high walk_a pass",
                                f"{SCAP_PREFIX} anssi_bp28_high bad_b fail",
                                f"{SCAP_PREFIX} cis_level2_server sysctl_c pass",
                                f"{SCAP_PREFIX} cis_level2_server walk_a pass",
                                f"{SCAP_PREFIX} cis_level2_server bad_b fail",
                                f"{SCAP_PREFIX} cis_level1_server gone_d error",
                                f"{SCAP_PREFIX} end"]
    calls = [c.split() for c in (tmp_path / "bin/calls").read_text().splitlines()]
    walks = [a for c in calls for a in c if a.endswith("walk_a")]
    assert walks == ["xccdf_org.ssgproject.content_rule_walk_a"]  # evaluated in one profile


def test_the_build_evaluates_on_the_node_once_what_no_profile_can_change(tmp_path: Path) -> None:
    from provisioning.image.audit import AuditResult, rules_without_values, stage_booted_scan
    from provisioning.image.compliance import ProfileSummary

    x = "http://checklists.nist.gov/xccdf/1.2"
    rule = "xccdf_org.ssgproject.content_rule_"
    content = tmp_path / "ds.xml"
    content.write_text(
        f'<ds:data-stream-collection xmlns:ds="http://scap.nist.gov/schema/scap/source/1.2">'
        f'<ds:component><Benchmark xmlns="{x}"><Group id="g">'
        f'<Rule id="{rule}walk"><check system="oval"><check-content-ref name="d1"/></check></Rule>'
        f'<Rule id="{rule}sysctl_valued"><check system="oval"><check-export value-id="v" '
        f'export-name="oval:x:var:1"/><check-content-ref name="d2"/></check></Rule>'
        f'</Group></Benchmark></ds:component></ds:data-stream-collection>')
    assert rules_without_values(content) == {"walk"}
    profiles = (ProfileSummary("anssi_bp28_enhanced", {"fail": 2}, ("walk", "sysctl_valued"), ()),
                ProfileSummary("anssi_bp28_high", {"fail": 2}, ("walk", "sysctl_valued"), ()),
                ProfileSummary("cis_level1_server", {"fail": 1}, ("walk",), ()))
    result = AuditResult(tmp_path, "s", profiles, {}, {}, {}, content=content)
    d = stage_booted_scan(tmp_path / "root", result)
    lines = (d / "profiles").read_text().splitlines()
    to_evaluate = {line.split()[0]: line.split()[2:] for line in lines}
    # a value may differ by profile (and the tailoring sets some): such a rule runs in each
    assert to_evaluate == {"anssi_bp28_enhanced": ["walk", "sysctl_valued"],
                           "anssi_bp28_high": ["sysctl_valued"]}
    assert (d / "same").read_text() == ("anssi_bp28_high walk anssi_bp28_enhanced\n"
                                        "cis_level1_server walk anssi_bp28_enhanced\n")
    content.write_text("<not closed")
    with pytest.raises(ImageError, match="not SCAP content"):
        rules_without_values(content)


def test_an_oscap_that_fails_leaves_no_results_and_says_so(tmp_path: Path) -> None:
    from provisioning.image.booted import scap_report

    script, env, state = _scap_node(tmp_path, 'echo "oscap: cannot load" >&2; exit 1',
                                    "cis_level1_server xccdf_p partition_for_var\n")
    proc = subprocess.run(["sh", str(script)], capture_output=True, text=True, check=False, env=env)
    assert proc.returncode == 1
    assert proc.stdout.strip() == (f"{SCAP_PREFIX} failed: oscap exited 1 on cis_level1_server "
                                   f"(see {state}/cis_level1_server.log)")
    assert "cannot load" in (state / "cis_level1_server.log").read_text()
    assert not (state / "results-ab12.txt").exists()
    with pytest.raises(ImageError, match="OpenSCAP on the node: failed: oscap exited 1 on cis_level1_server"):
        scap_report(proc.stdout)


def test_the_build_gives_the_node_the_content_and_what_the_offline_scan_failed(tmp_path: Path) -> None:
    from provisioning.image.audit import BOOTED_SCAN_DIR, DEFAULT_TAILORING, AuditResult, stage_booted_scan
    from provisioning.image.compliance import ProfileSummary, load_tailoring

    content = tmp_path / "ds.xml"
    content.write_text("<datastream/>")
    # the unit rules a directory cannot answer ("unknown" offline) are asked of the node too
    profiles = (ProfileSummary("anssi_bp28_high", {"fail": 2, "unknown": 1, "other": 1},
                               ("sysctl_a", "partition_for_var"), (),
                               undecided={"service_auditd_enabled": "unknown"}),
                ProfileSummary("cis_level1_server", {"pass": 3}, (), ()))  # nothing to scan again
    result = AuditResult(tmp_path / "root", "s", profiles, {}, {}, {}, content=content)
    d = stage_booted_scan(tmp_path / "root", result)
    assert d == tmp_path / "root" / BOOTED_SCAN_DIR
    high = load_tailoring(DEFAULT_TAILORING).profile_id("anssi_bp28_high")
    assert (d / "profiles").read_text() == \
        f"anssi_bp28_high {high} sysctl_a partition_for_var service_auditd_enabled\n"
    assert (d / "ssg-debian13-ds.xml").read_text() == "<datastream/>"
    assert (d / "tailoring.xml").read_bytes() == DEFAULT_TAILORING.read_bytes()
    assert {oct(p.stat().st_mode & 0o777) for p in d.iterdir()} == {"0o644"}
    with pytest.raises(ImageError, match="names no content"):
        stage_booted_scan(tmp_path / "other", AuditResult(tmp_path, "s", profiles, {}, {}, {}))
