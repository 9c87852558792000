"""The configure stage: the agent, its unit and settings, baked bundles and hardening, in a chroot.

Steps, in order (each a small function):

1. :func:`stage_payload` puts the mirrored wheels (hash-checked again) into the root, and
   bakes the bundles: TUF-verified on the host, installed under the state directory.
2. :func:`run_deploy` applies the plan of :mod:`provisioning.image.plan` with pyinfra's
   ``@chroot`` connector (users, venv from wheels with ``--require-hashes``, files, units).
3. :func:`provisioning.image.apparmor.prune_profiles` leaves out the AppArmor profiles of
   programs the image does not have (compiled at first boot on the critical chain).
4. :func:`provisioning.image.outputs.normalise` makes the tree reproducible.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.errors import VerificationError
from provisioning.errors import ImageError, ToolError
from provisioning.image.apparmor import prune_profiles
from provisioning.image.bake import BakedBundle, bake_bundles
from provisioning.image.egress import egress_json
from provisioning.image.gpu_manifest import image_record
from provisioning.image.gpu_stage import check_built_modules, check_lock, kernel_release_in_root, stage_gpu
from provisioning.image.mirror import Lock, file_sha256
from provisioning.image.plan import AGENT_UID, WHEELS_IN_ROOT, configure_plan
from provisioning.image.profile import Profile
from provisioning.tools import run

__all__ = ["DEPLOY", "IMAGE_METADATA_IN_ROOT", "REGISTRY_IN_ROOT", "bake_node_tls", "configure_root",
           "image_version", "record_compliance", "run_deploy", "stage_payload", "write_image_metadata"]

log = logging.getLogger(__name__)

DEPLOY = Path(__file__).parent / "deploys" / "configure.py"
REGISTRY_IN_ROOT = "etc/appliance/registry"
# What the agent's inventory reads (agent.health.inventory.IMAGE_METADATA).
IMAGE_METADATA_IN_ROOT = "usr/lib/appliance/image.json"


def _inside(root: Path, path: str | Path) -> Path:
    return root / str(path).lstrip("/")


def stage_payload(profile: Profile, lock: Lock, mirror: Path, root: Path,
                  source_date_epoch: int = 0) -> list[BakedBundle]:
    """Copy the locked wheels into the root; verify and install the baked bundles.

    Raises:
        VerificationError: a wheel does not match the lock, or a bundle fails TUF or its own checks.
    """
    dest = _inside(root, WHEELS_IN_ROOT)
    dest.mkdir(parents=True, exist_ok=True)
    lines = []
    for wheel in lock.wheels:
        src = mirror / wheel.path
        if file_sha256(src) != wheel.sha256:
            raise VerificationError(f"{src}: does not match the lock's sha256 {wheel.sha256}")
        shutil.copyfile(src, dest / src.name)
        lines.append(f"{wheel.name}=={wheel.version} --hash=sha256:{wheel.sha256}")
    # Written from the lock, not copied from the mirror: the lock is what was verified.
    (dest / "requirements.txt").write_text("\n".join(lines) + "\n")
    registry = profile.registry_dir
    if registry is None or not profile.bundles.targets:
        return []
    state = _inside(root, profile.agent.server.state_dir)
    baked = bake_bundles(registry, profile.bundles.targets, state, _inside(root, REGISTRY_IN_ROOT),
                         installed_at=float(source_date_epoch))
    for path in [state, *state.rglob("*")]:
        os.lchown(path, AGENT_UID, AGENT_UID)
    state.chmod(0o700)
    return baked


def image_version(profile: Profile, source_date_epoch: int) -> str:
    """The image's version: the one the seal stage names the UKI with (from SOURCE_DATE_EPOCH)."""
    from provisioning.image.stage import version_from_epoch

    return getattr(profile.image, "version", "") or version_from_epoch(source_date_epoch)


def write_image_metadata(profile: Profile, root: Path, source_date_epoch: int) -> dict[str, Any]:
    """/usr/lib/appliance/image.json: name, version, CPU level, firmware manifest and the
    destinations the firewall lets the node send to (``egress``), for the inventory and audits.

    The root hash cannot be inside the root it hashes: the agent reads it from the kernel
    command line (``roothash=``) and the slot from the device under /dev/mapper/root.
    """
    doc = {"name": profile.image.name, "version": image_version(profile, source_date_epoch),
           "suite": profile.debian.suite, "cpu_level": profile.image.cpu_level,
           "firmware_manifest": profile.gpu_manifest.stem if profile.gpu_manifest else "",
           "egress": egress_json(profile)}
    path = _inside(root, IMAGE_METADATA_IN_ROOT)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():  # the GPU deploy wrote its "gpu" summary there first: keep it
        doc = {**json.loads(path.read_text()), **doc}
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    path.chmod(0o644)
    return doc


