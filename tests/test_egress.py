"""Fast tier for zero unplanned outbound traffic: the egress allowlist a profile gives, the
firewall's output chain built from it, the image metadata and audit that list it, idle timers,
the pcap reader and the check hil/ runs on a guest's recording."""

from __future__ import annotations

import ipaddress
import json
import re
import struct
from pathlib import Path

import pytest

from provisioning.demo.bench import hil_profile_text
from provisioning.errors import ImageError
from provisioning.image.audit import egress
from provisioning.image.configure import write_image_metadata
from provisioning.image.egress import (
    DROP_LOG_PREFIX,
    egress_allowlist,
    egress_json,
    explain,
    from_json,
    unplanned,
)
from provisioning.image.pcap import Packet, format_mac, parse_frame, read_pcap, write_pcap
from provisioning.image.plan import IDLE_TIMERS, configure_plan, nftables_ruleset
from provisioning.image.profile import load_profile
from provisioning.pki import init_pki

ROOT = Path(__file__).resolve().parent.parent
GUEST = bytes.fromhex("525400123456")
SLIRP = bytes.fromhex("52550a000202")


def _profile(tmp_path: Path, base: str, replace: dict[str, str] | None = None, extra: str = ""):  # type: ignore[no-untyped-def]
    text = (ROOT / base).read_text()
    if "hil" in base:
        init_pki(tmp_path / "pki", organization="Test Site")
        text = hil_profile_text(tmp_path / "pki")
    for old, new in (replace or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / "images/p.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + extra)
    return load_profile(path)


def _output_chain(rules: str) -> list[str]:
    chain = rules.split("chain output {", 1)[1].split("}\n", 1)[0]
    return [line.strip() for line in chain.splitlines() if line.strip()]


# --- the allowlist and the ruleset ------------------------------------------------------------

def test_hil_profile_may_reach_its_registry_and_dhcp_only(tmp_path: Path) -> None:
    p = _profile(tmp_path, "images/hil.toml")
    allowed = egress_allowlist(p)
    assert [(d.why, d.proto, d.host, d.port) for d in allowed] == [
        ("registry", "tcp", "10.0.2.100", 18480), ("dhcp", "udp", "", 67), ("dhcpv6", "udp", "", 547)]
    chain = _output_chain(nftables_ruleset(p))
    assert chain[0] == "type filter hook output priority filter; policy drop;"
    assert "ct state established,related accept" in chain and 'oif "lo" accept' in chain
    assert 'ip daddr 10.0.2.100 tcp dport 18480 accept comment "registry"' in chain
    assert 'udp sport 68 udp dport 67 accept comment "dhcp"' in chain
    assert 'udp sport 546 udp dport 547 accept comment "dhcpv6"' in chain
    (icmpv6,) = [r for r in chain if "icmpv6 type" in r]
    assert icmpv6.startswith("meta l4proto ipv6-icmp ")  # MLD reports carry a hop-by-hop header
    assert "mld2-listener-report" in icmpv6 and "nd-neighbor-solicit" in icmpv6
    assert chain[-1] == (f'limit rate 10/minute burst 20 packets log prefix "{DROP_LOG_PREFIX}" '
                         "level warn")
    assert not any("dport 53" in r or "dport 123" in r for r in chain)  # no DNS, no NTP configured
    # nothing else accepts: every accept is replies, loopback, ICMP or a listed destination
    accepts = [r for r in chain if "accept" in r]
    assert len(accepts) == 4 + len(allowed)


def test_minimal_profile_sends_nothing_but_dhcp(tmp_path: Path) -> None:
    p = load_profile(ROOT / "images/minimal.toml")
    assert {d.why for d in egress_allowlist(p)} == {"dhcp", "dhcpv6"}
    assert "policy accept" not in nftables_ruleset(p)


def test_static_network_with_dns_ntp_names_and_https_sources(tmp_path: Path) -> None:
    p = _profile(tmp_path, "images/minimal.toml", {
        'mode = "dhcp"': 'mode = "static"\naddress = "192.0.2.10/24"\ngateway = "192.0.2.1"\n'
                         'dns = ["192.0.2.53", "2001:db8::53"]',
        "ntp = []": 'ntp = ["ntp.site.internal", "192.0.2.123"]',
    }, extra='\n[agent.updates]\nsources = ["https://registry.site.internal/repo", '
             '"http://[2001:db8::80]:8080/", "/media/usb/registry"]\n')
    allowed = egress_allowlist(p)
    got = {(d.why, d.proto, d.host, d.port) for d in allowed}
    assert got == {("registry", "tcp", "registry.site.internal", 443),
                   ("registry", "tcp", "2001:db8::80", 8080),
                   ("ntp", "udp", "ntp.site.internal", 123), ("ntp", "udp", "192.0.2.123", 123),
                   ("dns", "udp", "192.0.2.53", 53), ("dns", "tcp", "192.0.2.53", 53),
                   ("dns", "udp", "2001:db8::53", 53), ("dns", "tcp", "2001:db8::53", 53)}
    chain = _output_chain(nftables_ruleset(p))
    assert 'ip daddr 192.0.2.53 udp dport 53 accept comment "dns"' in chain
    assert 'ip6 daddr 2001:db8::53 tcp dport 53 accept comment "dns"' in chain
    assert 'ip6 daddr 2001:db8::80 tcp dport 8080 accept comment "registry"' in chain
    assert 'ip daddr 192.0.2.123 udp dport 123 accept comment "ntp"' in chain
    # a name cannot be matched by address (nft would resolve it at boot): its port only
    assert 'tcp dport 443 accept comment "registry registry.site.internal"' in chain
    assert 'udp dport 123 accept comment "ntp ntp.site.internal"' in chain
    assert not any("dport 67" in r for r in chain)  # static: no DHCP
    assert all("never resolved" not in d.note for d in allowed)


def test_a_name_without_a_dns_server_is_listed_as_never_resolved(tmp_path: Path) -> None:
    p = _profile(tmp_path, "images/minimal.toml", {"ntp = []": 'ntp = ["ntp.site.internal"]'})
    (ntp,) = [d for d in egress_allowlist(p) if d.why == "ntp"]
    assert "no [network] dns server configured" in ntp.note
    assert not any("dport 53" in r for r in _output_chain(nftables_ruleset(p)))


def test_idle_timers_are_masked() -> None:
    plan = configure_plan(load_profile(ROOT / "images/minimal.toml"), pip_wheel="/w/pip.whl")
    for timer in ("apt-daily.timer", "apt-daily-upgrade.timer", "man-db.timer", "e2scrub_all.timer",
                  "dpkg-db-backup.timer"):
        assert timer in IDLE_TIMERS and timer in plan.mask and timer not in plan.enable


def test_metadata_and_audit_list_what_is_configured(tmp_path: Path) -> None:
    p = _profile(tmp_path, "images/hil.toml")
    root = tmp_path / "root"
    doc = write_image_metadata(p, root, 1767225600)
    assert doc["egress"] == egress_json(p)
    assert from_json(json.loads((root / "usr/lib/appliance/image.json").read_text())["egress"]) \
        == egress_allowlist(p)
    (root / "etc").mkdir()
    (root / "etc/nftables.conf").write_text(nftables_ruleset(p))
    report = egress(root)
    assert report["output_policy"] == "drop"
    first = report["allowed"][0]
    assert (first["why"], first["host"], first["port"]) == ("registry", "10.0.2.100", 18480)
    (root / "usr/lib/appliance/image.json").unlink()
    assert egress(root)["allowed"] is None


def test_from_json_refuses_what_is_not_a_destination() -> None:
    with pytest.raises(ValueError, match="not an egress entry"):
        from_json([{"why": "x", "port": 1}])


# --- pcap frames ---------------------------------------------------------------------------

def _eth(src: bytes, ethertype: int, payload: bytes, dst: bytes = b"\xff" * 6) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def _ipv4(src: str, dst: str, proto: int, payload: bytes, frag: int = 0) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, frag, 64, proto, 0,
                       ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed) + payload


