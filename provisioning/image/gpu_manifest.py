"""GPU driver sets (the pure part): firmware manifests, compatibility rules, wheel tags.

A firmware manifest (``firmware-manifests/NAME.toml``) names one driver set: the Debian packages
of an NVIDIA driver (exact versions and sha256 from Debian's signed Packages indices), the
kernel series its module builds for, and the agent's ONNX Runtime GPU wheels with the CUDA
libraries they load (versions, file names and sha256).  :func:`load_manifest` parses it into
frozen dataclasses; :func:`check_compatibility` refuses a set that cannot work, naming the
versions.  Both are pure (no network, no mirror, no files but the manifest): ``load_profile``
runs them.  What needs the mirror or the image's root (the pinned files are the ones synced,
the kernel the mirror holds, the staging into the root, the modules DKMS built) is the GPU
stage, :mod:`provisioning.image.gpu_stage`; the GPU's files and units in the image are part
of the configure plan (:func:`provisioning.image.plan.configure_plan`).

The rules (README.md, "GPU layer"), after NVIDIA's CUDA Compatibility guide
(docs.nvidia.com/deploy/cuda-compatibility, "Minor Version Compatibility", table 1):

* The driver supports CUDA up to ``driver.cuda`` (for a known branch it must equal
  :data:`CUDA_BY_BRANCH`: 550 -> 12.4).
* A CUDA component of major version M on a driver whose CUDA version is D.d:
  M < D: runs (binary backward compatibility; newer drivers run older CUDA).
  M > D: refused (e.g. an onnxruntime-gpu built for CUDA 13 on a 550 driver).
  M = D, minor <= d: runs natively.
  M = D, minor > d: "minor version compatibility": only with a driver at or above the family's
  minimum (:data:`MVC_MIN_DRIVER`: 12.x needs >= 525.60.13), and with a limited feature set:
  PTX produced by a newer toolchain cannot be JIT-compiled by the older driver, and APIs newer
  than the driver fail at run time.  This layer therefore refuses it unless the manifest opts in
  (``runtime.minor_version_compatibility = true``), and refuses runtime compilers (NVRTC,
  nvJitLink) newer than the driver even then, since their output is exactly such PTX.
* The components checked are the CUDA runtime wheel (``nvidia-cuda-runtime-cuM``) and the CUDA
  version onnxruntime-gpu was built with (its kernels are compiled by that toolkit); every
  ``nvidia-*-cuM`` wheel has the same M as ONNX Runtime's build (ORT: "built with CUDA 12.x is
  compatible with any CUDA 12.x"), cuDNN's major is the one ORT was built against.
* The kernel's release series lies within ``kernel.min``..``kernel.max`` (the module source's
  supported range); the module is built by DKMS for the image's kernel, never the build host's.
* Every wheel has a tag triple the image's CPython, glibc and machine accept.
* The LLM runtime, ``onnxruntime-genai-cuda``, is pinned too, at a release whose recorded facts
  (:data:`GENAI_FACTS`) fit the set: it accepts the pinned onnxruntime-gpu (its Requires-Dist
  floor), and the CUDA major its own kernels link is the one ONNX Runtime was built with.  So
  the chain genai -> onnxruntime -> CUDA -> driver is checked link by link: e.g. genai 0.18.0
  needs onnxruntime-gpu >= 1.31.0, which is built with CUDA 13.0, which needs a 580-series
  driver; on Debian 13's 550 driver (CUDA 12.4) the newest set that runs natively is
  onnxruntime-gpu 1.23.2 (CUDA 12.2) with genai 0.11.x (1.24 to 1.26 are built with CUDA 12.8,
  which would rest on minor version compatibility).
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import ConfigError
from agent.settings import from_table, setting, to_json
from provisioning.errors import ProfileError

if TYPE_CHECKING:
    from provisioning.image.profile import Profile

__all__ = [
    "CUDA_BY_BRANCH",
    "GENAI_FACTS",
    "GENAI_WHEEL",
    "MODULE_PACKAGES",
    "MVC_MIN_DRIVER",
    "ORT_GPU_BUILT_WITH",
    "Compatibility",
    "DebPin",
    "DriverSection",
    "GpuManifest",
    "KernelSection",
    "ManifestSection",
    "RuntimeSection",
    "WheelPin",
    "check_compatibility",
    "deb_closure_names",
    "genai_onnxruntime_floor",
    "gpu_packages",
    "gpu_stack",
    "headers_package",
    "image_record",
    "load_manifest",
    "normalise_name",
    "ort_built_with_cuda",
    "wheel_fits",
    "wheel_requirements",
]

# Driver branch -> the highest CUDA version it supports (CUDA Toolkit release notes, table 3).
CUDA_BY_BRANCH: dict[int, tuple[int, int]] = {
    450: (11, 0), 455: (11, 1), 460: (11, 2), 465: (11, 3), 470: (11, 4), 495: (11, 5),
    510: (11, 6), 515: (11, 7), 520: (11, 8), 525: (12, 0), 530: (12, 1), 535: (12, 2),
    545: (12, 3), 550: (12, 4), 555: (12, 5), 560: (12, 6), 565: (12, 7), 570: (12, 8),
    575: (12, 9), 580: (13, 0),
}
# CUDA major -> minimum driver for minor version compatibility within that major
# (CUDA Compatibility guide, "Minor Version Compatibility", table 1 and its note on 11.x).
MVC_MIN_DRIVER: dict[int, str] = {11: "450.80.02", 12: "525.60.13", 13: "580"}

# The LLM runtime's GPU build, pinned in every driver set next to onnxruntime-gpu.
GENAI_WHEEL = "onnxruntime-genai-cuda"
# onnxruntime-genai-cuda release -> (the oldest onnxruntime-gpu it accepts, the CUDA major its
# kernels link).  Read 2026-11-30 from PyPI's cp313 manylinux_2_28 x86_64 wheel of each release:
# the first is its METADATA's `Requires-Dist: onnxruntime-gpu>=X` (pip install --dry-run
# --no-deps --report), the second the libcudart.so.M that onnxruntime_genai/
# libonnxruntime-genai-cuda.so names as DT_NEEDED.  A release not listed is refused until
# both facts are read from its wheel and added here.
GENAI_FACTS: dict[str, tuple[str, int]] = {
    "0.11.2": ("1.23.2", 12), "0.11.3": ("1.23.2", 12), "0.11.4": ("1.23.2", 12),
    "0.12.0": ("1.24.1", 12), "0.12.1": ("1.24.1", 12), "0.12.2": ("1.24.1", 12),
    "0.13.0": ("1.24.4", 12), "0.13.1": ("1.24.4", 12), "0.13.2": ("1.25.1", 12),
    "0.14.0": ("1.26.0", 12), "0.14.1": ("1.26.0", 12),
    "0.15.0": ("1.28.0", 13), "0.15.1": ("1.28.0", 13), "0.15.2": ("1.28.0", 13),
    "0.16.0": ("1.30.0", 13), "0.17.0": ("1.30.0", 13), "0.17.1": ("1.30.0", 13),
    "0.18.0": ("1.31.0", 13),
}
# onnxruntime-gpu release -> the CUDA version it was built with: `cuda_version` in the wheel's
# onnxruntime/capi/build_and_package_info.py (PyPI cp313 manylinux x86_64 wheels, read
# 2026-11-30).  Their `cuda` extras agree: nvidia-*-cu12 up to 1.26.0, CUDA 13 wheels from 1.27.0.
# A manifest's [runtime] built_with_cuda for a listed release must say the same; for another
# release mirror sync reads it from the wheel (gpu_stage.check_wheel_files).
ORT_GPU_BUILT_WITH: dict[str, str] = {
    "1.23.2": "12.2", "1.24.1": "12.8", "1.24.4": "12.8", "1.25.0": "12.8", "1.25.1": "12.8",
    "1.26.0": "12.8", "1.27.0": "13.0", "1.28.0": "13.0", "1.30.0": "13.0",
    "1.31.0": "13.0", "1.31.1": "13.0",
}
# manifest driver.module -> the Debian package that carries the DKMS source.
MODULE_PACKAGES = {"proprietary": "nvidia-kernel-dkms", "open": "nvidia-open-kernel-dkms"}
# Packages a driver set must pin (besides the module package): the user-space driver, NVML,
# the persistence daemon and the GSP firmware of the same driver version.
REQUIRED_DEBS = ("libcuda1", "libnvidia-ml1", "nvidia-persistenced", "firmware-nvidia-gsp")
_JIT_WHEELS = ("nvidia-cuda-nvrtc", "nvidia-nvjitlink")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DEB_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_WHEEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_CUDA = re.compile(r"^\d+\.\d+$")
_SERIES = re.compile(r"^\d+\.\d+$")
_CU_SUFFIX = re.compile(r"^nvidia-(.+)-cu(\d+)$")


def _nonempty(v: str) -> str | None:
    return None if v else "missing"


def _cuda(v: str) -> str | None:
    return None if _CUDA.match(v) else "not a CUDA version MAJOR.MINOR"


def _series(v: str) -> str | None:
    return None if _SERIES.match(v) else "not a kernel series MAJOR.MINOR"


def _sha(v: str) -> str | None:
    return None if _SHA256.match(v) else "not a lowercase hex sha256"


@dataclass(frozen=True)
class ManifestSection:
    id: str = setting("", "identifier of this driver set (recorded in the image)", check=_nonempty)
    description: str = setting("", "what this set is")
    suite: str = setting("", "Debian suite the packages come from", check=_nonempty)
    architecture: str = setting("amd64", "Debian architecture")
    components: tuple[str, ...] = setting(("main", "contrib", "non-free", "non-free-firmware"),
                                          "archive components the packages need")


@dataclass(frozen=True)
class DriverSection:
    version: str = setting("", "NVIDIA driver version, e.g. 550.163.01",
                           check=lambda v: None if re.match(r"^\d+\.\d+(\.\d+)?$", v)
                           else "not a driver version such as 550.163.01")
    cuda: str = setting("", "highest CUDA version the driver supports", check=_cuda)
    module: str = setting("proprietary", "kernel module flavour: proprietary or open",
                          check=lambda v: None if v in MODULE_PACKAGES
                          else "must be one of proprietary, open")
    dkms_module: str = setting("nvidia-current", "DKMS module name (dkms status)", check=_nonempty)


@dataclass(frozen=True)
class KernelSection:
    min: str = setting("", "oldest kernel series the module builds for (inclusive)", check=_series)
    max: str = setting("", "newest kernel series the module builds for (inclusive)", check=_series)


@dataclass(frozen=True)
class RuntimeSection:
    onnxruntime: str = setting("onnxruntime-gpu", "ONNX Runtime distribution",
                               check=lambda v: None if v == "onnxruntime-gpu"
                               else "must be onnxruntime-gpu")
    onnxruntime_version: str = setting("", "its version", check=_nonempty)
    built_with_cuda: str = setting("", "CUDA version ONNX Runtime was built with", check=_cuda)
    cudnn_major: int = setting(9, "cuDNN major version ONNX Runtime was built with")
    python: str = setting("", "CPython version the wheels are for", check=_nonempty)
    minor_version_compatibility: bool = setting(
        False, "allow CUDA libraries newer than the driver's CUDA (same major; limited features)")


@dataclass(frozen=True)
class DebPin:
    name: str = setting("", "Debian package name", check=lambda v: None if _DEB_NAME.match(v)
                        else "not a Debian package name")
    version: str = setting("", "exact Debian version", check=_nonempty)
    sha256: str = setting("", "sha256 of the .deb (Debian's Packages index)", check=_sha)


@dataclass(frozen=True)
class WheelPin:
    name: str = setting("", "distribution name", check=lambda v: None if _WHEEL_NAME.match(v)
                        else "not a distribution name")
    version: str = setting("", "exact version", check=_nonempty)
    filename: str = setting("", "the wheel's file name (its tags)",
                            check=lambda v: None if v.endswith(".whl") and v.count("-") >= 4
                            else "not a wheel file name")
    sha256: str = setting("", "sha256 of the wheel", check=_sha)

    @property
    def key(self) -> str:
        return normalise_name(self.name)


@dataclass(frozen=True)
class GpuManifest:
    path: Path
    manifest: ManifestSection
    driver: DriverSection
    kernel: KernelSection
    runtime: RuntimeSection
    debs: tuple[DebPin, ...]
    wheels: tuple[WheelPin, ...]

    @property
    def module_package(self) -> str:
        return MODULE_PACKAGES[self.driver.module]

    @property
    def branch(self) -> int:
        return int(self.driver.version.split(".")[0])

    def wheel(self, name: str) -> WheelPin | None:
        key = normalise_name(name)
        return next((w for w in self.wheels if w.key == key), None)

    def deb(self, name: str) -> DebPin | None:
        return next((d for d in self.debs if d.name == name), None)

    def to_json(self) -> dict[str, Any]:
        """What the image records about its driver set (inventory reads it)."""
        return {
            "path": self.path.name,
            "manifest": to_json(self.manifest), "driver": to_json(self.driver),
            "kernel": to_json(self.kernel), "runtime": to_json(self.runtime),
            "debs": [to_json(d) for d in self.debs], "wheels": [to_json(w) for w in self.wheels],
        }


@dataclass(frozen=True)
class Compatibility:
    """Why a set fits: the versions compared and the compatibility each comparison relies on."""

    driver: str
    driver_cuda: str
    runtime_cuda: str
    built_with_cuda: str
    basis: str  # native | backward compatibility | minor version compatibility
    kernel: str = ""
    python: str = ""
    notes: tuple[str, ...] = field(default=())
    genai: str = ""  # the onnxruntime-genai-cuda release checked against the set

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


# ------------------------------------------------------------------ parsing


def normalise_name(name: str) -> str:
    """A distribution name as PEP 503 compares it (lower case, runs of ``-_.`` as one ``-``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _vtuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text))


