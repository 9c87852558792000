"""``appliance.v1.Node`` (health, inventory, events) and the health component's ``attach``.

Requests never sample: ``GetHealth`` returns the sampler's latest report, ``WatchHealth``
streams reports as the sampler publishes them.  The update RPCs belong to the updates
component: when one is published as ``ctx.updates`` its methods of the same
names answer them, otherwise they answer UNIMPLEMENTED.

grpc.health.v1 (README "Health rules"): ``appliance.v1.Node`` is always SERVING (a failed
node must still say why); with ``[health] gate_serving`` the server's overall status
(service ``""``) follows the verdict: NOT_SERVING while it is FAIL, SERVING otherwise.
Model readiness follows through :meth:`Sampler.serving_ok`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from cryptography import x509
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2

from agent.attest import Enrolment, Quote, TpmQuoter
from agent.context import AgentContext
from agent.errors import ApplianceError
from agent.events import Event, EventLog
from agent.health.inventory import Compliance, GpuInfo, Inventory, collect_inventory
from agent.health.metrics import NodeCollector
from agent.health.report import HealthReport, Verdict
from agent.health.sampler import Sampler
from agent.metrics import REGISTRY, register_collector
from agent.proto import node_pb2 as pb
from agent.proto import node_pb2_grpc as pb_grpc
from agent.sealed import Unsealer, UnsealError, read_escrow

__all__ = ["SERVICE_NAME", "NodeServicer", "attach", "close", "event_to_proto", "inventory_to_proto",
           "report_to_proto"]

log = logging.getLogger(__name__)

T = TypeVar("T")

SERVICE_NAME = "appliance.v1.Node"
MIN_WATCH_INTERVAL_MS = 100
DEFAULT_EVENTS_LIMIT = 100
MAX_EVENTS_LIMIT = 10_000


def _ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


# ---------------------------------------------------------------------- conversions

def report_to_proto(report: HealthReport) -> pb.HealthReport:
    s, h = report.sample, report.sample.host
    host = pb.HostSample(
        cpu_pct=h.cpu_pct, cpu_per_core_pct=h.cpu_per_core_pct, load1=h.load1, load5=h.load5,
        load15=h.load15, memory_total_bytes=h.memory_total_bytes,
        memory_available_bytes=h.memory_available_bytes, swap_total_bytes=h.swap_total_bytes,
        swap_used_bytes=h.swap_used_bytes,
        disks=[pb.HostSample.Disk(mountpoint=d.mountpoint, total_bytes=d.total_bytes,
                                  used_bytes=d.used_bytes, used_pct=d.used_pct, role=d.role)
               for d in h.disks],
        disk_read_bytes=h.disk_read_bytes, disk_write_bytes=h.disk_write_bytes,
        net_rx_bytes=h.net_rx_bytes, net_tx_bytes=h.net_tx_bytes,
        temperatures_c=h.temperatures_c, fans_rpm=h.fans_rpm, uptime_s=h.uptime_s)
    gpus = [pb.GpuSample(
        index=g.index, name=g.name, uuid=g.uuid, pci_bus_id=g.pci_bus_id,
        temperature_c=g.temperature_c, power_w=g.power_w, power_limit_w=g.power_limit_w,
        utilization_gpu_pct=g.utilization_gpu_pct, utilization_mem_pct=g.utilization_mem_pct,
        memory_total_bytes=g.memory_total_bytes, memory_used_bytes=g.memory_used_bytes,
        clock_sm_mhz=g.clock_sm_mhz, clock_mem_mhz=g.clock_mem_mhz,
        throttle_reasons=g.throttle_reasons, throttle_mask=g.throttle_mask,
        ecc_corrected_volatile=g.ecc_corrected_volatile, ecc_uncorrected_volatile=g.ecc_uncorrected_volatile,
        ecc_corrected_aggregate=g.ecc_corrected_aggregate,
        ecc_uncorrected_aggregate=g.ecc_uncorrected_aggregate, retired_pages=g.retired_pages,
        retired_pages_pending=g.retired_pages_pending,
        remapped_rows_correctable=g.remapped_rows_correctable,
        remapped_rows_uncorrectable=g.remapped_rows_uncorrectable, remap_pending=g.remap_pending,
        remap_failure=g.remap_failure, pcie_replay_counter=g.pcie_replay_counter,
        nvlink_errors=g.nvlink_errors, xid_errors=g.xid_errors, last_xid=g.last_xid,
        recent_xids=g.recent_xids, lost=g.lost, lost_reason=g.lost_reason, unsupported=g.unsupported,
    ) for g in s.gpus]
    return pb.HealthReport(
        overall=report.overall.name,
        rules=[pb.RuleResult(rule=r.rule, verdict=r.verdict.name, reason=r.reason, subject=r.subject)
               for r in report.rules],
        host=host, gpus=gpus, nvml_available=s.nvml_available, nvml_reason=s.nvml_reason,
        sampled_at=_ts(s.time), driver_version=s.driver_version,
        cuda_driver_version=s.cuda_driver_version,
        data_seal=pb.DataSeal(sealed=True, reason=s.sealed.reason, pcrs_sha256=s.sealed.pcrs_sha256,
                              device=s.sealed.device, recovery_escrow=s.sealed.recovery_escrow)
        if s.sealed is not None else None)


def _compliance_to_proto(c: Compliance | None) -> pb.Compliance | None:
    if c is None:
        return None
    return pb.Compliance(
        scope=c.scope, scanner=c.scanner,
        profiles=[pb.ProfileScore(profile=p.profile, pass_ratio=p.pass_ratio, passed=p.passed,
                                  fail=p.fail, waived=p.waived, notapplicable=p.notapplicable,
                                  other=p.other) for p in c.profiles],
        lynis_hardening_index=c.lynis_hardening_index, agent_exposure=c.agent_exposure,
        services=[pb.ServiceExposure(unit=s.unit, exposure=s.exposure) for s in c.services])


def inventory_to_proto(inv: Inventory) -> pb.Inventory:
    return pb.Inventory(
        node_id=inv.node_id, hostname=inv.hostname, image_version=inv.image_version,
        active_slot=inv.active_slot, kernel=inv.kernel, agent_version=inv.agent_version,
        bundles=[pb.InstalledBundle(name=b.name, version=b.version, sha256=b.sha256, active=b.active,
                                    rolled_back=b.rolled_back,
                                    installed_at=_ts(b.installed_at) if b.installed_at else None,
                                    kind=b.kind, context_length=b.context_length,
                                    parameters=b.parameters, quantisation=b.quantisation)
                 for b in inv.bundles],
        registry_root_version=inv.registry_root_version,
        firmware_manifest_id=inv.firmware_manifest_id,
        gpus=[pb.GpuInfo(index=g.index, name=g.name, uuid=g.uuid, driver_version=g.driver_version,
                         cuda_driver_version=g.cuda_driver_version) for g in inv.gpus],
        execution_providers=inv.execution_providers,
        gpu_stack=pb.GpuStack(**inv.gpu_stack) if inv.gpu_stack else None,
        onnxruntime_version=inv.onnxruntime_version, root_hash=inv.root_hash,
        cpu_level_required=inv.cpu_level_required, cpu_missing_features=inv.cpu_missing_features,
        compliance=_compliance_to_proto(inv.compliance))


def event_to_proto(e: Event) -> pb.Event:
    return pb.Event(seq=e.seq, time=_ts(e.time), kind=e.kind, severity=e.severity, subject=e.subject,
                    message=e.message, details={k: str(v) for k, v in e.details.items()})


# ---------------------------------------------------------------------- servicer

class _Hub:
    """Fans the sampler's reports (from its thread) out to WatchHealth streams (on the loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queues: set[asyncio.Queue[HealthReport]] = set()

    def from_thread(self, report: HealthReport) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed under us: nobody is watching
            self._loop.call_soon_threadsafe(self._publish, report)

    def _publish(self, report: HealthReport) -> None:
        for q in self._queues:
            if q.full():  # a slow watcher gets the newest report, not a backlog
                q.get_nowait()
            q.put_nowait(report)

    def watch(self) -> asyncio.Queue[HealthReport]:
        q: asyncio.Queue[HealthReport] = asyncio.Queue(maxsize=1)
        self._queues.add(q)
        return q

    def unwatch(self, q: asyncio.Queue[HealthReport]) -> None:
        self._queues.discard(q)


