"""Image profiles: the shipped default parses; every kind of bad profile fails early and clearly."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from provisioning.errors import ProfileError
from provisioning.image.profile import load_profile, package_set
from testsupport.image_helpers import make_registry

ROOT = Path(__file__).resolve().parent.parent


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "images" / "edge.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def test_minimal_profile_is_the_cpu_default() -> None:
    p = load_profile(ROOT / "images/minimal.toml")
    assert p.debian.suite == "trixie" and p.python_version == "3.13"
    assert p.python.onnxruntime == "onnxruntime"
    assert p.ssh.enabled is False and "openssh-server" not in package_set(p)
    assert p.inbound_tcp == (8000, 8001, 8002)  # HTTPS, gRPC, metrics
    assert {"linux-image-amd64", "python3-venv", "nftables", "apparmor", "auditd"} <= set(package_set(p))


def test_bookworm_profile_selects_python_311(tmp_path: Path) -> None:
    p = load_profile(_write(tmp_path, '[debian]\nsuite = "bookworm"\n'))
    assert (p.python_version, p.glibc_version) == ("3.11", "2.36")


@pytest.mark.parametrize(("text", "expected"), [
    ('[debian]\nsuit = "trixie"\n', "[debian]: unknown key 'suit'"),
    ('[debain]\n', "unknown section [debain]"),
    ('[debian]\nsuite = "sid"\n', "[debian] suite = 'sid': must be one of bookworm, trixie"),
    ('[image]\ncpu_level = "x86-64"\n',
     "[image] cpu_level = 'x86-64': must be one of x86-64-v2, x86-64-v3, x86-64-v4"),
    ('[debian]\npackages = "vim"\n', "[debian] packages = 'vim': expected list of str"),
    ('[debian]\npackages = ["Vim!"]\n', "not a Debian package name: 'Vim!'"),
    ('[disk]\nroot_mib = "big"\n', "[disk] root_mib = 'big': expected int"),
    ('[network]\nmode = "static"\n', "[network] address = '': static mode needs an address"),
    ('[network]\nmode = "static"\naddress = "10.0.0.300/24"\n', "address = '10.0.0.300/24'"),
    ('[network]\nallow_tcp = [70000]\n', "not a TCP port: 70000"),
    ('[ssh]\nenabled = true\n', "[ssh] enabled = true: no [[users]] entry has ssh_keys"),
    ('[[users]]\nname = "Bad Name"\n', "[[users]][0] name = 'Bad Name'"),
    ('[gpu]\nmanifest = "nvidia-999"\n', "[gpu] manifest = 'nvidia-999': no such firmware manifest"),
    ('[agent.server]\nport = 99999\n', "[agent.server] port = 99999: not a TCP port"),
    ('[agent.serverr]\n', "unknown section [agent.serverr]"),
    ('[agent.seal]\nmarker = "/tmp/sealed.json"\n',
     "[agent.seal] marker = '/tmp/sealed.json': the image's initrd and unseal helper use "
     "/run/appliance/sealed.json"),
    ('[bundles]\ntargets = ["x.bundle"]\n', "no registry given"),
    ('[bundles]\nregistry = "nowhere"\n', "has no metadata/ directory"),
    ('[debian\n', "not valid TOML"),
    ('[boot]\ncmdline = ["quiet splash"]\n', "not one kernel argument (no spaces or quotes): 'quiet splash'"),
    ('[boot]\ncmdline = ["roothash=00"]\n', "[boot] cmdline = ['roothash=00']: 'roothash=00': the sealed"),
    ('[boot]\ncmdline = ["rw"]\n', "'rw': the sealed command line sets this itself"),
    ('[boot]\ntries = 0\n', "[boot] tries = 0: must be 1 to 9"),
    ('[boot]\ntries = 10\n', "[boot] tries = 10: must be 1 to 9"),
    ('[compliance]\naudit = "yes"\n', "[compliance] audit = 'yes': expected bool"),
    ('[compliance]\nbaseline = "b.json"\n',
     "[compliance] baseline = 'b.json' needs [compliance] audit = true"),
    ('[compliance]\naudit = true\nbaseline = "missing.json"\n',
     "[compliance] baseline = 'missing.json': "),
])
def test_bad_profiles_name_file_key_and_value(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    assert str(err.value).startswith(str(path)), err.value
    assert expected in str(err.value)


def test_ssh_enabled_is_key_only_and_adds_sshd(tmp_path: Path) -> None:
    p = load_profile(_write(tmp_path, '[ssh]\nenabled = true\n[[users]]\nname = "ops"\n'
                            'ssh_keys = ["ssh-ed25519 AAAAC3Nza ops@site"]\n'))
    assert "openssh-server" in package_set(p) and 22 in p.inbound_tcp


def test_gpu_manifest_resolves_next_to_images(tmp_path: Path) -> None:
    (tmp_path / "firmware-manifests").mkdir()
    (tmp_path / "firmware-manifests/nvidia-550.toml").write_text(
        (ROOT / "firmware-manifests/nvidia-550-trixie.toml").read_text())
    text = (ROOT / "images/edge-gpu.toml").read_text().replace('"nvidia-550-trixie"', '"nvidia-550"')
    path = tmp_path / "images/gpu.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    p = load_profile(path)
    assert p.gpu_manifest == (tmp_path / "firmware-manifests/nvidia-550.toml").resolve()


def test_bundle_missing_from_registry(tmp_path: Path, affine_bundle: Path) -> None:
    make_registry(tmp_path / "registry", {"affine-1.0.0.bundle": affine_bundle})
    ok = _write(tmp_path, '[bundles]\nregistry = "../registry"\ntargets = ["affine-1.0.0.bundle"]\n')
    assert load_profile(ok).bundles.targets == ("affine-1.0.0.bundle",)
    bad = _write(tmp_path, '[bundles]\nregistry = "../registry"\ntargets = ["resnet-2.0.bundle"]\n')
    with pytest.raises(ProfileError, match=r"targets = 'resnet-2.0.bundle': not a target of the "
                                           r"registry .* \(it has: affine-1.0.0.bundle\)"):
        load_profile(bad)


def test_a_compliance_baseline_is_read_from_the_profiles_directory(tmp_path: Path) -> None:
    path = _write(tmp_path, '[compliance]\naudit = true\nbaseline = "floor.json"\n')
    (path.parent / "floor.json").write_text('{"format": 1, "profiles": {"p": {"pass_ratio": 1.5}}}')
    with pytest.raises(ProfileError, match=r"baseline = 'floor.json': .*floor.json: "
                                           r"profiles.p.pass_ratio = 1.5"):
        load_profile(path)
    (path.parent / "floor.json").write_text('{"format": 1, "profiles": {"p": {"pass_ratio": 0.5}}}')
    p = load_profile(path)
    assert p.compliance.audit and p.compliance_baseline == (path.parent / "floor.json").resolve()
    assert load_profile(ROOT / "images/minimal.toml").compliance_baseline is None
    hil = tomllib.loads((ROOT / "images/hil.toml").read_text())["compliance"]
    assert hil["audit"] and (ROOT / "images" / hil["baseline"]).is_file()  # the bench image's floor