def _upstream(debian_version: str) -> str:
    """Debian version -> upstream part ("1:550.163.01-2" -> "550.163.01")."""
    v = debian_version.split(":", 1)[-1]
    return v.rsplit("-", 1)[0] if "-" in v else v


def load_manifest(path: Path) -> GpuManifest:
    """Read and check a firmware manifest on its own (no profile, no mirror).

    Raises:
        ProfileError: the file is missing or not TOML; an unknown table or key; a wrong type or
            bad value; a required package or wheel is missing; a pin contradicts the driver
            version.  Messages name the file, the key and the value.
    """
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileError(f"{path}: no such firmware manifest") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ProfileError(f"{path}: not valid TOML: {exc}") from None
    tables: dict[str, type[Any]] = {"manifest": ManifestSection, "driver": DriverSection,
                                    "kernel": KernelSection, "runtime": RuntimeSection}
    unknown = sorted(set(data) - {*tables, "debs", "wheels"})
    if unknown:
        raise ProfileError(f"{path}: unknown table [{unknown[0]}] "
                           f"(known: {', '.join([*tables, 'debs', 'wheels'])})")
    try:
        sections: dict[str, Any] = {n: from_table(c, data.get(n, {}), f"{path}: [{n}]")
                                    for n, c in tables.items()}
        for name, section in sections.items():
            _complete(section, f"{path}: [{name}]")
        debs = _pins(path, data.get("debs", []), "debs", DebPin)
        wheels = _pins(path, data.get("wheels", []), "wheels", WheelPin)
    except ProfileError:
        raise
    except ConfigError as exc:
        raise ProfileError(str(exc)) from None
    manifest = GpuManifest(path, sections["manifest"], sections["driver"], sections["kernel"],
                           sections["runtime"], debs, wheels)
    _check_pins(manifest)
    return manifest


