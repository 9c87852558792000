"""The operator's side of the exception family (:mod:`agent.errors`): profiles, images, fleets, tools.

Only ``provisioning/`` raises these; ``appliance``'s ``main`` turns every
:class:`~agent.errors.ApplianceError` into an exit code and a one-line message.
"""

from __future__ import annotations

from agent.errors import ApplianceError, ConfigError

__all__ = ["AttestError", "FleetError", "ImageError", "ProfileError", "ToolError"]


class ProfileError(ConfigError):
    """An image profile is malformed or refers to something that does not exist."""


class AttestError(ApplianceError):
    """A node's TPM quote, its signature or its attestation key is malformed or does not check out."""


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
