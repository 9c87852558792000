"""What a sample and a health report hold: plain dataclasses mirroring ``appliance.v1``.

Kept free of gRPC and protobuf so the sampler, the rules and the metrics run (and are
tested) without them; :mod:`agent.health.service` converts to the wire messages.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

from agent.sealed import SealState

__all__ = ["Disk", "GpuSample", "HealthReport", "HostSample", "RuleResult", "Sample", "Verdict", "Xid"]


class Verdict(enum.IntEnum):
    """Ordered so that the overall verdict is the maximum; values match the proto enum."""

    PASS = 1
    WARN = 2
    FAIL = 3


@dataclass(frozen=True)
class Disk:
    mountpoint: str
    role: str  # "root" or "data"
    total_bytes: int
    used_bytes: int
    used_pct: float


@dataclass(frozen=True)
class HostSample:
    cpu_pct: float = 0.0
    cpu_per_core_pct: tuple[float, ...] = ()
    load1: float = 0.0
    load5: float = 0.0
    load15: float = 0.0
    memory_total_bytes: int = 0
    memory_available_bytes: int = 0
    swap_total_bytes: int = 0
    swap_used_bytes: int = 0
    disks: tuple[Disk, ...] = ()
    disk_read_bytes: int = 0
    disk_write_bytes: int = 0
    net_rx_bytes: int = 0
    net_tx_bytes: int = 0
    temperatures_c: dict[str, float] = field(default_factory=dict)
    fans_rpm: dict[str, float] = field(default_factory=dict)
    uptime_s: float = 0.0

    def disk(self, role: str) -> Disk | None:
        return next((d for d in self.disks if d.role == role), None)


@dataclass(frozen=True)
class Xid:
    time: float
    gpu: int
    code: int


@dataclass(frozen=True)
class GpuSample:
    index: int
    name: str = ""
    uuid: str = ""
    pci_bus_id: str = ""
    temperature_c: float = 0.0
    power_w: float = 0.0
    power_limit_w: float = 0.0
    utilization_gpu_pct: float = 0.0
    utilization_mem_pct: float = 0.0
    memory_total_bytes: int = 0
    memory_used_bytes: int = 0
    clock_sm_mhz: int = 0
    clock_mem_mhz: int = 0
    throttle_mask: int = 0
    throttle_reasons: tuple[str, ...] = ()
    ecc_corrected_volatile: int = 0
    ecc_uncorrected_volatile: int = 0
    ecc_corrected_aggregate: int = 0
    ecc_uncorrected_aggregate: int = 0
    retired_pages: int = 0
    retired_pages_pending: bool = False
    remapped_rows_correctable: int = 0
    remapped_rows_uncorrectable: int = 0
    remap_pending: bool = False
    remap_failure: bool = False
    pcie_replay_counter: int = 0
    nvlink_errors: int = 0
    xid_errors: int = 0          # XIDs seen since the agent started
    last_xid: int = 0
    recent_xids: tuple[int, ...] = ()  # codes seen within [health] xid_window_s
    lost: bool = False
    lost_reason: str = ""
    unsupported: tuple[str, ...] = ()  # fields NVML does not report on this GPU


@dataclass(frozen=True)
class Sample:
    time: float
    host: HostSample
    gpus: tuple[GpuSample, ...] = ()
    nvml_available: bool = False
    nvml_reason: str = ""
    driver_version: str = ""
    cuda_driver_version: str = ""
    sealed: SealState | None = None  # the data partition stayed sealed at boot (agent.sealed)


@dataclass(frozen=True)
class RuleResult:
    rule: str
    verdict: Verdict
    reason: str
    subject: str = ""


@dataclass(frozen=True)
class HealthReport:
    sample: Sample
    rules: tuple[RuleResult, ...]

    @property
    def overall(self) -> Verdict:
        return max((r.verdict for r in self.rules), default=Verdict.PASS)

    def signature(self) -> tuple[Any, ...]:
        """What a watcher "on change" compares: the verdicts, not the measured values."""
        return (self.overall, tuple((r.rule, r.subject, r.verdict) for r in self.rules),
                self.sample.nvml_available, len(self.sample.gpus))

    def to_json(self) -> dict[str, Any]:
        data = {
            "overall": self.overall.name,
            "rules": [{"rule": r.rule, "verdict": r.verdict.name, "reason": r.reason,
                       "subject": r.subject} for r in self.rules],
            **dataclasses.asdict(self.sample),
        }
        data["sampled_at"] = data.pop("time")
        return data