def _complete(section: Any, origin: str) -> None:
    """Run each field's check on its value, defaults included (a required key left out)."""
    for f in dataclasses.fields(section):
        check = f.metadata.get("check")
        value = getattr(section, f.name)
        if check is not None and (problem := check(value)):
            raise ProfileError(f"{origin} {f.name} = {value!r}: {problem}")


def _pins(path: Path, raw: Any, key: str, cls: type[Any]) -> tuple[Any, ...]:
    if not isinstance(raw, list):
        raise ProfileError(f"{path}: [[{key}]] = {raw!r}: expected an array of tables")
    pins = []
    for i, table in enumerate(raw):
        where = f"{path}: [[{key}]][{i}]"
        pin = from_table(cls, table, where)
        _complete(pin, where)
        pins.append(pin)
    names = [normalise_name(p.name) for p in pins]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ProfileError(f"{path}: [[{key}]] name = {dup!r}: listed twice")
    return tuple(pins)


def _check_pins(m: GpuManifest) -> None:
    """The manifest agrees with itself: required pins present, driver packages of one version."""
    where = str(m.path)
    for name in (m.module_package, *REQUIRED_DEBS):
        if m.deb(name) is None:
            raise ProfileError(f"{where}: [[debs]]: no pin for {name!r} (a driver set needs "
                               f"{', '.join((m.module_package, *REQUIRED_DEBS))})")
    for name in (m.module_package, "libcuda1", "libnvidia-ml1", "firmware-nvidia-gsp"):
        pin = m.deb(name)
        assert pin is not None
        if _upstream(pin.version) != m.driver.version:
            raise ProfileError(f"{where}: [[debs]] {name} version = {pin.version!r}: not the "
                               f"driver version {m.driver.version} ([driver] version)")
    ort = m.wheel(m.runtime.onnxruntime)
    if ort is None:
        raise ProfileError(f"{where}: [[wheels]]: no pin for {m.runtime.onnxruntime!r}")
    if ort.version != m.runtime.onnxruntime_version:
        raise ProfileError(f"{where}: [[wheels]] {ort.name} version = {ort.version!r}: "
                           f"[runtime] onnxruntime_version is {m.runtime.onnxruntime_version!r}")
    for w in m.wheels:
        parsed = _parse_wheel_filename(w.filename)
        if parsed is None or normalise_name(parsed[0]) != w.key or parsed[1] != w.version:
            raise ProfileError(f"{where}: [[wheels]] {w.name} filename = {w.filename!r}: not a "
                               f"wheel of {w.name} {w.version}")
    if m.wheel(GENAI_WHEEL) is None:
        raise ProfileError(f"{where}: [[wheels]]: no pin for {GENAI_WHEEL!r} (the agent's LLM "
                           "runtime, a build matched to the pinned onnxruntime-gpu)")
    if not any(_CU_SUFFIX.match(w.key) and w.key.startswith("nvidia-cuda-runtime-")
               for w in m.wheels):
        raise ProfileError(f"{where}: [[wheels]]: no nvidia-cuda-runtime-cuNN pin (the CUDA "
                           "runtime ONNX Runtime's CUDA provider loads)")


