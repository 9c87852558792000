"""The GPU layer: firmware manifests, the compatibility rules, mirror pins, the configure plan.

The compatibility check is tested over a table of driver sets derived from the shipped
manifest (firmware-manifests/nvidia-550-trixie.toml) by changing one thing at a time.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest

from agent.errors import VerificationError
from provisioning.errors import ProfileError
from provisioning.image.gpu_manifest import (
    GENAI_FACTS,
    ORT_GPU_BUILT_WITH,
    check_compatibility,
    load_manifest,
    wheel_fits,
)
from provisioning.image.gpu_stage import check_lock, check_wheel_files, dkms_conf
from provisioning.image.mirror import Lock, LockedFile
from provisioning.image.plan import (
    AGENT_DEVICE_ALLOW,
    AGENT_UNIT,
    DEVICES_UNIT,
    TPM_DEVICE_ALLOW,
    configure_plan,
)
from provisioning.image.profile import load_profile, package_set

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "firmware-manifests/nvidia-550-trixie.toml"
TRIXIE = {"suite": "trixie", "architecture": "amd64", "machine": "x86_64", "python": "3.13",
          "glibc": "2.41"}
PIP = "/usr/share/python-wheels/pip-25.1.1-py3-none-any.whl"


# ------------------------------------------------------------------ helpers


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    return "[" + ", ".join(_toml_value(x) for x in v) + "]"


def _dump(data: dict[str, Any]) -> str:
    out = []
    for name, table in data.items():
        if isinstance(table, list):
            for item in table:
                out.append(f"[[{name}]]")
                out += [f"{k} = {_toml_value(v)}" for k, v in item.items()]
        else:
            out.append(f"[{name}]")
            out += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(out) + "\n"


def _shipped() -> dict[str, Any]:
    return tomllib.loads(SHIPPED.read_text())


def _set_driver(d: dict[str, Any], version: str, cuda: str) -> None:
    """A different driver: every driver-versioned package pin follows it."""
    old = d["driver"]["version"]
    d["driver"]["version"], d["driver"]["cuda"] = version, cuda
    for deb in d["debs"]:
        deb["version"] = deb["version"].replace(old, version)


def _set_wheel(d: dict[str, Any], name: str, version: str, filename: str | None = None) -> None:
    for w in d["wheels"]:
        if w["name"] == name:
            w["filename"] = filename or w["filename"].replace(w["version"], version)
            w["version"] = version
            return
    raise KeyError(name)


def _rename_wheels(d: dict[str, Any], old: str, new: str) -> None:
    for w in d["wheels"]:
        w["name"] = w["name"].replace(f"-{old}", f"-{new}")
        w["filename"] = w["filename"].replace(f"_{old}-", f"_{new}-")


def _write(tmp_path: Path, d: dict[str, Any], name: str = "set.toml") -> Path:
    path = tmp_path / name
    path.write_text(_dump(d))
    return path


# ------------------------------------------------------------------ the shipped set


def test_shipped_manifest_fits_trixie_natively() -> None:
    m = load_manifest(SHIPPED)
    assert (m.driver.version, m.driver.cuda, m.module_package) == ("550.163.01", "12.4",
                                                                    "nvidia-kernel-dkms")
    c = check_compatibility(m, **TRIXIE, kernel_release="6.12.117+deb13-amd64")
    assert (c.basis, c.runtime_cuda, c.built_with_cuda) == ("native", "12.4", "12.2")
    assert c.genai == "0.11.2" and m.wheel("onnxruntime_genai_cuda") is not None


def test_the_genai_facts_of_the_installed_build_are_the_recorded_ones() -> None:
    """The table entry for the onnxruntime-genai-cuda in this venv, read from the real wheel's
    metadata and its CUDA library's DT_NEEDED (the way every entry was read from PyPI)."""
    import importlib.metadata
    import re
    import subprocess

    dist = importlib.metadata.distribution("onnxruntime-genai-cuda")
    floor, cuda_major = GENAI_FACTS[dist.version]
    assert f"onnxruntime-gpu>={floor}" in [r.replace(" ", "") for r in dist.requires or []]
    lib = Path(str(dist.locate_file("onnxruntime_genai/libonnxruntime-genai-cuda.so")))
    dynamic = subprocess.run(["readelf", "-d", str(lib)], check=True, capture_output=True,
                             text=True).stdout
    assert re.findall(r"\[libcudart\.so\.(\d+)\]", dynamic) == [str(cuda_major)]
    onnxruntime = importlib.metadata.version("onnxruntime-gpu")
    if onnxruntime in ORT_GPU_BUILT_WITH:
        from onnxruntime.capi import build_and_package_info as info

        assert info.cuda_version == ORT_GPU_BUILT_WITH[onnxruntime]


