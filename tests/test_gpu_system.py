"""System tier, GPU image: sync images/edge-gpu.toml's mirror, build it offline, check it from outside.

Heavy (about 3.5 GB of wheels and 0.5 GB of packages, and the NVIDIA module compiled by DKMS
on the build machine's cores), so it has its own marker: ``pytest -m gpu_image``.  Set
``APPLIANCE_GPU_MIRROR=DIR`` to reuse a mirror synced before (it is synced there when it
has no lock).  The module is signed with a throwaway key generated here, as a profile with
Secure Boot would sign it; nothing loads it (no GPU needed).  Timings are printed, not asserted.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_appliance
from testsupport.scratch import scratch

pytestmark = [pytest.mark.system, pytest.mark.gpu_image, pytest.mark.timeout(7200)]
ROOT = Path(__file__).resolve().parent.parent


def _chroot(root: Path, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    prefix = ["env", *(f"{k}={v}" for k, v in (env or {}).items())]
    return subprocess.run(["unshare", "--mount", "--pid", "--fork", f"--mount-proc={root}/proc",
                           "chroot", str(root), *prefix, *argv],
                          capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def built(request: pytest.FixtureRequest) -> Iterator[dict[str, Path]]:
    with scratch(request, "gpu-image") as tmp:
        yield _build(tmp)


def _build(tmp: Path) -> dict[str, Path]:
    (tmp / "firmware-manifests").mkdir()
    manifest = ROOT / "firmware-manifests/nvidia-550-trixie.toml"
    (tmp / "firmware-manifests" / manifest.name).write_text(manifest.read_text())
    keys = tmp / "images/keys"
    keys.mkdir(parents=True)
    subprocess.run(["openssl", "req", "-new", "-x509", "-nodes", "-days", "1", "-newkey", "rsa:2048",
                    "-subj", "/CN=appliance test module signing", "-keyout", keys / "module.key",
                    "-out", keys / "module.crt"], check=True, capture_output=True)
    profile = tmp / "images/edge-gpu.toml"
    profile.write_text((ROOT / "images/edge-gpu.toml").read_text().replace(
        '# signing_key = "keys/module-signing.key"', 'signing_key = "keys/module.key"').replace(
        '# signing_cert = "keys/module-signing.crt"', 'signing_cert = "keys/module.crt"'))
    mirror = Path(os.environ.get("APPLIANCE_GPU_MIRROR", tmp / "mirror"))
    times = {}
    if not (mirror / "lock.json").is_file():
        started = time.monotonic()
        sync = run_appliance("mirror", "sync", profile, "--mirror", mirror, "--json", timeout=5400)
        assert sync.returncode == 0, sync.stderr[-3000:]
        times["mirror sync"] = time.monotonic() - started
    started = time.monotonic()
    r = run_appliance("build", profile, "--mirror", mirror, "--out", tmp / "out", "--offline", "--json",
                      timeout=5400)
    assert r.returncode == 0, r.stderr[-5000:]
    times["build (offline)"] = time.monotonic() - started
    for stage in json.loads(r.stdout)["stages"]:
        times[f"  stage {stage['name']}"] = stage["seconds"]
    print("\nGPU image timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    return {"root": tmp / "out/stages/configure/root", "cert": keys / "module.crt", "out": tmp / "out"}


def _kernel_release(root: Path) -> str:
    (release,) = [p.name for p in (root / "lib/modules").iterdir()]
    return release


def test_nvidia_module_built_for_the_image_kernel_and_signed(built: dict[str, Path]) -> None:
    root = built["root"]
    release = _kernel_release(root)
    assert release != os.uname().release  # the image's kernel, not the build host's
    modules = sorted((root / "lib/modules" / release / "updates/dkms").glob("*.ko*"))
    names = [re.sub(r"\.ko(\.xz|\.zst|\.gz)?$", "", m.name) for m in modules]
    assert "nvidia-current" in names and "nvidia-current-uvm" in names, names
    for module in modules:
        vermagic = subprocess.run(["modinfo", "-F", "vermagic", module], capture_output=True,
                                  text=True, check=True).stdout.split()
        assert vermagic[0] == release, (module.name, vermagic)
        signer = subprocess.run(["modinfo", "-F", "signer", module], capture_output=True,
                                text=True, check=True).stdout.strip()
        assert signer == "appliance test module signing", (module.name, signer)
    # modprobe in the image resolves "nvidia" to the DKMS module (Debian's alias), for the image kernel
    r = _chroot(root, "modprobe", "--show-depends", "-S", release, "nvidia-current")
    assert r.returncode == 0 and "updates/dkms/nvidia-current.ko" in r.stdout, r.stdout + r.stderr


def test_no_signing_key_or_staged_packages_left_in_the_image(built: dict[str, Path]) -> None:
    root = built["root"]
    for path in ("var/lib/dkms/mok.key", "var/lib/dkms/mok.pub", "var/tmp/appliance-gpu-mok",
                 "var/tmp/appliance-gpu-debs"):
        assert not (root / path).exists(), path
    key_text = (built["cert"].parent / "module.key").read_bytes()
    assert not any(p.is_file() and p.stat().st_size == len(key_text) and p.read_bytes() == key_text
                   for p in (root / "etc").rglob("*"))
    assert "sign_file=/nonexistent" in (root / "etc/dkms/framework.conf.d/50-appliance.conf").read_text()


def test_nvml_and_cuda_driver_libraries_load(built: dict[str, Path]) -> None:
    code = ("import ctypes\n"
            "for lib in ('libnvidia-ml.so.1', 'libcuda.so.1'):\n"
            "    ctypes.CDLL(lib)\n"
            "print('ok')")
    r = _chroot(built["root"], "/opt/appliance/venv/bin/python", "-c", code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_cuda_provider_libraries_all_resolve_inside_the_image(built: dict[str, Path]) -> None:
    root = built["root"]
    site = next((root / "opt/appliance/venv/lib").glob("python3*/site-packages"))
    inside = "/" + site.relative_to(root).as_posix()
    libdirs = sorted(f"{inside}/nvidia/{p.parent.parent.name}/lib"
                     for p in site.glob("nvidia/*/lib/*.so*"))
    libdirs = sorted(set(libdirs))
    assert any(d.endswith("cudnn/lib") for d in libdirs) and any(d.endswith("cublas/lib") for d in libdirs)
    targets = [f"{inside}/onnxruntime/capi/libonnxruntime_providers_cuda.so",
               *("/" + p.relative_to(root).as_posix() for p in sorted(site.glob("nvidia/*/lib/*.so*")))]
    env = {"LD_LIBRARY_PATH": ":".join(libdirs)}
    for target in targets:
        r = _chroot(root, "ldd", target, env=env)
        assert r.returncode == 0, (target, r.stderr)
        assert "not found" not in r.stdout, (target, r.stdout)


def test_agent_unit_and_persistenced(built: dict[str, Path]) -> None:
    root = built["root"]
    for unit in ("nvidia-persistenced", "appliance-nvidia-devices", "appliance-agent"):
        r = subprocess.run(["systemctl", f"--root={root}", "is-enabled", f"{unit}.service"],
                           capture_output=True, text=True, check=False)
        assert r.stdout.strip() == "enabled", (unit, r.stdout, r.stderr)
    unit = (root / "etc/systemd/system/appliance-agent.service").read_text().splitlines()
    assert "DevicePolicy=closed" in unit
    assert {x for x in unit if x.startswith("DeviceAllow=")} == {
        "DeviceAllow=/dev/nvidiactl rw", "DeviceAllow=/dev/nvidia-uvm rw", "DeviceAllow=char-nvidia rw",
        "DeviceAllow=char-nvidia-frontend rw", "DeviceAllow=/dev/tpmrm0 rw"}
    image = json.loads((root / "usr/lib/appliance/image.json").read_text())
    assert image["gpu"]["kernel_release"] == _kernel_release(root)
    assert image["gpu"]["driver_version"] == "550.163.01"
    r = _chroot(root, "/opt/appliance/venv/bin/python", "-c",
                "import importlib.metadata as m; print(m.version('onnxruntime-gpu'))")
    assert r.stdout.strip() == "1.23.2", r.stderr


def test_agent_sees_the_cuda_provider_libraries(built: dict[str, Path]) -> None:
    # The agent's own provider choice (agent/ort.py): preload the nvidia-*-cu12 wheels' libraries
    # and dlopen every library the CUDA provider needs; no GPU is needed to load them.
    code = ("from agent.ort import usable_providers\n"
            "print(','.join(usable_providers()))")
    r = _chroot(built["root"], "/opt/appliance/venv/bin/python", "-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().split(",")[-2:] == ["CUDAExecutionProvider", "CPUExecutionProvider"], r.stdout
