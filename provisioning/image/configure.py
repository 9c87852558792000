"""The configure stage: the agent, its unit and settings, baked bundles and hardening, in a chroot.

Steps, in order (each a small function):

1. :func:`stage_payload` puts the mirrored wheels (hash-checked again) into the root, and
   bakes the bundles: TUF-verified on the host, installed under the state directory.
2. :func:`run_deploy` applies the plan of :mod:`provisioning.image.plan` with pyinfra's
   ``@chroot`` connector (users, venv from wheels with ``--require-hashes``, files, units).
3. :func:`provisioning.image.outputs.normalise` makes the tree reproducible.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from agent.errors import ImageError, ToolError, VerificationError
from agent.tools import run
from provisioning.image.bake import BakedBundle, bake_bundles
from provisioning.image.mirror import Lock, file_sha256
from provisioning.image.plan import AGENT_UID, WHEELS_IN_ROOT, configure_plan
from provisioning.image.profile import Profile

__all__ = ["DEPLOY", "REGISTRY_IN_ROOT", "configure_root", "run_deploy", "stage_payload"]

log = logging.getLogger(__name__)

DEPLOY = Path(__file__).parent / "deploys" / "configure.py"
REGISTRY_IN_ROOT = "etc/appliance/registry"


def _inside(root: Path, path: str | Path) -> Path:
    return root / str(path).lstrip("/")


def stage_payload(profile: Profile, lock: Lock, mirror: Path, root: Path) -> list[BakedBundle]:
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
    baked = bake_bundles(registry, profile.bundles.targets, state, _inside(root, REGISTRY_IN_ROOT))
    for path in [state, *state.rglob("*")]:
        os.lchown(path, AGENT_UID, AGENT_UID)
    state.chmod(0o700)
    return baked


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

    baked = stage_payload(profile, lock, mirror, root)
    gpu = _stage_gpu(profile, lock, mirror, root)
    run_deploy(profile, root, source_date_epoch, debug=debug, gpu=gpu)
    if gpu is not None:
        from provisioning.gpu import check_built_modules

        modules = check_built_modules(root, gpu["kernel_release"],
                                      signed=profile.gpu_signing is not None)
        log.info("GPU modules for %s: %s", gpu["kernel_release"],
                 ", ".join(f"{m['module']} (signer {m['signer'] or 'none'})" for m in modules))
    normalise(root, source_date_epoch)
    return baked


def _stage_gpu(profile: Profile, lock: Lock, mirror: Path, root: Path) -> dict[str, Any] | None:
    """Stage the driver set into the root; the plan's GPU arguments (None without a GPU)."""
    if profile.gpu_set is None:
        return None
    from provisioning.gpu import check_lock, image_record, kernel_release_in_root, stage_gpu

    compat = check_lock(profile, lock)
    release = kernel_release_in_root(root)
    debs = stage_gpu(profile, lock, mirror, root)
    log.info("GPU: %s, %d packages staged, DKMS for kernel %s (%s)", profile.gpu_set.manifest.id,
             len(debs), release, compat.basis)
    return {"kernel_release": release, "gpu_record": image_record(profile.gpu_set, compat)}