def test_edge_gpu_profile_adds_the_driver_set_and_headers() -> None:
    p = load_profile(ROOT / "images/edge-gpu.toml")
    assert p.gpu_set is not None and p.python.onnxruntime == "onnxruntime-gpu"
    packages = package_set(p)
    for name in ("nvidia-kernel-dkms", "firmware-nvidia-gsp", "libnvidia-ml1", "libcuda1",
                 "nvidia-persistenced", "dkms", "linux-headers-amd64", "linux-image-amd64"):
        assert name in packages
    assert "nvidia-driver" not in packages  # the X server stack stays out of a headless node
    assert not (set(packages) & {"nvidia-kernel-dkms", "libcuda1"}) <= set(
        package_set(load_profile(ROOT / "images/minimal.toml")))


# ------------------------------------------------------------------ the compatibility table


def _set_ort(d: dict[str, Any], version: str, built: str) -> None:
    _set_wheel(d, "onnxruntime-gpu", version)
    d["runtime"]["onnxruntime_version"], d["runtime"]["built_with_cuda"] = version, built


def _cuda13_ort(d: dict[str, Any]) -> None:
    """The CUDA 13 stack: onnxruntime-gpu 1.31.0 (built with 13.0), genai 0.18.0 matched to it."""
    _rename_wheels(d, "cu12", "cu13")
    _set_wheel(d, "nvidia-cuda-runtime-cu13", "13.0.96")
    _set_ort(d, "1.31.0", "13.0")
    _set_wheel(d, "onnxruntime-genai-cuda", "0.18.0")


def _runtime_128(d: dict[str, Any]) -> None:
    _set_wheel(d, "nvidia-cuda-runtime-cu12", "12.8.90")


def _runtime_128_opt_in(d: dict[str, Any]) -> None:
    _runtime_128(d)
    d["runtime"]["minor_version_compatibility"] = True


def _nvrtc_128_opt_in(d: dict[str, Any]) -> None:
    _runtime_128_opt_in(d)
    _set_wheel(d, "nvidia-cuda-nvrtc-cu12", "12.8.93")


def _driver_580(d: dict[str, Any]) -> None:
    _set_driver(d, "580.95.05", "13.0")


def _driver_535(d: dict[str, Any]) -> None:  # CUDA 12.2: ORT's build fits, the 12.4 runtime needs MVC
    _set_driver(d, "535.261.03", "12.2")


def _driver_535_opt_in(d: dict[str, Any]) -> None:
    _driver_535(d)
    d["runtime"]["minor_version_compatibility"] = True
    _set_wheel(d, "nvidia-cuda-nvrtc-cu12", "12.2.140")  # runtime compilers at the driver's CUDA
    _set_wheel(d, "nvidia-nvjitlink-cu12", "12.2.140")


def _driver_515(d: dict[str, Any]) -> None:
    _set_driver(d, "515.105.01", "11.7")


def _old_11x_driver(d: dict[str, Any]) -> None:
    # CUDA 11.4 libraries on a 450.51 driver (CUDA 11.0): below the 11.x MVC floor 450.80.02.
    _set_driver(d, "450.51.06", "11.0")
    d["runtime"]["built_with_cuda"] = "11.0"
    d["runtime"]["minor_version_compatibility"] = True
    _rename_wheels(d, "cu12", "cu11")
    for name, version in (("nvidia-cuda-runtime-cu11", "11.4.43"),
                          ("nvidia-cuda-nvrtc-cu11", "11.0.221"), ("nvidia-nvjitlink-cu11", "11.0.1")):
        _set_wheel(d, name, version)


def _claims_128(d: dict[str, Any]) -> None:
    d["driver"]["cuda"] = "12.8"


def _cudnn_8(d: dict[str, Any]) -> None:
    _set_wheel(d, "nvidia-cudnn-cu12", "8.9.7.29")


def _mixed_cu11(d: dict[str, Any]) -> None:
    for w in d["wheels"]:
        if w["name"] == "nvidia-curand-cu12":
            w["name"] = "nvidia-curand-cu11"
            w["filename"] = w["filename"].replace("_cu12-", "_cu11-")


