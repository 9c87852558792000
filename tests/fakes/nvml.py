"""A fake of the nvidia-ml-py (``pynvml``) calls the health sampler uses, as strict as NVML.

Only the functions listed in :data:`FUNCTIONS` exist (anything else is an AttributeError, so
the sampler cannot quietly start depending on an unfaked call).  Errors are the real
``pynvml.NVMLError`` with the real codes: ``NVML_ERROR_UNINITIALIZED`` before ``nvmlInit``
or after the last ``nvmlShutdown``, ``NVML_ERROR_NOT_SUPPORTED`` for what a GPU lacks,
``NVML_ERROR_GPU_IS_LOST`` for every call on a GPU that fell off the bus,
``NVML_ERROR_LIBRARY_NOT_FOUND``/``DRIVER_NOT_LOADED`` from ``nvmlInit`` when NVML is missing,
``NVML_ERROR_TIMEOUT`` from ``nvmlEventSetWait``, ``NVML_ERROR_INVALID_ARGUMENT`` for a
handle that is not one.  Return types are the real ones: ``str`` for names, the real ctypes
structures for memory, utilization and PCI info (filled in as the library fills them),
opaque handles.

Tests script the hardware through :class:`FakeGpu` fields and the helpers on
:class:`FakeNvml` (ECC increments, XID events, throttling, power, losing a GPU).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import pynvml as _real

NVMLError = _real.NVMLError

# Every NVML function the fake offers: the sampler may use these and only these.
FUNCTIONS = frozenset({
    "nvmlInit", "nvmlShutdown", "nvmlSystemGetDriverVersion", "nvmlSystemGetCudaDriverVersion",
    "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetIndex", "nvmlDeviceGetName",
    "nvmlDeviceGetUUID", "nvmlDeviceGetPciInfo", "nvmlDeviceGetTemperature", "nvmlDeviceGetPowerUsage",
    "nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetUtilizationRates", "nvmlDeviceGetMemoryInfo",
    "nvmlDeviceGetClockInfo", "nvmlDeviceGetCurrentClocksEventReasons",
    "nvmlDeviceGetCurrentClocksThrottleReasons", "nvmlDeviceGetTotalEccErrors",
    "nvmlDeviceGetRetiredPages", "nvmlDeviceGetRetiredPagesPendingStatus", "nvmlDeviceGetRemappedRows",
    "nvmlDeviceGetPcieReplayCounter", "nvmlDeviceGetNvLinkState", "nvmlDeviceGetNvLinkErrorCounter",
    "nvmlEventSetCreate", "nvmlDeviceRegisterEvents", "nvmlEventSetWait", "nvmlEventSetFree",
})

HW_THERMAL = _real.nvmlClocksEventReasonHwThermalSlowdown
SW_THERMAL = _real.nvmlClocksEventReasonSwThermalSlowdown
SW_POWER_CAP = _real.nvmlClocksEventReasonSwPowerCap
GPU_IDLE = _real.nvmlClocksEventReasonGpuIdle

_SUPPORTED_EVENTS = (_real.nvmlEventTypeXidCriticalError | _real.nvmlEventTypeSingleBitEccError
                     | _real.nvmlEventTypeDoubleBitEccError | _real.nvmlEventTypePState
                     | _real.nvmlEventTypeClock)


def _fail(code: int) -> NVMLError:
    return NVMLError(code)


@dataclass
class FakeGpu:
    """The scriptable state of one GPU (H100 SXM-like defaults)."""

    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    bus_id: str = "00000000:19:00.0"
    temperature_c: int = 41
    power_mw: int = 72_000
    power_limit_mw: int = 700_000
    util_gpu: int = 0
    util_mem: int = 0
    memory_total: int = 80 << 30
    memory_used: int = 512 << 20
    clock_sm: int = 345
    clock_mem: int = 2619
    throttle_mask: int = GPU_IDLE
    # (error type, counter type) -> count
    ecc: dict[tuple[int, int], int] = field(default_factory=lambda: {
        (et, ct): 0 for et in (0, 1) for ct in (0, 1)})
    remapped: list[int] = field(default_factory=lambda: [0, 0, 0, 0])  # corr, unc, pending, failure
    pcie_replay: int = 0
    nvlinks: int = 18
    nvlink_errors: dict[tuple[int, int], int] = field(default_factory=dict)  # (link, counter) -> n
    lost: bool = False
    # NVML functions this GPU answers NVML_ERROR_NOT_SUPPORTED to (Hopper retires no pages:
    # it remaps rows).
    not_supported: set[str] = field(default_factory=lambda: {
        "nvmlDeviceGetRetiredPages", "nvmlDeviceGetRetiredPagesPendingStatus"})
    supported_events: int = _SUPPORTED_EVENTS


class _Handle:
    """Opaque, like ``c_nvmlDevice_t``: tests must not read the index out of it."""

    __slots__ = ("_FakeNvml__index", "_FakeNvml__owner")

    def __repr__(self) -> str:
        return "<fake nvmlDevice_t>"


class _EventSet:
    __slots__ = ("_FakeNvml__freed", "_FakeNvml__queue", "_FakeNvml__registered")

    def __repr__(self) -> str:
        return "<fake nvmlEventSet_t>"


@dataclass
class _EventData:
    """Fields of ``c_nvmlEventData_t``."""

    device: Any
    eventType: int
    eventData: int
    gpuInstanceId: int = 0xFFFFFFFF
    computeInstanceId: int = 0xFFFFFFFF


class FakeNvml:
    """Stands in for the ``pynvml`` module: pass it as the sampler's ``nvml``."""

    NVMLError = NVMLError

    def __init__(self, gpus: list[FakeGpu] | None = None, *, init_error: int | None = None,
                 driver: str = "550.163.01", cuda: int = 12040,
                 missing_functions: frozenset[str] = frozenset()) -> None:
        self.gpus = gpus if gpus is not None else [FakeGpu()]
        self.init_error = init_error
        self.driver = driver
        self.cuda = cuda
        self.missing_functions = missing_functions  # answer NVML_ERROR_FUNCTION_NOT_FOUND
        self.calls: list[str] = []
        self._refs = 0
        self._lock = threading.Lock()
        self._sets: list[_EventSet] = []

    def __getattr__(self, name: str) -> Any:
        # Constants come from the real module; functions only if faked (see FUNCTIONS).
        if name.startswith(("NVML_", "nvmlEventType", "nvmlClocksEventReason", "nvmlClocksThrottleReason")):
            return getattr(_real, name)
        raise AttributeError(f"FakeNvml has no {name!r}: the fake implements only {sorted(FUNCTIONS)}")

    # ------------------------------------------------------------------ scripting

    def add_ecc(self, index: int, *, corrected: int = 0, uncorrected: int = 0) -> None:
        """ECC errors happen: volatile and aggregate counters both grow."""
        g = self.gpus[index]
        for ct in (_real.NVML_VOLATILE_ECC, _real.NVML_AGGREGATE_ECC):
            g.ecc[(_real.NVML_MEMORY_ERROR_TYPE_CORRECTED, ct)] += corrected
            g.ecc[(_real.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, ct)] += uncorrected

    def throttle(self, index: int, on: bool, reasons: int = HW_THERMAL) -> None:
        g = self.gpus[index]
        g.throttle_mask = (g.throttle_mask | reasons) & ~GPU_IDLE if on else GPU_IDLE

    def lose(self, index: int) -> None:
        """The GPU falls off the bus: every call on it answers NVML_ERROR_GPU_IS_LOST."""
        self.gpus[index].lost = True

    def inject_xid(self, index: int, code: int) -> int:
        """The driver reports XID ``code`` on GPU ``index``; returns how many event sets got it."""
        delivered = 0
        with self._lock:
            for es in self._sets:
                if es.__freed:
                    continue
                mask = es.__registered.get(index, 0)
                if mask & _real.nvmlEventTypeXidCriticalError:
                    handle = _Handle()
                    handle.__index, handle.__owner = index, self
                    es.__queue.put(_EventData(handle, _real.nvmlEventTypeXidCriticalError, code))
                    delivered += 1
        return delivered

    @property
    def initialized(self) -> bool:
        return self._refs > 0

    # ------------------------------------------------------------------ helpers

    def _enter(self, name: str) -> None:
        self.calls.append(name)
        if name in self.missing_functions:
            raise _fail(_real.NVML_ERROR_FUNCTION_NOT_FOUND)
        if self._refs <= 0:
            raise _fail(_real.NVML_ERROR_UNINITIALIZED)

    def _gpu(self, name: str, handle: Any) -> FakeGpu:
        self._enter(name)
        if not isinstance(handle, _Handle) or getattr(handle, "_FakeNvml__owner", None) is not self:
            raise _fail(_real.NVML_ERROR_INVALID_ARGUMENT)
        g = self.gpus[handle.__index]
        if g.lost:
            raise _fail(_real.NVML_ERROR_GPU_IS_LOST)
        if name in g.not_supported:
            raise _fail(_real.NVML_ERROR_NOT_SUPPORTED)
        return g

    # ------------------------------------------------------------------ library

    def nvmlInit(self) -> None:
        self.calls.append("nvmlInit")
        if self.init_error is not None:
            raise _fail(self.init_error)
        self._refs += 1

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self._refs -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._enter("nvmlSystemGetDriverVersion")
        return self.driver

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._enter("nvmlSystemGetCudaDriverVersion")
        return self.cuda

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._enter("nvmlDeviceGetHandleByIndex")
        if not isinstance(index, int) or not 0 <= index < len(self.gpus):
            raise _fail(_real.NVML_ERROR_INVALID_ARGUMENT)
        if self.gpus[index].lost:
            raise _fail(_real.NVML_ERROR_GPU_IS_LOST)
        handle = _Handle()
        handle.__index, handle.__owner = index, self
        return handle

    # ------------------------------------------------------------------ device queries

    def nvmlDeviceGetIndex(self, handle: Any) -> int:
        self._gpu("nvmlDeviceGetIndex", handle)
        return int(handle.__index)

    def nvmlDeviceGetName(self, handle: Any) -> str:
        return self._gpu("nvmlDeviceGetName", handle).name

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        return self._gpu("nvmlDeviceGetUUID", handle).uuid

    def nvmlDeviceGetPciInfo(self, handle: Any) -> Any:
        g = self._gpu("nvmlDeviceGetPciInfo", handle)
        info = _real.nvmlPciInfo_t()
        info.busId = g.bus_id.encode()
        info.busIdLegacy = g.bus_id.encode()
        domain, bus, dev = g.bus_id.replace(".", ":").split(":")[:3]
        info.domain, info.bus, info.device = int(domain, 16), int(bus, 16), int(dev, 16)
        info.pciDeviceId = 0x233010DE
        return info

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        g = self._gpu("nvmlDeviceGetTemperature", handle)
        if sensor != _real.NVML_TEMPERATURE_GPU:
            raise _fail(_real.NVML_ERROR_INVALID_ARGUMENT)
        return g.temperature_c

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        return self._gpu("nvmlDeviceGetPowerUsage", handle).power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int:
        return self._gpu("nvmlDeviceGetEnforcedPowerLimit", handle).power_limit_mw

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any:
        g = self._gpu("nvmlDeviceGetUtilizationRates", handle)
        return _real.c_nvmlUtilization_t(gpu=g.util_gpu, memory=g.util_mem)

    def nvmlDeviceGetMemoryInfo(self, handle: Any, version: Any = None) -> Any:
        g = self._gpu("nvmlDeviceGetMemoryInfo", handle)
        if version is not None:
            raise _fail(_real.NVML_ERROR_NOT_SUPPORTED)  # the fake offers the v1 struct only
        return _real.c_nvmlMemory_t(total=g.memory_total, free=g.memory_total - g.memory_used,
                                    used=g.memory_used)

    def nvmlDeviceGetClockInfo(self, handle: Any, clock_type: int) -> int:
        g = self._gpu("nvmlDeviceGetClockInfo", handle)
        clocks = {_real.NVML_CLOCK_SM: g.clock_sm, _real.NVML_CLOCK_GRAPHICS: g.clock_sm,
                  _real.NVML_CLOCK_MEM: g.clock_mem}
        if clock_type not in clocks:
            raise _fail(_real.NVML_ERROR_INVALID_ARGUMENT)
        return clocks[clock_type]

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any) -> int:
        return self._gpu("nvmlDeviceGetCurrentClocksEventReasons", handle).throttle_mask

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: Any) -> int:
        return self._gpu("nvmlDeviceGetCurrentClocksThrottleReasons", handle).throttle_mask

    def nvmlDeviceGetTotalEccErrors(self, handle: Any, error_type: int, counter_type: int) -> int:
        g = self._gpu("nvmlDeviceGetTotalEccErrors", handle)
        if (error_type, counter_type) not in g.ecc:
            raise _fail(_real.NVML_ERROR_INVALID_ARGUMENT)
        return g.ecc[(error_type, counter_type)]

    def nvmlDeviceGetRetiredPages(self, handle: Any, source: int) -> list[int]:
        self._gpu("nvmlDeviceGetRetiredPages", handle)
        if source not in (0, 1):
            raise _fail(_real.NVML_ERROR_INVALID_ARGUMENT)
        return []

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: Any) -> int:
        self._gpu("nvmlDeviceGetRetiredPagesPendingStatus", handle)
        return 0

    def nvmlDeviceGetRemappedRows(self, handle: Any) -> tuple[int, int, int, int]:
        g = self._gpu("nvmlDeviceGetRemappedRows", handle)
        corr, unc, pending, failure = g.remapped
        return (corr, unc, pending, failure)

    def nvmlDeviceGetPcieReplayCounter(self, handle: Any) -> int:
        return self._gpu("nvmlDeviceGetPcieReplayCounter", handle).pcie_replay

    def nvmlDeviceGetNvLinkState(self, handle: Any, link: int) -> int:
        g = self._gpu("nvmlDeviceGetNvLinkState", handle)
        if g.nvlinks == 0:
            raise _fail(_real.NVML_ERROR_NOT_SUPPORTED)
        if not 0 <= link < _real.NVML_NVLINK_MAX_LINKS:
            raise _fail(_real.NVML_ERROR_INVALID_ARGUMENT)
        if link >= g.nvlinks:
            raise _fail(_real.NVML_ERROR_NOT_SUPPORTED)
        return 1

    def nvmlDeviceGetNvLinkErrorCounter(self, handle: Any, link: int, counter: int) -> int:
        g = self._gpu("nvmlDeviceGetNvLinkErrorCounter", handle)
        if not 0 <= link < g.nvlinks or not 0 <= counter < _real.NVML_NVLINK_ERROR_COUNT:
            raise _fail(_real.NVML_ERROR_INVALID_ARGUMENT)
        return g.nvlink_errors.get((link, counter), 0)

    # ------------------------------------------------------------------ events

    def nvmlEventSetCreate(self) -> _EventSet:
        self._enter("nvmlEventSetCreate")
        es = _EventSet()
        es.__freed, es.__queue, es.__registered = False, queue.Queue(), {}
        with self._lock:
            self._sets.append(es)
        return es

    def _live_set(self, es: Any) -> _EventSet:
        if not isinstance(es, _EventSet) or es.__freed:
            raise _fail(_real.NVML_ERROR_INVALID_ARGUMENT)
        return es

    def nvmlDeviceRegisterEvents(self, handle: Any, event_types: int, es: Any) -> None:
        g = self._gpu("nvmlDeviceRegisterEvents", handle)
        live = self._live_set(es)
        if event_types & ~g.supported_events:
            raise _fail(_real.NVML_ERROR_NOT_SUPPORTED)
        with self._lock:
            live.__registered[handle.__index] = live.__registered.get(handle.__index, 0) | event_types

    def nvmlEventSetWait(self, es: Any, timeout_ms: int) -> _EventData:
        self._enter("nvmlEventSetWait")
        live = self._live_set(es)
        try:
            data: _EventData = live.__queue.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            raise _fail(_real.NVML_ERROR_TIMEOUT) from None
        return data

    def nvmlEventSetFree(self, es: Any) -> None:
        self._enter("nvmlEventSetFree")
        live = self._live_set(es)
        with self._lock:
            live.__freed = True
            self._sets.remove(live)
