"""Health rules: pure functions from a sample to PASS/WARN/FAIL verdicts with reasons.

Each rule returns :class:`RuleResult` s whose reason names the measured value and the
threshold it was held against (thresholds come from agent.toml's ``[health]``).  The overall
verdict is the worst one.  :func:`transitions` compares two consecutive reports and says
which events to record (throttling start/stop, ECC increments, a lost GPU, a filling disk).

Design choices (README "Health rules"): NVML missing passes unless ``require_gpu`` is set,
so a CPU-only node is healthy; only the data partition is judged for space, since a sealed
read-only root is full by construction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.config import HealthSection
from agent.health.report import GpuSample, HealthReport, RuleResult, Sample, Verdict

__all__ = ["RULES", "THERMAL_REASONS", "THROTTLING_REASONS", "EventSpec", "Verdict", "evaluate",
           "transitions"]

# Clock-event reasons that mean the GPU is slowed against the workload's will; idle,
# application clocks, sync boost and display settings are normal.
THROTTLING_REASONS = frozenset({"sw_power_cap", "hw_slowdown", "sw_thermal_slowdown",
                                "hw_thermal_slowdown", "hw_power_brake_slowdown"})
THERMAL_REASONS = frozenset({"sw_thermal_slowdown", "hw_thermal_slowdown", "hw_slowdown"})

Rule = Callable[[Sample, HealthSection], list[RuleResult]]


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def nvml_rule(s: Sample, cfg: HealthSection) -> list[RuleResult]:
    if s.nvml_available:
        return [RuleResult("nvml.available", Verdict.PASS,
                           f"NVML {s.driver_version or '?'} sees {len(s.gpus)} GPU(s)", "nvml")]
    if cfg.require_gpu:
        return [RuleResult("nvml.available", Verdict.FAIL,
                           f"NVML unavailable: {s.nvml_reason}; [health] require_gpu = true", "nvml")]
    return [RuleResult("nvml.available", Verdict.PASS,
                       f"NVML unavailable: {s.nvml_reason}; no GPU required "
                       "([health] require_gpu = false)", "nvml")]


def memory_rule(s: Sample, cfg: HealthSection) -> list[RuleResult]:
    h = s.host
    if not h.memory_total_bytes:
        return []
    pct = 100.0 * h.memory_available_bytes / h.memory_total_bytes
    text = (f"{pct:.1f}% of memory available "
            f"({_gib(h.memory_available_bytes)} of {_gib(h.memory_total_bytes)})")
    if pct < cfg.memory_fail_available_pct:
        return [RuleResult("host.memory.available", Verdict.FAIL,
                           f"{text} < memory_fail_available_pct {cfg.memory_fail_available_pct}%", "memory")]
    if pct < cfg.memory_warn_available_pct:
        return [RuleResult("host.memory.available", Verdict.WARN,
                           f"{text} < memory_warn_available_pct {cfg.memory_warn_available_pct}%", "memory")]
    return [RuleResult("host.memory.available", Verdict.PASS,
                       f"{text} >= memory_warn_available_pct {cfg.memory_warn_available_pct}%", "memory")]


def data_disk_rule(s: Sample, cfg: HealthSection) -> list[RuleResult]:
    disk = s.host.disk("data")
    if disk is None:
        return [RuleResult("disk.data.usage", Verdict.WARN, "data partition not found", "data")]
    text = f"{disk.mountpoint} is {disk.used_pct:.1f}% full"
    if disk.used_pct > cfg.data_fail_pct:
        return [RuleResult("disk.data.usage", Verdict.FAIL,
                           f"{text} > data_fail_pct {cfg.data_fail_pct}%", disk.mountpoint)]
    if disk.used_pct > cfg.data_warn_pct:
        return [RuleResult("disk.data.usage", Verdict.WARN,
                           f"{text} > data_warn_pct {cfg.data_warn_pct}%", disk.mountpoint)]
    return [RuleResult("disk.data.usage", Verdict.PASS,
                       f"{text} <= data_warn_pct {cfg.data_warn_pct}%", disk.mountpoint)]


# ---------------------------------------------------------------------- per GPU

def _lost(g: GpuSample, cfg: HealthSection) -> RuleResult:
    if g.lost:
        return RuleResult("gpu.lost", Verdict.FAIL, f"gpu{g.index} is lost: {g.lost_reason}")
    return RuleResult("gpu.lost", Verdict.PASS, f"gpu{g.index} answers NVML")


def _ecc_uncorrected(g: GpuSample, cfg: HealthSection) -> RuleResult:
    if "ecc_uncorrected_volatile" in g.unsupported:
        return RuleResult("gpu.ecc.uncorrected", Verdict.PASS, "ECC not reported by this GPU")
    if g.ecc_uncorrected_volatile > 0:
        return RuleResult("gpu.ecc.uncorrected", Verdict.FAIL,
                          f"{g.ecc_uncorrected_volatile} uncorrectable ECC errors since driver load > 0")
    if g.ecc_uncorrected_aggregate > 0:
        return RuleResult("gpu.ecc.uncorrected", Verdict.WARN,
                          f"{g.ecc_uncorrected_aggregate} uncorrectable ECC errors in the GPU's "
                          "lifetime > 0 (none since driver load)")
    return RuleResult("gpu.ecc.uncorrected", Verdict.PASS, "0 uncorrectable ECC errors")


def _ecc_corrected(g: GpuSample, cfg: HealthSection) -> RuleResult:
    n = g.ecc_corrected_volatile
    if n >= cfg.ecc_corrected_warn:
        return RuleResult("gpu.ecc.corrected", Verdict.WARN,
                          f"{n} corrected ECC errors since driver load >= ecc_corrected_warn "
                          f"{cfg.ecc_corrected_warn}")
    return RuleResult("gpu.ecc.corrected", Verdict.PASS,
                      f"{n} corrected ECC errors < ecc_corrected_warn {cfg.ecc_corrected_warn}")


def _remap(g: GpuSample, cfg: HealthSection) -> RuleResult:
    rows = (f"{g.remapped_rows_uncorrectable} uncorrectable / {g.remapped_rows_correctable} "
            "correctable rows remapped")
    if g.remap_failure:
        return RuleResult("gpu.remap", Verdict.FAIL, f"row remapping failed ({rows}): replace the GPU")
    if g.remap_pending:
        return RuleResult("gpu.remap", Verdict.WARN, f"row remap pending ({rows}): reset the GPU")
    return RuleResult("gpu.remap", Verdict.PASS, rows)


def _retired(g: GpuSample, cfg: HealthSection) -> RuleResult:
    n = g.retired_pages
    if n >= cfg.retired_pages_fail:
        return RuleResult("gpu.retired_pages", Verdict.FAIL,
                          f"{n} retired pages >= retired_pages_fail {cfg.retired_pages_fail}")
    if g.retired_pages_pending:
        return RuleResult("gpu.retired_pages", Verdict.WARN, f"page retirement pending ({n} retired): "
                                                              "reset the GPU")
    if n >= cfg.retired_pages_warn:
        return RuleResult("gpu.retired_pages", Verdict.WARN,
                          f"{n} retired pages >= retired_pages_warn {cfg.retired_pages_warn}")
    return RuleResult("gpu.retired_pages", Verdict.PASS,
                      f"{n} retired pages < retired_pages_warn {cfg.retired_pages_warn}")


def _thermal(g: GpuSample, cfg: HealthSection) -> RuleResult:
    thermal = sorted(THERMAL_REASONS.intersection(g.throttle_reasons))
    if thermal:
        return RuleResult("gpu.thermal", Verdict.WARN,
                          f"throttling ({', '.join(thermal)}) at {g.temperature_c:.0f} C")
    if g.temperature_c >= cfg.gpu_temp_warn_c:
        return RuleResult("gpu.thermal", Verdict.WARN,
                          f"{g.temperature_c:.0f} C >= gpu_temp_warn_c {cfg.gpu_temp_warn_c:.0f} C")
    return RuleResult("gpu.thermal", Verdict.PASS, f"{g.temperature_c:.0f} C < gpu_temp_warn_c "
                                                   f"{cfg.gpu_temp_warn_c:.0f} C, not throttling")


def _power(g: GpuSample, cfg: HealthSection) -> RuleResult:
    if not g.power_limit_w:
        return RuleResult("gpu.power", Verdict.PASS, f"{g.power_w:.0f} W (no enforced limit reported)")
    pct = 100.0 * g.power_w / g.power_limit_w
    text = f"{g.power_w:.0f} W is {pct:.0f}% of the {g.power_limit_w:.0f} W limit"
    if pct > cfg.power_warn_pct:
        return RuleResult("gpu.power", Verdict.WARN,
                          f"{text} > power_warn_pct {cfg.power_warn_pct:.0f}%")
    return RuleResult("gpu.power", Verdict.PASS, f"{text} <= power_warn_pct {cfg.power_warn_pct:.0f}%")


def _counter(rule: str, n: int, what: str, key: str, threshold: int) -> RuleResult:
    """WARN once a counter reaches its ``[health]`` threshold ``key``, PASS below it."""
    if n >= threshold:
        return RuleResult(rule, Verdict.WARN, f"{n} {what} >= {key} {threshold}")
    return RuleResult(rule, Verdict.PASS, f"{n} {what} < {key} {threshold}")


def _pcie(g: GpuSample, cfg: HealthSection) -> RuleResult:
    return _counter("gpu.pcie.replay", g.pcie_replay_counter, "PCIe replays", "pcie_replay_warn",
                    cfg.pcie_replay_warn)


def _nvlink(g: GpuSample, cfg: HealthSection) -> RuleResult:
    return _counter("gpu.nvlink", g.nvlink_errors, "NVLink errors", "nvlink_errors_warn",
                    cfg.nvlink_errors_warn)


def _xid(g: GpuSample, cfg: HealthSection) -> RuleResult:
    window = f"in the last {cfg.xid_window_s:.0f} s (xid_window_s)"
    critical = sorted({c for c in g.recent_xids if c in cfg.xid_critical})
    if critical:
        return RuleResult("gpu.xid", Verdict.FAIL,
                          f"critical XID {', '.join(map(str, critical))} {window}; critical: "
                          f"xid_critical {list(cfg.xid_critical)}")
    if g.recent_xids:
        codes = ", ".join(map(str, sorted(set(g.recent_xids))))
        return RuleResult("gpu.xid", Verdict.WARN, f"XID {codes} {window}, none in xid_critical")
    return RuleResult("gpu.xid", Verdict.PASS, f"no XID {window}")


_GPU_RULES: tuple[Callable[[GpuSample, HealthSection], RuleResult], ...] = (
    _lost, _ecc_uncorrected, _ecc_corrected, _remap, _retired, _thermal, _power, _pcie, _nvlink, _xid,
)


def gpu_rules(s: Sample, cfg: HealthSection) -> list[RuleResult]:
    out: list[RuleResult] = []
    for g in s.gpus:
        subject = f"gpu{g.index}"
        if g.lost:  # nothing else can be read from a lost GPU; XIDs say why it went
            checks: tuple[Callable[[GpuSample, HealthSection], RuleResult], ...] = (_lost, _xid)
        else:
            checks = _GPU_RULES
        for check in checks:
            r = check(g, cfg)
            out.append(RuleResult(r.rule, r.verdict, r.reason, subject))
    return out


def data_seal_rule(s: Sample, cfg: HealthSection) -> list[RuleResult]:
    """Sealed mode (agent.sealed): the data partition stayed shut at boot; the node serves no
    model until an admin's recovery key enrols its TPM again (Node/Unseal)."""
    if s.sealed is None:
        return []
    return [RuleResult("data.sealed", Verdict.FAIL,
                       f"{s.sealed.describe()}; serving no model until an admin sends the site's "
                       "recovery key (Node/Unseal)", s.sealed.device or "data")]


