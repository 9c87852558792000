"""The hardware sampler: psutil and NVML on their own schedule, never on a request's path.

A :class:`Sampler` owns two background threads: one takes a sample every
``[health] interval_s`` (or sooner when woken) and evaluates the rules; one waits on an NVML
event set for XID errors.  Requests read :attr:`Sampler.latest`, a finished report.

The NVML module is injected (``nvml=``): the real ``pynvml`` of nvidia-ml-py by default, a
fake of the same calls in tests.  No NVML (no driver, no GPU, no library) is a state the
report carries with its reason, never an exception.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from agent.config import HealthSection
from agent.events import EventLog
from agent.health import rules
from agent.health.report import Disk, GpuSample, HealthReport, HostSample, Sample, Xid
from agent.sealed import SealState

__all__ = ["THROTTLE_REASONS", "Sampler", "decode_throttle", "nvml_error_name", "sample_host"]

log = logging.getLogger(__name__)

# Clock-event ("throttle") reason bits of nvmlDeviceGetCurrentClocksEventReasons; the values
# are NVML's ABI, the names follow nvidia-smi's "Clocks Event Reasons".
THROTTLE_REASONS: tuple[tuple[int, str], ...] = (
    (0x001, "gpu_idle"),
    (0x002, "applications_clocks_setting"),
    (0x004, "sw_power_cap"),
    (0x008, "hw_slowdown"),
    (0x010, "sync_boost"),
    (0x020, "sw_thermal_slowdown"),
    (0x040, "hw_thermal_slowdown"),
    (0x080, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
)


def decode_throttle(mask: int) -> tuple[str, ...]:
    """Names of the reason bits set in ``mask`` (unknown bits as ``unknown_0x...``)."""
    names = [name for bit, name in THROTTLE_REASONS if mask & bit]
    known = 0
    for bit, _ in THROTTLE_REASONS:
        known |= bit
    names += [f"unknown_{1 << b:#x}" for b in range(64) if mask & ~known & (1 << b)]
    return tuple(names)


def nvml_error_name(nvml: Any, exc: BaseException) -> str:
    """``"GPU is lost (NVML_ERROR_GPU_IS_LOST)"`` for an NVMLError of module ``nvml``."""
    code = getattr(exc, "value", None)
    name = next((k for k in _ERROR_NAMES if getattr(nvml, k, None) == code), f"NVML error {code}")
    return f"{exc} ({name})"


_ERROR_NAMES = tuple(f"NVML_ERROR_{n}" for n in (
    "UNINITIALIZED", "INVALID_ARGUMENT", "NOT_SUPPORTED", "NO_PERMISSION", "ALREADY_INITIALIZED",
    "NOT_FOUND", "INSUFFICIENT_SIZE", "INSUFFICIENT_POWER", "DRIVER_NOT_LOADED", "TIMEOUT",
    "IRQ_ISSUE", "LIBRARY_NOT_FOUND", "FUNCTION_NOT_FOUND", "CORRUPTED_INFOROM", "GPU_IS_LOST",
    "RESET_REQUIRED", "OPERATING_SYSTEM", "LIB_RM_VERSION_MISMATCH", "IN_USE", "MEMORY", "NO_DATA",
    "INSUFFICIENT_RESOURCES", "NOT_READY", "GPU_NOT_FOUND", "INVALID_STATE", "UNKNOWN"))


# ---------------------------------------------------------------------- host (psutil)

def _busy(prev: Any, cur: Any) -> float:
    """Busy percentage between two psutil cpu_times (psutil's own definition of busy)."""
    def total(t: Any) -> float:
        return float(sum(t)) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)

    def idle(t: Any) -> float:
        return float(t.idle) + getattr(t, "iowait", 0.0)

    dt = total(cur) - total(prev)
    if dt <= 0:
        return 0.0
    return max(0.0, min(100.0, 100.0 * (dt - (idle(cur) - idle(prev))) / dt))