def _ipv6(src: str, dst: str, nxt: int, payload: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), nxt, 1, ipaddress.IPv6Address(src).packed,
                       ipaddress.IPv6Address(dst).packed) + payload


def _ports(sport: int, dport: int, rest: int = 4) -> bytes:
    return struct.pack("!HH", sport, dport) + bytes(rest)


def _frames() -> list[tuple[float, bytes]]:
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, GUEST, ipaddress.IPv4Address("10.0.2.15").packed,
                      bytes(6), ipaddress.IPv4Address("10.0.2.2").packed)
    hop_by_hop = bytes([58, 0, 5, 2, 0, 0, 1, 0])  # router alert, then ICMPv6
    return [
        (1.0, _eth(GUEST, 0x0806, arp)),
        (2.0, _eth(GUEST, 0x0800, _ipv4("0.0.0.0", "255.255.255.255", 17, _ports(68, 67)))),
        (3.0, _eth(GUEST, 0x0800, _ipv4("10.0.2.15", "10.0.2.100", 6, _ports(40000, 18480, 16)),
                   SLIRP)),
        (4.0, _eth(GUEST, 0x0800, _ipv4("10.0.2.15", "10.0.2.2", 6, _ports(8001, 51000, 16)), SLIRP)),
        (5.0, _eth(GUEST, 0x86DD, _ipv6("fe80::1", "ff02::16", 0, hop_by_hop + bytes([143, 0, 0, 0])))),
        (6.0, _eth(GUEST, 0x0800, _ipv4("10.0.2.15", "10.0.2.3", 17, _ports(41000, 53)), SLIRP)),
        (7.0, _eth(GUEST, 0x86DD, _ipv6("fec0::5054:ff:fe12:3456", "2001:db8::1", 6,
                                        _ports(42000, 443, 16)), SLIRP)),
        (8.0, _eth(SLIRP, 0x0800, _ipv4("10.0.2.2", "10.0.2.15", 6, _ports(51000, 8001, 16)), GUEST)),
        (9.0, _eth(GUEST, 0x0800, _ipv4("10.0.2.15", "192.0.2.9", 17, b"", frag=10))),
        (10.5, _eth(GUEST, 0x8100, struct.pack("!HH", 7, 0x0800)
                    + _ipv4("10.0.2.15", "10.0.2.2", 1, bytes([3, 3, 0, 0])))),
    ]