RULES: tuple[Rule, ...] = (nvml_rule, memory_rule, data_disk_rule, data_seal_rule, gpu_rules)


def evaluate(sample: Sample, cfg: HealthSection) -> HealthReport:
    """Every rule over ``sample``; the report's ``overall`` is the worst verdict."""
    results: list[RuleResult] = []
    for rule in RULES:
        results.extend(rule(sample, cfg))
    return HealthReport(sample, tuple(results))


# ---------------------------------------------------------------------- transitions

@dataclass(frozen=True)
class EventSpec:
    kind: str
    severity: str
    subject: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)


_ECC_FIELDS = ("ecc_corrected_volatile", "ecc_uncorrected_volatile",
               "ecc_corrected_aggregate", "ecc_uncorrected_aggregate")


def _gpu_transitions(p: GpuSample | None, c: GpuSample) -> list[EventSpec]:
    subject = f"gpu{c.index}"
    out: list[EventSpec] = []
    if c.lost and not (p and p.lost):
        out.append(EventSpec("gpu.lost", "error", subject, f"{subject} is lost: {c.lost_reason}",
                             {"uuid": c.uuid, "reason": c.lost_reason}))
    if c.lost:
        return out
    if p is not None and p.lost:
        out.append(EventSpec("gpu.recovered", "info", subject, f"{subject} answers NVML again",
                             {"uuid": c.uuid}))
    before = THROTTLING_REASONS.intersection(p.throttle_reasons) if p and not p.lost else set()
    now = THROTTLING_REASONS.intersection(c.throttle_reasons)
    if now and not before:
        out.append(EventSpec("gpu.throttle.start", "warning", subject,
                             f"{subject} throttling: {', '.join(sorted(now))} at {c.temperature_c:.0f} C, "
                             f"{c.power_w:.0f} W", {"reasons": ",".join(sorted(now)), "uuid": c.uuid}))
    elif before and not now:
        out.append(EventSpec("gpu.throttle.stop", "info", subject, f"{subject} no longer throttling",
                             {"reasons": ",".join(sorted(before)), "uuid": c.uuid}))
    if p is None or p.lost:
        return out
    grown = {f: (getattr(p, f), getattr(c, f)) for f in _ECC_FIELDS if getattr(c, f) > getattr(p, f)}
    if grown:
        uncorrected = any("uncorrected" in f for f in grown)
        text = ", ".join(f"{f} {a} -> {b}" for f, (a, b) in grown.items())
        out.append(EventSpec("gpu.ecc", "error" if uncorrected else "warning", subject,
                             f"{subject} ECC errors: {text}",
                             {f: b for f, (_, b) in grown.items()} | {"uuid": c.uuid}))
    if (c.remapped_rows_correctable + c.remapped_rows_uncorrectable
            > p.remapped_rows_correctable + p.remapped_rows_uncorrectable
            or (c.remap_failure and not p.remap_failure) or (c.remap_pending and not p.remap_pending)):
        out.append(EventSpec("gpu.remap", "error" if c.remap_failure else "warning", subject,
                             f"{subject} row remapping: {c.remapped_rows_correctable} correctable, "
                             f"{c.remapped_rows_uncorrectable} uncorrectable, pending={c.remap_pending}, "
                             f"failure={c.remap_failure}", {"uuid": c.uuid}))
    if c.retired_pages > p.retired_pages:
        out.append(EventSpec("gpu.retired_pages", "warning", subject,
                             f"{subject} retired pages {p.retired_pages} -> {c.retired_pages}",
                             {"uuid": c.uuid}))
    return out


