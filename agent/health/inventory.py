"""What this node is and runs: identity, image, kernel, agent, bundles, registry, GPUs.

Everything here is read from files (state directory, image metadata) or from components
already running; nothing is sampled.  Missing sources read as empty fields, never errors,
so a development machine without an appliance image still answers ``GetInventory``.

Sources:
- node id: ``STATE/node-id`` (a random UUID written on first use, atomically).
- image: :data:`IMAGE_METADATA` (JSON written by the image builder: ``version``, ``slot``,
  ``firmware_manifest``); without it, ``IMAGE_VERSION`` of /etc/os-release, slot empty.
- root hash: ``roothash=`` on the kernel command line (:data:`KERNEL_CMDLINE`); slot: the GPT
  label (``root-a``/``root-b``) of the partition under the device-mapper device named ``root``
  (read from /sys, which the sandboxed agent can see without any device access).
- bundles: the inference component's ``installed()`` when it runs, else the model store's
  (:meth:`agent.inference.store.ModelStore.installed`, which owns that layout).
- CPU: the image's ``cpu_level`` (:data:`IMAGE_METADATA`, default x86-64-v2) and the flags of
  that level missing from /proc/cpuinfo (:mod:`agent.cpu`; x86-64 machines only).
- registry root version: ``signed.version`` of ``root.json`` in the trusted TUF metadata
  (:attr:`agent.state.StateLayout.tuf_metadata`).
- GPU stack: the ``gpu`` object of :data:`IMAGE_METADATA` (driver, CUDA and ONNX Runtime
  versions pinned by the firmware manifest; see provisioning/image/gpu_manifest.py); the ONNX Runtime
  actually installed from the package metadata (nothing imported).
- compliance: the ``compliance`` object of :data:`IMAGE_METADATA`, the build's audit summary
  (:class:`Compliance`).  The file is checked, not trusted: a summary that is not the
  builder's shape is logged (the file and the field) and reported as absent.
"""

from __future__ import annotations

import json
import logging
import platform
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from agent import __version__
from agent.cpu import CPUINFO, cpu_flags, image_level, missing_features
from agent.fsutil import atomic_write_text
from agent.inference.store import ModelStore
from agent.osrelease import active_slot, running_root_hash
from agent.state import StateLayout

__all__ = ["IMAGE_METADATA", "OS_RELEASE", "Bundle", "Compliance", "GpuInfo", "Inventory",
           "ProfileScore", "ServiceExposure", "collect_inventory", "compliance_from_json", "node_id"]

log = logging.getLogger(__name__)

IMAGE_METADATA = Path("/usr/lib/appliance/image.json")
OS_RELEASE = Path("/etc/os-release")
KERNEL_CMDLINE = Path("/proc/cmdline")
SYS_BLOCK = Path("/sys/block")


@dataclass(frozen=True)
class Bundle:
    name: str
    version: str
    sha256: str
    active: bool
    installed_at: float = 0.0
    rolled_back: bool = False  # active because of an explicit Rollback
    kind: str = "tensor"  # or a generative bundle's: "llm", "embedding"
    # A generative bundle's model, from its verified manifest (0 / "" for a tensor bundle).
    context_length: int = 0
    parameters: int = 0
    quantisation: str = ""


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    uuid: str
    driver_version: str
    cuda_driver_version: str


@dataclass(frozen=True)
class ProfileScore:
    """One audited profile's counts (``appliance audit``'s summary)."""

    profile: str
    pass_ratio: float  # pass / (pass + fail + waived + error + unknown), 0..1
    passed: int  # "pass" in image.json
    fail: int
    waived: int
    notapplicable: int
    other: int


@dataclass(frozen=True)
class ServiceExposure:
    unit: str
    exposure: float  # systemd-analyze security: 0.0 (locked down) .. 10.0 (fully exposed)


@dataclass(frozen=True)
class Compliance:
    """The image's compliance summary, as the image builder records it in image.json."""

    scope: str
    scanner: str
    profiles: tuple[ProfileScore, ...]
    lynis_hardening_index: int
    agent_exposure: float
    services: tuple[ServiceExposure, ...]


@dataclass(frozen=True)
class Inventory:
    node_id: str
    hostname: str
    image_version: str
    active_slot: str
    kernel: str
    agent_version: str
    bundles: tuple[Bundle, ...]
    registry_root_version: int
    firmware_manifest_id: str
    gpus: tuple[GpuInfo, ...]
    execution_providers: tuple[str, ...]
    gpu_stack: dict[str, str] = field(default_factory=dict)
    onnxruntime_version: str = ""
    root_hash: str = ""
    cpu_level_required: str = ""
    cpu_missing_features: tuple[str, ...] = ()
    compliance: Compliance | None = None


