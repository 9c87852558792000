"""Prometheus metrics from the sampler's latest report: dcgm-exporter's names and our own.

A scrape reads :attr:`Sampler.latest`; it never samples, so a scrape costs microseconds and
a slow sensor never slows it.  GPU metrics carry dcgm-exporter's names, units and labels
(``gpu``, ``UUID``, ``pci_bus_id``, ``device``, ``modelName``, ``Hostname``) so its dashboards
work; DCGM's counters keep their names without a ``_total`` suffix, as dcgm-exporter writes
them.  Node metrics (host, health verdicts, GPU states DCGM has no field for) are under
``appliance_node_``.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent.health.dcgm import DCGM_FIELDS, gpu_labels
from agent.health.report import HealthReport

__all__ = ["DCGM_FIELDS", "NODE_PREFIX", "NodeCollector"]

log = logging.getLogger(__name__)

NODE_PREFIX = "appliance_node_"
class NodeCollector:
    """A prometheus-client collector over ``latest()`` (e.g. ``sampler`` 's latest report)."""

    def __init__(self, latest: Callable[[], HealthReport | None], hostname: str | None = None) -> None:
        self._latest = latest
        self._hostname = hostname or socket.gethostname()

    def collect(self) -> Iterator[Metric]:
        try:
            report = self._latest()
        except Exception:  # a scrape must never take the agent down
            log.exception("reading the latest health report failed")
            report = None
        if report is None:
            return
        yield from self._dcgm(report)
        yield from self._node(report)

    def _dcgm(self, report: HealthReport) -> Iterator[Metric]:
        gpus = [g for g in report.sample.gpus if not g.lost]
        for name, kind, doc, value in DCGM_FIELDS:
            metric = Metric(name, doc, kind)
            for g in gpus:
                metric.add_sample(name, gpu_labels(g, self._hostname), float(value(g)))
            yield metric

    def _node(self, report: HealthReport) -> Iterator[Metric]:
        p, s, h = NODE_PREFIX, report.sample, report.sample.host

        def gauge(name: str, doc: str, value: float | None = None,
                  labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(p + name, doc, value=value, labels=labels or None)

        yield gauge("health_status", "Overall health verdict: 1 PASS, 2 WARN, 3 FAIL", float(report.overall))
        rules = gauge("health_rule_status", "Verdict of each health rule: 1 PASS, 2 WARN, 3 FAIL",
                      labels=("rule", "subject"))
        for r in report.rules:
            rules.add_metric([r.rule, r.subject], float(r.verdict))
        yield rules
        yield gauge("sample_timestamp_seconds", "When the latest sample was taken", s.time)
        yield gauge("nvml_available", "1 when NVML answers", float(s.nvml_available))
        yield gauge("cpu_utilization_percent", "CPU busy over the last sample interval", h.cpu_pct)
        cores = gauge("cpu_core_utilization_percent", "Per-core busy over the last interval",
                      labels=("core",))
        for n, pct in enumerate(h.cpu_per_core_pct):
            cores.add_metric([str(n)], pct)
        yield cores
        for name, value in (("load1", h.load1), ("load5", h.load5), ("load15", h.load15)):
            yield gauge(name, f"{name} average of runnable tasks", value)
        yield gauge("memory_total_bytes", "Physical memory", h.memory_total_bytes)
        yield gauge("memory_available_bytes", "Memory available without swapping", h.memory_available_bytes)
        yield gauge("swap_total_bytes", "Swap space", h.swap_total_bytes)
        yield gauge("swap_used_bytes", "Swap space used", h.swap_used_bytes)
        total = gauge("disk_total_bytes", "Filesystem size", labels=("mountpoint", "role"))
        used = gauge("disk_used_bytes", "Filesystem space used", labels=("mountpoint", "role"))
        for d in h.disks:
            total.add_metric([d.mountpoint, d.role], d.total_bytes)
            used.add_metric([d.mountpoint, d.role], d.used_bytes)
        yield total
        yield used
        for name, doc, value in (
            ("disk_read_bytes", "Bytes read from all disks", h.disk_read_bytes),
            ("disk_written_bytes", "Bytes written to all disks", h.disk_write_bytes),
            ("network_receive_bytes", "Bytes received on all interfaces but loopback", h.net_rx_bytes),
            ("network_transmit_bytes", "Bytes sent on all interfaces but loopback", h.net_tx_bytes),
        ):
            yield CounterMetricFamily(p + name, doc, value=value)
        temps = gauge("temperature_celsius", "Host temperature sensors", labels=("sensor",))
        for sensor, celsius in sorted(h.temperatures_c.items()):
            temps.add_metric([sensor], celsius)
        yield temps
        fans = gauge("fan_rpm", "Host fans", labels=("sensor",))
        for sensor, rpm in sorted(h.fans_rpm.items()):
            fans.add_metric([sensor], rpm)
        yield fans
        yield gauge("uptime_seconds", "Seconds since boot", h.uptime_s)
        yield from self._gpu_states(report)

    def _gpu_states(self, report: HealthReport) -> Iterator[Metric]:
        labels = ("gpu", "UUID")
        lost = GaugeMetricFamily(NODE_PREFIX + "gpu_lost", "1 when the GPU no longer answers NVML",
                                 labels=labels)
        xids = CounterMetricFamily(NODE_PREFIX + "gpu_xid_errors", "XID errors since the agent started",
                                   labels=labels)
        nvlink = CounterMetricFamily(NODE_PREFIX + "gpu_nvlink_errors",
                                     "NVLink replay/recovery/CRC errors summed over links", labels=labels)
        throttle = GaugeMetricFamily(NODE_PREFIX + "gpu_throttle_reason",
                                     "1 for each clock-event reason in force", labels=(*labels, "reason"))
        retired = GaugeMetricFamily(NODE_PREFIX + "gpu_retired_pages", "Retired pages", labels=labels)
        for g in report.sample.gpus:
            key: Any = [str(g.index), g.uuid]
            lost.add_metric(key, float(g.lost))
            xids.add_metric(key, g.xid_errors)
            if g.lost:
                continue
            nvlink.add_metric(key, g.nvlink_errors)
            retired.add_metric(key, g.retired_pages)
            for reason in g.throttle_reasons:
                throttle.add_metric([*key, reason], 1.0)
        yield from (lost, xids, nvlink, throttle, retired)
