"""One small exception family, grouped by who is at fault.

Code raises these with the fact that went wrong; only the CLI's ``main`` and the gRPC
servicers translate them (to exit codes and status codes).  Both the node and the
operator's tools share the family, so a message reads the same wherever it surfaces.
"""

from __future__ import annotations

__all__ = [
    "AccessDeniedError",
    "ApplianceError",
    "BundleError",
    "ConfigError",
    "FleetError",
    "HealthError",
    "ImageError",
    "InferenceError",
    "NotFoundError",
    "ProfileError",
    "RegistryError",
    "ToolError",
    "UpdateError",
    "VerificationError",
]


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


class ProfileError(ConfigError):
    """An image profile is malformed or refers to something that does not exist."""


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


class FleetError(ApplianceError):
    """A fleet-wide operation could not be planned or carried out."""


class ImageError(ApplianceError):
    """An image build stage failed or its output does not check out."""


class ToolError(ApplianceError):
    """An external tool (mmdebstrap, mksquashfs, qemu, ...) failed.

    The message names the tool, its exit code and the tail of its stderr.
    """

    def __init__(self, tool: str, returncode: int, stderr_tail: str) -> None:
        self.tool = tool
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        tail = stderr_tail.strip() or "(no output on stderr)"
        super().__init__(f"{tool} failed with exit code {returncode}:\n{tail}")