def _cp312_only(d: dict[str, Any]) -> None:
    _set_wheel(d, "onnxruntime-gpu", "1.23.2",
               "onnxruntime_gpu-1.23.2-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl")


def _glibc_too_new(d: dict[str, Any]) -> None:
    _set_wheel(d, "nvidia-cudnn-cu12", "9.28.0.42",
               "nvidia_cudnn_cu12-9.28.0.42-py3-none-manylinux_2_42_x86_64.whl")


def _aarch64_wheel(d: dict[str, Any]) -> None:
    _set_wheel(d, "nvidia-curand-cu12", "10.3.5.147",
               "nvidia_curand_cu12-10.3.5.147-py3-none-manylinux2014_aarch64.whl")


def _python_312(d: dict[str, Any]) -> None:
    d["runtime"]["python"] = "3.12"


def _open_module(d: dict[str, Any]) -> None:
    d["driver"]["module"] = "open"
    for deb in d["debs"]:
        if deb["name"] == "nvidia-kernel-dkms":
            deb["name"] = "nvidia-open-kernel-dkms"


def _genai(version: str) -> Any:
    return lambda d: _set_wheel(d, "onnxruntime-genai-cuda", version)


def _genai_018(d: dict[str, Any]) -> None:  # what issue 15 names: genai 0.18 on the 550 set
    _set_wheel(d, "onnxruntime-genai-cuda", "0.18.0")


def _genai_018_chain_580(d: dict[str, Any]) -> None:  # the CUDA 13 stack on the driver it wants
    _cuda13_ort(d)
    _driver_580(d)


def _genai_014_ort_126(d: dict[str, Any]) -> None:  # the newest CUDA 12 pair: built with 12.8
    _set_wheel(d, "onnxruntime-genai-cuda", "0.14.1")
    _set_ort(d, "1.26.0", "12.8")


def _ort_126_claims_122(d: dict[str, Any]) -> None:
    _set_ort(d, "1.26.0", "12.2")


def _genai_cu12_ort_cu13(d: dict[str, Any]) -> None:  # genai 0.11.2 accepts 1.27.0 by version
    _cuda13_ort(d)
    _set_ort(d, "1.27.0", "13.0")
    _set_wheel(d, "onnxruntime-genai-cuda", "0.11.2")
    _driver_580(d)


GOOD = [
    ("genai 0.11.4 on the shipped set", _genai("0.11.4"), "native"),
    ("genai 0.18 + onnxruntime-gpu 1.31 + CUDA 13 on a 580 driver", _genai_018_chain_580, "native"),
    ("shipped", None, "native"),
    ("runtime 12.8 on 12.4 driver, opted in", _runtime_128_opt_in, "minor version compatibility"),
    ("CUDA 12 set on a 580 (CUDA 13.0) driver", _driver_580, "backward compatibility"),
    ("12.4 runtime on 535 (12.2), opted in", _driver_535_opt_in, "minor version compatibility"),
    ("open kernel module", _open_module, "native"),
]

