"""The sampler and every health rule, driven by the fake NVML (tests/fakes/nvml.py)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pynvml
import pytest

from agent.config import HealthSection, load_config
from agent.errors import ConfigError
from agent.events import EventLog
from agent.health import rules
from agent.health.report import Disk, HealthReport, HostSample, RuleResult, Sample, Verdict
from agent.health.sampler import Sampler, decode_throttle
from tests.fakes.nvml import FUNCTIONS, SW_POWER_CAP, FakeGpu, FakeNvml

MakeSampler = Callable[..., tuple[Sampler, FakeNvml]]


@pytest.fixture
def make_sampler(tmp_path: Path) -> Iterator[MakeSampler]:
    made: list[Sampler] = []

    def make(fake: FakeNvml | None = None, **cfg: object) -> tuple[Sampler, FakeNvml]:
        fake = fake or FakeNvml([FakeGpu(uuid="GPU-0"), FakeGpu(uuid="GPU-1", bus_id="00000000:3B:00.0")])
        sampler = Sampler(HealthSection(**cfg), tmp_path, nvml=fake, events=EventLog(tmp_path / "ev.jsonl"))  # type: ignore[arg-type]
        sampler.XID_WAIT_MS = 50  # quick to stop; the real agent waits longer per call
        made.append(sampler)
        return sampler, fake

    yield make
    for s in made:
        s.stop()


def rule(report: HealthReport, name: str, subject: str) -> RuleResult:
    return next(r for r in report.rules if r.rule == name and r.subject == subject)


def kinds(sampler: Sampler) -> list[str]:
    return [e.kind for e in sampler.events.recent(limit=0)]


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        time.sleep(0.02)


# ---------------------------------------------------------------------- the fake itself


def test_fake_fakes_only_real_nvml_calls() -> None:
    for name in FUNCTIONS:
        assert callable(getattr(pynvml, name)), name


def test_fake_is_as_strict_as_nvml() -> None:
    fake = FakeNvml()
    with pytest.raises(pynvml.NVMLError) as exc:
        fake.nvmlDeviceGetCount()
    assert exc.value.value == pynvml.NVML_ERROR_UNINITIALIZED
    assert isinstance(exc.value, pynvml.NVMLError_Uninitialized)
    fake.nvmlInit()
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        fake.nvmlDeviceGetName(0)  # an index is not a handle
    with pytest.raises(AttributeError):
        fake.nvmlDeviceGetFanSpeed  # noqa: B018 - not faked, so not usable by the sampler
    handle = fake.nvmlDeviceGetHandleByIndex(0)
    mem = fake.nvmlDeviceGetMemoryInfo(handle)
    assert (mem.total, mem.used, mem.free) == (80 << 30, 512 << 20, (80 << 30) - (512 << 20))
    assert fake.nvmlDeviceGetPciInfo(handle).busId == "00000000:19:00.0"  # the real struct decodes
    with pytest.raises(pynvml.NVMLError_NotSupported):
        fake.nvmlDeviceGetRetiredPages(handle, 0)
    es = fake.nvmlEventSetCreate()
    with pytest.raises(pynvml.NVMLError_Timeout):
        fake.nvmlEventSetWait(es, 10)
    fake.lose(0)
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        fake.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
    fake.nvmlShutdown()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.nvmlShutdown()


# ---------------------------------------------------------------------- sampling


def test_healthy_gpus_pass_and_fields_are_read(make_sampler: MakeSampler) -> None:
    sampler, _ = make_sampler()
    report = sampler.sample_once()
    assert report.overall == Verdict.PASS, [r for r in report.rules if r.verdict != Verdict.PASS]
    s = report.sample
    assert s.nvml_available and s.driver_version == "550.163.01" and s.cuda_driver_version == "12.4"
    g0, g1 = s.gpus
    assert (g0.uuid, g1.pci_bus_id) == ("GPU-0", "00000000:3B:00.0")
    assert g0.power_w == 72.0 and g0.power_limit_w == 700.0
    assert g0.memory_total_bytes == 80 << 30 and g0.clock_mem_mhz == 2619
    assert g0.throttle_reasons == ("gpu_idle",)
    assert "retired_pages" in g0.unsupported  # Hopper remaps rows instead
    assert {r.rule for r in report.rules if r.subject == "gpu0"} >= {
        "gpu.lost",
        "gpu.ecc.uncorrected",
        "gpu.ecc.corrected",
        "gpu.remap",
        "gpu.thermal",
        "gpu.power",
        "gpu.pcie.replay",
        "gpu.nvlink",
        "gpu.xid",
    }


def test_decode_throttle_names_known_and_unknown_bits() -> None:
    assert decode_throttle(0x44) == ("sw_power_cap", "hw_thermal_slowdown")
    assert decode_throttle(1 << 20) == ("unknown_0x100000",)


def test_ecc_increments_warn_fail_and_record_events(make_sampler: MakeSampler) -> None:
    sampler, fake = make_sampler(ecc_corrected_warn=5)
    sampler.sample_once()
    fake.add_ecc(0, corrected=3)
    report = sampler.sample_once()
    assert rule(report, "gpu.ecc.corrected", "gpu0").verdict == Verdict.PASS
    ecc = sampler.events.recent(kind_prefix="gpu.ecc")
    assert len(ecc) == 1 and ecc[0].severity == "warning" and ecc[0].details["ecc_corrected_volatile"] == 3
    fake.add_ecc(0, corrected=2)
    report = sampler.sample_once()
    r = rule(report, "gpu.ecc.corrected", "gpu0")
    assert r.verdict == Verdict.WARN and "5 corrected" in r.reason and "ecc_corrected_warn 5" in r.reason
    fake.add_ecc(1, uncorrected=1)
    report = sampler.sample_once()
    r = rule(report, "gpu.ecc.uncorrected", "gpu1")
    assert r.verdict == Verdict.FAIL and report.overall == Verdict.FAIL and "1 uncorrectable" in r.reason
    last = sampler.events.recent(kind_prefix="gpu.ecc")[-1]
    assert (last.subject, last.severity) == ("gpu1", "error")
    assert kinds(sampler)[-1] == "health.changed"


def test_xid_event_through_the_event_set_thread(make_sampler: MakeSampler) -> None:
    sampler, fake = make_sampler(interval_s=3600)  # only the XID wake-up resamples
    sampler.start()
    assert fake.inject_xid(1, 79) == 1  # the watcher registered gpu1 for XID events
    wait_for(lambda: any(e.kind == "gpu.xid" for e in sampler.events.recent()))
    wait_for(lambda: (r := sampler.latest) is not None and r.overall == Verdict.FAIL)
    report = sampler.latest
    assert report is not None
    r = rule(report, "gpu.xid", "gpu1")
    assert r.verdict == Verdict.FAIL and "79" in r.reason
    g1 = report.sample.gpus[1]
    assert (g1.xid_errors, g1.last_xid, g1.recent_xids) == (1, 79, (79,))
    event = next(e for e in sampler.events.recent() if e.kind == "gpu.xid")
    assert (event.subject, event.severity, event.details["xid"], event.details["uuid"]) == (
        "gpu1",
        "error",
        79,
        "GPU-1",
    )
    assert fake.inject_xid(0, 31) == 1  # a non-critical XID (MMU fault) warns
    wait_for(lambda: rule(sampler.latest, "gpu.xid", "gpu0").verdict == Verdict.WARN)  # type: ignore[arg-type]


def test_xid_leaves_the_verdict_after_its_window(make_sampler: MakeSampler, tmp_path: Path) -> None:
    now = [1000.0]
    fake = FakeNvml([FakeGpu()])
    sampler = Sampler(HealthSection(xid_window_s=60), tmp_path, nvml=fake, clock=lambda: now[0])
    sampler.XID_WAIT_MS = 50
    try:
        sampler.sample_once()
        sampler.note_xid(0, 48)
        assert rule(sampler.sample_once(), "gpu.xid", "gpu0").verdict == Verdict.FAIL
        now[0] += 61
        report = sampler.sample_once()
        assert rule(report, "gpu.xid", "gpu0").verdict == Verdict.PASS
        assert report.sample.gpus[0].xid_errors == 1  # still counted, no longer judged
    finally:
        sampler.stop()


def test_thermal_throttling_on_and_off(make_sampler: MakeSampler) -> None:
    sampler, fake = make_sampler()
    sampler.sample_once()
    fake.gpus[0].temperature_c = 89
    fake.throttle(0, True)
    report = sampler.sample_once()
    r = rule(report, "gpu.thermal", "gpu0")
    assert r.verdict == Verdict.WARN and "hw_thermal_slowdown" in r.reason and "89 C" in r.reason
    assert report.overall == Verdict.WARN
    sampler.sample_once()  # still throttling: no second start event
    fake.throttle(0, False)
    fake.gpus[0].temperature_c = 60
    report = sampler.sample_once()
    assert rule(report, "gpu.thermal", "gpu0").verdict == Verdict.PASS
    throttle = [e for e in sampler.events.recent() if e.kind.startswith("gpu.throttle")]
    assert [(e.kind, e.subject) for e in throttle] == [
        ("gpu.throttle.start", "gpu0"),
        ("gpu.throttle.stop", "gpu0"),
    ]
    assert throttle[0].details["reasons"] == "hw_thermal_slowdown"


def test_hot_gpu_warns_without_throttling(make_sampler: MakeSampler) -> None:
    sampler, fake = make_sampler(gpu_temp_warn_c=80)
    fake.gpus[1].temperature_c = 81
    r = rule(sampler.sample_once(), "gpu.thermal", "gpu1")
    assert r.verdict == Verdict.WARN and "81 C >= gpu_temp_warn_c 80 C" in r.reason


def test_power_over_limit_warns(make_sampler: MakeSampler) -> None:
    sampler, fake = make_sampler()
    fake.gpus[0].power_mw = 735_000
    fake.throttle(0, True, SW_POWER_CAP)
    report = sampler.sample_once()
    r = rule(report, "gpu.power", "gpu0")
    assert r.verdict == Verdict.WARN
    assert "735 W is 105% of the 700 W limit > power_warn_pct 100%" in r.reason
    assert rule(report, "gpu.thermal", "gpu0").verdict == Verdict.PASS  # a power cap is not thermal
    assert "gpu.throttle.start" in kinds(sampler)


def test_lost_gpu_fails_and_the_other_is_still_sampled(make_sampler: MakeSampler) -> None:
    sampler, fake = make_sampler()
    sampler.sample_once()
    fake.lose(0)
    report = sampler.sample_once()
    g0, g1 = report.sample.gpus
    assert g0.lost and g0.uuid == "GPU-0"  # identity kept from before the loss
    assert "NVML_ERROR_GPU_IS_LOST" in g0.lost_reason
    r = rule(report, "gpu.lost", "gpu0")
    assert r.verdict == Verdict.FAIL and "NVML_ERROR_GPU_IS_LOST" in r.reason
    assert not g1.lost and rule(report, "gpu.lost", "gpu1").verdict == Verdict.PASS
    assert report.overall == Verdict.FAIL
    assert kinds(sampler).count("gpu.lost") == 1
    sampler.sample_once()
    assert kinds(sampler).count("gpu.lost") == 1  # once per loss


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "NVML_ERROR_LIBRARY_NOT_FOUND"),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "NVML_ERROR_DRIVER_NOT_LOADED"),
    ],
)
def test_nvml_missing_is_a_state_not_an_error(make_sampler: MakeSampler, code: int, name: str) -> None:
    sampler, _ = make_sampler(FakeNvml(init_error=code))
    report = sampler.sample_once()
    assert not report.sample.nvml_available and report.sample.gpus == ()
    assert name in report.sample.nvml_reason
    r = rule(report, "nvml.available", "nvml")
    assert r.verdict == Verdict.PASS and "require_gpu = false" in r.reason
    assert report.overall == Verdict.PASS  # a CPU-only node is healthy
    assert "nvml.unavailable" in kinds(sampler)
    strict, _ = make_sampler(FakeNvml(init_error=code), require_gpu=True)
    r = rule(strict.sample_once(), "nvml.available", "nvml")
    assert r.verdict == Verdict.FAIL and name in r.reason


def test_remapped_rows(make_sampler: MakeSampler) -> None:
    sampler, fake = make_sampler()
    sampler.sample_once()
    fake.gpus[0].remapped = [2, 1, 1, 0]
    report = sampler.sample_once()
    assert rule(report, "gpu.remap", "gpu0").verdict == Verdict.WARN
    assert "gpu.remap" in kinds(sampler)
    fake.gpus[0].remapped = [2, 1, 0, 1]
    r = rule(sampler.sample_once(), "gpu.remap", "gpu0")
    assert r.verdict == Verdict.FAIL and "1 uncorrectable / 2 correctable" in r.reason


def test_pcie_replays_and_nvlink_errors(make_sampler: MakeSampler) -> None:
    sampler, fake = make_sampler(pcie_replay_warn=10, nvlink_errors_warn=5)
    fake.gpus[0].pcie_replay = 12
    fake.gpus[1].nvlink_errors = {
        (3, pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT): 4,
        (17, pynvml.NVML_NVLINK_ERROR_DL_REPLAY): 2,
    }
    report = sampler.sample_once()
    assert report.sample.gpus[1].nvlink_errors == 6
    assert rule(report, "gpu.pcie.replay", "gpu0").verdict == Verdict.WARN
    r = rule(report, "gpu.nvlink", "gpu1")
    assert r.verdict == Verdict.WARN and "6 NVLink errors >= nvlink_errors_warn 5" in r.reason


def test_gpu_without_nvlink_or_ecc(make_sampler: MakeSampler) -> None:
    gpu = FakeGpu(nvlinks=0)
    gpu.not_supported |= {"nvmlDeviceGetTotalEccErrors", "nvmlDeviceGetRemappedRows"}
    sampler, _ = make_sampler(FakeNvml([gpu]))
    report = sampler.sample_once()
    assert report.overall == Verdict.PASS
    assert {"nvlink_errors", "ecc_uncorrected_volatile", "remapped_rows"} <= set(
        report.sample.gpus[0].unsupported
    )


def test_older_driver_without_clocks_event_reasons(make_sampler: MakeSampler) -> None:
    fake = FakeNvml(missing_functions=frozenset({"nvmlDeviceGetCurrentClocksEventReasons"}))
    fake.throttle(0, True)
    sampler, _ = make_sampler(fake)
    assert sampler.sample_once().sample.gpus[0].throttle_reasons == ("hw_thermal_slowdown",)
    assert "nvmlDeviceGetCurrentClocksThrottleReasons" in fake.calls


def test_stop_frees_the_event_set_and_shuts_nvml_down(make_sampler: MakeSampler) -> None:
    sampler, fake = make_sampler()
    sampler.start()
    assert fake.initialized
    sampler.stop()
    assert not fake.initialized
    assert "nvmlEventSetFree" in fake.calls


# ---------------------------------------------------------------------- pure rules on host samples


def _host_sample(data_pct: float = 50.0, avail_pct: float = 50.0) -> Sample:
    total = 100 << 30
    host = HostSample(
        memory_total_bytes=total,
        memory_available_bytes=int(total * avail_pct / 100),
        disks=(
            Disk("/var/lib/appliance", "data", 1000, int(10 * data_pct), data_pct),
            Disk("/", "root", 1000, 1000, 100.0),
        ),
    )
    return Sample(time=0.0, host=host, nvml_available=False, nvml_reason="test")


@pytest.mark.parametrize(
    ("pct", "verdict"), [(90.0, Verdict.PASS), (90.5, Verdict.WARN), (98.5, Verdict.FAIL)]
)
def test_data_partition_filling(pct: float, verdict: Verdict) -> None:
    report = rules.evaluate(_host_sample(data_pct=pct), HealthSection())
    r = rule(report, "disk.data.usage", "/var/lib/appliance")
    assert r.verdict == verdict and f"{pct:.1f}% full" in r.reason
    assert report.overall == verdict  # a full read-only root is never judged


def test_disk_filling_event_once_when_crossing() -> None:
    cfg = HealthSection()
    ok = rules.evaluate(_host_sample(data_pct=50), cfg)
    full = rules.evaluate(_host_sample(data_pct=95), cfg)
    events = rules.transitions(ok, full, cfg)
    filling = [e for e in events if e.kind == "disk.filling"]
    assert (
        len(filling) == 1 and filling[0].severity == "warning" and "data_warn_pct 90.0%" in filling[0].message
    )
    assert not [e for e in rules.transitions(full, full, cfg) if e.kind == "disk.filling"]


@pytest.mark.parametrize(
    ("avail", "verdict"), [(20.0, Verdict.PASS), (4.0, Verdict.WARN), (0.5, Verdict.FAIL)]
)
def test_memory_low(avail: float, verdict: Verdict) -> None:
    r = rule(
        rules.evaluate(_host_sample(avail_pct=avail), HealthSection()), "host.memory.available", "memory"
    )
    assert r.verdict == verdict and f"{avail:.1f}% of memory available" in r.reason


def test_health_section_from_agent_toml(tmp_path: Path) -> None:
    toml = tmp_path / "agent.toml"
    toml.write_text("[health]\ninterval_s = 5\ndata_warn_pct = 80\nxid_critical = [79]\n")
    cfg = load_config(toml).health
    assert (cfg.interval_s, cfg.data_warn_pct, cfg.xid_critical) == (5.0, 80.0, (79,))
    assert dataclasses.replace(cfg, require_gpu=True).require_gpu
    toml.write_text("[health]\ndata_warn_pct = 150\n")
    with pytest.raises(ConfigError, match=r"\[health\] data_warn_pct = 150: not a percentage"):
        load_config(toml)


def test_dcgm_rendering_without_prometheus_client_parses(make_sampler: MakeSampler) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from agent.health.dcgm import render_dcgm

    sampler, fake = make_sampler()
    fake.gpus[0].name = 'odd "name"'
    text = "\n".join(render_dcgm(sampler.sample_once(), "host")) + "\n"
    temps = [
        s
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "DCGM_FI_DEV_GPU_TEMP"
    ]
    assert [(s.labels["gpu"], s.labels["modelName"], s.value) for s in temps] == [
        ("0", 'odd "name"', 41.0),
        ("1", "NVIDIA H100 80GB HBM3", 41.0),
    ]
