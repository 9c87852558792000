"""A bench: site PKI, registry, the hil profile, the built image (for hil/ and `appliance demo --image`).

Everything is made once in a cache directory and reused (the CI system tier and a developer's
runs share ``/var/tmp/appliance-hil`` unless told otherwise), so a second run neither syncs nor
builds again: the mirror is synced only when it has no lock, and ``appliance build`` reruns only
the stages whose inputs changed.

    python -m provisioning.demo.bench prepare [--cache DIR]      # PKI, registry, mirror, image; prints JSON

The bench also bakes ``tiny-llm`` (the tiny decoder of :mod:`provisioning.demo.llm_models`,
bundled with golden token ids), which hil/ asks for chat completions on the HTTPS port.

The bundle ``affine`` computes ``y = x * scale + 1`` with ``scale`` 2 for odd last version parts
and 3 for even ones, so a reply shows which version served it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from provisioning.tools import require_tool, run

ROOT = Path(__file__).resolve().parents[2]
# A fixed, root-owned cache that CI and operators share (builds need root anyway).
DEFAULT_CACHE = Path(os.environ.get("APPLIANCE_HIL_CACHE", "/var/tmp/appliance-hil"))  # noqa: S108
REGISTRY_PORT = 18480  # images/hil.toml: [agent.updates] sources = ["http://10.0.2.100:18480"]
BUNDLE = "affine"
BAKED_VERSION = "1.0.1"
LLM = "tiny-llm"
LLM_VERSION = "1.0.0"
X = np.arange(8, dtype=np.float32).reshape(2, 4)


def scale_of(version: str) -> float:
    return 2.0 if int(version.rsplit(".", 1)[-1]) % 2 else 3.0


def expected(version: str) -> np.ndarray:
    return (X * np.float32(scale_of(version)) + np.float32(1.0)).astype(np.float32)


@dataclass(frozen=True)
class Bench:
    cache: Path
    pki: Path
    registry: Path  # the registry's own directory (keys, config); its tree is registry/published
    profile: Path
    mirror: Path
    out: Path

    @property
    def image(self) -> Path:
        return self.out / "disk" / "disk.raw"

    @property
    def pcr_key(self) -> Path:
        """The bench site's key that signs each UKI's PCR 11 policy ([tpm] pcr_key)."""
        return self.cache / "pcr.key"

    @property
    def client(self) -> dict[str, Path]:
        issued = self.pki / "issued" / "hil-admin"
        return {"ca": self.pki / "ca.crt", "cert": issued / "hil-admin.crt",
                "key": issued / "hil-admin.key"}


def bench_paths(cache: Path = DEFAULT_CACHE) -> Bench:
    return Bench(cache, cache / "pki", cache / "registry", cache / "images" / "hil.toml",
                 cache / "mirror", cache / "out")


def affine_bundle(work: Path, version: str) -> Path:
    """A real signed-off bundle ``affine`` at ``version`` (golden vectors included)."""
    from provisioning.bundle import create_bundle
    from provisioning.demo.models import affine_model, save_golden

    work.mkdir(parents=True, exist_ok=True)
    model = affine_model(work / f"{BUNDLE}-{version}.onnx", scale=scale_of(version))
    golden = save_golden(work / f"{BUNDLE}-{version}.npz", {"x": X})
    return create_bundle(model, name=BUNDLE, version=version, golden=[golden],
                         out=work / f"{BUNDLE}-{version}.bundle").path


def tiny_llm_bundle(work: Path, name: str = LLM, version: str = LLM_VERSION) -> Path:
    """A real LLM bundle of the tiny decoder (golden token ids recorded on onnxruntime-genai).

    Raises:
        BundleError, VerificationError: as :func:`provisioning.genbundle.create_generative_bundle`.
    """
    from provisioning.demo.llm_models import write_decoder
    from provisioning.genbundle import create_generative_bundle

    out = work / f"{name}-{version}.bundle"
    if not out.is_file():
        work.mkdir(parents=True, exist_ok=True)
        folder = write_decoder(work / f"{name}-{version}")
        create_generative_bundle(folder, out, kind="llm", name=name, version=version,
                                 context_length=256, max_tokens=64, kv_budget_tokens=1024,
                                 description="tiny test decoder (provisioning.demo.llm_models)")
    return out


def ensure_pki(bench: Bench) -> None:
    """The bench's site CA and an admin client certificate for the checks."""
    from provisioning.pki import init_pki, issue_client

    if not (bench.pki / "ca.crt").is_file():
        init_pki(bench.pki, organization="Sovereign Appliance HIL bench")
    if not bench.client["cert"].is_file():
        issue_client(bench.pki, "hil-admin", "admin", days=30)
    if not bench.pcr_key.is_file():
        from provisioning.image.pcrsign import new_pcr_key

        new_pcr_key(bench.pcr_key)


