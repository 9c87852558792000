"""A small reader for classic pcap files of Ethernet frames (what qemu's filter-dump writes).

It decodes only what the egress check needs: Ethernet (with 802.1Q tags), ARP, IPv4, IPv6 (and
its extension headers), UDP, TCP, ICMP and ICMPv6.  A file still being written may end in a
partial record: reading stops before it.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from provisioning.errors import ImageError

__all__ = ["LINKTYPE_ETHERNET", "Packet", "format_mac", "parse_frame", "read_pcap", "write_pcap"]

LINKTYPE_ETHERNET = 1
_MAGIC = {b"\xd4\xc3\xb2\xa1": ("<", 1e-6), b"\xa1\xb2\xc3\xd4": (">", 1e-6),
          b"\x4d\x3c\xb2\xa1": ("<", 1e-9), b"\xa1\xb2\x3c\x4d": (">", 1e-9)}
_ETH_ARP, _ETH_IPV4, _ETH_IPV6, _ETH_VLAN = 0x0806, 0x0800, 0x86DD, (0x8100, 0x88A8)
_PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 2: "igmp"}
_IPV6_EXT = {0, 43, 60}  # hop-by-hop, routing, destination options: (len + 1) * 8 bytes


@dataclass(frozen=True)
class Packet:
    """One decoded frame; fields that do not apply are empty (``""``) or ``None``."""

    time: float
    src_mac: str
    dst_mac: str
    kind: str  # arp, ipv4, ipv6 or ether-0xNNNN
    src: str = ""
    dst: str = ""
    proto: str = ""  # tcp, udp, icmp, icmpv6, igmp, or the protocol number
    sport: int | None = None
    dport: int | None = None
    icmp_type: int | None = None

    def describe(self) -> str:
        """One line for a person: ``udp 10.0.2.15:68 -> 255.255.255.255:67``."""
        if self.kind == "arp":
            return f"arp {self.src} -> {self.dst}"
        if not self.kind.startswith("ip"):
            return f"{self.kind} {self.src_mac} -> {self.dst_mac}"
        if self.sport is not None:
            return f"{self.proto} {_hostport(self.src, self.sport)} -> {_hostport(self.dst, self.dport)}"
        icmp = f" type {self.icmp_type}" if self.icmp_type is not None else ""
        return f"{self.proto}{icmp} {self.src} -> {self.dst}"


def _hostport(host: str, port: int | None) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def format_mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def _l4(proto: int, data: bytes) -> tuple[str, int | None, int | None, int | None]:
    name = _PROTO_NAMES.get(proto, str(proto))
    if name in ("tcp", "udp") and len(data) >= 4:
        sport, dport = struct.unpack_from("!HH", data)
        return name, sport, dport, None
    if name in ("icmp", "icmpv6") and data:
        return name, None, None, data[0]
    return name, None, None, None


def _ipv4(data: bytes) -> tuple[str, str, tuple[str, int | None, int | None, int | None]]:
    if len(data) < 20:
        raise ValueError("short IPv4 header")
    ihl = (data[0] & 0x0F) * 4
    frag_offset = struct.unpack_from("!H", data, 6)[0] & 0x1FFF
    src, dst = (str(ipaddress.IPv4Address(data[o:o + 4])) for o in (12, 16))
    # a later fragment carries no transport header
    l4 = _l4(data[9], data[ihl:]) if frag_offset == 0 else (_PROTO_NAMES.get(data[9], str(data[9])),
                                                           None, None, None)
    return src, dst, l4


def _ipv6(data: bytes) -> tuple[str, str, tuple[str, int | None, int | None, int | None]]:
    if len(data) < 40:
        raise ValueError("short IPv6 header")
    src, dst = (str(ipaddress.IPv6Address(data[o:o + 16])) for o in (8, 24))
    nxt, offset = data[6], 40
    while nxt in _IPV6_EXT or nxt in (44, 51):
        if offset + 2 > len(data):
            raise ValueError("short IPv6 extension header")
        header, length = data[offset], data[offset + 1]
        if nxt == 44:  # fragment: fixed 8 bytes; only the first has the transport header
            later = struct.unpack_from("!H", data, offset + 2)[0] >> 3
            if later:
                return src, dst, (_PROTO_NAMES.get(header, str(header)), None, None, None)
            offset += 8
        else:
            offset += (length + 2) * 4 if nxt == 51 else (length + 1) * 8
        nxt = header
    return src, dst, _l4(nxt, data[offset:])


def parse_frame(frame: bytes, when: float = 0.0) -> Packet:
    """Decode one Ethernet frame.

    Raises:
        ValueError: the frame is too short for the headers it announces.
    """
    if len(frame) < 14:
        raise ValueError("short Ethernet header")
    dst_mac, src_mac = format_mac(frame[0:6]), format_mac(frame[6:12])
    ethertype, offset = struct.unpack_from("!H", frame, 12)[0], 14
    while ethertype in _ETH_VLAN and len(frame) >= offset + 4:
        ethertype, offset = struct.unpack_from("!H", frame, offset + 2)[0], offset + 4
    data = frame[offset:]
    if ethertype == _ETH_ARP:
        if len(data) < 28:
            raise ValueError("short ARP packet")
        sender, target = (str(ipaddress.IPv4Address(data[o:o + 4])) for o in (14, 24))
        return Packet(when, src_mac, dst_mac, "arp", sender, target, "arp")
    if ethertype in (_ETH_IPV4, _ETH_IPV6):
        src, dst, (proto, sport, dport, icmp_type) = (_ipv4 if ethertype == _ETH_IPV4 else _ipv6)(data)
        kind = "ipv4" if ethertype == _ETH_IPV4 else "ipv6"
        return Packet(when, src_mac, dst_mac, kind, src, dst, proto, sport, dport, icmp_type)
    return Packet(when, src_mac, dst_mac, f"ether-0x{ethertype:04x}")


def read_pcap(path: Path) -> Iterator[Packet]:
    """The frames of the pcap file ``path``, decoded; a frame too short for its headers is
    yielded as ``kind="malformed"`` (a check should treat it as unexplained).

    Raises:
        ImageError: not a pcap file of Ethernet frames.
    """
    with path.open("rb") as f:
        head = f.read(24)
        if len(head) < 24 or head[:4] not in _MAGIC:
            raise ImageError(f"{path}: not a pcap file")
        order, unit = _MAGIC[head[:4]]
        linktype = struct.unpack(f"{order}I", head[20:24])[0] & 0x0FFFFFFF
        if linktype != LINKTYPE_ETHERNET:
            raise ImageError(f"{path}: link type {linktype}, not Ethernet")
        record = struct.Struct(f"{order}IIII")
        while True:
            rec = f.read(record.size)
            if len(rec) < record.size:
                return  # end, or a record still being written
            sec, frac, caplen, _ = record.unpack(rec)
            frame = f.read(caplen)
            if len(frame) < caplen:
                return
            when = sec + frac * unit
            try:
                yield parse_frame(frame, when)
            except ValueError:
                yield Packet(when, "", "", "malformed")


def write_pcap(path: Path, frames: list[tuple[float, bytes]]) -> None:
    """Write ``(time, frame)`` pairs as a little-endian microsecond pcap of Ethernet frames."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, LINKTYPE_ETHERNET)]
    for when, frame in frames:
        sec = int(when)
        out.append(struct.pack("<IIII", sec, round((when - sec) * 1e6), len(frame), len(frame)))
        out.append(frame)
    path.write_bytes(b"".join(out))
