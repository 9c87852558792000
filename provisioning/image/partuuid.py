"""The partition UUIDs an image derives from its name, shared by the disk, the initrd and the
root's units (kept apart from provisioning.image.disk, which imports the configure stage)."""

from __future__ import annotations

import hashlib
import uuid

__all__ = ["data_uuid", "derived_uuid", "esp_uuid"]


def derived_uuid(*parts: str) -> str:
    """A UUID (version 4 bits set) from the sha256 of ``parts``; the same inputs give the same UUID."""
    digest = hashlib.sha256("\0".join(("sovereign-appliance", *parts)).encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


def esp_uuid(name: str) -> str:
    """The ESP's partition UUID: from the image name only, stable across versions."""
    return derived_uuid(name, "esp")


def data_uuid(name: str) -> str:
    """The data partition's UUID (and its ext4 UUID): from the image name only."""
    return derived_uuid(name, "data")
