"""Where an image may send packets: the allowlist its firewall enforces and its manifest lists.

:func:`egress_allowlist` is pure: from a profile it gives every destination the node is
configured to reach (the agent's registry sources, the NTP servers, the DNS servers of a
static network, DHCP on its link).  The image's nftables output chain is built from it
(:func:`nft_output_rules`), the image metadata and the audit report list it, and the hil suite
checks a booted guest's recorded packets against it.

A destination given by name cannot be matched by address in the ruleset: nft would resolve it
while loading, at boot, before the network is up (and a failed lookup would leave no firewall
at all).  Such a destination is allowed by protocol and port only, and reaching it needs a DNS
server in the profile; without one the name stays unresolved (the entry says so).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, cast
from urllib.parse import urlsplit

from provisioning.image.pcap import Packet
from provisioning.image.profile import Profile

__all__ = ["DROP_LOG_PREFIX", "Destination", "egress_allowlist", "egress_json", "explain",
           "from_json", "nft_output_rules", "unplanned"]

DROP_LOG_PREFIX = "appliance-egress-drop: "
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Destination:
    """One allowed outbound flow: ``host`` is an IP address, a name, or "" for any (DHCP)."""

    why: str  # registry, ntp, dns, dhcp, dhcpv6
    proto: str  # tcp or udp
    host: str
    port: int
    source_port: int | None = None  # DHCP clients send from a fixed port
    note: str = ""

    @property
    def family(self) -> str:
        """``ip``, ``ip6`` or ``name`` (no address to match)."""
        try:
            return "ip" if ipaddress.ip_address(self.host).version == 4 else "ip6"
        except ValueError:
            return "name" if self.host else "any"


def _registry(profile: Profile) -> list[Destination]:
    out = []
    for source in profile.agent.updates.sources:
        url = urlsplit(source)
        if url.scheme not in _DEFAULT_PORTS or not url.hostname:
            continue  # a directory (removable media): nothing on the network
        port = url.port or _DEFAULT_PORTS[url.scheme]
        out.append(Destination("registry", "tcp", url.hostname, port, note=source))
    return out


def egress_allowlist(profile: Profile) -> tuple[Destination, ...]:
    """Every destination ``profile``'s node may send to (besides loopback and replies)."""
    dests = _registry(profile)
    dests += [Destination("ntp", "udp", server, 123) for server in profile.time.ntp]
    dests += [Destination("dns", proto, server, 53)
              for server in profile.network.dns for proto in ("udp", "tcp")]
    if profile.network.mode == "dhcp":
        dests += [Destination("dhcp", "udp", "", 67, source_port=68, note="on its link"),
                  Destination("dhcpv6", "udp", "", 547, source_port=546, note="on its link")]
    named = [d for d in dests if d.family == "name"]
    if named and not profile.network.dns:
        unresolved = "a name, and no [network] dns server configured: it is never resolved"
        dests = [Destination(d.why, d.proto, d.host, d.port, d.source_port,
                             f"{d.note}; {unresolved}".lstrip("; ")) if d.family == "name" else d
                 for d in dests]
    return tuple(dict.fromkeys(dests))


def egress_json(profile: Profile) -> list[dict[str, object]]:
    """The allowlist as the image metadata and the audit report list it."""
    return [asdict(d) for d in egress_allowlist(profile)]


_FIELDS: dict[str, type] = {"why": str, "proto": str, "host": str, "port": int, "source_port": int,
                             "note": str}
_REQUIRED = ("why", "proto", "host", "port")