def _mountpoint(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


class _CpuMeter:
    """CPU use since the previous call, kept apart from psutil's module-global state."""

    def __init__(self) -> None:
        self._prev = psutil.cpu_times()
        self._prev_per = psutil.cpu_times(percpu=True)

    def read(self) -> tuple[float, tuple[float, ...]]:
        cur, cur_per = psutil.cpu_times(), psutil.cpu_times(percpu=True)
        overall = _busy(self._prev, cur)
        per = tuple(_busy(p, c) for p, c in zip(self._prev_per, cur_per, strict=False))
        self._prev, self._prev_per = cur, cur_per
        return overall, per


def _disk(path: Path, role: str) -> Disk | None:
    try:
        usage = psutil.disk_usage(str(_existing(path)))
    except OSError:
        return None
    return Disk(str(_mountpoint(_existing(path))), role, usage.total, usage.used, usage.percent)


def _sensors() -> tuple[dict[str, float], dict[str, float]]:
    temps: dict[str, float] = {}
    fans: dict[str, float] = {}
    read_temps = getattr(psutil, "sensors_temperatures", None)
    read_fans = getattr(psutil, "sensors_fans", None)
    with contextlib.suppress(OSError):
        for chip, entries in (read_temps() if read_temps else {}).items():
            for n, entry in enumerate(entries):
                temps[f"{chip}/{entry.label or n}"] = float(entry.current)
    with contextlib.suppress(OSError):
        for chip, entries in (read_fans() if read_fans else {}).items():
            for n, entry in enumerate(entries):
                fans[f"{chip}/{entry.label or n}"] = float(entry.current)
    return temps, fans


def sample_host(state_dir: Path, cpu: _CpuMeter | None = None) -> HostSample:
    """One psutil sample of this machine; ``state_dir`` locates the data partition.

    Raises nothing for absent sensors or counters (they read as empty or zero).
    """
    overall, per_core = (cpu or _CpuMeter()).read()
    load1, load5, load15 = os.getloadavg()
    mem = psutil.virtual_memory()
    swap = psutil.swap_memory()
    disks = tuple(d for d in (_disk(Path("/"), "root"), _disk(state_dir, "data")) if d)
    io = psutil.disk_io_counters(perdisk=False)
    rx = tx = 0
    for nic, counters in psutil.net_io_counters(pernic=True).items():
        if nic != "lo":
            rx += counters.bytes_recv
            tx += counters.bytes_sent
    temps, fans = _sensors()
    return HostSample(
        cpu_pct=overall, cpu_per_core_pct=per_core, load1=load1, load5=load5, load15=load15,
        memory_total_bytes=mem.total, memory_available_bytes=mem.available,
        swap_total_bytes=swap.total, swap_used_bytes=swap.used, disks=disks,
        disk_read_bytes=io.read_bytes if io else 0, disk_write_bytes=io.write_bytes if io else 0,
        net_rx_bytes=rx, net_tx_bytes=tx, temperatures_c=temps, fans_rpm=fans,
        uptime_s=max(0.0, time.time() - psutil.boot_time()),
    )


# ---------------------------------------------------------------------- GPUs (NVML)

class _GpuLostError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _GpuReader:
    """Reads one GPU through NVML; fields NVML does not support read as zero and are listed."""

    # Errors that mean "this GPU does not report this field"; anything else is logged too.
    _ABSENT = ("NVML_ERROR_NOT_SUPPORTED", "NVML_ERROR_FUNCTION_NOT_FOUND",
               "NVML_ERROR_NO_PERMISSION", "NVML_ERROR_INVALID_ARGUMENT", "NVML_ERROR_NOT_FOUND")

    def __init__(self, nvml: Any, index: int, handle: Any) -> None:
        self.nvml = nvml
        self.index = index
        self.handle = handle
        self.unsupported: list[str] = []
        self._absent = {getattr(nvml, n) for n in self._ABSENT if hasattr(nvml, n)}

    def get(self, field: str, fn: Callable[..., Any], *args: Any, default: Any = 0) -> Any:
        try:
            return fn(self.handle, *args)
        except self.nvml.NVMLError as exc:
            if exc.value == self.nvml.NVML_ERROR_GPU_IS_LOST:
                raise _GpuLostError(nvml_error_name(self.nvml, exc)) from None
            if exc.value not in self._absent:
                log.warning("gpu%d: %s: %s", self.index, field, nvml_error_name(self.nvml, exc))
            self.unsupported.append(field)
            return default

    def throttle_mask(self) -> int:
        n = self.nvml
        try:
            return int(n.nvmlDeviceGetCurrentClocksEventReasons(self.handle))
        except n.NVMLError as exc:
            if exc.value != n.NVML_ERROR_FUNCTION_NOT_FOUND:
                if exc.value == n.NVML_ERROR_GPU_IS_LOST:
                    raise _GpuLostError(nvml_error_name(n, exc)) from None
                self.unsupported.append("throttle_reasons")
                return 0
        # drivers older than 535 know only the deprecated name of the same call
        return int(self.get("throttle_reasons", n.nvmlDeviceGetCurrentClocksThrottleReasons))

    def retired_pages(self) -> tuple[int, bool]:
        n = self.nvml
        count = 0
        for cause in (n.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS,
                      n.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR):
            pages = self.get("retired_pages", n.nvmlDeviceGetRetiredPages, cause, default=None)
            if pages is None:
                return 0, False
            count += len(pages)
        pending = self.get("retired_pages_pending", n.nvmlDeviceGetRetiredPagesPendingStatus)
        return count, bool(pending)

    def nvlink_errors(self) -> int:
        n = self.nvml
        total = 0
        counters = (n.NVML_NVLINK_ERROR_DL_REPLAY, n.NVML_NVLINK_ERROR_DL_RECOVERY,
                    n.NVML_NVLINK_ERROR_DL_CRC_FLIT, n.NVML_NVLINK_ERROR_DL_CRC_DATA)
        for link in range(n.NVML_NVLINK_MAX_LINKS):
            try:
                active = n.nvmlDeviceGetNvLinkState(self.handle, link)
            except n.NVMLError as exc:
                if exc.value == n.NVML_ERROR_GPU_IS_LOST:
                    raise _GpuLostError(nvml_error_name(n, exc)) from None
                if link == 0:
                    self.unsupported.append("nvlink_errors")
                break  # no NVLink, or no more links on this GPU
            if not active:
                continue
            for counter in counters:
                try:
                    total += int(n.nvmlDeviceGetNvLinkErrorCounter(self.handle, link, counter))
                except n.NVMLError as exc:
                    if exc.value == n.NVML_ERROR_GPU_IS_LOST:
                        raise _GpuLostError(nvml_error_name(n, exc)) from None
        return total

    def read(self) -> dict[str, Any]:
        n, g = self.nvml, self.get
        mem = g("memory", n.nvmlDeviceGetMemoryInfo, default=None)
        util = g("utilization", n.nvmlDeviceGetUtilizationRates, default=None)
        pci = g("pci_bus_id", n.nvmlDeviceGetPciInfo, default=None)
        bus_id = getattr(pci, "busId", b"") if pci is not None else b""
        remap = g("remapped_rows", n.nvmlDeviceGetRemappedRows, default=None)
        retired, retired_pending = self.retired_pages()
        mask = self.throttle_mask()
        ecc = {}
        for key, etype, ctype in (
            ("ecc_corrected_volatile", n.NVML_MEMORY_ERROR_TYPE_CORRECTED, n.NVML_VOLATILE_ECC),
            ("ecc_uncorrected_volatile", n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, n.NVML_VOLATILE_ECC),
            ("ecc_corrected_aggregate", n.NVML_MEMORY_ERROR_TYPE_CORRECTED, n.NVML_AGGREGATE_ECC),
            ("ecc_uncorrected_aggregate", n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, n.NVML_AGGREGATE_ECC),
        ):
            ecc[key] = int(g(key, n.nvmlDeviceGetTotalEccErrors, etype, ctype))
        return dict(
            name=str(g("name", n.nvmlDeviceGetName, default="")),
            uuid=str(g("uuid", n.nvmlDeviceGetUUID, default="")),
            pci_bus_id=bus_id.decode() if isinstance(bus_id, bytes) else str(bus_id),
            temperature_c=float(g("temperature", n.nvmlDeviceGetTemperature, n.NVML_TEMPERATURE_GPU)),
            power_w=g("power", n.nvmlDeviceGetPowerUsage) / 1000.0,
            power_limit_w=g("power_limit", n.nvmlDeviceGetEnforcedPowerLimit) / 1000.0,
            utilization_gpu_pct=float(util.gpu) if util is not None else 0.0,
            utilization_mem_pct=float(util.memory) if util is not None else 0.0,
            memory_total_bytes=int(mem.total) if mem is not None else 0,
            memory_used_bytes=int(mem.used) if mem is not None else 0,
            clock_sm_mhz=int(g("clock_sm", n.nvmlDeviceGetClockInfo, n.NVML_CLOCK_SM)),
            clock_mem_mhz=int(g("clock_mem", n.nvmlDeviceGetClockInfo, n.NVML_CLOCK_MEM)),
            throttle_mask=mask, throttle_reasons=decode_throttle(mask),
            **ecc,
            retired_pages=retired, retired_pages_pending=retired_pending,
            remapped_rows_correctable=int(remap[0]) if remap else 0,
            remapped_rows_uncorrectable=int(remap[1]) if remap else 0,
            remap_pending=bool(remap[2]) if remap else False,
            remap_failure=bool(remap[3]) if remap else False,
            pcie_replay_counter=int(g("pcie_replay_counter", n.nvmlDeviceGetPcieReplayCounter)),
            nvlink_errors=self.nvlink_errors(),
        )


# ---------------------------------------------------------------------- the sampler

class Sampler:
    """Samples this node in the background and keeps the latest :class:`HealthReport`.

    ``nvml`` is the nvidia-ml-py module (``import pynvml``) or a fake of it; None imports
    the real one.  ``events`` receives transitions (throttling, ECC, XID, ...).
    """

    XID_WAIT_MS = 1000  # how long one nvmlEventSetWait blocks; bounds stop() latency

    def __init__(self, cfg: HealthSection, state_dir: Path, *, nvml: Any = None,
                 events: EventLog | None = None, clock: Callable[[], float] = time.time,
                 sealed: SealState | None = None) -> None:
        if nvml is None:
            nvml = importlib.import_module("pynvml")
        self.cfg = cfg
        self.sealed = sealed  # this boot's seal state: it does not change until the next boot
        self.state_dir = state_dir
        self.nvml = nvml
        self.events = events or EventLog(None)
        self._clock = clock
        self._cpu = _CpuMeter()  # primed now, so the first sample measures something
        self._lock = threading.Lock()       # one sample at a time
        self._state = threading.Lock()      # guards the fields below
        self._latest: HealthReport | None = None
        self._listeners: list[Callable[[HealthReport], None]] = []
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._nvml_ok = False
        self._nvml_reason = "not initialised yet"
        self._nvml_tried = float("-inf")
        self._driver = self._cuda = ""
        self._static: dict[int, dict[str, str]] = {}  # index -> name/uuid/pci, survives loss
        self._gpu_count = 0
        self._xids: deque[Xid] = deque(maxlen=1024)
        self._xid_counts: dict[int, int] = {}
        self._last_xid: dict[int, int] = {}
        self._event_set: Any = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> HealthReport:
        """Initialise NVML (or note why not), take the first sample, start the threads."""
        report = self.sample_once()
        sampler = threading.Thread(target=self._run, name="health-sampler", daemon=True)
        self._threads.append(sampler)
        sampler.start()
        return report

    def stop(self) -> None:
        """Stop the threads and shut NVML down; idempotent."""
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=self.XID_WAIT_MS / 1000 * 3 + self.cfg.interval_s)
        self._threads.clear()
        with self._state:
            if self._nvml_ok:
                self._nvml_close()

    def wake(self) -> None:
        """Ask for a sample now rather than at the next interval."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.cfg.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.sample_once()
            except Exception:  # the sampler must outlive any one bad sample
                log.exception("health sample failed")

    # ------------------------------------------------------------------ NVML

    def _nvml_open(self) -> None:
        n = self.nvml
        self._nvml_tried = self._clock()
        try:
            n.nvmlInit()
        except n.NVMLError as exc:
            self._nvml_ok, self._nvml_reason = False, nvml_error_name(n, exc)
            return
        try:
            self._driver = str(n.nvmlSystemGetDriverVersion())
            cuda = int(n.nvmlSystemGetCudaDriverVersion())
            self._cuda = f"{cuda // 1000}.{cuda % 1000 // 10}"
            self._gpu_count = int(n.nvmlDeviceGetCount())
        except n.NVMLError as exc:
            self._nvml_ok, self._nvml_reason = False, nvml_error_name(n, exc)
            with contextlib.suppress(n.NVMLError):
                n.nvmlShutdown()
            return
        self._nvml_ok = True
        self._nvml_reason = "" if self._gpu_count else "NVML found no GPU"
        self._start_xid_watch()

    def _nvml_close(self) -> None:
        n = self.nvml
        if self._event_set is not None:
            with contextlib.suppress(n.NVMLError):
                n.nvmlEventSetFree(self._event_set)
            self._event_set = None
        with contextlib.suppress(n.NVMLError):
            n.nvmlShutdown()
        self._nvml_ok = False
        self._nvml_reason = "NVML shut down"

    def _start_xid_watch(self) -> None:
        n = self.nvml
        try:
            event_set = n.nvmlEventSetCreate()
        except n.NVMLError as exc:
            log.warning("no XID watch: nvmlEventSetCreate: %s", nvml_error_name(n, exc))
            return
        registered = 0
        for index in range(self._gpu_count):
            try:
                handle = n.nvmlDeviceGetHandleByIndex(index)
                n.nvmlDeviceRegisterEvents(handle, n.nvmlEventTypeXidCriticalError, event_set)
                registered += 1
            except n.NVMLError as exc:
                log.warning("gpu%d: no XID events: %s", index, nvml_error_name(n, exc))
        if not registered:
            with contextlib.suppress(n.NVMLError):
                n.nvmlEventSetFree(event_set)
            return
        self._event_set = event_set
        watcher = threading.Thread(target=self._watch_xids, args=(event_set,),
                                   name="health-xid", daemon=True)
        self._threads.append(watcher)
        watcher.start()

    def _watch_xids(self, event_set: Any) -> None:
        n = self.nvml
        while not self._stop.is_set():
            try:
                data = n.nvmlEventSetWait(event_set, self.XID_WAIT_MS)
            except n.NVMLError as exc:
                if exc.value == n.NVML_ERROR_TIMEOUT:
                    continue
                log.warning("XID watch: %s", nvml_error_name(n, exc))
                self._stop.wait(self.XID_WAIT_MS / 1000)
                continue
            if data.eventType != n.nvmlEventTypeXidCriticalError:
                continue
            try:
                index = int(n.nvmlDeviceGetIndex(data.device))
            except n.NVMLError:
                index = -1
            self.note_xid(index, int(data.eventData))

    def note_xid(self, index: int, code: int) -> None:
        """Record an XID error of GPU ``index`` (-1: unknown) and resample soon."""
        now = self._clock()
        with self._state:
            self._xids.append(Xid(now, index, code))
            self._xid_counts[index] = self._xid_counts.get(index, 0) + 1
            self._last_xid[index] = code
            uuid = self._static.get(index, {}).get("uuid", "")
        critical = code in self.cfg.xid_critical
        self.events.record("gpu.xid", "error" if critical else "warning", f"gpu{index}",
                           f"XID {code} on gpu{index}" + (" (critical)" if critical else ""),
                           xid=code, uuid=uuid, critical=critical)
        self.wake()

    # ------------------------------------------------------------------ sampling

    def _gpu(self, index: int, now: float) -> GpuSample:
        n = self.nvml
        window = [x.code for x in self._xids if x.gpu == index and now - x.time <= self.cfg.xid_window_s]
        common: dict[str, Any] = {"index": index, "xid_errors": self._xid_counts.get(index, 0),
                                  "last_xid": self._last_xid.get(index, 0), "recent_xids": tuple(window)}
        try:
            try:
                handle = n.nvmlDeviceGetHandleByIndex(index)
            except n.NVMLError as exc:
                if exc.value == n.NVML_ERROR_GPU_IS_LOST:
                    raise _GpuLostError(nvml_error_name(n, exc)) from None
                raise
            reader = _GpuReader(n, index, handle)
            fields = reader.read()
        except _GpuLostError as lost:
            return GpuSample(**self._static.get(index, {}), **common,  # type: ignore[arg-type]
                             lost=True, lost_reason=lost.reason)
        self._static[index] = {k: fields[k] for k in ("name", "uuid", "pci_bus_id")}
        return GpuSample(**fields, **common, unsupported=tuple(dict.fromkeys(reader.unsupported)))

    def _gpus(self, now: float) -> tuple[GpuSample, ...]:
        if not self._nvml_ok and now - self._nvml_tried >= 60.0:
            self._nvml_open()  # the driver may have been loaded since
        if not self._nvml_ok:
            return ()
        gpus = []
        for index in range(self._gpu_count):
            try:
                gpus.append(self._gpu(index, now))
            except self.nvml.NVMLError as exc:
                log.warning("gpu%d: %s", index, nvml_error_name(self.nvml, exc))
                gpus.append(GpuSample(index=index, **self._static.get(index, {}),  # type: ignore[arg-type]
                                      lost=True, lost_reason=nvml_error_name(self.nvml, exc)))
        return tuple(gpus)

    def take_sample(self) -> Sample:
        """Read psutil and NVML now (in the calling thread) and return the raw sample."""
        now = self._clock()
        host = sample_host(self.state_dir, self._cpu)
        with self._state:
            gpus = self._gpus(now)
            return Sample(time=now, host=host, gpus=gpus, nvml_available=self._nvml_ok,
                          nvml_reason=self._nvml_reason, driver_version=self._driver,
                          cuda_driver_version=self._cuda, sealed=self.sealed)

    def sample_once(self) -> HealthReport:
        """Sample, evaluate the rules, record transitions as events, notify listeners."""
        with self._lock:
            sample = self.take_sample()
            report = rules.evaluate(sample, self.cfg)
            with self._state:
                previous, self._latest = self._latest, report
                listeners = list(self._listeners)
            for spec in rules.transitions(previous, report, self.cfg):
                try:
                    self.events.record(spec.kind, spec.severity, spec.subject, spec.message,
                                       **spec.details)
                except Exception:
                    log.exception("cannot record event %s", spec.kind)
        for listener in listeners:
            try:
                listener(report)
            except Exception:
                log.exception("health listener failed")
        return report

    # ------------------------------------------------------------------ readers

    @property
    def latest(self) -> HealthReport | None:
        with self._state:
            return self._latest

    def subscribe(self, listener: Callable[[HealthReport], None]) -> Callable[[], None]:
        """Call ``listener(report)`` after every sample (in the sampler's thread); returns an
        unsubscribe function."""
        with self._state:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._state:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    def serving_ok(self) -> bool:
        """False while the overall verdict is FAIL: what model readiness follows."""
        report = self.latest
        return report is None or report.overall < rules.Verdict.FAIL