BAD = [
    ("genai 0.18 + onnxruntime-gpu 1.31 (CUDA 13) on a 550 driver", _cuda13_ort,
     "onnxruntime-gpu 1.31.0 (built with CUDA 13.0) needs CUDA 13.0, but driver 550.163.01 "
     "supports CUDA up to 12.4: a newer CUDA major version never runs on an older driver (a "
     "CUDA 13 component needs a driver of the CUDA 13 family, the 580-series or newer)"),
    ("runtime 12.8 on 12.4 driver, no opt-in", _runtime_128,
     "nvidia-cuda-runtime-cu12 12.8.90 needs CUDA 12.8, but driver 550.163.01 supports CUDA up to "
     "12.4: this relies on CUDA minor version compatibility"),
    ("nvrtc 12.8 on a 12.4 driver even with opt-in", _nvrtc_128_opt_in,
     "nvidia-cuda-nvrtc-cu12 12.8.93: a runtime compiler newer than the driver's CUDA 12.4"),
    ("12.4 runtime on 535 (12.2), no opt-in", _driver_535, "supports CUDA up to 12.2"),
    ("CUDA 12 set on a 515 (CUDA 11.7) driver", _driver_515,
     "driver 515.105.01 supports CUDA up to 11.7: a newer CUDA major"),
    ("11.4 libraries below the 11.x MVC driver floor", _old_11x_driver,
     "minor version compatibility needs driver >= 450.80.02"),
    ("550 driver claiming CUDA 12.8", _claims_128, "driver branch 550 supports CUDA 12.4"),
    ("cuDNN 8 for an ORT built with cuDNN 9", _cudnn_8,
     "cuDNN 8, but onnxruntime-gpu was built with cuDNN 9"),
    ("a CUDA 11 library in a CUDA 12 set", _mixed_cu11, "a CUDA 11 library"),
    ("cp312 wheel for Python 3.13", _cp312_only, "no tag for CPython 3.13, glibc 2.41, x86_64"),
    ("manylinux_2_42 on glibc 2.41", _glibc_too_new, "no tag for CPython 3.13"),
    ("aarch64 wheel on x86_64", _aarch64_wheel, "no tag for CPython 3.13"),
    ("manifest for Python 3.12", _python_312, "[runtime] python = '3.12': the image's Python is 3.13"),
    ("genai 0.18 on onnxruntime-gpu 1.23.2", _genai_018,
     "[[wheels]] onnxruntime-genai-cuda version = '0.18.0': requires onnxruntime-gpu >= 1.31.0, "
     "but [runtime] onnxruntime_version = '1.23.2'; onnxruntime-gpu 1.31.0 is built with CUDA "
     "13.0, which needs a 580-series driver or newer to run natively"),
    ("genai 0.12 on onnxruntime-gpu 1.23.2", _genai("0.12.0"),
     "requires onnxruntime-gpu >= 1.24.1, but [runtime] onnxruntime_version = '1.23.2'; "
     "onnxruntime-gpu 1.24.1 is built with CUDA 12.8, which needs a 570-series driver or newer "
     "to run natively"),
    ("genai 0.14 + onnxruntime-gpu 1.26 (CUDA 12.8) on a 550 driver", _genai_014_ort_126,
     "onnxruntime-gpu 1.26.0 (built with CUDA 12.8) needs CUDA 12.8, but driver 550.163.01 "
     "supports CUDA up to 12.4: this relies on CUDA minor version compatibility"),
    ("onnxruntime-gpu 1.26 said to be built with CUDA 12.2", _ort_126_claims_122,
     "[runtime] built_with_cuda = '12.2': onnxruntime-gpu 1.26.0 is built with CUDA 12.8"),
    ("a CUDA 12 genai beside a CUDA 13 onnxruntime", _genai_cu12_ort_cu13,
     "onnxruntime-genai-cuda version = '0.11.2': its CUDA kernels link CUDA 12 (libcudart.so.12), "
     "but [runtime] built_with_cuda = '13.0'"),
    ("a genai release with no recorded facts", _genai("0.10.0"),
     "onnxruntime-genai-cuda version = '0.10.0': no recorded onnxruntime and CUDA requirements"),
]


@pytest.mark.parametrize(("case", "change", "basis"), GOOD, ids=[g[0] for g in GOOD])
def test_good_sets(tmp_path: Path, case: str, change: Any, basis: str) -> None:
    d = copy.deepcopy(_shipped())
    if change:
        change(d)
    m = load_manifest(_write(tmp_path, d))
    assert check_compatibility(m, **TRIXIE).basis == basis


@pytest.mark.parametrize(("case", "change", "expected"), BAD, ids=[b[0] for b in BAD])
def test_bad_sets_are_refused_with_reason_and_versions(tmp_path: Path, case: str, change: Any,
                                                       expected: str) -> None:
    d = copy.deepcopy(_shipped())
    change(d)
    path = _write(tmp_path, d)
    with pytest.raises(ProfileError) as err:
        check_compatibility(load_manifest(path), **TRIXIE)
    assert expected in str(err.value)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(("release", "ok"), [("6.12.117+deb13-amd64", True), ("6.1.0-40-amd64", True),
                                             ("6.14.3+deb13-amd64", False), ("3.2.0-4-amd64", False)])
def test_kernel_range(release: str, ok: bool) -> None:
    m = load_manifest(SHIPPED)
    if ok:
        assert check_compatibility(m, **TRIXIE, kernel_release=release).kernel == release
    else:
        with pytest.raises(ProfileError, match=r"outside the range the nvidia-kernel-dkms 550.163.01"):
            check_compatibility(m, **TRIXIE, kernel_release=release)


