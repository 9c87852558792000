"""The updates component: ``appliance.v1.Node`` CheckUpdates/ApplyUpdate/Rollback/UpdateHistory.

The Node servicer (agent.health.service) forwards those four RPCs to
``ctx.updates``, an :class:`UpdatesComponent`, whose async methods of the
same names take the request and the gRPC context and return the response message; they
raise :class:`~agent.errors.ApplianceError` subclasses, which that servicer turns into
status codes.

:func:`attach` runs first among the agent's components: it resolves an update that a crash
or power cut interrupted (:meth:`UpdateManager.recover`) before the inference component
loads anything, so the node serves either the old or the new version, never a mix.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from agent.context import AgentContext
from agent.events import EventLog
from agent.health.inventory import KERNEL_CMDLINE
from agent.osrelease import running_root_hash
from agent.proto import node_pb2 as pb
from agent.updates.manager import Outcome, UpdateManager

__all__ = ["UpdatesComponent", "attach", "outcome_to_proto"]

log = logging.getLogger(__name__)

DEFAULT_HISTORY_LIMIT = 100


def outcome_to_proto(o: Outcome) -> pb.UpdateResult:
    return pb.UpdateResult(target=o.target, name=o.name, version=o.version, sha256=o.sha256,
                           outcome=o.outcome, reason=o.reason)


def _ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


class UpdatesComponent:
    """The update RPCs over an :class:`UpdateManager` (called by the Node servicer)."""

    def __init__(self, manager: UpdateManager) -> None:
        self.manager = manager

    async def CheckUpdates(self, request: Any, context: Any) -> pb.CheckUpdatesResponse:  # noqa: N802
        pending, source = await self.manager.check()
        return pb.CheckUpdatesResponse(
            source=source,
            pending=[pb.PendingUpdate(target=p.target, kind=p.kind, name=p.name, version=p.version,
                                      current_version=p.current_version, sha256=p.sha256, length=p.length)
                     for p in pending])

    async def ApplyUpdate(self, request: Any, context: Any) -> pb.ApplyUpdateResponse:  # noqa: N802
        results = await self.manager.apply(list(request.targets), dry_run=request.dry_run)
        return pb.ApplyUpdateResponse(results=[outcome_to_proto(r) for r in results])

    async def Rollback(self, request: Any, context: Any) -> pb.RollbackResponse:  # noqa: N802
        if not request.name or not request.version:
            from agent.errors import ConfigError

            raise ConfigError("Rollback needs the bundle name and the kept version to return to")
        result = await self.manager.rollback(request.name, request.version, request.reason)
        return pb.RollbackResponse(result=outcome_to_proto(result))

    async def UpdateHistory(self, request: Any, context: Any) -> pb.UpdateHistoryResponse:  # noqa: N802
        entries = await asyncio.to_thread(self.manager.history, request.limit or DEFAULT_HISTORY_LIMIT)
        return pb.UpdateHistoryResponse(entries=[outcome_to_proto(e) for e in entries],
                                        times=[_ts(e.time) for e in entries])


async def attach(server: grpc.aio.Server, ctx: AgentContext) -> list[str]:
    """Recover an interrupted update, then publish ``ctx.updates``.

    Adds no gRPC service of its own (the Node servicer forwards to it); publishes the event
    log as ``ctx.events`` when no component did yet (the health component
    reuses it).

    Raises:
        UpdateError: the update journal is unreadable (the agent does not guess what runs).
        ConfigError: a malformed ``[updates] pins`` entry.
    """
    events = ctx.events
    if events is None:
        cfg = ctx.config.health
        events = EventLog.open(ctx.state_dir, keep=cfg.events_keep, max_bytes=cfg.events_max_bytes,
                               shared=ctx.workers is not None)
        ctx.events = events
    manager = UpdateManager(ctx.state_dir, ctx.config.updates, lambda: ctx.inference, events,
                            drain_s=ctx.config.server.grace_period_s)
    notes = await asyncio.to_thread(manager.recover)
    os_result = await asyncio.to_thread(manager.report_os_attempt, running_root_hash(KERNEL_CMDLINE))
    if os_result is not None:
        log.warning("OS update attempt: %s", os_result)
    if notes:
        log.warning("update recovery done: %d action(s)", len(notes))
    link = ctx.workers
    if link is not None:  # the agent's other serving processes follow every switch
        async def follow(name: str) -> None:
            await link.broadcast({"op": "sync", "name": name})

        manager.after_switch = follow
    ctx.updates = UpdatesComponent(manager)
    ctx.update_manager = manager
    return []