def node_id(state_dir: Path) -> str:
    """This node's stable id, created on first call; "" when the state dir is not writable."""
    path = StateLayout(state_dir).node_id
    try:
        text = path.read_text().strip()
        if text:
            return text
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("%s: %s", path, exc)
        return ""
    new = str(uuid.uuid4())
    try:
        atomic_write_text(path, new + "\n")
    except OSError as exc:
        log.warning("%s: cannot record the node id: %s", path, exc)
        return ""
    return new


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable: %s", path, exc)
        return None


def _os_release(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        key, sep, value = line.partition("=")
        if sep and key.strip() and not key.startswith("#"):
            out[key.strip()] = value.strip().strip("\"'")
    return out


def _image(meta: object, os_release: Path) -> tuple[str, str, str]:
    if isinstance(meta, dict):
        return (str(meta.get("version", "")), str(meta.get("slot", "")),
                str(meta.get("firmware_manifest", "")))
    return _os_release(os_release).get("IMAGE_VERSION", ""), "", ""


def _bundle(b: Mapping[str, Any]) -> Bundle:
    """A bundle from its listing (``ModelStore.describe``, which the repository extends)."""
    return Bundle(str(b["name"]), str(b["version"]), str(b.get("sha256", "")),
                  bool(b.get("active")), float(b.get("installed_at", 0) or 0),
                  bool(b.get("rolled_back")), str(b.get("kind", "tensor")),
                  int(b.get("context_length", 0)), int(b.get("parameters", 0)),
                  str(b.get("quantisation", "")))


def _bundles_from_store(state_dir: Path) -> list[Bundle]:
    store = ModelStore(state_dir)
    return [_bundle(store.describe(m)) for m in store.installed()]


def _bundles(state_dir: Path, inference: Any) -> list[Bundle]:
    installed = getattr(inference, "installed", None)
    if callable(installed):
        try:
            return [_bundle(b) for b in installed()]
        except Exception:  # the component's view failed: fall back to the files
            log.exception("inference component's installed() failed")
    return _bundles_from_store(state_dir)


def _root_version(state_dir: Path) -> int:
    root = _json(StateLayout(state_dir).tuf_metadata / "root.json")
    try:
        return int(root["signed"]["version"])
    except (TypeError, KeyError, ValueError):
        return 0


GPU_STACK_FIELDS = ("manifest_id", "driver_version", "cuda_version", "runtime_cuda_version",
                    "built_with_cuda", "onnxruntime_version", "cudnn_version", "compatibility",
                    "kernel_release", "genai_version")


def _gpu_stack(meta: object) -> dict[str, str]:
    gpu = meta.get("gpu") if isinstance(meta, dict) else None
    if not isinstance(gpu, dict):
        return {}
    return {k: str(gpu[k]) for k in GPU_STACK_FIELDS if k in gpu}


# Bounds of a summary the builder could have written; anything beyond them is not reported.
MAX_ITEMS = 1000  # profiles, services
MAX_TEXT = 1000  # characters of one string
_UINT32_MAX = 2**32 - 1  # ProfileScore's counts on the wire
_PROFILE_COUNTS = ("pass", "fail", "waived", "notapplicable", "other")


class _MalformedError(ValueError):
    """A ``compliance`` field that is not what the image builder writes (the message names it)."""


def _object(value: object, name: str, keys: tuple[str, ...]) -> dict[str, object]:
    """``value`` as an object with every one of ``keys`` (others are ignored: a newer builder
    may record more than this agent reports)."""
    if not isinstance(value, dict):
        raise _MalformedError(f"{name} is {value!r:.40}, not an object")
    for key in keys:
        if key not in value:
            raise _MalformedError(f"{name}.{key} is missing")
    return value


def _items(value: object, name: str) -> list[object]:
    if not isinstance(value, list):
        raise _MalformedError(f"{name} is {value!r:.40}, not a list")
    if len(value) > MAX_ITEMS:
        raise _MalformedError(f"{name} has {len(value)} entries (at most {MAX_ITEMS})")
    return value


def _text(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise _MalformedError(f"{name} is {value!r:.40}, not a string")
    if len(value) > MAX_TEXT:
        raise _MalformedError(f"{name} is {len(value)} characters long (at most {MAX_TEXT})")
    return value


def _count(value: object, name: str, high: int = _UINT32_MAX) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _MalformedError(f"{name} is {value!r:.40}, not an integer")
    if not 0 <= value <= high:
        raise _MalformedError(f"{name} is {value!r:.40}, not in 0..{high}")
    return value


def _number(value: object, name: str, high: float) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _MalformedError(f"{name} is {value!r:.40}, not a number")
    if not 0 <= value <= high:  # NaN and infinity (which json.loads accepts) fail this too
        raise _MalformedError(f"{name} is {value!r:.40}, not in 0..{high:g}")
    return float(value)


def _profile(value: object, name: str) -> ProfileScore:
    p = _object(value, name, ("profile", "pass_ratio", *_PROFILE_COUNTS))
    passed, fail, waived, notapplicable, other = (_count(p[k], f"{name}.{k}") for k in _PROFILE_COUNTS)
    return ProfileScore(_text(p["profile"], f"{name}.profile"),
                        _number(p["pass_ratio"], f"{name}.pass_ratio", 1.0),
                        passed, fail, waived, notapplicable, other)


def _service(value: object, name: str) -> ServiceExposure:
    s = _object(value, name, ("unit", "exposure"))
    return ServiceExposure(_text(s["unit"], f"{name}.unit"), _number(s["exposure"], f"{name}.exposure", 10.0))


def compliance_from_json(value: object) -> Compliance:
    """The ``compliance`` object of image.json, checked field by field.

    Raises:
        ValueError: it is not the image builder's shape; the message names the field
            (``compliance.profiles[1].pass_ratio``) and its value.
    """
    c = _object(value, "compliance", ("scope", "scanner", "profiles", "lynis_hardening_index",
                                      "agent_exposure", "services"))
    return Compliance(
        scope=_text(c["scope"], "compliance.scope"),
        scanner=_text(c["scanner"], "compliance.scanner"),
        profiles=tuple(_profile(p, f"compliance.profiles[{i}]")
                       for i, p in enumerate(_items(c["profiles"], "compliance.profiles"))),
        lynis_hardening_index=_count(c["lynis_hardening_index"], "compliance.lynis_hardening_index", 100),
        agent_exposure=_number(c["agent_exposure"], "compliance.agent_exposure", 10.0),
        services=tuple(_service(s, f"compliance.services[{i}]")
                       for i, s in enumerate(_items(c["services"], "compliance.services"))),
    )


def _compliance(meta: object, image_metadata: Path) -> Compliance | None:
    """The image's compliance summary; None when it recorded none or recorded it malformed."""
    if not isinstance(meta, dict) or "compliance" not in meta:
        return None
    try:
        return compliance_from_json(meta["compliance"])
    except ValueError as exc:
        log.warning("%s: compliance not reported: %s", image_metadata, exc)
        return None


def _onnxruntime_version() -> str:
    for dist in ("onnxruntime-gpu", "onnxruntime"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return ""


def _cpu(image_metadata: Path, cpuinfo: Path) -> tuple[str, tuple[str, ...]]:
    """The image's x86-64 level and the features of it this CPU lacks (none off x86-64)."""
    level = image_level(image_metadata)
    if platform.machine() not in ("x86_64", "AMD64"):
        return level, ()
    try:
        return level, missing_features(level, cpu_flags(cpuinfo))
    except OSError as exc:
        log.warning("%s: unreadable: %s", cpuinfo, exc)
        return level, ()


def collect_inventory(state_dir: Path, *, gpus: tuple[GpuInfo, ...] = (),
                      providers: tuple[str, ...] = (), inference: Any = None,
                      image_metadata: Path | None = None,
                      os_release: Path = OS_RELEASE, cmdline: Path = KERNEL_CMDLINE,
                      sys_block: Path = SYS_BLOCK, cpuinfo: Path = CPUINFO) -> Inventory:
    """This node's inventory (``image_metadata``: default :data:`IMAGE_METADATA`).

    Raises nothing: absent sources read as empty fields, a malformed one is logged.
    """
    image_metadata = image_metadata or IMAGE_METADATA
    meta = _json(image_metadata)
    version, slot, firmware = _image(meta, os_release)
    slot = slot or active_slot(sys_block)
    cpu_level, cpu_missing = _cpu(image_metadata, cpuinfo)
    return Inventory(
        node_id=node_id(state_dir),
        hostname=socket.gethostname(),
        image_version=version,
        active_slot=slot,
        kernel=platform.release(),
        agent_version=__version__,
        bundles=tuple(_bundles(state_dir, inference)),
        registry_root_version=_root_version(state_dir),
        firmware_manifest_id=firmware,
        gpus=gpus,
        execution_providers=providers,
        gpu_stack=_gpu_stack(meta),
        onnxruntime_version=_onnxruntime_version(),
        root_hash=running_root_hash(cmdline),
        cpu_level_required=cpu_level,
        cpu_missing_features=cpu_missing,
        compliance=_compliance(meta, image_metadata),
    )
