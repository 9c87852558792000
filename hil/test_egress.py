"""Zero unplanned outbound traffic: every frame the guest sent, from its first power-on for
``--egress-watch`` seconds (10 minutes) and on while the other checks ran, goes to a
destination its image is configured for (image-manifest.json's ``egress``: the registry, NTP,
DHCP on its link), is a reply from the agent's forwarded ports, or is link machinery (ARP,
IPv6 neighbour discovery).

The recording runs from the power-on (qemu's filter-dump on a restricted user network, see
conftest.Appliance.power_on), so this check runs last and waits only for what is left of the
watch; it then reads the recordings of every boot.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from provisioning.image.boot import AGENT_PORTS, GUEST_MAC
from provisioning.image.egress import Destination, from_json, unplanned
from provisioning.image.pcap import Packet, read_pcap
from testsupport.appliance import Appliance

pytestmark = [pytest.mark.egress_last, pytest.mark.timeout(1800)]


def _flow(p: Packet) -> str:
    """A packet without its ephemeral port, to count flows."""
    if p.proto == "tcp" and p.sport in AGENT_PORTS:
        return f"tcp {p.src}:{p.sport} -> {p.dst} (agent reply)"
    if p.sport is not None:
        return f"{p.proto} {p.src} -> {p.dst}:{p.dport}"
    return p.describe()


def _destination(d: Destination) -> str:
    return f"{d.why} {d.proto} {d.host or '*'}:{d.port}"


def test_the_guest_sends_nothing_it_is_not_configured_to(appliance: Appliance,
                                                         request: pytest.FixtureRequest) -> None:
    if not appliance.pcaps or appliance.first_power_on is None:
        pytest.skip("a real appliance: record its traffic at the switch (not automated)")
    manifest = appliance.manifest
    assert manifest is not None and "egress" in manifest, \
        "image-manifest.json lists no egress allowlist (an image built before it was recorded)"
    allowed = from_json(manifest["egress"])
    watch = float(request.config.getoption("--egress-watch"))
    left = watch - (time.monotonic() - appliance.first_power_on)
    if left > 0:
        print(f"egress: waiting {left:.0f} s more, to cover {watch:.0f} s since the first power-on")
        time.sleep(left)
    seen: Counter[str] = Counter()
    flows: Counter[str] = Counter()
    bad = []
    for pcap in appliance.pcaps:
        assert pcap.is_file(), f"{pcap}: no recording"
        packets = list(read_pcap(pcap))
        counts, unexplained = unplanned(packets, allowed, guest_mac=GUEST_MAC,
                                        reply_ports=frozenset(AGENT_PORTS))
        seen.update(counts)
        bad += [(pcap.name, p) for p in unexplained]
        flows.update(_flow(p) for p in packets if p.src_mac == GUEST_MAC)
    print(f"egress: {sum(seen.values())} frames sent by the guest over "
          f"{time.monotonic() - appliance.first_power_on:.0f} s, {len(appliance.pcaps)} boots; "
          f"by reason: {dict(sorted(seen.items()))}; allowed: "
          f"{[_destination(d) for d in allowed]}")
    for flow, n in flows.most_common(20):
        print(f"egress:   {n:6d}  {flow}")
    assert seen["dhcp"] > 0, "no DHCP from the guest: the recording did not start at power-on"
    assert not bad, "unplanned traffic from the guest:\n" + "\n".join(
        f"  {name}: {p.describe()}" for name, p in bad[:50])
