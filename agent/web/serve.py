"""Assemble and start the HTTPS port from the agent's configuration and context."""

from __future__ import annotations

import logging

from aiohttp import web

from agent import security
from agent.context import AgentContext
from agent.errors import ConfigError
from agent.web import kserve
from agent.web.app import Surface, start_http
from agent.web.openai_api import OpenAiRoutes

__all__ = ["build_app", "start"]

log = logging.getLogger(__name__)


def build_app(ctx: AgentContext, surface: Surface) -> web.Application:
    """The application: access and errors (``surface``), ``/v2`` over the inference servicer,
    ``/v1`` over the generative models."""
    config = ctx.config
    app = web.Application(middlewares=[surface.middleware],
                          client_max_size=config.server.max_message_bytes)
    if ctx.inference_servicer is not None:
        kserve.add_routes(app, ctx.inference_servicer)
    OpenAiRoutes(ctx.generative, config.limits.max_deadline_s, config.limits.max_stream_s).add_to(app)
    return app


async def start(ctx: AgentContext, host: str) -> web.AppRunner | None:
    """Serve the HTTPS port (``[server] http_port``; 0: none) with the gRPC port's mTLS, its
    CRL in force and its roles; plain HTTP on loopback where the gRPC port is plaintext.
    ``runner.cleanup()`` stops it, letting requests in flight finish for ``grace_period_s``.

    Raises:
        ConfigError: the port cannot be bound.
    """
    config = ctx.config
    port = config.server.http_port
    if not port:
        return None
    tls = security.client_tls(config, ctx.revocation)
    loopback_role = None if config.tls.loopback_role == "none" else config.tls.loopback_role
    app = build_app(ctx, Surface(tls, loopback_role, config.limits, config.server.max_message_bytes,
                                 ctx.call_limits))
    try:
        runner = await start_http(app, host, port, tls, config.server.grace_period_s)
    except OSError as exc:
        raise ConfigError(f"cannot serve HTTP on {host}:{port}: {exc.strerror}") from None
    log.info("http: %s://%s:%d (/v1 OpenAI-compatible, /v2 KServe REST)",
             "https" if tls else "http", host, bound_port(runner))
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port ``runner`` listens on (the one the OS chose for port 0)."""
    for address in runner.addresses:
        return int(address[1])
    return 0