def record_compliance(root: Path, summary: Mapping[str, Any]) -> None:
    """Add the build's audit summary to image.json as ``compliance`` (the node's inventory
    reports it).  Written after the audit: the summary describes the root without itself."""
    path = _inside(root, IMAGE_METADATA_IN_ROOT)
    doc = {**json.loads(path.read_text()), "compliance": dict(summary)}
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def bake_node_tls(profile: Profile, root: Path) -> str:
    """Issue a node certificate from the profile's [pki] dir into /etc/appliance/tls.

    Writes node.crt, node.key (0600, owned by the agent's user: it refuses anything looser),
    ca.crt and a freshly signed crl.pem.  Returns the certificate's serial (hex).
    Every issue is recorded in the PKI's index, like any other.

    Raises:
        NotFoundError: the directory holds no CA. ConfigError, VerificationError: bad names
            or a wrong passphrase (see :func:`provisioning.pki.issue_node`).
    """
    from agent.fsutil import atomic_write_bytes
    from provisioning.image.profile import TLS_IN_ROOT
    from provisioning.pki import issue_node, load_passphrase, write_crl

    pki_dir = profile.pki_dir
    assert pki_dir is not None
    passphrase = load_passphrase(profile.pki_passphrase_file)
    name = profile.pki.node or profile.image.hostname
    with tempfile.TemporaryDirectory(prefix="node-tls-") as tmp:
        issued = issue_node(pki_dir, name, dns=profile.pki.dns, ips=profile.pki.ips,
                            days=profile.pki.days, passphrase=passphrase, out=Path(tmp))
        crl = write_crl(pki_dir, passphrase=passphrase)
        dest = _inside(root, TLS_IN_ROOT)
        dest.mkdir(parents=True, exist_ok=True)
        dest.chmod(0o750)
        os.chown(dest, 0, AGENT_UID)
        # the agent refuses a key others can read: its own, mode 0600
        files = {"node.crt": (Path(issued.cert_path), 0o644, 0),
                 "node.key": (Path(issued.key_path), 0o600, AGENT_UID),
                 "ca.crt": (pki_dir / "ca.crt", 0o644, 0), "crl.pem": (crl, 0o644, 0)}
        for rel, (src, mode, owner) in files.items():
            atomic_write_bytes(dest / rel, src.read_bytes(), mode=mode)
            os.chown(dest / rel, owner, AGENT_UID)
    log.info("baked node certificate %s (serial %x, DNS %s, IP %s) into %s", name, issued.serial,
             ",".join(issued.dns), ",".join(issued.ips), TLS_IN_ROOT)
    return f"{issued.serial:x}"


def _pip_wheel(root: Path) -> str:
    found = sorted(_inside(root, "usr/share/python-wheels").glob("pip-*.whl"))
    if not found:
        raise ImageError(f"{root}: no pip wheel in /usr/share/python-wheels (is python3-venv in "
                         "the package set?)")
    return "/" + found[-1].relative_to(root).as_posix()


def run_deploy(profile: Profile, root: Path, source_date_epoch: int, *, debug: bool = False,
               gpu: dict[str, Any] | None = None) -> None:
    """Apply the configure plan to ``root`` with pyinfra's chroot connector.

    ``gpu`` holds :func:`configure_plan`'s GPU arguments (kernel_release, gpu_record).

    Raises:
        ToolError: pyinfra (or a command it ran in the chroot) failed; pyinfra's exit code is
            not trusted for that (see the deploy's last operation).
    """
    plan = configure_plan(profile, pip_wheel=_pip_wheel(root), **(gpu or {}))
    with tempfile.TemporaryDirectory(prefix="configure-") as tmp:
        plan_file = Path(tmp) / "plan.json"
        plan_file.write_text(json.dumps(plan.to_json()))
        argv = [sys.executable, "-m", "pyinfra", "-y", "--no-wait", f"@chroot/{root}", str(DEPLOY),
                "--data", f"plan={plan_file}", "--data", f"source_date_epoch={source_date_epoch}"]
        if debug:
            argv.append("-v")
        done = root / ".appliance-configure-done"
        done.unlink(missing_ok=True)
        result = run(argv, cwd=Path(tmp), env={"SOURCE_DATE_EPOCH": str(source_date_epoch)},
                     timeout=3600)
        log.debug("%s", result.text[-4000:])
        if not done.is_file():  # an operation failed: pyinfra said so only in its output
            raise ToolError("pyinfra", result.returncode,
                            _failure_tail(result.text + result.stderr.decode(errors="replace")))
        done.unlink()


def _failure_tail(output: str) -> str:
    lines = output.splitlines()
    start = next((i for i, line in enumerate(lines) if "Error" in line or "E: " in line), 0)
    return "\n".join(lines[max(0, start - 15):start + 10])


def configure_root(profile: Profile, lock: Lock, mirror: Path, root: Path,
                   source_date_epoch: int, *, debug: bool = False) -> list[BakedBundle]:
    """Configure an extracted rootfs in place; returns the bundles baked into it.

    Raises:
        VerificationError: wheels or bundles fail verification.
        ToolError: pyinfra or a chroot command fails.
    """
    from provisioning.image.outputs import normalise

    baked = stage_payload(profile, lock, mirror, root, source_date_epoch)
    gpu = _stage_gpu(profile, lock, mirror, root)
    run_deploy(profile, root, source_date_epoch, debug=debug, gpu=gpu)
    prune_profiles(root)  # after the deploy: what it installed counts as present
    if gpu is not None:
        modules = check_built_modules(root, gpu["kernel_release"],
                                      signed=profile.gpu_signing is not None)
        log.info("GPU modules for %s: %s", gpu["kernel_release"],
                 ", ".join(f"{m['module']} (signer {m['signer'] or 'none'})" for m in modules))
    write_image_metadata(profile, root, source_date_epoch)
    if profile.pki_dir is not None:
        bake_node_tls(profile, root)
    normalise(root, source_date_epoch)
    return baked


def _stage_gpu(profile: Profile, lock: Lock, mirror: Path, root: Path) -> dict[str, Any] | None:
    """Stage the driver set into the root; the plan's GPU arguments (None without a GPU)."""
    if profile.gpu_set is None:
        return None
    compat = check_lock(profile, lock)
    release = kernel_release_in_root(root)
    debs = stage_gpu(profile, lock, mirror, root)
    log.info("GPU: %s, %d packages staged, DKMS for kernel %s (%s)", profile.gpu_set.manifest.id,
             len(debs), release, compat.basis)
    return {"kernel_release": release, "gpu_record": image_record(profile.gpu_set, compat)}
