"""The HTTPS port: one aiohttp application on the agent's event loop.

**Access** is the gRPC port's: the same site CA and CRL object (:func:`agent.security.client_tls`),
and the same decision (:func:`agent.security.refusal` over :data:`agent.security.METHOD_ROLES`).
Every route names the RPC it stands for (the KServe v2 routes name the gRPC method they mirror,
so a role may do the same on both ports).  The client certificate is parsed once per
connection; expiry and revocation are checked on every request, as on gRPC.  Decisions are
audit lines on ``agent.audit`` in the gRPC port's format.

**Limits** are the gRPC port's ``[limits]``, counted on this port: requests in progress per
peer address (``max_calls_per_peer``) and overall (``max_concurrent_rpcs``); beyond them a
request is refused with 429, a JSON error and ``Retry-After`` (where gRPC answers
RESOURCE_EXHAUSTED).  A streamed response counts until its last event.

**Hostile bodies**: a body over ``[server] max_message_bytes`` is refused (413): by its
``Content-Length`` before any of it is read, a chunked one as soon as it passes the limit;
JSON must parse, be an object, and hold no NaN/Infinity constants.

**Errors** are translated here only: :class:`~agent.errors.ApplianceError` by its
``grpc_code`` to an HTTP status, written in the shape of the route's protocol (OpenAI's
``{"error": {"message", "type", "param", "code"}}`` under ``/v1``, KServe's ``{"error": msg}``
elsewhere).
"""

from __future__ import annotations

import logging
import ssl
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web

from agent.config import LimitsSection
from agent.errors import AccessDeniedError, ApplianceError
from agent.llm.params import parse_json
from agent.security import CallLimits, ClientTls, Identity, admitted, audit_decision, refusal

__all__ = [
    "IDENTITY",
    "RETRY_AFTER_S",
    "Surface",
    "error_body",
    "http_status",
    "read_json",
    "rpc",
    "start_http",
]

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
IDENTITY = web.RequestKey("identity", Identity)  # who sent the request, set once it is admitted
RETRY_AFTER_S = 1  # the Retry-After of a 429: calls in progress end in about that time

# grpc_code of the exception family -> HTTP status
_HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
}
# HTTP status -> OpenAI's error "type"
_OPENAI_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_exceeded",
                503: "server_error"}


def http_status(exc: ApplianceError) -> int:
    return _HTTP_STATUS.get(exc.grpc_code, 500)