def transitions(prev: HealthReport | None, cur: HealthReport, cfg: HealthSection) -> list[EventSpec]:
    """Events that the change from ``prev`` (None: the first report) to ``cur`` means."""
    out: list[EventSpec] = []
    ps, cs = (prev.sample if prev else None), cur.sample
    if not cs.nvml_available and (ps is None or ps.nvml_available):
        out.append(EventSpec("nvml.unavailable", "error" if cfg.require_gpu else "info", "nvml",
                             f"NVML unavailable: {cs.nvml_reason}"))
    previous_gpus = {g.index: g for g in ps.gpus} if ps else {}
    for g in cs.gpus:
        out.extend(_gpu_transitions(previous_gpus.get(g.index), g))
    verdicts = {(r.rule, r.subject): r for r in cur.rules}
    before = {(r.rule, r.subject): r.verdict for r in prev.rules} if prev else {}
    disk = next((r for key, r in verdicts.items() if key[0] == "disk.data.usage"), None)
    if disk is not None and disk.verdict > before.get((disk.rule, disk.subject), Verdict.PASS):
        out.append(EventSpec("disk.filling", "error" if disk.verdict == Verdict.FAIL else "warning",
                             disk.subject, disk.reason))
    if prev is None and cs.sealed is not None:
        out.append(EventSpec("data.sealed", "error", cs.sealed.device or "data", cs.sealed.describe(),
                             {"reason": cs.sealed.reason,
                              **{f"pcr{i}_sha256": v for i, v in cs.sealed.pcrs_sha256.items()}}))
    if prev is None or cur.overall != prev.overall:
        worst = [r for r in cur.rules if r.verdict == cur.overall and r.verdict > Verdict.PASS]
        reason = "; ".join(f"{r.subject}: {r.reason}" for r in worst[:3]) or "all rules pass"
        severity = {Verdict.PASS: "info", Verdict.WARN: "warning", Verdict.FAIL: "error"}[cur.overall]
        was = prev.overall.name if prev else "(start)"
        out.append(EventSpec("health.changed", severity, "node",
                             f"health {was} -> {cur.overall.name}: {reason}",
                             {"overall": cur.overall.name, "previous": was}))
    return out