def test_suite_and_architecture_must_match() -> None:
    m = load_manifest(SHIPPED)
    with pytest.raises(ProfileError, match="the image is bookworm/amd64"):
        check_compatibility(m, **{**TRIXIE, "suite": "bookworm", "python": "3.11", "glibc": "2.36"})


# ------------------------------------------------------------------ malformed manifests


def _drop_gsp(d: dict[str, Any]) -> None:
    d["debs"] = [x for x in d["debs"] if x["name"] != "firmware-nvidia-gsp"]


def _libcuda_other_driver(d: dict[str, Any]) -> None:
    next(x for x in d["debs"] if x["name"] == "libcuda1")["version"] = "535.261.03-1"


def _bad_sha(d: dict[str, Any]) -> None:
    d["debs"][0]["sha256"] = "ABC"


def _unknown_key(d: dict[str, Any]) -> None:
    d["driver"]["branch"] = 550


def _no_cuda(d: dict[str, Any]) -> None:
    del d["driver"]["cuda"]


def _no_genai(d: dict[str, Any]) -> None:
    d["wheels"] = [w for w in d["wheels"] if w["name"] != "onnxruntime-genai-cuda"]


def _filename_mismatch(d: dict[str, Any]) -> None:
    d["wheels"][0]["version"] = "1.23.1"
    d["runtime"]["onnxruntime_version"] = "1.23.1"


@pytest.mark.parametrize(("change", "expected"), [
    (_drop_gsp, "[[debs]]: no pin for 'firmware-nvidia-gsp'"),
    (_libcuda_other_driver, "[[debs]] libcuda1 version = '535.261.03-1': not the driver version 550.163.01"),
    (_bad_sha, "[[debs]][0] sha256 = 'ABC': not a lowercase hex sha256"),
    (_unknown_key, "[driver]: unknown key 'branch'"),
    (_no_cuda, "[driver] cuda = '': not a CUDA version"),
    (_filename_mismatch, "filename = 'onnxruntime_gpu-1.23.2-cp313"),
    (_no_genai, "[[wheels]]: no pin for 'onnxruntime-genai-cuda' (the agent's LLM runtime"),
])
def test_malformed_manifests_name_file_key_and_value(tmp_path: Path, change: Any, expected: str) -> None:
    d = copy.deepcopy(_shipped())
    change(d)
    path = _write(tmp_path, d)
    with pytest.raises(ProfileError) as err:
        load_manifest(path)
    assert expected in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize(("filename", "fits"), [
    ("x-1-cp313-cp313-manylinux_2_28_x86_64.whl", True),
    ("x-1-cp310-abi3-manylinux2014_x86_64.whl", True),
    ("x-1-py3-none-any.whl", True),
    ("x-1-py2.py3-none-any.whl", True),
    ("x-1-cp314-abi3-manylinux2014_x86_64.whl", False),
    ("x-1-cp313-cp313-linux_x86_64.whl", False),
    ("x-1-cp313-cp313-musllinux_1_2_x86_64.whl", False),
    ("x-1-cp313-cp313t-manylinux_2_28_x86_64.whl", False),
])
def test_wheel_tags(filename: str, fits: bool) -> None:
    assert wheel_fits(filename, "3.13", "2.41", "x86_64") is fits


# ------------------------------------------------------------------ profiles


def _gpu_profile(tmp_path: Path, edit: tuple[str, str] = ("", "")) -> Path:
    (tmp_path / "firmware-manifests").mkdir(exist_ok=True)
    (tmp_path / "firmware-manifests/nvidia-550-trixie.toml").write_text(SHIPPED.read_text())
    path = tmp_path / "images/edge-gpu.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text((ROOT / "images/edge-gpu.toml").read_text().replace(*edit))
    return path