def _entry_problem(e: object) -> str:
    """What makes ``e`` not a :class:`Destination` (after its index), or ""."""
    if not isinstance(e, dict):
        return f" is {type(e).__name__}, not an object"
    for name in e:
        if name not in _FIELDS:
            return f": unknown field {str(name)[:40]!r}"
    for name in _REQUIRED:
        if name not in e:
            return f": missing field {name!r}"
    for name, value in e.items():
        if name == "source_port" and value is None:
            continue
        kind = _FIELDS[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            return f".{name} is {value!r:.40}, not {kind.__name__}"
    return ""


def from_json(entries: Iterable[object]) -> tuple[Destination, ...]:
    """The allowlist back from image metadata (:func:`egress_json`).

    Raises:
        ValueError: an entry is not a destination (the message names its index and field).
    """
    out = []
    for i, e in enumerate(entries):
        problem = _entry_problem(e)
        if problem:
            raise ValueError(f"not an egress entry: [{i}]{problem}")
        out.append(Destination(**cast("dict[str, Any]", e)))
    return tuple(out)


def _rule(d: Destination) -> str:
    match = {"ip": f"ip daddr {d.host} ", "ip6": f"ip6 daddr {d.host} "}.get(d.family, "")
    sport = f"{d.proto} sport {d.source_port} " if d.source_port is not None else ""
    comment = f"{d.why} {d.host}" if d.family == "name" else d.why
    return f"{match}{sport}{d.proto} dport {d.port} accept comment \"{comment}\""


def nft_output_rules(profile: Profile) -> list[str]:
    """The output chain's rules (policy drop): replies, loopback, needed ICMP, the allowlist,
    and a rate-limited log line for whatever else is dropped."""
    rules = [
        "ct state invalid drop",
        "ct state established,related accept",
        "oif \"lo\" accept",
        # errors about packets we received, and path MTU discovery
        "ip protocol icmp icmp type { destination-unreachable, time-exceeded, parameter-problem }"
        " limit rate 10/second accept",
        # neighbour discovery, router solicitation and multicast listener reports on the link;
        # l4proto, not the IPv6 header's next header: an MLD report starts with a hop-by-hop
        # option (router alert), so its next header is 0
        "meta l4proto ipv6-icmp icmpv6 type { destination-unreachable, packet-too-big, time-exceeded,"
        " parameter-problem, nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert,"
        " mld-listener-report, mld2-listener-report } accept",
    ]
    rules += [_rule(d) for d in egress_allowlist(profile)]
    rules.append(f"limit rate 10/minute burst 20 packets log prefix \"{DROP_LOG_PREFIX}\" level warn")
    return rules


# ICMP types a node sends without being configured to: errors about packets it received,
# echo replies (inbound echo requests are allowed), and IPv6's link machinery (router and
# neighbour solicitation and advertisement, multicast listener reports).
_ICMP_OK = {"icmp": {0, 3, 11, 12}, "icmpv6": {1, 2, 3, 4, 129, 131, 132, 133, 135, 136, 143}}


def explain(packet: Packet, allowed: tuple[Destination, ...], reply_ports: frozenset[int]) -> str:
    """Why the node may send ``packet`` (a name from the allowlist, ``link``, ``reply``), or
    ``""`` when nothing it is configured for explains it."""
    if packet.kind == "arp":
        return "link"
    if packet.proto in _ICMP_OK:
        return "link" if packet.icmp_type in _ICMP_OK[packet.proto] else ""
    if packet.sport is None or packet.proto not in ("tcp", "udp"):
        return ""
    if packet.proto == "tcp" and packet.sport in reply_ports:
        return "reply"  # the agent answering a forwarded client
    return next((d.why for d in allowed if _matches(d, packet)), "")


def _matches(d: Destination, packet: Packet) -> bool:
    if (d.proto, d.port) != (packet.proto, packet.dport):
        return False
    if d.source_port is not None and d.source_port != packet.sport:
        return False
    return d.family in ("any", "name") or _same_address(d.host, packet.dst)


def _same_address(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


def unplanned(packets: Iterable[Packet], allowed: tuple[Destination, ...], *, guest_mac: str,
              reply_ports: frozenset[int]) -> tuple[dict[str, int], list[Packet]]:
    """Sort what ``guest_mac`` sent: counts per reason, and the packets nothing explains."""
    seen: dict[str, int] = {}
    bad: list[Packet] = []
    for packet in packets:
        if packet.src_mac != guest_mac:
            continue  # sent to the guest
        why = explain(packet, allowed, reply_ports)
        if why:
            seen[why] = seen.get(why, 0) + 1
        else:
            bad.append(packet)
    return seen, bad