def publish_bundle_version(bench: Bench, version: str) -> str:
    """Add ``affine`` at ``version`` to the registry and publish; returns its target path."""
    from provisioning.image.bake import registry_targets
    from provisioning.registry import add_target, init_registry, publish, target_path

    path = target_path("bundle", BUNDLE, version, f"{BUNDLE}-{version}.bundle")
    if not (bench.registry / "registry.toml").exists():
        init_registry(bench.registry)
    elif path in registry_targets(bench.registry / "published"):
        return path  # published already: publishing again would change the baked metadata
    bundle = affine_bundle(bench.cache / "bundles", version)
    add_target(bench.registry, bundle, kind="bundle")
    publish(bench.registry)
    return path


def publish_llm(bench: Bench) -> str:
    """Add ``tiny-llm`` to the registry (made by :func:`publish_bundle_version`) and publish;
    returns its target path."""
    from provisioning.image.bake import registry_targets
    from provisioning.registry import add_target, publish, target_path

    bundle_name = f"{LLM}-{LLM_VERSION}.bundle"
    path = target_path("bundle", LLM, LLM_VERSION, bundle_name)
    if path in registry_targets(bench.registry / "published"):
        return path
    add_target(bench.registry, tiny_llm_bundle(bench.cache / "bundles"), kind="bundle")
    publish(bench.registry)
    return path


def hil_profile_text(pki: Path) -> str:
    """images/hil.toml with ``pki`` as its [pki] dir and its baseline's absolute path, to be
    written anywhere."""
    baseline = ROOT / "images" / "compliance" / "baseline.json"
    return ((ROOT / "images" / "hil.toml").read_text()
            .replace('dir = "../hil/site-pki"', f'dir = "{pki}"')
            .replace('baseline = "compliance/baseline.json"', f'baseline = "{baseline}"'))


def write_profile(bench: Bench, *baked_targets: str) -> Path:
    """images/hil.toml with this bench's PKI and registry (absolute paths)."""
    text = hil_profile_text(bench.pki)
    text = text.replace('registry = ""', f'registry = "{bench.registry / "published"}"')
    text = text.replace("targets = []", f"targets = {json.dumps(list(baked_targets))}")
    text += f'\n[tpm]\npcr_key = "{bench.pcr_key}"\n'  # the bench site signs its UKIs' PCR policy
    bench.profile.parent.mkdir(parents=True, exist_ok=True)
    if not bench.profile.is_file() or bench.profile.read_text() != text:
        bench.profile.write_text(text)
    return bench.profile