@pytest.mark.parametrize(("edit", "expected"), [
    (('onnxruntime = "onnxruntime-gpu"', 'onnxruntime = "onnxruntime"'),
     "[python] onnxruntime = 'onnxruntime': the GPU manifest nvidia-550-trixie.toml needs 'onnxruntime-gpu'"),
    (('components = ["main", "contrib", "non-free", "non-free-firmware"]', 'components = ["main"]'),
     "[debian] components = ['main']: the GPU manifest nvidia-550-trixie.toml needs contrib, non-free"),
    (('suite = "trixie"', 'suite = "bookworm"'), "[gpu] manifest = 'nvidia-550-trixie': refused:"),
    (('[gpu]\n', '[gpu]\nsigning_key = "k.pem"\n'),
     "[gpu] signing_key = 'k.pem', signing_cert = '': give both"),
    (('[gpu]\n', '[gpu]\nsigning_key = "k.pem"\nsigning_cert = "c.pem"\n'),
     "[gpu] signing_key = 'k.pem': no such file"),
    (('manifest = "nvidia-550-trixie"', 'signing_key = "k.pem"'),
     "[gpu] signing_key = 'k.pem': no manifest, so no GPU modules to sign"),
    (('[debian]\n', '[debian]\nkernel = "linux-image-6.16.3+deb13-amd64"\n'),
     "kernel 6.16.3+deb13-amd64 (series 6.16) is outside the range"),
])
def test_gpu_profiles_refused_at_load(tmp_path: Path, edit: tuple[str, str], expected: str) -> None:
    path = _gpu_profile(tmp_path, edit)
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    assert expected in str(err.value) and str(path) in str(err.value)


# ------------------------------------------------------------------ the mirror's pins


def _lock(m: Any, *, kernel: str = "6.12.117+deb13-amd64", headers: str = "6.12.117-1",
          tweak: dict[str, str] | None = None) -> Lock:
    debs = [LockedFile(f"debian/pool/{d.name}.deb", (tweak or {}).get(d.name, d.sha256), 1, d.name,
                       d.version, "amd64") for d in m.debs]
    debs += [LockedFile("debian/pool/k.deb", "0" * 64, 1, f"linux-image-{kernel}", "6.12.117-1", "amd64"),
             LockedFile("debian/pool/h.deb", "0" * 64, 1, f"linux-headers-{kernel}", headers, "amd64"),
             LockedFile("debian/pool/m.deb", "0" * 64, 1, "linux-image-amd64", "6.12.117-1", "amd64")]
    wheels = [LockedFile(f"wheels/{w.filename}", w.sha256, 1, w.key, w.version) for w in m.wheels]
    return Lock("trixie", "amd64", "3.13", (), tuple(debs), (), (), tuple(wheels), "onnxruntime-gpu")


def test_check_lock(tmp_path: Path) -> None:
    p = load_profile(_gpu_profile(tmp_path))
    assert p.gpu_set is not None
    assert check_lock(p, _lock(p.gpu_set)).kernel == "6.12.117+deb13-amd64"
    with pytest.raises(ProfileError, match=r"pins libcuda1 550.163.01-2 sha256 8feff97a.*the mirror holds "
                                           r"550.163.01-2 sha256 ffff"):
        check_lock(p, _lock(p.gpu_set, tweak={"libcuda1": "f" * 64}))
    with pytest.raises(ProfileError, match=r"kernel 6.12.117\+deb13-amd64 \(6.12.117-1\) has no headers of "
                                           r"the same version \(6.12.116-1\)"):
        check_lock(p, _lock(p.gpu_set, headers="6.12.116-1"))
    with pytest.raises(ProfileError, match=r"series 6\.16"):
        check_lock(p, _lock(p.gpu_set, kernel="6.16.3+deb13-amd64"))


