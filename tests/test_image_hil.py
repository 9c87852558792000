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
from provisioning.errors import ProfileError
from provisioning.image.configure import bake_node_tls, write_image_metadata
from provisioning.image.plan import (
    LISTEN_PREFIX,
    LISTEN_REPORT_SCRIPT,
    LISTEN_REPORT_UNIT,
    STATE_PREFIX,
    configure_plan,
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