# ------------------------------------------------------------------ wheel tags


def _parse_wheel_filename(filename: str) -> tuple[str, str, list[tuple[str, str, str]]] | None:
    """PEP 427 file name -> (name, version, [(python, abi, platform), ...])."""
    if not filename.endswith(".whl"):
        return None
    parts = filename[:-4].split("-")
    if len(parts) not in (5, 6):
        return None
    name, version = parts[0], parts[1]
    pys, abis, plats = (p.split(".") for p in parts[-3:])
    return name, version, [(p, a, pl) for p in pys for a in abis for pl in plats]


def _glibc_of(platform: str, machine: str) -> tuple[int, int] | None:
    """The glibc a manylinux platform tag needs on ``machine`` (None: not for this machine)."""
    legacy = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
    for prefix, glibc in legacy.items():
        if platform == f"{prefix}_{machine}":
            return glibc
    m = re.match(rf"^manylinux_(\d+)_(\d+)_{re.escape(machine)}$", platform)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _tag_fits(tag: tuple[str, str, str], python: tuple[int, int], glibc: tuple[int, int],
              machine: str) -> bool:
    py, abi, plat = tag
    cp = f"cp{python[0]}{python[1]}"
    if plat != "any":
        need = _glibc_of(plat, machine)
        if need is None or need > glibc:
            return False
    if abi == "none":
        return py in (f"py{python[0]}", f"py{python[0]}{python[1]}", cp)
    if abi == "abi3":
        m = re.match(r"^cp(\d)(\d+)$", py)
        if m is None:
            return False
        built_for = (int(m.group(1)), int(m.group(2)))
        return built_for[0] == python[0] and built_for <= python
    return abi == cp and py == cp