def test_downloaded_wheels_must_be_the_pinned_files(tmp_path: Path) -> None:
    d = copy.deepcopy(_shipped())
    files = tmp_path / "wheels"
    files.mkdir()
    for w in d["wheels"]:
        path = files / w["filename"]
        with zipfile.ZipFile(path, "w") as zf:
            if w["name"] == "onnxruntime-gpu":
                zf.writestr("onnxruntime/capi/build_and_package_info.py",
                            "package_name = 'onnxruntime-gpu'\ncuda_version = '12.2'\n")
            elif w["name"] == "onnxruntime-genai-cuda":
                zf.writestr(_GENAI_META, "Name: onnxruntime-genai-cuda\nVersion: 0.11.2\n"
                            "Requires-Dist: numpy>=1.21.6\nRequires-Dist: onnxruntime-gpu>=1.23.2\n")
            else:
                zf.writestr("x.txt", w["name"])
        w["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    m = load_manifest(_write(tmp_path, d))
    check_wheel_files(m, sorted(files.iterdir()))
    extra = files / "nvidia_cublas_cu12-12.9.3.13-py3-none-manylinux_2_27_x86_64.whl"
    extra.write_bytes(b"newer")
    with pytest.raises(VerificationError, match=r"pins nvidia_cublas_cu12-12.4.5.8.*the download gave"):
        check_wheel_files(m, sorted(files.iterdir()))
    extra.unlink()
    ort = files / d["wheels"][0]["filename"]
    with zipfile.ZipFile(ort, "w") as zf:
        zf.writestr("onnxruntime/capi/build_and_package_info.py", "cuda_version = '12.8'\n")
    with pytest.raises(VerificationError, match="does not match"):
        check_wheel_files(m, sorted(files.iterdir()))
    d["wheels"][0]["sha256"] = hashlib.sha256(ort.read_bytes()).hexdigest()
    with pytest.raises(VerificationError, match=r"built with CUDA 12.8, but .* built_with_cuda = '12.2'"):
        check_wheel_files(load_manifest(_write(tmp_path, d)), sorted(files.iterdir()))
    with zipfile.ZipFile(ort, "w") as zf:
        zf.writestr("onnxruntime/capi/build_and_package_info.py", "cuda_version = '12.2'\n")
    d["wheels"][0]["sha256"] = hashlib.sha256(ort.read_bytes()).hexdigest()
    pin = next(w for w in d["wheels"] if w["name"] == "onnxruntime-genai-cuda")
    genai = files / pin["filename"]
    with zipfile.ZipFile(genai, "w") as zf:  # a wheel whose metadata contradicts the record
        zf.writestr(_GENAI_META, "Requires-Dist: onnxruntime-gpu>=1.24.1\n")
    pin["sha256"] = hashlib.sha256(genai.read_bytes()).hexdigest()
    with pytest.raises(VerificationError, match=r"onnxruntime_genai_cuda-0.11.2-cp313.*requires "
                       r"onnxruntime-gpu >= 1.24.1, but .*GENAI_FACTS\) says >= 1.23.2"):
        check_wheel_files(load_manifest(_write(tmp_path, d)), sorted(files.iterdir()))


_GENAI_META = "onnxruntime_genai_cuda-0.11.2.dist-info/METADATA"


# ------------------------------------------------------------------ configure plan


def _gpu_plan(tmp_path: Path) -> Any:
    p = load_profile(_gpu_profile(tmp_path))
    return configure_plan(p, pip_wheel=PIP, kernel_release="6.12.117+deb13-amd64",
                          gpu_record={"compatibility": {"basis": "native"}})


def test_agent_unit_gets_the_nvidia_devices_and_nothing_more(tmp_path: Path) -> None:
    unit = _gpu_plan(tmp_path).file(f"/etc/systemd/system/{AGENT_UNIT}").content.splitlines()
    assert "DevicePolicy=closed" in unit and "PrivateDevices=no" in unit
    allowed = [x for x in unit if x.startswith("DeviceAllow=")]
    assert allowed == [f"DeviceAllow={d}" for d in (*AGENT_DEVICE_ALLOW, TPM_DEVICE_ALLOW)]
    assert "PrivateDevices=yes" not in unit and "ProcSubset=pid" not in unit
    service = unit[unit.index("[Service]"):]
    assert not any(x.startswith(("After=", "Wants=")) for x in service)  # [Unit] options stay there
    assert f"Wants={DEVICES_UNIT} nvidia-persistenced.service" in unit[:unit.index("[Service]")]
    cpu = configure_plan(load_profile(ROOT / "images/minimal.toml"), pip_wheel=PIP)
    cpu_unit = cpu.file(f"/etc/systemd/system/{AGENT_UNIT}").content.splitlines()
    assert "PrivateDevices=yes" in cpu_unit
    assert [x for x in cpu_unit if x.startswith("DeviceAllow=")] == [f"DeviceAllow={TPM_DEVICE_ALLOW}"]


def test_gpu_plan_builds_for_the_image_kernel_and_enables_persistenced(tmp_path: Path) -> None:
    plan = _gpu_plan(tmp_path)
    assert ("dkms", "autoinstall", "-k", "6.12.117+deb13-amd64") in plan.commands
    apt = next(c for c in plan.commands if "apt-get" in c and "install" in c)
    assert "nvidia-kernel-dkms=550.163.01-2" in apt and "linux-headers-amd64" in apt
    assert "Dir::State::Lists=/var/tmp/appliance-gpu-debs/lists" in apt  # no apt lists left behind
    assert "INITRD=No" in apt[:apt.index("apt-get")]  # no initrd from the kernel hooks it triggers
    assert any(c[:2] == ("rm", "-rf") and "/var/lib/dkms/mok.key" in c for c in plan.commands)
    assert "nvidia-persistenced.service" in plan.enable and DEVICES_UNIT in plan.enable
    image = json.loads(plan.file("/usr/lib/appliance/image.json").content)
    assert image["firmware_manifest"] == "nvidia-550.163.01-trixie-ort-1.23.2-genai-0.11.2"
    assert image["gpu"]["driver_version"] == "550.163.01" and image["gpu"]["compatibility"] == "native"
    assert "sign_file=/nonexistent" in plan.file("/etc/dkms/framework.conf.d/50-appliance.conf").content


def test_dkms_never_mints_its_own_key() -> None:
    assert "sign_file=/nonexistent" in dkms_conf(signing=False)
    signing = dkms_conf(signing=True)
    assert "mok_signing_key=" in signing and "sign_file" not in signing


def test_inventory_reports_the_image_gpu_stack(tmp_path: Path) -> None:
    from agent.health.inventory import collect_inventory
    from agent.health.service import inventory_to_proto

    plan = _gpu_plan(tmp_path)
    meta = tmp_path / "image.json"
    meta.write_text(plan.file("/usr/lib/appliance/image.json").content)
    inv = collect_inventory(tmp_path / "state", image_metadata=meta, os_release=tmp_path / "none")
    msg = inventory_to_proto(inv)
    assert msg.firmware_manifest_id == "nvidia-550.163.01-trixie-ort-1.23.2-genai-0.11.2"
    assert (msg.gpu_stack.driver_version, msg.gpu_stack.cuda_version, msg.gpu_stack.runtime_cuda_version,
            msg.gpu_stack.onnxruntime_version, msg.gpu_stack.genai_version) == (
        "550.163.01", "12.4", "12.4", "1.23.2", "0.11.2")
    assert msg.onnxruntime_version.startswith("onnxruntime")
    assert not inventory_to_proto(collect_inventory(tmp_path / "s2", image_metadata=tmp_path / "no",
                                                    os_release=tmp_path / "no")).HasField("gpu_stack")


@pytest.mark.parametrize(("cuda", "has", "lacks"), [
    ("12.2", {"libcudart.so.12", "libcublasLt.so.12", "libcufft.so.11", "libcudnn.so.9"},
     {"libcudart.so.13", "libcufft.so.12"}),
    ("12.8", {"libcublas.so.12", "libcufft.so.11"}, {"libcublas.so.13"}),
    ("13.0", {"libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libcufft.so.12",
              "libcurand.so.10", "libcudnn.so.9"}, {"libcudart.so.12", "libcufft.so.11"}),
])
def test_the_cuda_libraries_checked_follow_the_build_cuda_major(cuda: str, has: set[str],
                                                                lacks: set[str]) -> None:
    from agent.ort import cuda_libraries

    libraries = cuda_libraries(cuda)
    assert libraries[0] == "libcuda.so.1"  # the driver first: absent means no GPU at all
    assert has <= set(libraries) and not lacks & set(libraries)


@pytest.mark.parametrize("cuda", ["11.8", "", "cuda13"])
def test_a_cuda_build_of_unknown_major_is_named_in_the_refusal(cuda: str) -> None:
    from agent.ort import cuda_libraries

    with pytest.raises(ValueError, match=f"CUDA {cuda!r}"):
        cuda_libraries(cuda)


def test_the_installed_cuda_provider_links_nothing_the_check_leaves_out() -> None:
    """Every CUDA library the installed provider library links is one usable_providers loads
    first, so a node that lacks one never asks ONNX Runtime for CUDA (which would log an error)."""
    import subprocess

    import onnxruntime
    from onnxruntime.capi import build_and_package_info as info

    from agent.ort import cuda_libraries

    provider = Path(onnxruntime.__file__).parent / "capi/libonnxruntime_providers_cuda.so"
    if not provider.is_file():
        pytest.skip(f"this onnxruntime ({info.package_name}) has no CUDA provider")
    dynamic = subprocess.run(["readelf", "-d", str(provider)], check=True, capture_output=True,
                             text=True).stdout
    needed = {ln.split("[", 1)[1].rstrip("]") for ln in dynamic.splitlines() if "(NEEDED)" in ln}
    cuda_side = {n for n in needed if n.startswith(("libcu", "libnv"))}
    assert cuda_side, f"no CUDA library among {sorted(needed)}: readelf output changed?"
    assert cuda_side <= set(cuda_libraries(info.cuda_version)), sorted(cuda_side)
