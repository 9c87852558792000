"""dcgm-exporter's field names, types, help and labels for the GPU samples we take.

Kept apart from prometheus-client so a script can print a DCGM-style scrape without it
(bench/gpu_check.py on a bare GPU machine); :mod:`agent.health.metrics` serves the same
table through prometheus-client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from agent.health.report import GpuSample, HealthReport

__all__ = ["DCGM_FIELDS", "gpu_labels", "render_dcgm"]

_MIB = 1 << 20

# (dcgm-exporter name, type, help as dcgm-exporter words it, value from a GPU sample)
DCGM_FIELDS: tuple[tuple[str, str, str, Callable[[GpuSample], float]], ...] = (
    ("DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz).", lambda g: g.clock_sm_mhz),
    ("DCGM_FI_DEV_MEM_CLOCK", "gauge", "Memory clock frequency (in MHz).", lambda g: g.clock_mem_mhz),
    ("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C).", lambda g: g.temperature_c),
    ("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W).", lambda g: g.power_w),
    ("DCGM_FI_DEV_ENFORCED_POWER_LIMIT", "gauge", "Enforced power limit (in W).",
     lambda g: g.power_limit_w),
    ("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %).", lambda g: g.utilization_gpu_pct),
    ("DCGM_FI_DEV_MEM_COPY_UTIL", "gauge", "Memory utilization (in %).", lambda g: g.utilization_mem_pct),
    ("DCGM_FI_DEV_FB_FREE", "gauge", "Framebuffer memory free (in MiB).",
     lambda g: (g.memory_total_bytes - g.memory_used_bytes) // _MIB),
    ("DCGM_FI_DEV_FB_USED", "gauge", "Framebuffer memory used (in MiB).",
     lambda g: g.memory_used_bytes // _MIB),
    ("DCGM_FI_DEV_FB_TOTAL", "gauge", "Framebuffer memory total (in MiB).",
     lambda g: g.memory_total_bytes // _MIB),
    ("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", "gauge", "Current clock throttle reasons (bitmask).",
     lambda g: g.throttle_mask),
    ("DCGM_FI_DEV_XID_ERRORS", "gauge", "Value of the last XID error encountered.", lambda g: g.last_xid),
    ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "counter", "Total number of PCIe retries.",
     lambda g: g.pcie_replay_counter),
    ("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "counter", "Total number of single-bit volatile ECC errors.",
     lambda g: g.ecc_corrected_volatile),
    ("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "counter", "Total number of double-bit volatile ECC errors.",
     lambda g: g.ecc_uncorrected_volatile),
    ("DCGM_FI_DEV_ECC_SBE_AGG_TOTAL", "counter", "Total number of single-bit persistent ECC errors.",
     lambda g: g.ecc_corrected_aggregate),
    ("DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", "counter", "Total number of double-bit persistent ECC errors.",
     lambda g: g.ecc_uncorrected_aggregate),
    ("DCGM_FI_DEV_RETIRED_PENDING", "gauge", "Pending page retirements (1 when any).",
     lambda g: float(g.retired_pages_pending)),
    ("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "counter", "Number of remapped rows for correctable errors",
     lambda g: g.remapped_rows_correctable),
    ("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "counter",
     "Number of remapped rows for uncorrectable errors", lambda g: g.remapped_rows_uncorrectable),
    ("DCGM_FI_DEV_ROW_REMAP_FAILURE", "gauge", "Whether remapping of rows has failed",
     lambda g: float(g.remap_failure)),
    ("DCGM_FI_DEV_ROW_REMAP_PENDING", "gauge", "Whether a row remap is pending (reset needed)",
     lambda g: float(g.remap_pending)),
)


def gpu_labels(g: GpuSample, hostname: str) -> dict[str, str]:
    return {"gpu": str(g.index), "UUID": g.uuid, "pci_bus_id": g.pci_bus_id,
            "device": f"nvidia{g.index}", "modelName": g.name, "Hostname": hostname}


def render_dcgm(report: HealthReport, hostname: str) -> Iterator[str]:
    """Prometheus text-format lines of the DCGM fields, as dcgm-exporter writes them."""
    gpus = [g for g in report.sample.gpus if not g.lost]
    for name, kind, doc, value in DCGM_FIELDS:
        yield f"# HELP {name} {doc}"
        yield f"# TYPE {name} {kind}"
        for g in gpus:
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(gpu_labels(g, hostname).items()))
            yield f"{name}{{{labels}}} {float(value(g))}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