def test_pcap_reader_decodes_each_header(tmp_path: Path) -> None:
    write_pcap(tmp_path / "t.pcap", _frames())
    packets = list(read_pcap(tmp_path / "t.pcap"))
    assert [p.describe() for p in packets] == [
        "arp 10.0.2.15 -> 10.0.2.2",
        "udp 0.0.0.0:68 -> 255.255.255.255:67",
        "tcp 10.0.2.15:40000 -> 10.0.2.100:18480",
        "tcp 10.0.2.15:8001 -> 10.0.2.2:51000",
        "icmpv6 type 143 fe80::1 -> ff02::16",
        "udp 10.0.2.15:41000 -> 10.0.2.3:53",
        "tcp [fec0::5054:ff:fe12:3456]:42000 -> [2001:db8::1]:443",
        "tcp 10.0.2.2:51000 -> 10.0.2.15:8001",
        "udp 10.0.2.15 -> 192.0.2.9",  # a later fragment: no ports
        "icmp type 3 10.0.2.15 -> 10.0.2.2",  # behind an 802.1Q tag
    ]
    assert packets[0].src_mac == "52:54:00:12:34:56" and packets[2].dst_mac == format_mac(SLIRP)
    assert packets[-1].time == pytest.approx(10.5)


def test_pcap_reader_formats_and_a_partial_last_record(tmp_path: Path) -> None:
    frame = _frames()[1][1]
    # big-endian, nanosecond timestamps (another writer's choice)
    head = struct.pack(">IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 65535, 1)
    record = struct.pack(">IIII", 7, 500_000_000, len(frame), len(frame)) + frame
    (tmp_path / "be.pcap").write_bytes(head + record + record[:20])  # qemu still writing
    (packet,) = read_pcap(tmp_path / "be.pcap")
    assert packet.time == pytest.approx(7.5) and packet.dport == 67
    (tmp_path / "bad.pcap").write_bytes(b"not a pcap file at all, no")
    with pytest.raises(ImageError, match="not a pcap file"):
        list(read_pcap(tmp_path / "bad.pcap"))
    (tmp_path / "sll.pcap").write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 113))
    with pytest.raises(ImageError, match="link type 113"):
        list(read_pcap(tmp_path / "sll.pcap"))
    with pytest.raises(ValueError, match="short IPv4"):
        parse_frame(_eth(GUEST, 0x0800, b"\x45\x00"))
    write_pcap(tmp_path / "short.pcap", [(1.0, _eth(GUEST, 0x86DD, b"\x60" * 10))])
    assert [p.kind for p in read_pcap(tmp_path / "short.pcap")] == ["malformed"]


