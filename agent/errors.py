"""One small exception family, grouped by who is at fault.

Code raises these with the fact that went wrong; only the CLIs' ``main`` and the gRPC
servicers translate them (to exit codes and status codes).  The operator's tools extend the
family with their own errors (:mod:`provisioning.errors`: profiles, images, fleet, tools),
so a message reads the same wherever it surfaces.
"""

from __future__ import annotations

__all__ = [
    "AccessDeniedError",
    "ApplianceError",
    "BundleError",
    "CapacityError",
    "ConfigError",
    "HealthError",
    "InferenceError",
    "NotFoundError",
    "RegistryError",
    "RequestError",
    "UpdateError",
    "VerificationError",
    "echo",
]

ECHO_LIMIT = 64  # characters of caller-supplied text repeated in an error message


def echo(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` (a name or value the caller sent) as an error message repeats it: quoted,
    and cut after ``limit`` characters with the full length named, so that a message never
    grows with what the caller sent (a 100k-character model name must not come back)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}...({len(text)} chars)"


class ApplianceError(Exception):
    """Base of every error this project raises on purpose.

    ``exit_code`` is what the CLI exits with; ``grpc_code`` names the
    ``grpc.StatusCode`` member a servicer answers with.
    """

    exit_code = 1
    grpc_code = "FAILED_PRECONDITION"


class ConfigError(ApplianceError):
    """A configuration file (agent.toml, registry config) is malformed or inconsistent."""

    exit_code = 6  # not 2: argparse exits 2 for a usage error
    grpc_code = "INVALID_ARGUMENT"



class BundleError(ApplianceError):
    """A model bundle is malformed, inconsistent or fails its golden vectors."""

    grpc_code = "FAILED_PRECONDITION"


class VerificationError(ApplianceError):
    """A signature, hash, length, expiry or version check failed: the artifact is refused."""

    exit_code = 3
    grpc_code = "FAILED_PRECONDITION"


class RegistryError(ApplianceError):
    """The local TUF registry cannot do what was asked (missing keys, bad passphrase, ...)."""


class UpdateError(ApplianceError):
    """An update could not be fetched, staged, installed or activated."""


class InferenceError(ApplianceError):
    """A request cannot be served as asked (bad tensor, unknown model, full queue)."""

    grpc_code = "INVALID_ARGUMENT"


class RequestError(InferenceError):
    """A request field the node cannot take; ``param`` names it (OpenAI's error ``param``)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class CapacityError(InferenceError):
    """The request is valid but the model has no room for it now (KV-cache budget, queue):
    the caller may retry later (gRPC ``RESOURCE_EXHAUSTED``, HTTP 429)."""

    grpc_code = "RESOURCE_EXHAUSTED"


class NotFoundError(ApplianceError):
    """Something named by the caller does not exist (model, target, file)."""

    exit_code = 4
    grpc_code = "NOT_FOUND"


class AccessDeniedError(ApplianceError):
    """The caller's role does not allow this call."""

    exit_code = 5
    grpc_code = "PERMISSION_DENIED"


class HealthError(ApplianceError):
    """Health sampling failed in a way that is not a reportable hardware state."""