def wheel_fits(filename: str, python: str, glibc: str, machine: str) -> bool:
    """Whether CPython ``python`` on glibc ``glibc`` and ``machine`` can install this wheel."""
    parsed = _parse_wheel_filename(filename)
    if parsed is None:
        return False
    py_v = _vtuple(python)[:2]
    gl_v = _vtuple(glibc)[:2]
    return any(_tag_fits(t, (py_v[0], py_v[1]), (gl_v[0], gl_v[1]), machine) for t in parsed[2])


# ------------------------------------------------------------------ compatibility


def _cuda_basis(component: str, version: tuple[int, int], m: GpuManifest) -> str:
    """How ``component`` at CUDA ``version`` runs on the driver; raises if it does not."""
    driver_cuda = (_vtuple(m.driver.cuda)[0], _vtuple(m.driver.cuda)[1])
    shown = f"{version[0]}.{version[1]}"
    head = (f"{m.path}: {component} needs CUDA {shown}, but driver {m.driver.version} supports "
            f"CUDA up to {m.driver.cuda}")
    if version[0] < driver_cuda[0]:
        return "backward compatibility"
    if version[0] > driver_cuda[0]:
        raise ProfileError(f"{head}: a newer CUDA major version never runs on an older driver "
                           f"(a CUDA {version[0]} component needs a driver of the CUDA "
                           f"{version[0]} family{_branch_floor(version[0])})")
    if version[1] <= driver_cuda[1]:
        return "native"
    floor = MVC_MIN_DRIVER.get(version[0])
    if floor is None or _vtuple(m.driver.version) < _vtuple(floor):
        raise ProfileError(f"{head}: CUDA {version[0]}.x minor version compatibility needs "
                           f"driver >= {floor or 'a known minimum'}")
    if not m.runtime.minor_version_compatibility:
        raise ProfileError(f"{head}: this relies on CUDA minor version compatibility (limited "
                           "feature set; no PTX JIT from the newer toolchain); pin CUDA "
                           f"{m.driver.cuda} libraries, or set [runtime] "
                           "minor_version_compatibility = true to accept the limits")
    return "minor version compatibility"


