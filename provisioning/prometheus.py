"""What a Prometheus server needs to scrape a fleet's agents: ``file_sd`` targets and the
scrape job whose TLS settings match the nodes' mTLS metrics port.

The metrics port (8002, Triton's) serves HTTPS and asks for a client certificate from the
site CA once the agent has TLS material; any role may scrape.  Targets carry the labels
``node`` (the inventory name) and ``group`` (its inventory groups, comma-separated), which the
dashboards in ``provisioning/dashboards/`` select on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from provisioning.fleet import Node

__all__ = ["DEFAULT_METRICS_PORT", "file_sd_targets", "scrape_config"]

DEFAULT_METRICS_PORT = 8002


def _target(address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"{host}:{port}"


def file_sd_targets(nodes: Sequence[Node], metrics_port: int = DEFAULT_METRICS_PORT) -> list[dict[str, Any]]:
    """Prometheus ``file_sd`` entries: one per node, its metrics address and labels."""
    return [{"targets": [_target(n.address, metrics_port)],
             "labels": {"node": n.name, "group": ",".join(n.groups)}} for n in nodes]


def scrape_config(sd_file: Path | str, nodes: Sequence[Node], *, ca: Path | None, cert: Path | None,
                  key: Path | None, job: str = "appliance") -> str:
    """A ``scrape_configs`` entry (YAML) reading ``sd_file``, with the mTLS settings.

    ``server_name`` is set when the nodes' certificates carry one name other than their
    addresses (an inventory's ``appliance_tls_name``); certificates from ``enroll.yml`` carry
    each node's address, so it is needed only then.
    """
    def path(p: Path | None, what: str) -> str:
        return str(p.resolve()) if p is not None else f"/etc/prometheus/appliance/{what}"

    names = {n.tls_name for n in nodes if n.tls_name}
    if len(names) == 1:
        server_name = f"      server_name: {names.pop()}"
    elif names:
        server_name = ("      # server_name: the nodes' certificates carry different names "
                       f"({', '.join(sorted(names))}); split them into one job per name")
    else:
        server_name = ("      # server_name: not needed; each node's certificate carries its "
                       "address (set it when a certificate names the node otherwise)")
    return "\n".join([
        "scrape_configs:",
        f"  - job_name: {job}",
        "    scheme: https",
        "    tls_config:",
        f"      ca_file: {path(ca, 'ca.crt')}",
        f"      cert_file: {path(cert, 'prometheus.crt')}",
        f"      key_file: {path(key, 'prometheus.key')}",
        server_name,
        "    file_sd_configs:",
        f"      - files: [{sd_file}]",
        "",
    ])
