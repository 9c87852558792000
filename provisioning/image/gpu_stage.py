"""The GPU stage of the image pipeline: lock checks, staging into the root, module checks.

The pure part (manifests, compatibility rules, wheel tags) is
:mod:`provisioning.image.gpu_manifest`; the GPU's files, units and install commands in the
image are part of the configure plan (:mod:`provisioning.image.plan`).  Here is what needs the
mirror or the root: :func:`check_lock` and :func:`check_wheel_files` (the mirror holds exactly
the manifest's pins), :func:`stage_gpu` (the packages and the signing key into the root before
the configure deploy), :func:`check_built_modules` (what DKMS built, afterwards).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import VerificationError
from agent.fsutil import file_sha256
from provisioning.errors import ImageError, ProfileError
from provisioning.image.gpu_manifest import (
    GENAI_FACTS,
    GENAI_WHEEL,
    Compatibility,
    GpuManifest,
    check_compatibility,
    deb_closure_names,
    genai_onnxruntime_floor,
    normalise_name,
    ort_built_with_cuda,
)
from provisioning.tools import require_tool, run

if TYPE_CHECKING:
    from provisioning.image.mirror import Lock
    from provisioning.image.profile import Profile

__all__ = [
    "DEBS_IN_ROOT",
    "DKMS_CONF",
    "KEYS_IN_ROOT",
    "check_built_modules",
    "check_lock",
    "check_wheel_files",
    "dkms_conf",
    "installed_packages",
    "kernel_release_from_lock",
    "kernel_release_in_root",
    "stage_gpu",
]

DEBS_IN_ROOT = "/var/tmp/appliance-gpu-debs"  # noqa: S108 - inside the image's root; removed by the plan
KEYS_IN_ROOT = "/var/tmp/appliance-gpu-mok"  # noqa: S108 - likewise
DKMS_CONF = "/etc/dkms/framework.conf.d/50-appliance.conf"


def dkms_conf(*, signing: bool) -> str:
    """DKMS settings: sign with the staged key, or never sign (and so never mint a key)."""
    head = "# Written by `appliance build`.\n"
    if signing:
        return (head + f"mok_signing_key={KEYS_IN_ROOT}/module.key\n"
                f"mok_certificate={KEYS_IN_ROOT}/module.crt\n")
    # Without a sign-file DKMS skips signing; with one and no key it would create a random key
    # in /var/lib/dkms, baking a private key into the image.
    return head + "sign_file=/nonexistent\n"


def kernel_release_from_lock(lock: Lock, kernel_package: str) -> str:
    """The kernel release (``uname -r`` of the image) the mirror's kernel package installs.

    Raises:
        ProfileError: the mirror holds no versioned linux-image package for it.
    """
    if re.match(r"^linux-image-\d", kernel_package):
        return kernel_package.removeprefix("linux-image-")
    flavour = kernel_package.removeprefix("linux-image-")
    releases = sorted(d.name.removeprefix("linux-image-") for d in lock.debs
                      if re.match(rf"^linux-image-\d.*-{re.escape(flavour)}$", d.name))
    if not releases:
        raise ProfileError(f"the mirror holds no versioned kernel for {kernel_package!r}")
    return releases[-1]


def check_lock(profile: Profile, lock: Lock) -> Compatibility:
    """The mirror holds exactly the manifest's pins, and its kernel fits the module.

    Raises:
        ProfileError: a pinned package or wheel is missing from the mirror or differs in
            version or sha256; the mirror's kernel is outside the module's range, or its
            headers do not match it.
    """
    m = profile.gpu_set
    assert m is not None
    where = f"{profile.path}: [gpu] manifest = {profile.gpu.manifest!r}"
    debs = {d.name: d for d in lock.debs}
    for pin in m.debs:
        have = debs.get(pin.name)
        if have is None or (have.version, have.sha256) != (pin.version, pin.sha256):
            got = f"{have.version} sha256 {have.sha256}" if have else "nothing"
            raise ProfileError(f"{where}: {m.path.name} pins {pin.name} {pin.version} sha256 "
                               f"{pin.sha256}; the mirror holds {got}; run `appliance mirror "
                               "sync` again, or update the manifest")
    wheels = {w.path.rsplit("/", 1)[-1]: w for w in lock.wheels}
    for w in m.wheels:
        have_w = wheels.get(w.filename)
        if have_w is None or have_w.sha256 != w.sha256:
            raise ProfileError(f"{where}: {m.path.name} pins {w.filename} sha256 {w.sha256}; the "
                               f"mirror holds {have_w.sha256 if have_w else 'no such wheel'}")
    release = kernel_release_from_lock(lock, profile.kernel_package)
    image = debs.get(f"linux-image-{release}")
    headers = debs.get(f"linux-headers-{release}")
    if image is None or headers is None or headers.version != image.version:
        raise ProfileError(f"{where}: the mirror's kernel {release} "
                           f"({image.version if image else 'missing'}) has no headers of the same "
                           f"version ({headers.version if headers else 'missing'}); DKMS needs them")
    return check_compatibility(m, suite=profile.debian.suite,
                               architecture=profile.debian.architecture, machine=profile.machine,
                               python=profile.python_version, glibc=profile.glibc_version,
                               kernel_release=release)


def check_wheel_files(m: GpuManifest, wheels: Iterable[Path]) -> None:
    """Downloaded wheels against the manifest: every pin present with its sha256, no other version.

    Raises:
        VerificationError: a pinned wheel is missing or differs, a second version of a pinned
            distribution was fetched, onnxruntime-gpu says it was built with another CUDA, or
            onnxruntime-genai-cuda requires another onnxruntime-gpu than recorded.
    """
    by_name: dict[str, list[Path]] = {}
    for path in wheels:
        by_name.setdefault(normalise_name(path.name.split("-")[0]), []).append(path)
    for w in m.wheels:
        found = by_name.get(w.key, [])
        names = sorted(p.name for p in found)
        if names != [w.filename]:
            raise VerificationError(f"{m.path}: pins {w.filename}; the download gave "
                                    f"{names or 'nothing'}")
        actual = file_sha256(found[0])
        if actual != w.sha256:
            raise VerificationError(f"{found[0]}: sha256 {actual} does not match {m.path.name}'s "
                                    f"{w.sha256}")
    ort = m.wheel(m.runtime.onnxruntime)
    assert ort is not None
    built = ort_built_with_cuda(by_name[ort.key][0])
    if built and built != m.runtime.built_with_cuda:
        raise VerificationError(f"{by_name[ort.key][0]}: built with CUDA {built}, but "
                                f"{m.path.name} says [runtime] built_with_cuda = "
                                f"{m.runtime.built_with_cuda!r}")
    genai = m.wheel(GENAI_WHEEL)
    assert genai is not None
    facts = GENAI_FACTS.get(genai.version)
    floor = genai_onnxruntime_floor(by_name[genai.key][0])
    if facts is not None and floor != facts[0]:
        raise VerificationError(f"{by_name[genai.key][0]}: requires onnxruntime-gpu >= "
                                f"{floor or '(nothing)'}, but the compatibility check's record "
                                f"(gpu_manifest.GENAI_FACTS) says >= {facts[0]}")


def installed_packages(root: Path) -> set[str]:
    """Names dpkg lists as installed in ``root``."""
    return deb_closure_names((root / "var/lib/dpkg/status").read_text())


def stage_gpu(profile: Profile, lock: Lock, mirror: Path, root: Path) -> tuple[str, ...]:
    """Put the GPU packages (and the signing key) into the root before the deploy runs.

    Returns the staged .deb file names: every locked package the root does not have yet (the
    driver set and what it pulls: DKMS, compiler, kernel headers).

    Raises:
        VerificationError: a staged .deb does not match the lock.
    """
    have = installed_packages(root)
    dest = root / DEBS_IN_ROOT.lstrip("/")
    dest.mkdir(parents=True, exist_ok=True)
    staged = []
    for deb in lock.debs:
        if deb.name in have:
            continue
        src = mirror / deb.path
        if file_sha256(src) != deb.sha256:
            raise VerificationError(f"{src}: does not match the lock's sha256 {deb.sha256}")
        shutil.copyfile(src, dest / src.name)
        staged.append(src.name)
    _flat_repository(dest)
    conf = root / DKMS_CONF.lstrip("/")
    conf.parent.mkdir(parents=True, exist_ok=True)
    signing = profile.gpu_signing
    conf.write_text(dkms_conf(signing=signing is not None))
    if signing is not None:
        keys = root / KEYS_IN_ROOT.lstrip("/")
        keys.mkdir(mode=0o700, parents=True, exist_ok=True)
        for src, name in zip(signing, ("module.key", "module.crt"), strict=True):
            shutil.copyfile(src, keys / name)
            (keys / name).chmod(0o600)
    return tuple(sorted(staged))


def _flat_repository(directory: Path) -> None:
    """Packages, Release and a sources.list that make ``directory`` an apt repository."""
    tool = require_tool("apt-ftparchive")
    (directory / "Packages").write_bytes(run([tool, "packages", "."], cwd=directory).stdout)
    (directory / "Release").write_bytes(run([tool, "release", "."], cwd=directory).stdout)
    (directory / "sources.list").write_text(f"deb [trusted=yes] file:{DEBS_IN_ROOT} ./\n")


def kernel_release_in_root(root: Path) -> str:
    """The one kernel release installed in ``root`` (``/lib/modules/RELEASE``).

    Raises:
        ImageError: none, or more than one.
    """
    releases = sorted(p.name for p in (root / "lib/modules").iterdir() if (p / "kernel").is_dir())
    if len(releases) != 1:
        raise ImageError(f"{root}/lib/modules: expected one kernel, found {releases}")
    return releases[0]


def check_built_modules(root: Path, kernel_release: str, *, signed: bool) -> list[dict[str, str]]:
    """The DKMS modules in the root were built for ``kernel_release`` (and signed when asked).

    Reads each module's vermagic and signer with the build host's modinfo (a file read, nothing
    is loaded).  Returns one record per module.

    Raises:
        ImageError: no nvidia module, a vermagic of another kernel, or a missing signature.
    """
    moddir = root / "lib/modules" / kernel_release / "updates/dkms"
    modules = sorted(p for p in moddir.glob("*.ko*") if p.is_file())
    if not any(p.name.startswith("nvidia") for p in modules):
        raise ImageError(f"{moddir}: no nvidia module was built for {kernel_release}")
    modinfo = require_tool("modinfo")
    out = []
    for path in modules:
        vermagic = run([modinfo, "-F", "vermagic", path]).text.strip()
        signer = run([modinfo, "-F", "signer", path]).text.strip()
        if vermagic.split(" ", 1)[0] != kernel_release:
            raise ImageError(f"{path}: vermagic {vermagic!r} is not for the image's kernel "
                             f"{kernel_release}")
        if signed and not signer:
            raise ImageError(f"{path}: not signed, but [gpu] signing_key is set")
        out.append({"module": path.name, "vermagic": vermagic, "signer": signer})
    return out