def _branch_floor(cuda_major: int) -> str:
    """", the NNN-series or newer": the oldest driver branch of a CUDA major ('' if unknown)."""
    branches = [b for b, cuda in CUDA_BY_BRANCH.items() if cuda[0] == cuda_major]
    return f", the {min(branches)}-series or newer" if branches else ""


def _native_branch(cuda: str) -> int | None:
    """The oldest driver branch that supports CUDA ``cuda`` natively (None if unknown)."""
    v = _vtuple(cuda)[:2]
    branches = [b for b, supported in CUDA_BY_BRANCH.items() if supported >= (v[0], v[1])]
    return min(branches) if branches else None


def _check_ort_build(m: GpuManifest) -> None:
    """[runtime] built_with_cuda agrees with what the pinned onnxruntime-gpu release is known
    to be built with (:data:`ORT_GPU_BUILT_WITH`)."""
    known = ORT_GPU_BUILT_WITH.get(m.runtime.onnxruntime_version)
    if known is not None and known != m.runtime.built_with_cuda:
        raise ProfileError(f"{m.path}: [runtime] built_with_cuda = {m.runtime.built_with_cuda!r}: "
                           f"{m.runtime.onnxruntime} {m.runtime.onnxruntime_version} is built with "
                           f"CUDA {known} (its build_and_package_info.py)")


def _check_genai(m: GpuManifest) -> str:
    """The pinned onnxruntime-genai-cuda fits the pinned onnxruntime-gpu and its CUDA major;
    returns its version.  The driver side of the chain is the onnxruntime/CUDA checks, which
    run first."""
    genai = m.wheel(GENAI_WHEEL)
    assert genai is not None  # load_manifest requires the pin
    head = f"{m.path}: [[wheels]] {genai.name} version = {genai.version!r}"
    facts = GENAI_FACTS.get(genai.version)
    if facts is None:
        raise ProfileError(f"{head}: no recorded onnxruntime and CUDA requirements for this "
                           f"release (known: {', '.join(GENAI_FACTS)}); read its wheel's "
                           "Requires-Dist and the libcudart its CUDA library links, and add "
                           "them to gpu_manifest.GENAI_FACTS")
    min_ort, cuda_major = facts
    ort = m.runtime.onnxruntime_version
    if _vtuple(ort) < _vtuple(min_ort):
        chain = ""
        built = ORT_GPU_BUILT_WITH.get(min_ort)
        branch = _native_branch(built) if built else None
        if built and branch:
            chain = (f"; {m.runtime.onnxruntime} {min_ort} is built with CUDA {built}, which needs "
                     f"a {branch}-series driver or newer to run natively")
        raise ProfileError(f"{head}: requires {m.runtime.onnxruntime} >= {min_ort}, but [runtime] "
                           f"onnxruntime_version = {ort!r}{chain}")
    built_major = _vtuple(m.runtime.built_with_cuda)[0]
    if cuda_major != built_major:
        raise ProfileError(f"{head}: its CUDA kernels link CUDA {cuda_major} (libcudart.so."
                           f"{cuda_major}), but [runtime] built_with_cuda = "
                           f"{m.runtime.built_with_cuda!r}: {m.runtime.onnxruntime} {ort} uses CUDA "
                           f"{built_major} (one CUDA major per process)")
    return genai.version


def _wheel_cuda(w: WheelPin) -> tuple[int, int]:
    v = _vtuple(w.version)
    return (v[0], v[1]) if len(v) >= 2 else (v[0], 0)