def error_body(path: str, status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """The error JSON of the protocol ``path`` belongs to."""
    if path.startswith("/v1/"):
        code = str(status) if status != 429 else "rate_limit_exceeded"
        return {"error": {"message": message, "type": _OPENAI_TYPE.get(status, "server_error"),
                          "param": param, "code": code}}
    return {"error": message}


H = TypeVar("H", bound=Callable[..., Awaitable[web.StreamResponse]])


def rpc(method: str) -> Callable[[H], H]:
    """Mark a route handler with the RPC name the access table knows it by."""
    def mark(handler: H) -> H:
        handler.rpc_method = method  # type: ignore[attr-defined]
        return handler
    return mark


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object (:func:`parse_json`)."""
    return parse_json(await request.read())


class Surface:
    """Access and error translation for the HTTPS port's routes (an aiohttp middleware)."""

    def __init__(self, tls: ClientTls | None, loopback_role: str | None, limits: LimitsSection,
                 max_body: int, calls: CallLimits | None = None) -> None:
        """``calls``: the gRPC port's count of calls in progress, to share; else its own."""
        self._tls = tls
        self._loopback = Identity(subject="loopback (no TLS)", serial=None, role=loopback_role)
        self._limits = calls if calls is not None else CallLimits(limits)
        self._max_body = max_body
        # One entry per TLS connection, gone with it: the certificate is parsed once.
        self._connections: weakref.WeakKeyDictionary[ssl.SSLObject, Identity] = weakref.WeakKeyDictionary()

    def identity(self, request: web.Request) -> Identity:
        """Who sends ``request``: its connection's certificate, expiry and CRL checked now."""
        if self._tls is None:
            return self._loopback
        transport = request.transport
        sslobj = transport.get_extra_info("ssl_object") if transport is not None else None
        if not isinstance(sslobj, ssl.SSLObject):
            return self._tls.identify(None)
        ident = self._connections.get(sslobj)
        if ident is None:
            ident = self._tls.parse(sslobj.getpeercert(binary_form=True))
            self._connections[sslobj] = ident
        return admitted(ident, self._tls.crl)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        try:
            host = self._admit(request)
            with self._limits.counted(host):
                self._check_size(request)
                return await handler(request)
        except ApplianceError as exc:
            status = http_status(exc)
            if status == 500:
                log.error("%s %s: %s", request.method, path, exc)  # noqa: TRY400 - expected
            return _error(path, status, str(exc), getattr(exc, "param", None))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            message = exc.reason
            if exc.status == 413:
                declared = "" if request.content_length is None else f"of {request.content_length} bytes "
                message = (f"request body {declared}is over the node's limit of {self._max_body} bytes "
                           "([server] max_message_bytes)")
            return _error(path, exc.status, message)
        except Exception as exc:  # a bug must still answer in the protocol's shape, never hang
            log.exception("%s %s: internal error", request.method, path)
            return web.json_response(error_body(path, 500, f"internal error: {type(exc).__name__}"),
                                     status=500)

    def _admit(self, request: web.Request) -> str:
        """Decide who may send ``request`` (audited), then whether the limits let it run now.
        Returns the peer address the request counts against."""
        route_handler = request.match_info.route.handler
        method = getattr(route_handler, "rpc_method", None)
        ident = self.identity(request)
        peer = str(request.remote)
        name = method or f"HTTP {request.path}"
        denied = refusal(ident, method or "", tls=self._tls is not None)
        if method is None and ident.role is not None and not ident.problem:
            denied = None  # no such route: only a caller with a role learns that it is a 404
        if denied is not None:
            code, reason = denied
            audit_decision(logging.WARNING, "deny", name, ident, peer, reason=reason)
            exc_type = _DENIALS[code]
            raise exc_type(reason)
        busy = self._limits.busy(peer)
        if busy is not None:
            audit_decision(logging.WARNING, "deny", name, ident, peer, reason=busy)
            raise _BusyError(busy)
        audit_decision(logging.DEBUG, "allow", name, ident, peer, reason=f"role {ident.role}")
        request[IDENTITY] = ident
        return peer

    def _check_size(self, request: web.Request) -> None:
        """Refuse a body whose declared size is over the limit before reading any of it
        (aiohttp's ``client_max_size`` stops a chunked one once it passes the limit)."""
        size = request.content_length
        if size is not None and size > self._max_body:
            raise web.HTTPRequestEntityTooLarge(max_size=self._max_body, actual_size=size)



def _error(path: str, status: int, message: str, param: str | None = None) -> web.Response:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else None
    return web.json_response(error_body(path, status, message, param), status=status, headers=headers)


class _BusyError(ApplianceError):
    grpc_code = "RESOURCE_EXHAUSTED"


class _UnauthenticatedError(ApplianceError):
    grpc_code = "UNAUTHENTICATED"


_DENIALS: dict[str, type[ApplianceError]] = {"UNAUTHENTICATED": _UnauthenticatedError,
                                             "PERMISSION_DENIED": AccessDeniedError}


async def start_http(app: web.Application, host: str, port: int, tls: ClientTls | None,
                     grace_s: float) -> web.AppRunner:
    """Serve ``app`` on ``host:port`` (HTTPS with ``tls``); the runner's ``cleanup()`` stops
    accepting, then lets requests in flight run for ``grace_s`` seconds.

    Raises:
        OSError: the port cannot be bound.
    """
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=grace_s)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls.context if tls else None,
                       reuse_address=True)
    await site.start()
    return runner

