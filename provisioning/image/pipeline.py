"""The build pipeline: a list of named stages, each cached by the hash of its inputs.

    rootfs     mmdebstrap from the mirror          -> stages/rootfs/rootfs.tar
    configure  pyinfra in the chroot, normalise    -> stages/configure/root/, manifest, SBOM
    seal       provisioning.image.seal.seal         -> stages/seal/ (squashfs, verity, UKI)
    disk       provisioning.image.disk.disk         -> stages/disk/disk.raw, image-manifest.json

A stage's key hashes its inputs, the source of the code that runs it and the previous
stage's key, so changing a baked bundle reruns configure and what follows, never rootfs.
A stage directory holds ``.key`` only once the stage finished; anything else is rebuilt.
:func:`plan_build` does every check (profile, lock, packages, tools) before any heavy work;
:func:`build` runs the plan.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.fsutil import atomic_write_text, file_sha256
from provisioning.errors import ImageError, ProfileError
from provisioning.image.audit import DEFAULT_TAILORING, audit, stage_booted_scan
from provisioning.image.disk import disk
from provisioning.image.egress import egress_json
from provisioning.image.gpu_manifest import gpu_packages
from provisioning.image.gpu_stage import check_lock
from provisioning.image.mirror import Lock, load_lock, missing_packages, verify_mirror
from provisioning.image.pcrsign import key_fingerprint, load_pcr_key
from provisioning.image.profile import Profile, load_profile, package_set
from provisioning.image.recovery import load_recovery_public_key
from provisioning.image.seal import PACKAGES as SEAL_PACKAGES
from provisioning.image.seal import SEALED_DATA_PACKAGES, seal
from provisioning.image.stage import DiskSizes, StageContext, version_from_epoch
from provisioning.tools import require_tool, run

__all__ = ["BuildContext", "BuildPlan", "PlannedStage", "Stage", "build", "plan_build",
           "stage_context", "stage_key", "stage_packages"]

log = logging.getLogger(__name__)

def stage_packages(profile: Profile | None = None) -> tuple[str, ...]:
    """Debian packages later stages need in the root (the seal stage's tools, and those of a
    sealed data partition's initrd when ``profile`` asks for one)."""
    extra = SEALED_DATA_PACKAGES if profile is not None and profile.tpm.seal_data else ()
    return tuple(sorted({*SEAL_PACKAGES, *extra}))


@dataclass
class BuildContext:
    """What every stage sees.  ``stage_dir`` is the running stage's own output directory."""

    profile: Profile
    mirror: Path
    lock: Lock
    out: Path
    source_date_epoch: int
    packages: tuple[str, ...]
    debug: bool = False
    stage_dir: Path = Path()
    artifacts: dict[str, Path] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    baked: list[dict[str, str]] = field(default_factory=list)

    def stage_path(self, name: str) -> Path:
        return self.out / "stages" / name

    @property
    def rootfs_tar(self) -> Path:
        return self.stage_path("rootfs") / "rootfs.tar"

    @property
    def root(self) -> Path:
        """The configured root filesystem directory (the seal stage's input)."""
        return self.stage_path("configure") / "root"


@dataclass(frozen=True)
class Stage:
    name: str
    modules: tuple[str, ...]  # source files hashed into the key
    inputs: Callable[[BuildContext], dict[str, Any]]
    run: Callable[[BuildContext], None]
    outputs: Callable[[BuildContext], dict[str, Path]]


@dataclass(frozen=True)
class PlannedStage:
    stage: Stage
    key: str
    cached: bool

    @property
    def name(self) -> str:
        return self.stage.name


@dataclass
class BuildPlan:
    ctx: BuildContext
    stages: list[PlannedStage]


def _code_digest(modules: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for name in modules:
        module = importlib.import_module(name)
        assert module.__file__
        digest.update(name.encode() + b"\0" + Path(module.__file__).read_bytes())
    for extra in sorted((Path(__file__).parent / "deploys").glob("*.py")):
        if "provisioning.image.configure" in modules:
            digest.update(extra.read_bytes())
    return digest.hexdigest()


def stage_key(name: str, modules: tuple[str, ...], inputs: dict[str, Any], previous: str) -> str:
    """sha256 over the stage name, its code, its inputs and the previous stage's key."""
    doc = {"stage": name, "code": _code_digest(modules), "inputs": inputs, "after": previous}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------ rootfs


def _rootfs_inputs(ctx: BuildContext) -> dict[str, Any]:
    d = ctx.profile.debian
    mmdebstrap = run([require_tool("mmdebstrap"), "--version"]).text.strip()
    return {"suite": d.suite, "architecture": d.architecture, "variant": d.variant,
            "packages": list(_rootfs_packages(ctx)), "debs": sorted(f.sha256 for f in ctx.lock.debs),
            "repo": [f.sha256 for f in ctx.lock.repo], "sde": ctx.source_date_epoch,
            "mmdebstrap": mmdebstrap}


def _rootfs_run(ctx: BuildContext) -> None:
    from provisioning.image.rootfs import build_rootfs_tar

    build_rootfs_tar(ctx.profile, _rootfs_packages(ctx), ctx.mirror, ctx.stage_dir / "rootfs.tar",
                     ctx.source_date_epoch, closure=len(ctx.lock.debs))


# ------------------------------------------------------------------ configure


def _registry_digest(profile: Profile) -> str:
    registry = profile.registry_dir
    if registry is None or not profile.bundles.targets:
        return ""
    digest = hashlib.sha256()
    for path in sorted((registry / "metadata").glob("*.json")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _pki_digest(profile: Profile) -> str:
    pki = profile.pki_dir
    if pki is None:
        return ""
    return hashlib.sha256((pki / "ca.crt").read_bytes()).hexdigest()


def _configure_inputs(ctx: BuildContext) -> dict[str, Any]:
    profile = ctx.profile.to_json()
    for key in ("path", "disk"):
        profile.pop(key)
    inputs = {"profile": profile, "wheels": sorted(f.sha256 for f in ctx.lock.wheels),
              "registry": _registry_digest(ctx.profile), "sde": ctx.source_date_epoch,
              "pki": _pki_digest(ctx.profile)}
    if ctx.profile.compliance.audit:  # the configure stage audits its root with these
        baseline = ctx.profile.compliance_baseline
        inputs["compliance"] = {
            "scanner": sorted(f.sha256 for f in ctx.lock.scanner_debs),
            "tailoring": file_sha256(DEFAULT_TAILORING),
            "baseline": file_sha256(baseline) if baseline is not None else ""}
    if ctx.profile.gpu_set is not None:  # the configure stage installs these packages
        inputs["gpu"] = {"manifest": ctx.profile.gpu_set.to_json(),
                         "debs": sorted(f.sha256 for f in ctx.lock.debs),
                         "signing": [hashlib.sha256(p.read_bytes()).hexdigest()
                                     for p in ctx.profile.gpu_signing or ()]}
    return inputs


def _configure_run(ctx: BuildContext) -> None:
    from provisioning.image.configure import configure_root
    from provisioning.image.outputs import debian_packages, file_manifest, python_packages, spdx_sbom

    root = ctx.stage_dir / "root"
    root.mkdir()
    run([require_tool("tar"), "--extract", "--file", ctx.rootfs_tar, "--directory", root,
         "--numeric-owner", "--preserve-permissions", "--xattrs", "--xattrs-include=*"])
    baked = configure_root(ctx.profile, ctx.lock, ctx.mirror, root, ctx.source_date_epoch,
                           debug=ctx.debug)
    compliance = _audit_root(ctx, root) if ctx.profile.compliance.audit else None
    manifest = {
        "image": ctx.profile.image.name, "suite": ctx.profile.debian.suite,
        "architecture": ctx.profile.debian.architecture,
        "source_date_epoch": ctx.source_date_epoch, "lock_sha256": ctx.lock.sha256,
        "bundles": [b.to_json() for b in baked], "packages": debian_packages(root),
        "python": python_packages(root), "files": file_manifest(root),
    }
    if compliance is not None:
        manifest["compliance"] = compliance
    atomic_write_text(ctx.stage_dir / "manifest.json",
                      json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    sbom = spdx_sbom(root, ctx.profile, ctx.lock, ctx.mirror, ctx.source_date_epoch, files=manifest["files"])
    atomic_write_text(ctx.stage_dir / "sbom.spdx.json", json.dumps(sbom, indent=1, sort_keys=True) + "\n")


def _audit_root(ctx: BuildContext, root: Path) -> dict[str, Any]:
    """``appliance audit`` of the configured root, its reports kept in the stage's ``audit/``;
    the summary goes into the root's image.json.  Below the profile's baseline the build fails.

    Raises:
        ImageError: a profile fell below the baseline (the reports stay for reading).
    """
    from provisioning.image.configure import record_compliance

    reports = ctx.stage_dir / "audit"
    log.info("auditing the configured root (offline; reports in %s)", reports)
    result = audit(root, mirror=ctx.mirror, out=reports, baseline=ctx.profile.compliance_baseline)
    for s in result.profiles:
        log.info("audit: %s", s.line())
    if result.baseline:
        raise ImageError(f"{ctx.profile.path}: [compliance] baseline = "
                         f"{ctx.profile.compliance.baseline!r}: the image fell below it: "
                         f"{'; '.join(result.baseline)} (reports: {reports})")
    log.info("audit: Lynis hardening index %s; %s exposure %s", result.lynis.get("hardening_index"),
             result.systemd.get("unit"), result.systemd.get("exposure"))
    summary = result.compact("offline scan of the built root")
    record_compliance(root, summary)
    if ctx.profile.diagnostics.console_scap:  # the node scans again what failed here
        log.info("audit: the content and the failed rules for the node's own scan in %s",
                 stage_booted_scan(root, result))
    return summary


def _configure_outputs(ctx: BuildContext) -> dict[str, Path]:
    d = ctx.stage_path("configure")
    out = {"rootfs": d / "root", "manifest": d / "manifest.json", "sbom": d / "sbom.spdx.json"}
    if ctx.profile.compliance.audit:
        out["audit"] = d / "audit"
    return out


# ------------------------------------------------------------------ seal, disk (other modules)


def stage_context(ctx: BuildContext, stage: str) -> StageContext:
    """What the seal or disk stage ``stage`` is given in this build: the configured root as
    input, its own stage directory as output, the profile's name, version and ``[disk]`` sizes."""
    profile = ctx.profile
    out = ctx.stage_path(stage)
    disk_section = profile.disk
    return StageContext(
        rootfs=ctx.root, out=out, work=out / ".work", source_date_epoch=ctx.source_date_epoch,
        version=profile.image.version or version_from_epoch(ctx.source_date_epoch),
        name=profile.image.name,
        sizes=DiskSizes(disk_section.esp_mib, disk_section.root_mib, disk_section.data_mib,
                        disk_section.data_label),
        sealed=ctx.stage_path("seal"),
        cpu_level=profile.image.cpu_level,
        egress=tuple(egress_json(profile)),
        pcr_key=profile.pcr_key,
        seal_data=profile.tpm.seal_data,
        recovery_key=profile.recovery_key,
        boot_tries=profile.boot.tries,
    )


def _sealed_stage(name: str, module: str, run_stage: Callable[[StageContext], object]) -> Stage:
    """The seal or disk stage: ``run_stage`` on this build's :func:`stage_context`."""
    def inputs(ctx: BuildContext) -> dict[str, Any]:
        data: dict[str, Any] = {"sde": ctx.source_date_epoch}
        if name == "seal" and ctx.profile.pcr_key is not None:  # the key's public half names it
            data["pcr_key"] = key_fingerprint(load_pcr_key(ctx.profile.pcr_key).public_key())
            data["seal_data"] = ctx.profile.tpm.seal_data
        if name == "seal" and ctx.profile.recovery_key is not None:
            data["recovery_key"] = load_recovery_public_key(ctx.profile.recovery_key).decode()
        if name == "disk":
            data["disk"] = ctx.profile.to_json()["disk"]
            data["cpu_level"] = ctx.profile.image.cpu_level  # recorded in image-manifest.json
            data["egress"] = egress_json(ctx.profile)  # recorded in image-manifest.json too
            data["tries"] = ctx.profile.boot.tries  # the first UKI's try counter; the manifest's too
        return data

    def outputs(ctx: BuildContext) -> dict[str, Path]:
        d = ctx.stage_path(name)
        return {f"{name}/{p.name}": p for p in sorted(d.iterdir()) if not p.name.startswith(".")}

    def run(ctx: BuildContext) -> None:
        run_stage(stage_context(ctx, name))

    return Stage(name, (module,), inputs, run, outputs)


def _stages() -> list[Stage]:
    return [
        Stage("rootfs", ("provisioning.image.rootfs", "provisioning.image.pipeline"),
              _rootfs_inputs, _rootfs_run, lambda ctx: {"rootfs.tar": ctx.rootfs_tar}),
        Stage("configure", ("provisioning.image.configure", "provisioning.image.plan",
                            "provisioning.image.outputs", "provisioning.image.bake",
                            "provisioning.image.audit", "provisioning.image.compliance",
                            "provisioning.image.gpu_manifest", "provisioning.image.gpu_stage"),
              _configure_inputs, _configure_run, _configure_outputs),
        _sealed_stage("seal", "provisioning.image.seal", seal),
        _sealed_stage("disk", "provisioning.image.disk", disk),
    ]


# ------------------------------------------------------------------ plan and build


def _source_date_epoch(profile: Profile, given: int | None) -> int:
    if given is not None:
        return given
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env:
        if not env.isdigit():
            raise ImageError(f"SOURCE_DATE_EPOCH = {env!r}: not a number of seconds")
        return int(env)
    return profile.image.source_date_epoch


def _check_mirror(profile: Profile, lock: Lock, mirror: Path, extra: tuple[str, ...]) -> None:
    where = str(profile.path)
    if (lock.suite, lock.architecture) != (profile.debian.suite, profile.debian.architecture):
        raise ProfileError(f"{where}: [debian] suite = {profile.debian.suite!r}: the mirror "
                           f"{mirror} holds {lock.suite}/{lock.architecture}")
    missing = missing_packages(profile, lock, extra)
    if missing:
        raise ProfileError(f"{where}: [debian] packages = {missing[0]!r}: not in the mirror "
                           f"{mirror} (missing: {', '.join(missing)}); run `appliance mirror sync "
                           f"{profile.path} --mirror {mirror}`")
    if lock.onnxruntime != profile.python.onnxruntime:
        raise ProfileError(f"{where}: [python] onnxruntime = {profile.python.onnxruntime!r}: the "
                           f"mirror's wheels were synced for {lock.onnxruntime!r}")
    if profile.gpu_set is not None:
        check_lock(profile, lock)
    if profile.compliance.audit and not lock.scanner_debs:
        raise ProfileError(f"{where}: [compliance] audit = true: the mirror {mirror} has no scanner "
                           f"packages; run `appliance mirror sync-scanner --mirror {mirror}`")


def plan_build(profile_path: Path, mirror: Path, out: Path,
               source_date_epoch: int | None = None, *, debug: bool = False) -> BuildPlan:
    """Check everything a build needs and compute each stage's key; touches nothing.

    Raises:
        ProfileError: the profile is bad, or asks for packages or wheels the mirror lacks.
        NotFoundError, ImageError: no usable lock in the mirror.
        ToolError: a tool the build needs is not installed.
    """
    profile = load_profile(profile_path)
    lock = load_lock(mirror)
    extra = stage_packages(profile)
    _check_mirror(profile, lock, mirror, extra)
    for tool in ("mmdebstrap", "tar", "chroot", "gpgv"):
        require_tool(tool)
    if profile.gpu_set is not None:  # GPU: a flat repository in the root; modules checked
        for tool in ("apt-ftparchive", "modinfo"):
            require_tool(tool)
    ctx = BuildContext(profile, mirror.resolve(), lock, out.resolve(),
                       _source_date_epoch(profile, source_date_epoch),
                       package_set(profile, extra), debug)
    planned: list[PlannedStage] = []
    previous = ""
    for stage in _stages():
        key = stage_key(stage.name, stage.modules, stage.inputs(ctx), previous)
        key_file = ctx.stage_path(stage.name) / ".key"
        cached = key_file.is_file() and key_file.read_text().strip() == key
        planned.append(PlannedStage(stage, key, cached))
        previous = key
    return BuildPlan(ctx, planned)


def _rootfs_packages(ctx: BuildContext) -> tuple[str, ...]:
    """The rootfs stage's packages: the GPU set is installed by the configure stage instead."""
    if ctx.profile.gpu_set is None:
        return ctx.packages
    gpu = set(gpu_packages(ctx.profile))
    return tuple(p for p in ctx.packages if p not in gpu)


class _BuildLog:
    """Everything logged during the build also goes, with tool commands, to OUT/build.log."""

    def __init__(self, path: Path) -> None:
        self.handler = logging.FileHandler(path, mode="w")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        self.root = logging.getLogger()
        self.saved = self.root.level

    def __enter__(self) -> None:
        for h in self.root.handlers:
            if h.level == logging.NOTSET:
                h.setLevel(self.saved)
        self.root.addHandler(self.handler)
        self.root.setLevel(logging.DEBUG)

    def __exit__(self, *exc: object) -> None:
        self.root.removeHandler(self.handler)
        self.root.setLevel(self.saved)
        self.handler.close()


def _publish(ctx: BuildContext, outputs: dict[str, Path]) -> None:
    """Top-level names in OUT for the stage outputs (symlinks into stages/)."""
    for name, target in outputs.items():
        link = ctx.out / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.is_file():
            link.unlink()
        link.symlink_to(os.path.relpath(target, link.parent))


def build(plan: BuildPlan) -> dict[str, Any]:
    """Run every stage that is not cached; returns a summary (stages, keys, outputs).

    Raises:
        VerificationError: the mirror does not verify (checked before any stage runs).
        ImageError, ToolError: a stage failed (its output directory is left without a key).
    """
    from provisioning.output import progress

    ctx = plan.ctx
    ctx.out.mkdir(parents=True, exist_ok=True)
    summary: list[dict[str, Any]] = []
    with _BuildLog(ctx.out / "build.log"):
        log.info("build %s: suite %s, SOURCE_DATE_EPOCH %d, mirror lock %s", ctx.profile.path,
                 ctx.profile.debian.suite, ctx.source_date_epoch, ctx.lock.sha256)
        log.info("verifying the mirror (every file against the lock, debs against Debian's signature)")
        verify_mirror(ctx.mirror)
        with progress("build", len(plan.stages)) as bar:
            for planned in plan.stages:
                summary.append(_run_stage(ctx, planned))
                bar.advance()
        outputs: dict[str, Path] = {}
        for planned in plan.stages:
            outputs.update(planned.stage.outputs(ctx))
        _publish(ctx, outputs)
        outputs["build.log"] = ctx.out / "build.log"
        log.info("build finished: %s", ", ".join(f"{s['name']} {'cached' if s['cached'] else 'built'}"
                                                   for s in summary))
    return {"stages": summary, "outputs": {k: str(v) for k, v in outputs.items()},
            "source_date_epoch": ctx.source_date_epoch, "lock_sha256": ctx.lock.sha256}


def _run_stage(ctx: BuildContext, planned: PlannedStage) -> dict[str, Any]:
    name, key = planned.name, planned.key
    ctx.keys[name] = key
    ctx.stage_dir = ctx.stage_path(name)
    started = time.monotonic()
    if planned.cached:
        log.info("stage %s: cached (%s)", name, key[:16])
    else:
        log.info("stage %s: building (%s)", name, key[:16])
        if ctx.stage_dir.exists():
            shutil.rmtree(ctx.stage_dir)
        ctx.stage_dir.mkdir(parents=True)
        planned.stage.run(ctx)
        atomic_write_text(ctx.stage_dir / ".key", key + "\n")
    seconds = time.monotonic() - started
    log.info("stage %s: done in %.1f s", name, seconds)
    return {"name": name, "key": key, "cached": planned.cached, "seconds": round(seconds, 2)}