def check_compatibility(m: GpuManifest, *, suite: str, architecture: str, machine: str,
                        python: str, glibc: str, kernel_release: str = "") -> Compatibility:
    """Refuse a driver set that cannot work on this image; say why a good one fits.

    ``kernel_release`` (e.g. ``6.12.117+deb13-amd64`` or a Debian kernel version) is checked
    against the module's kernel range when known (a versioned kernel package, or the mirror's).

    Raises:
        ProfileError: the reason and the versions (onnxruntime-genai-cuda against
            onnxruntime-gpu and its CUDA major, onnxruntime-gpu's recorded CUDA build, CUDA
            major/minor against the driver, cuDNN, kernel series, Python and platform tags,
            suite or architecture).
    """
    where = str(m.path)
    if (m.manifest.suite, m.manifest.architecture) != (suite, architecture):
        raise ProfileError(f"{where}: [manifest] suite = {m.manifest.suite!r}, architecture = "
                           f"{m.manifest.architecture!r}: the image is {suite}/{architecture}")
    known = CUDA_BY_BRANCH.get(m.branch)
    if known is not None and _vtuple(m.driver.cuda)[:2] != known:
        raise ProfileError(f"{where}: [driver] cuda = {m.driver.cuda!r}: driver branch "
                           f"{m.branch} supports CUDA {known[0]}.{known[1]}")
    runtime = next(w for w in m.wheels if w.key.startswith("nvidia-cuda-runtime-"))
    built = _vtuple(m.runtime.built_with_cuda)
    built_v = (built[0], built[1])
    for w in m.wheels:
        cu = _CU_SUFFIX.match(w.key)
        if cu and int(cu.group(2)) != built_v[0]:
            raise ProfileError(f"{where}: [[wheels]] {w.name} {w.version}: a CUDA {cu.group(2)} "
                               f"library, but {m.runtime.onnxruntime} {m.runtime.onnxruntime_version}"
                               f" was built with CUDA {m.runtime.built_with_cuda}")
    runtime_v = _wheel_cuda(runtime)
    if runtime_v[0] != built_v[0]:
        raise ProfileError(f"{where}: [[wheels]] {runtime.name} {runtime.version}: CUDA runtime "
                           f"{runtime_v[0]}.{runtime_v[1]}, but {m.runtime.onnxruntime} was built "
                           f"with CUDA {m.runtime.built_with_cuda}")
    bases = [_cuda_basis(f"{m.runtime.onnxruntime} {m.runtime.onnxruntime_version} (built with "
                         f"CUDA {m.runtime.built_with_cuda})", built_v, m),
             _cuda_basis(f"{runtime.name} {runtime.version}", runtime_v, m)]
    driver_cuda = _vtuple(m.driver.cuda)[:2]
    for w in m.wheels:
        if any(w.key.startswith(j + "-") for j in _JIT_WHEELS) and _wheel_cuda(w) > driver_cuda:
            raise ProfileError(f"{where}: [[wheels]] {w.name} {w.version}: a runtime compiler "
                               f"newer than the driver's CUDA {m.driver.cuda} emits PTX the "
                               "driver cannot load; pin it at the driver's CUDA version")
    cudnn = next((w for w in m.wheels if w.key.startswith("nvidia-cudnn-")), None)
    if cudnn is not None and _vtuple(cudnn.version)[0] != m.runtime.cudnn_major:
        raise ProfileError(f"{where}: [[wheels]] {cudnn.name} {cudnn.version}: cuDNN "
                           f"{_vtuple(cudnn.version)[0]}, but {m.runtime.onnxruntime} was built "
                           f"with cuDNN {m.runtime.cudnn_major} (different majors do not mix)")
    if m.runtime.python != python:
        raise ProfileError(f"{where}: [runtime] python = {m.runtime.python!r}: the image's "
                           f"Python is {python}")
    for w in m.wheels:
        if not wheel_fits(w.filename, python, glibc, machine):
            raise ProfileError(f"{where}: [[wheels]] {w.name} filename = {w.filename!r}: no tag "
                               f"for CPython {python}, glibc {glibc}, {machine}")
    # The recorded facts of the pinned builds, once the CUDA side fits the driver (so a set
    # that cannot run on it is refused for that, the more basic reason).
    _check_ort_build(m)
    genai = _check_genai(m)
    if kernel_release:
        _check_kernel(m, kernel_release)
    order = ["minor version compatibility", "native", "backward compatibility"]
    basis = next(b for b in order if b in bases)
    return Compatibility(m.driver.version, m.driver.cuda,
                         f"{runtime_v[0]}.{runtime_v[1]}", m.runtime.built_with_cuda, basis,
                         kernel_release, python, genai=genai)


