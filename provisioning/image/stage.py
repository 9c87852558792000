"""What the seal and disk stages are given: a small frozen context.

The image pipeline (``appliance build``, :mod:`provisioning.image.pipeline`) makes one
:class:`StageContext` per stage from its build context (:func:`~provisioning.image.pipeline.stage_context`)
and passes it to :func:`provisioning.image.seal.seal` and then :func:`provisioning.image.disk.disk`.
Everything that can change the output bytes is a field here, so the pipeline can hash the
context (see :meth:`StageContext.cache_key`) to decide whether a stage must rerun.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from provisioning.errors import ImageError
from provisioning.tools import Completed
from provisioning.tools import run as tools_run

__all__ = ["DiskSizes", "RunFn", "StageContext", "check_paths", "version_from_epoch"]

# The signature of provisioning.tools.run; tests may pass a wrapper that injects faults.
RunFn = Callable[..., Completed]

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
# No '+' (it starts systemd-boot's try counter in a file name) and no '/'.
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._~^-]{0,62}$")


@dataclass(frozen=True)
class DiskSizes:
    """Partition sizes in MiB (the profile's ``[disk]`` section has the same names).

    The verity partitions are sized from ``root_mib`` (see :func:`provisioning.image.disk.verity_mib`).
    """

    esp_mib: int = 512
    root_mib: int = 2048
    data_mib: int = 1024
    data_label: str = "data"  # GPT label of the data partition

    def __post_init__(self) -> None:
        for name, minimum in (("esp_mib", 40), ("root_mib", 16), ("data_mib", 16)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < minimum:
                raise ImageError(f"disk layout: {name} = {value!r}: must be an integer >= {minimum}")


@dataclass(frozen=True)
class StageContext:
    """Inputs of the seal and disk stages.

    ``rootfs`` is the configured root filesystem directory (read, never modified);
    ``out`` receives the artifacts; ``work`` is scratch space (may be deleted afterwards).
    """

    rootfs: Path
    out: Path
    work: Path
    source_date_epoch: int
    version: str
    name: str = "appliance"
    sizes: DiskSizes = field(default_factory=DiskSizes)
    secure_boot_key: Path | None = None
    secure_boot_cert: Path | None = None
    # the site's RSA-2048 key that signs the UKI's PCR 11 policy (provisioning.image.pcrsign)
    pcr_key: Path | None = None
    # the data partition made at first boot as LUKS2, its key sealed to the node's TPM under
    # PCR 7 and the PCR 11 policy ``pcr_key`` signed (provisioning.image.seal); needs pcr_key
    seal_data: bool = False
    # the site's recovery public key (RSA PEM): the node escrows its data's recovery key to it
    recovery_key: Path | None = None
    extra_cmdline: tuple[str, ...] = ()
    boot_tries: int = 3
    keep_xattrs: bool = False
    sealed: Path | None = None  # where the disk stage finds the seal stage's outputs (default: out)
    cpu_level: str = ""  # the profile's [image] cpu_level, recorded in image-manifest.json
    # the profile's egress allowlist (provisioning.image.egress), recorded in image-manifest.json
    egress: tuple[dict[str, object], ...] | None = None
    run: RunFn = tools_run

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ImageError(f"image name {self.name!r}: use [a-z0-9._-], starting with a letter or digit")
        if not _VERSION.match(self.version):
            raise ImageError(f"image version {self.version!r}: use [A-Za-z0-9._~^-] (no '+' or '/')")
        if self.source_date_epoch < 0:
            raise ImageError(f"SOURCE_DATE_EPOCH = {self.source_date_epoch}: must be >= 0")
        if (self.secure_boot_key is None) != (self.secure_boot_cert is None):
            raise ImageError("Secure Boot signing needs both a key and a certificate "
                             f"(key={self.secure_boot_key}, cert={self.secure_boot_cert})")
        if self.seal_data and self.pcr_key is None:
            raise ImageError("a sealed data partition needs the site's PCR signing key ([tpm] pcr_key): "
                             "the TPM unseals it under the PCR 11 policy that key signs")
        if self.seal_data and self.recovery_key is None:
            raise ImageError("a sealed data partition needs the site's recovery public key ([tpm] "
                             "recovery_key): the node escrows its recovery key to it, or a node whose "
                             "TPM fails loses its data")
        if not 1 <= self.boot_tries <= 9:
            raise ImageError(f"boot_tries = {self.boot_tries}: must be 1..9")

    @property
    def signing(self) -> bool:
        """True when the UKI and boot loader are to be signed for Secure Boot."""
        return self.secure_boot_key is not None

    def cache_key(self, *extra: str | bytes) -> str:
        """A hash of every field that changes the stage outputs (not paths, not ``run``).

        The pipeline adds the hash of the input root filesystem itself as ``extra``.
        """
        doc: dict[str, Any] = {
            "source_date_epoch": self.source_date_epoch, "version": self.version, "name": self.name,
            "sizes": [self.sizes.esp_mib, self.sizes.root_mib, self.sizes.data_mib, self.sizes.data_label],
            "cmdline": list(self.extra_cmdline), "tries": self.boot_tries, "xattrs": self.keep_xattrs,
            "signing": [_file_hash(self.secure_boot_key), _file_hash(self.secure_boot_cert)],
            "pcr_key": _file_hash(self.pcr_key), "seal_data": self.seal_data,
            "recovery_key": _file_hash(self.recovery_key),
        }
        h = hashlib.sha256(json.dumps(doc, sort_keys=True).encode())
        for item in extra:
            h.update(item.encode() if isinstance(item, str) else item)
        return h.hexdigest()


def version_from_epoch(epoch: int) -> str:
    """An image version that sorts like its SOURCE_DATE_EPOCH (``YYYYMMDD.HHMMSS``, UTC)."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y%m%d.%H%M%S")


def _file_hash(path: Path | None) -> str | None:
    return None if path is None else hashlib.sha256(path.read_bytes()).hexdigest()


def check_paths(paths: Sequence[tuple[str, Path | None]]) -> None:
    """Raise ImageError naming the first of ``paths`` (label, path) that does not exist."""
    for label, path in paths:
        if path is not None and not path.exists():
            raise ImageError(f"{label}: {path} does not exist")