async def _guard(context: Any, run: Callable[[], Awaitable[T]]) -> T:
    """Run a handler; the one place where ApplianceError becomes a status code."""
    try:
        return await run()
    except ApplianceError as exc:
        await context.abort(getattr(grpc.StatusCode, exc.grpc_code), str(exc))
        raise  # abort raises; this keeps the type checker honest


class NodeServicer(pb_grpc.NodeServicer):
    def __init__(self, ctx: AgentContext, sampler: Sampler, events: EventLog) -> None:
        self.ctx = ctx
        self.sampler = sampler
        self.events = events
        self._hub: _Hub | None = None
        self._providers: tuple[str, ...] | None = None
        self._quoter = TpmQuoter(ctx.config.attest, state_dir=ctx.state_dir)

    def bind(self, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
        """Start forwarding the sampler's reports to watchers on ``loop``; returns the undo."""
        self._hub = _Hub(loop)
        return self.sampler.subscribe(self._hub.from_thread)

    def _latest(self) -> HealthReport:
        report = self.sampler.latest
        if report is None:
            raise ApplianceError("no health sample taken yet")
        return report

    async def GetHealth(self, request: Any, context: Any) -> pb.HealthReport:  # noqa: N802
        async def run() -> pb.HealthReport:
            return report_to_proto(self._latest())

        return await _guard(context, run)

    async def WatchHealth(self, request: Any, context: Any) -> AsyncIterator[pb.HealthReport]:  # noqa: N802
        if self._hub is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the health sampler is not running")
        assert self._hub is not None
        queue = self._hub.watch()
        try:
            report = self.sampler.latest
            if report is not None:
                yield report_to_proto(report)
            if request.interval_ms:
                interval = max(request.interval_ms, MIN_WATCH_INTERVAL_MS) / 1000
                while True:
                    await asyncio.sleep(interval)
                    latest = self.sampler.latest
                    if latest is not None:
                        yield report_to_proto(latest)
            else:
                sent = report.signature() if report is not None else None
                while True:
                    report = await queue.get()
                    if report.signature() != sent:
                        sent = report.signature()
                        yield report_to_proto(report)
        finally:
            self._hub.unwatch(queue)

    async def _providers_once(self) -> tuple[str, ...]:
        if self._providers is None:
            def probe() -> tuple[str, ...]:
                from agent.ort import usable_providers  # imports ONNX Runtime: once, off the loop
                return usable_providers()

            try:
                self._providers = await asyncio.to_thread(probe)
            except ImportError as exc:
                log.warning("execution providers unknown: %s", exc)
                self._providers = ()
        return self._providers

    def gpu_info(self) -> tuple[GpuInfo, ...]:
        report = self.sampler.latest
        if report is None:
            return ()
        s = report.sample
        return tuple(GpuInfo(g.index, g.name, g.uuid, s.driver_version, s.cuda_driver_version)
                     for g in s.gpus)

    async def GetInventory(self, request: Any, context: Any) -> pb.Inventory:  # noqa: N802
        async def run() -> pb.Inventory:
            providers = await self._providers_once()
            inv = await asyncio.to_thread(
                collect_inventory, self.ctx.state_dir, gpus=self.gpu_info(), providers=providers,
                inference=self.ctx.inference)
            answer = inventory_to_proto(inv)
            answer.recovery_escrow = await asyncio.to_thread(read_escrow, self.ctx.config.seal.escrow)
            return answer

        return await _guard(context, run)

    async def Attest(self, request: Any, context: Any) -> pb.AttestResponse:  # noqa: N802
        async def run() -> pb.AttestResponse:
            def quote() -> tuple[Quote, Inventory]:
                return self._quoter.quote(request.nonce), collect_inventory(self.ctx.state_dir)

            q, inv = await asyncio.to_thread(quote)
            return pb.AttestResponse(attest=q.attest, signature=q.signature, pcr_values=q.pcr_values,
                                     ak_public=q.ak_public, ak_certificate=q.ak_certificate,
                                     event_log=q.event_log, userspace_log=q.userspace_log,
                                     image_version=inv.image_version, root_hash=inv.root_hash)

        return await _guard(context, run)

    async def EnrolAttestation(self, request: Any, context: Any) -> pb.EnrolAttestationResponse:  # noqa: N802
        def enrol() -> Enrolment:
            e = self._quoter.enrol(request.ak_certificate)
            if e.created:
                self.events.record("attest.key_created", "info", "tpm", "attestation key made in the TPM")
            if request.ak_certificate:
                serial = x509.load_der_x509_certificate(e.ak_certificate).serial_number
                self.events.record("attest.enrolled", "info", "tpm", "attestation key certificate installed",
                                   serial=f"{serial:x}")
            return e

        async def run() -> pb.EnrolAttestationResponse:
            e = await asyncio.to_thread(enrol)
            return pb.EnrolAttestationResponse(ak_public=e.ak_public, created=e.created,
                                               ak_certificate=e.ak_certificate)

        return await _guard(context, run)

    async def Unseal(self, request: Any, context: Any) -> pb.UnsealResponse:  # noqa: N802
        seal = self.ctx.sealed
        cfg = self.ctx.config.seal

        def unseal() -> str:
            try:
                message = Unsealer(cfg.request, cfg.result, cfg.unseal_timeout_s).unseal(request.recovery_key)
            except UnsealError as exc:
                self.events.record("data.unseal_refused", "warning", "data", str(exc))
                raise
            self.events.record("data.unsealed", "info", "data", message)
            return message

        async def run() -> pb.UnsealResponse:
            if seal is None:
                raise UnsealError("the data partition opened at boot: there is nothing to unseal")
            return pb.UnsealResponse(message=await asyncio.to_thread(unseal))

        return await _guard(context, run)

    async def GetEvents(self, request: Any, context: Any) -> pb.GetEventsResponse:  # noqa: N802
        limit = min(request.limit or DEFAULT_EVENTS_LIMIT, MAX_EVENTS_LIMIT)
        events = self.events.recent(request.after_seq, limit, request.kind_prefix)
        return pb.GetEventsResponse(events=[event_to_proto(e) for e in events])

    # Update RPCs: answered by the updates component once there is one.
    async def _updates(self, method: str, request: Any, context: Any) -> Any:
        updates = self.ctx.updates
        handler = getattr(updates, method, None)
        if handler is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                                f"{SERVICE_NAME}/{method}: no updates component runs on this node")
        assert handler is not None
        return await _guard(context, lambda: handler(request, context))

    async def CheckUpdates(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._updates("CheckUpdates", request, context)

    async def ApplyUpdate(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._updates("ApplyUpdate", request, context)

    async def Rollback(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._updates("Rollback", request, context)

    async def UpdateHistory(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._updates("UpdateHistory", request, context)


# ---------------------------------------------------------------------- health gate

def _health_gate(ctx: AgentContext, loop: asyncio.AbstractEventLoop) -> Callable[[HealthReport], None]:
    """grpc.health.v1 service "" follows the overall verdict (FAIL -> NOT_SERVING).

    NOT_SERVING is asserted on every FAIL report (so a server that marks everything SERVING
    once it has started cannot mask a failed node for long); SERVING is set once, when the
    verdict leaves FAIL, so other reasons for NOT_SERVING are not overridden.
    """
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    last: list[int] = []
    pending: set[asyncio.Future[Any]] = set()

    def apply(status: int) -> None:
        if ctx.health is None or (last and last[0] == status and status != not_serving):
            return
        last[:] = [status]
        task = asyncio.ensure_future(ctx.health.set("", status))
        pending.add(task)
        task.add_done_callback(pending.discard)

    def listener(report: HealthReport) -> None:
        status = (not_serving if report.overall == Verdict.FAIL
                  else health_pb2.HealthCheckResponse.SERVING)
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(apply, status)

    return listener


# ---------------------------------------------------------------------- attach

async def attach(server: grpc.aio.Server, ctx: AgentContext) -> list[str]:
    """Start the sampler, register ``appliance.v1.Node``, wire health gating and metrics.

    Publishes ``ctx.events`` (the event log; an already published one is
    reused) and ``ctx.sampler`` (a sampler already published there, e.g. one
    built on a fake NVML in tests, is used instead of a new one on the real ``pynvml``).
    The node collector joins :mod:`agent.metrics`' registry.
    Stop with :func:`close`.  Raises nothing for missing hardware: that is a reported state.
    """
    cfg = ctx.config.health
    events = ctx.events
    if events is None:
        events = EventLog.open(ctx.state_dir, keep=cfg.events_keep, max_bytes=cfg.events_max_bytes,
                               shared=ctx.workers is not None)
        ctx.events = events
    sampler = ctx.sampler
    if sampler is None:
        # One sampler records the node's transitions; the other workers' samplers only
        # answer health questions (each would record the same transition again).
        recorder = ctx.workers is None or ctx.workers.leader
        sampler = Sampler(cfg, ctx.state_dir, events=events if recorder else None, sealed=ctx.sealed)
        ctx.sampler = sampler
    loop = asyncio.get_running_loop()
    servicer = NodeServicer(ctx, sampler, events)
    unsubscribe = [servicer.bind(loop)]
    if cfg.gate_serving:
        unsubscribe.append(sampler.subscribe(_health_gate(ctx, loop)))
    ctx.health_unsubscribe = unsubscribe
    await asyncio.to_thread(sampler.start)
    pb_grpc.add_NodeServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    if ctx.health is not None:
        await ctx.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    _register_metrics(ctx, sampler)
    return [SERVICE_NAME]


def _register_metrics(ctx: AgentContext, sampler: Sampler) -> None:
    collector = NodeCollector(lambda: sampler.latest)
    register_collector(collector)
    ctx.health_collector = collector


async def close(ctx: AgentContext) -> None:
    """Stop what :func:`attach` started (sampler threads, NVML, metrics collector)."""
    for undo in ctx.health_unsubscribe:
        undo()
    ctx.health_unsubscribe = []
    collector, ctx.health_collector = ctx.health_collector, None
    if collector is not None:
        with contextlib.suppress(Exception):
            REGISTRY.unregister(collector)
    sampler = ctx.sampler
    if sampler is not None:
        await asyncio.to_thread(sampler.stop)
