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

__all__ = ["IMAGE_METADATA", "OS_RELEASE", "Bundle", "GpuInfo", "Inventory", "collect_inventory",
           "node_id"]

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


def _image(image_metadata: Path, os_release: Path) -> tuple[str, str, str]:
    meta = _json(image_metadata)
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


def _gpu_stack(image_metadata: Path) -> dict[str, str]:
    meta = _json(image_metadata)
    gpu = meta.get("gpu") if isinstance(meta, dict) else None
    if not isinstance(gpu, dict):
        return {}
    return {k: str(gpu[k]) for k in GPU_STACK_FIELDS if k in gpu}


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
                      image_metadata: Path = IMAGE_METADATA,
                      os_release: Path = OS_RELEASE, cmdline: Path = KERNEL_CMDLINE,
                      sys_block: Path = SYS_BLOCK, cpuinfo: Path = CPUINFO) -> Inventory:
    """This node's inventory. Raises nothing: absent sources read as empty fields."""
    version, slot, firmware = _image(image_metadata, os_release)
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
        gpu_stack=_gpu_stack(image_metadata),
        onnxruntime_version=_onnxruntime_version(),
        root_hash=running_root_hash(cmdline),
        cpu_level_required=cpu_level,
        cpu_missing_features=cpu_missing,
    )