def _check_kernel(m: GpuManifest, kernel_release: str) -> None:
    series = _vtuple(kernel_release)[:2]
    low, high = _vtuple(m.kernel.min)[:2], _vtuple(m.kernel.max)[:2]
    if not low <= series <= high:
        raise ProfileError(f"{m.path}: kernel {kernel_release} (series "
                           f"{'.'.join(map(str, series))}) is outside the range the "
                           f"{m.module_package} {m.driver.version} module builds for "
                           f"([kernel] min = {m.kernel.min!r}, max = {m.kernel.max!r})")


# ------------------------------------------------------------------ what the profile adds


def headers_package(kernel_package: str) -> str:
    """The kernel headers package that matches ``kernel_package`` (DKMS builds against it)."""
    return "linux-headers-" + kernel_package.removeprefix("linux-image-")


def gpu_packages(profile: Profile) -> tuple[str, ...]:
    """The Debian packages a GPU profile adds: the manifest's pins and the kernel's headers."""
    m = profile.gpu_set
    if m is None:
        return ()
    return tuple(sorted({*(d.name for d in m.debs), headers_package(profile.kernel_package)}))


def wheel_requirements(m: GpuManifest) -> list[str]:
    """pip requirements that fetch exactly the pinned wheels (checked by :func:`check_wheel_files`)."""
    return [f"{w.name}=={w.version}" for w in m.wheels]


def ort_built_with_cuda(wheel: Path) -> str:
    """The CUDA version an onnxruntime-gpu wheel says it was built with ('' if it does not say)."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            text = zf.read("onnxruntime/capi/build_and_package_info.py").decode()
        except KeyError:
            return ""
    found = re.search(r"^cuda_version\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
    return found.group(1) if found else ""


def genai_onnxruntime_floor(wheel: Path) -> str:
    """X in an onnxruntime-genai wheel's ``Requires-Dist: onnxruntime-gpu>=X`` ('' if none)."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next((n for n in zf.namelist() if n.endswith(".dist-info/METADATA")), None)
        text = zf.read(meta).decode() if meta else ""
    found = re.search(r"^Requires-Dist:\s*onnxruntime(?:-gpu)?\s*\(?\s*>=\s*([0-9][0-9.]*)", text,
                      re.M | re.I)
    return found.group(1) if found else ""


def image_record(m: GpuManifest, compat: Compatibility | None = None) -> dict[str, Any]:
    """The driver set as baked into the image (``/usr/lib/appliance/gpu.json``)."""
    record: dict[str, Any] = {"id": m.manifest.id, **m.to_json()}
    if compat is not None:
        record["compatibility"] = compat.to_json()
    return record


def gpu_stack(m: GpuManifest, record: dict[str, Any], kernel_release: str) -> dict[str, str]:
    """The flat summary the agent's inventory reports (appliance.v1.GpuStack's fields)."""
    runtime = next((w for w in m.wheels if w.key.startswith("nvidia-cuda-runtime-")), None)
    cudnn = next((w for w in m.wheels if w.key.startswith("nvidia-cudnn-")), None)
    genai = m.wheel(GENAI_WHEEL)
    compat = record.get("compatibility", {})
    return {"manifest_id": m.manifest.id, "driver_version": m.driver.version,
            "cuda_version": m.driver.cuda,
            "runtime_cuda_version": ".".join(runtime.version.split(".")[:2]) if runtime else "",
            "built_with_cuda": m.runtime.built_with_cuda,
            "onnxruntime_version": m.runtime.onnxruntime_version,
            "cudnn_version": cudnn.version if cudnn else "",
            "compatibility": str(compat.get("basis", "")), "kernel_release": kernel_release,
            "genai_version": genai.version if genai else ""}


def deb_closure_names(status: str) -> set[str]:
    """Installed package names from a dpkg status file's text."""
    names = set()
    for stanza in status.split("\n\n"):
        fields: Mapping[str, str] = dict(re.findall(r"^([A-Za-z-]+): (.*)$", stanza, re.M))
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            names.add(fields["Package"])
    return names
