"""The agent's one grpc.aio server: components, health, reflection, metrics, graceful stop.

:func:`run_agent` builds the :class:`~agent.context.AgentContext`, registers
``grpc.health.v1.Health``, then awaits ``attach(server, ctx)`` of every module in
:data:`SERVICE_MODULES` (each returns the full names of the services it added), enables
server reflection for all of them, binds and serves.

Transport security is chosen in one place, :func:`server_credentials`.  Without TLS
material the agent binds to loopback only, whatever address was asked for, and says so.

The HTTPS port (:mod:`agent.web.serve`, ``[server] http_port``) runs on the same event loop
with the same mTLS, CRL and roles.

SIGTERM (or SIGINT): every health status goes NOT_SERVING, new calls are refused on both
ports, calls in flight get ``grace_period_s`` to finish, then the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agent import security
from agent.config import AgentConfig
from agent.context import AgentContext
from agent.errors import ConfigError
from agent.health import service as health_service
from agent.inference import service as inference_service
from agent.lifecycle import LOOPBACK, ports_free, sd_notify
from agent.metrics import InferenceCollector, KvCacheCollector, register_collector, start_metrics_server
from agent.proto._pool import POOL
from agent.sealed import read_seal_state
from agent.updates import service as updates_service
from agent.web import serve as http_service

if TYPE_CHECKING:  # agent.workers runs this module's run_agent in each worker process
    from agent.workers import WorkerLink

__all__ = ["LOOPBACK", "SEALED_MODULES", "SERVICE_MODULES", "build_server", "check_config", "run_agent",
           "server_credentials"]

log = logging.getLogger(__name__)

# Components that add gRPC services; each has `async def attach(server, ctx) -> list[str]`.
# The updates component comes first: it resolves an interrupted update before any model loads.
SERVICE_MODULES: tuple[ModuleType, ...] = (updates_service, inference_service, health_service)
# ... and in sealed mode (agent.sealed), when the data partition stayed shut at boot.
SEALED_MODULES: tuple[ModuleType, ...] = (health_service,)

def server_credentials(config: AgentConfig) -> grpc.ServerCredentials | None:
    """The server's transport credentials, or None for plaintext on loopback.

    The one place where they are chosen: :func:`agent.security.server_credentials` (mTLS
    with the site CA, client certificate required, role from the certificate).

    Raises:
        ConfigError: listening beyond loopback without TLS material, or bad TLS material.
    """
    return security.server_credentials(config)


def _reflection_pool(service_names: list[str]) -> Any:
    """One descriptor pool holding every service's file (and dependencies) for reflection.

    The inference protos live in a private pool (see agent/proto/__init__.py); the others in
    protobuf's default pool.
    """
    merged = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(fd: Any) -> None:
        if fd.name in added:
            return
        for dep in fd.dependencies:
            add(dep)
        proto = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(proto)
        merged.Add(proto)
        added.add(fd.name)

    for name in service_names:
        for pool in (POOL, descriptor_pool.Default()):
            try:
                add(pool.FindServiceByName(name).file)
                break
            except KeyError:
                continue
    return merged


async def build_server(config: AgentConfig, worker: WorkerLink | None = None,
                       ) -> tuple[grpc.aio.Server, AgentContext, list[str]]:
    """A server with health, every component and reflection; not yet bound.  ``worker``: this
    process is one of several sharing the port (agent.workers).

    Raises:
        ApplianceError: a component refused to start (e.g. a named model cannot be installed).
    """
    guards = security.interceptors(config)
    server = grpc.aio.server(
        options=security.server_options(config, shared_port=worker is not None),
        interceptors=guards,
        maximum_concurrent_rpcs=security.maximum_concurrent_rpcs(config),
    )
    ctx = AgentContext(config=config, workers=worker, sealed=read_seal_state(config.seal.marker,
                                                                               config.seal.escrow))
    ctx.health = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(ctx.health, server)
    names = [health.SERVICE_NAME]
    modules = SERVICE_MODULES
    if ctx.sealed is not None:
        # the state directory is a RAM copy of the image's: no model, no update, only the node's
        # health (which says why), its attestation and Node/Unseal
        log.warning("agent: sealed mode: %s; serving no model", ctx.sealed.describe())
        modules = SEALED_MODULES
    for module in modules:
        added = await module.attach(server, ctx)
        names.extend(added)
        log.debug("%s added %s", module.__name__, ", ".join(added))
    for guard in guards:
        if isinstance(guard, security.AccessInterceptor):
            guard.attach(ctx.events, ctx.layout.crl_in_force)
            ctx.revocation = guard.revocation
            ctx.call_limits = guard.call_limits
    names.append(reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server, pool=_reflection_pool(names))
    return server, ctx, names


def check_config(config: AgentConfig) -> None:
    """Refuse what the agent would refuse at start, without touching the state directory.

    Raises:
        ConfigError, NotFoundError: a listener beyond loopback without mTLS, unreadable TLS files.
    """
    server_credentials(config)


def _bind(server: grpc.aio.Server, config: AgentConfig) -> tuple[str, int]:
    host = config.server.listen
    creds = server_credentials(config)  # refuses a listener beyond loopback without mTLS
    if creds is None:
        log.info("no TLS material: plaintext on loopback (%s) only", host)
    address = f"[{host}]:{config.server.port}" if ":" in host else f"{host}:{config.server.port}"
    try:
        port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen on {address}: {exc}") from None
    if port == 0:
        raise ConfigError(f"cannot listen on {address} (address in use?)")
    return host, port


async def _watchdog() -> None:
    """Ping systemd's watchdog at half its interval while the event loop is alive.

    A loop blocked by a stuck handler stops the pings, and systemd restarts the agent.
    """
    usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    if usec <= 0 or os.environ.get("WATCHDOG_PID", str(os.getpid())) != str(os.getpid()):
        return
    while True:
        sd_notify("WATCHDOG=1")
        await asyncio.sleep(usec / 2e6)


async def _set_all(ctx: AgentContext, names: list[str], status: Any) -> None:
    overall = status
    sampler = ctx.sampler
    if sampler is not None and not sampler.serving_ok():
        overall = health_pb2.HealthCheckResponse.NOT_SERVING  # node health gates serving
    await ctx.health.set("", overall)
    for name in names:
        await ctx.health.set(name, status)


async def run_agent(config: AgentConfig, on_ready: Callable[[str, int], None] | None = None,
                    worker: WorkerLink | None = None) -> int:
    """Serve until SIGTERM/SIGINT; return the exit code.  ``worker``: serve as one of several
    processes on the port (the supervisor checked the ports and holds the gRPC one).

    Raises:
        ApplianceError: the server cannot start (a port in use, a model that cannot be provided).
    """
    check_config(config)
    if worker is None:
        ports_free(config)  # before any component writes to the state directory
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server, ctx, names = await build_server(config, worker)
    host, port = _bind(server, config)
    metrics = _start_metrics(config, ctx) if worker is None or worker.leader else None
    await server.start()
    # the HTTPS port: the gRPC port's mTLS, CRL in force and roles, or plain HTTP on loopback;
    # with several workers only the leader serves it, as it serves the metrics port
    http = (await http_service.start(ctx, config.server.listen if config.tls.cert else LOOPBACK)
            if (worker is None or worker.leader) and ctx.sealed is None else None)
    serving = health_pb2.HealthCheckResponse.SERVING
    await _set_all(ctx, [n for n in names if n != reflection.SERVICE_NAME], serving)
    if worker is None:
        log.info("agent: serving on %s:%d", host, port)
        sd_notify("READY=1")
    else:
        worker.ready(port)  # the supervisor tells systemd once every worker serves
    watchdog = asyncio.create_task(_watchdog())
    if on_ready is not None:
        on_ready(host, port)
    await stop.wait()

    log.info("agent: stopping (in-flight requests get %.1f s)", config.server.grace_period_s)
    sd_notify("STOPPING=1")
    watchdog.cancel()
    servicer = ctx.inference_servicer
    if servicer is not None:
        servicer.ready = False
    await ctx.health.enter_graceful_shutdown()
    # both ports stop accepting at once; calls in flight on either get the grace period
    await asyncio.gather(server.stop(config.server.grace_period_s),
                         http.cleanup() if http is not None else asyncio.sleep(0))
    repo = ctx.inference
    if repo is not None:
        await repo.close()
    if ctx.sampler is not None:
        await health_service.close(ctx)
    if metrics is not None:
        metrics.shutdown()
    log.info("agent: stopped")
    return 0


def _start_metrics(config: AgentConfig, ctx: AgentContext) -> Any:
    if not config.server.metrics_port:
        return None
    if ctx.inference_servicer is not None:
        register_collector(InferenceCollector(ctx.inference_servicer.statistics_blocking))
    if ctx.inference is not None:
        register_collector(KvCacheCollector(ctx.inference.generative))
    # the gRPC port's mTLS rules and its revocation list in force, or None on loopback
    tls = security.metrics_tls(config, ctx.revocation)
    host = config.server.listen if tls else LOOPBACK
    try:
        return start_metrics_server(config.server.metrics_port, host, tls)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {host}:{config.server.metrics_port}: {exc}") from None