def source_digest() -> str:
    """sha256 of the agent's sources (the mirror's agent wheel is built from them at sync time)
    and of images/hil.toml (the mirror holds its package set)."""
    import hashlib

    digest = hashlib.sha256()
    files = [ROOT / "pyproject.toml", ROOT / "setup.py", ROOT / "images" / "hil.toml"]
    for package in ("agent", "provisioning"):
        files += sorted(p for p in (ROOT / package).rglob("*")
                        if p.suffix in (".py", ".proto", ".toml", ".yml", ".json", ".j2")
                        and "__pycache__" not in p.parts and not p.name.endswith(("_pb2.py", "_pb2_grpc.py")))
    for path in files:
        if path.is_file():
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _appliance(*args: str | Path, timeout: float, stream: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``appliance ARGS``; with ``stream`` its output (progress) goes to this stderr."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    argv = [sys.executable, "-m", "provisioning.cli", *map(str, args)]
    if stream:
        return subprocess.run(argv, env=env, stdout=sys.stderr, text=True, timeout=timeout, check=False)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _check(proc: subprocess.CompletedProcess[str], what: str) -> None:
    if proc.returncode != 0:
        tail = proc.stderr[-4000:] if proc.stderr is not None else "(its output is above)"
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{tail}")


def prepare(cache: Path = DEFAULT_CACHE, *, offline: bool = True, stream: bool = False) -> Bench:
    """PKI, registry (``affine`` 1.0.1 and ``tiny-llm`` baked), profile, mirror and image,
    reusing what exists.  With ``stream``, mirror sync and build show their progress on stderr.

    Raises:
        RuntimeError: mirror sync or the build failed (with the tail of its output).
    """
    bench = bench_paths(cache)
    cache.mkdir(parents=True, exist_ok=True)
    ensure_pki(bench)
    target = publish_bundle_version(bench, BAKED_VERSION)
    profile = write_profile(bench, target, publish_llm(bench))
    stamp = bench.cache / "mirror-source.sha256"
    digest = source_digest()
    if (not (bench.mirror / "lock.json").is_file() or not stamp.is_file()
            or stamp.read_text().strip() != digest):
        # (re)sync: the agent wheel in the mirror is built from this checkout
        _check(_appliance("mirror", "sync", profile, "--mirror", bench.mirror, timeout=3600,
                          stream=stream),
               "appliance mirror sync")
        stamp.write_text(digest + "\n")
    args: list[str | Path] = ["build", profile, "--mirror", bench.mirror, "--out", bench.out]
    if offline:
        args.append("--offline")
    _check(_appliance(*args, timeout=5400, stream=stream), "appliance build")
    return bench


OS_B_VERSION = "20260102.1"
# A newer release still that never comes up healthy: its UKI masks the agent, so the boot check
# reboots it unblessed until the try counter runs out (hil/test_os_update.py).
BROKEN_VERSION = "20260103.1"
NEVER_SERVES = ("systemd.mask=appliance-agent.service",)


def release_profile(text: str, version: str, kernel_args: tuple[str, ...] = ()) -> str:
    """The hil profile ``text`` as the OS release ``version``: no compliance audit, and
    ``kernel_args`` as its ``[boot] cmdline`` (in the profile's own [boot] section, if it has one)."""
    text = text.replace('name = "appliance"', f'name = "appliance"\nversion = "{version}"', 1)
    # The same root as the first build's but for its version: audited once, there (hil.toml's
    # [compliance]), which saves CI an audit (about 85 s) per release.
    text = re.sub(r"^audit = true\n(baseline = .*\n)?", "audit = false\n", text, count=1, flags=re.M)
    # Nor does the node scan itself again (the OpenSCAP scan needs the audit's results; Lynis
    # would run again on each new root, minutes under TCG while the update checks use the node),
    # but its root keeps the scanners, so the first build's rootfs stage serves this build too.
    for setting, package in (("console_scap", "openscap-scanner"), ("console_lynis", "lynis")):
        if re.search(rf"^{setting} = true\b", text, flags=re.M):
            text = re.sub(rf"^{setting} = true\b", f"{setting} = false", text, count=1, flags=re.M)
            text = _add_package(text, package)
    if kernel_args:
        cmdline = f"cmdline = {json.dumps(list(kernel_args))}\n"
        text = text.replace("\n[boot]\n", f"\n[boot]\n{cmdline}", 1) if "\n[boot]\n" in text \
            else f"{text}\n[boot]\n{cmdline}"
    return text


def _add_package(profile_text: str, package: str) -> str:
    """``profile_text`` with ``package`` added to its [debian] packages list."""
    def add(m: re.Match[str]) -> str:
        return f"packages = [{m.group(1)}{', ' if m.group(1) else ''}\"{package}\"]"

    return re.sub(r"^packages = \[(.*)\]$", add, profile_text, count=1, flags=re.M)


def prepare_os_release(bench: Bench, version: str = OS_B_VERSION, *,
                       kernel_args: tuple[str, ...] = ()) -> Path:
    """Build the hil profile again as ``[image] version = VERSION`` (rootfs stage cached, no
    compliance audit), with ``kernel_args`` as its ``[boot] cmdline``, and pack its sealed
    root as an OS release file; returns the file.

    Raises:
        RuntimeError: the build or the packing failed.
    """
    profile = bench.profile.with_name(f"hil-{version}.toml")
    text = release_profile(bench.profile.read_text(), version, kernel_args)
    if not profile.is_file() or profile.read_text() != text:
        profile.write_text(text)
    out = bench.cache / f"out-{version}"
    if not out.exists() and (bench.out / "stages" / "rootfs" / ".key").is_file():
        # the rootfs stage does not depend on the version: start from the first build's
        (out / "stages").mkdir(parents=True)
        run([require_tool("cp"), "-a", "--reflink=auto", str(bench.out / "stages" / "rootfs"),
             str(out / "stages" / "rootfs")])
    _check(_appliance("build", profile, "--mirror", bench.mirror, "--out", out, "--offline",
                      timeout=5400), f"appliance build (OS {version})")
    release = bench.cache / f"appliance-{version}.osrelease"
    _check(_appliance("os-release", out, "--out", release, timeout=600), "appliance os-release")
    return release


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m provisioning.demo.bench")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="PKI, registry, mirror and the hil image (cached)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--online", action="store_true", help="build without the network namespace")
    p.add_argument("--os-release", action="store_true",
                   help=f"also build versions {OS_B_VERSION} and {BROKEN_VERSION} (never serves) "
                   "and pack them as OS releases")
    args = parser.parse_args(argv)
    bench = prepare(args.cache, offline=not args.online)
    if args.os_release:
        releases = {"os_release": str(prepare_os_release(bench)),
                    "broken_os_release": str(prepare_os_release(bench, BROKEN_VERSION,
                                                                kernel_args=NEVER_SERVES))}
        sys.stdout.write(json.dumps(releases) + "\n")
    json.dump({"image": str(bench.image), "pki": str(bench.pki), "registry": str(bench.registry),
               **{k: str(v) for k, v in bench.client.items()}}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