def test_the_check_flags_only_what_nothing_configured_explains(tmp_path: Path) -> None:
    p = _profile(tmp_path, "images/hil.toml")
    write_pcap(tmp_path / "t.pcap", _frames())
    seen, bad = unplanned(read_pcap(tmp_path / "t.pcap"), egress_allowlist(p),
                          guest_mac="52:54:00:12:34:56", reply_ports=frozenset({8001, 8002}))
    assert seen == {"link": 3, "dhcp": 1, "registry": 1, "reply": 1}
    # DNS nobody configured, a connection to the internet, a fragment nothing explains
    assert [b.describe() for b in bad] == ["udp 10.0.2.15:41000 -> 10.0.2.3:53",
                                           "tcp [fec0::5054:ff:fe12:3456]:42000 -> [2001:db8::1]:443",
                                           "udp 10.0.2.15 -> 192.0.2.9"]
    # the registry's port on another address is not the registry
    other = Packet(0.0, "", "", "ipv4", "10.0.2.15", "10.0.2.2", "tcp", 40001, 18480)
    assert explain(other, egress_allowlist(p), frozenset()) == ""
    # a DHCP request must come from the client port
    spoof = Packet(0.0, "", "", "ipv4", "10.0.2.15", "10.0.2.2", "udp", 5000, 67)
    assert explain(spoof, egress_allowlist(p), frozenset()) == ""


def test_the_disk_stage_records_the_allowlist_in_the_image_manifest(tmp_path: Path) -> None:
    from provisioning.image.disk import _manifest_extra, write_manifest
    from provisioning.image.pipeline import BuildContext, stage_context

    p = _profile(tmp_path, "images/hil.toml")
    build = BuildContext(profile=p, mirror=tmp_path / "mirror", lock=None,  # type: ignore[arg-type]
                         out=tmp_path / "out", source_date_epoch=1767225600, packages=())
    ctx = stage_context(build, "disk")
    (tmp_path / "m").mkdir()
    write_manifest(tmp_path / "m", name="appliance", version="1", epoch=1, roothash="00",
                   artifacts={}, extra=_manifest_extra(ctx))
    doc = json.loads((tmp_path / "m/image-manifest.json").read_text())
    assert from_json(doc["egress"]) == egress_allowlist(p)
    assert doc["cpu_level"] == p.image.cpu_level
    assert doc["boot_tries"] == p.boot.tries == 1  # hil.toml's: what the hil fallback test expects


@pytest.mark.parametrize(("entries", "fragment"), [
    ([{"why": "registry", "proto": "tcp", "host": "10.0.0.1", "port": "443"}], "[0].port is '443', not int"),
    ([{"why": "dns", "proto": "udp", "host": "", "port": 53}, "dns"], "[1] is str, not an object"),
    ([{"why": "ntp", "proto": "udp", "host": "", "port": True}], "[0].port is True, not int"),
    ([{"why": "dhcp", "proto": "udp", "host": "", "port": 67, "source_port": "68"}], "[0].source_port"),
])
def test_from_json_names_the_bad_entry_and_field(entries: list[object], fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        from_json(entries)


@pytest.mark.parametrize("listed", [
    '{"registry": 1}', '[{"why": "registry"}]', '[{"why": "x", "proto": "tcp", "host": "h", "port": "443"}]'])
def test_audit_refuses_malformed_egress_metadata_naming_the_file(tmp_path: Path, listed: str) -> None:
    meta = tmp_path / "usr/lib/appliance/image.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(f'{{"egress": {listed}}}')
    with pytest.raises(ImageError, match=re.escape(str(meta)) + ": egress"):
        egress(tmp_path)


def test_the_disk_stage_records_the_roots_compliance_summary(tmp_path: Path) -> None:
    from provisioning.image.disk import _manifest_extra
    from provisioning.image.pipeline import BuildContext, stage_context

    p = _profile(tmp_path, "images/hil.toml")
    build = BuildContext(profile=p, mirror=tmp_path / "mirror", lock=None,  # type: ignore[arg-type]
                         out=tmp_path / "out", source_date_epoch=1767225600, packages=())
    ctx = stage_context(build, "disk")
    write_image_metadata(p, ctx.rootfs, 1767225600)
    assert "compliance" not in (_manifest_extra(ctx) or {})  # an image built without the audit
    summary = {"scope": "offline scan of the built root", "profiles": []}
    from provisioning.image.configure import record_compliance

    record_compliance(ctx.rootfs, summary)
    assert (_manifest_extra(ctx) or {})["compliance"] == summary
    assert json.loads((ctx.rootfs / "usr/lib/appliance/image.json").read_text())["egress"]  # kept
