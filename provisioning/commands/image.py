"""``appliance mirror sync|verify``, ``appliance build`` and ``appliance audit``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from provisioning.errors import ImageError
from provisioning.output import emit_json, examples, print_table, progress

__all__ = ["register"]

log = logging.getLogger(__name__)


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    m = sub.add_parser("mirror", **examples(
            "appliance mirror sync images/edge.toml --mirror /srv/mirror",
            "appliance mirror verify /srv/mirror"),
        help="sync and verify the air-gapped local mirror", parents=[common])
    msub = m.add_subparsers(dest="mirror_command", metavar="ACTION")
    msub.required = True
    s = msub.add_parser("sync", **examples(
            "appliance mirror sync images/edge.toml --mirror /srv/mirror"),
        parents=[common],
                        help="fetch a profile's packages and wheels into a local mirror (network)")
    s.add_argument("profile", type=Path, help="image profile (images/*.toml)")
    s.add_argument("--mirror", type=Path, required=True, help="mirror directory")
    s.set_defaults(handler=_sync)
    sc = msub.add_parser("sync-scanner", **examples(
            "appliance mirror sync-scanner --mirror /srv/mirror"), parents=[common],
                         help="add the audit's scanner packages (OpenSCAP, ComplianceAsCode content, "
                              "Lynis) to a synced mirror (network)")
    sc.add_argument("--mirror", type=Path, required=True, help="a synced mirror directory")
    sc.add_argument("--archive", default="http://deb.debian.org/debian", help="Debian archive")
    sc.set_defaults(handler=_sync_scanner)

    v = msub.add_parser("verify", **examples('appliance mirror verify /srv/mirror --json'), parents=[common],
                        help="recheck every file of a mirror against its lock and Debian's signatures")
    v.add_argument("mirror", type=Path, help="the mirror directory")
    v.set_defaults(handler=_verify)

    b = sub.add_parser("build", **examples(
            "appliance build images/edge.toml --mirror /srv/mirror --out out --dry-run",
            "appliance build images/edge.toml --mirror /srv/mirror --out out --offline"),
        parents=[common],
                       help="build an image from a profile and a local mirror (no network)")
    b.add_argument("profile", type=Path, help="image profile (images/*.toml)")
    b.add_argument("--mirror", type=Path, required=True, help="a mirror synced for this profile")
    b.add_argument("--out", type=Path, required=True, help="output directory (stage cache inside)")
    b.add_argument("--offline", action="store_true",
                   help="run the build in a new network namespace with no interfaces (unshare -n)")
    b.add_argument("--dry-run", action="store_true",
                   help="check everything, print the stages and whether they are cached, build nothing")
    b.add_argument("--source-date-epoch", type=int, default=None,
                   help="timestamp for reproducible output (default: $SOURCE_DATE_EPOCH, "
                        "else the profile's)")
    b.set_defaults(handler=_build)

    r = sub.add_parser("os-release", **examples(
            "appliance os-release out --out edge-os.release --json"),
        parents=[common],
                       help="pack a build's sealed root (root + verity + UKI) as an OS release file",
                       description="Publish the file with `appliance registry add REGISTRY FILE --kind os "
                                   "--name NAME --version VERSION` (the JSON output gives both).")
    r.add_argument("build", type=Path, help="an `appliance build --out` directory")
    r.add_argument("--out", type=Path, required=True, help="the OS release file to write")
    r.set_defaults(handler=_os_release)

    a = sub.add_parser("audit", **examples(
            "appliance audit out --mirror /srv/mirror --out out/audit",
            "appliance audit out/stages/configure/root --mirror /srv/mirror --out audit "
            "--baseline images/compliance/baseline.json --json"),
        parents=[common],
                       help="compliance report of a built root filesystem, offline from the mirror "
                            "(OpenSCAP, Lynis, systemd)")
    a.add_argument("target", type=Path, help="a root filesystem directory or a build --out directory")
    a.add_argument("--mirror", type=Path, required=True,
                   help="a mirror holding the scanner packages (`appliance mirror sync-scanner`)")
    a.add_argument("--out", type=Path, required=True,
                   help="directory for the ARF/XCCDF results, HTML reports and summary.json")
    a.add_argument("--cache", type=Path, default=None,
                   help="where the scanner root is kept (default: scanner-cache beside the mirror)")
    a.add_argument("--profile", dest="profiles", action="append", default=None,
                   help="ComplianceAsCode profile id suffix, repeatable (default: anssi_bp28_enhanced, "
                        "anssi_bp28_high, cis_level1_server, cis_level2_server)")
    a.add_argument("--tailoring", type=Path, default=None,
                   help="XCCDF tailoring file with the waivers (default: images/compliance/tailoring.xml)")
    a.add_argument("--baseline", type=Path, default=None,
                   help="fail when a profile's pass ratio is below this file's (images/compliance/"
                        "baseline.json)")
    a.add_argument("--write-baseline", type=Path, default=None, metavar="FILE",
                   help="after the audit, record the ratios it reached in FILE, rounded down so that "
                        "the same root meets them again (refused when --baseline fails)")
    a.add_argument("--unit", default="appliance-agent.service", help="unit for systemd-analyze security")
    a.set_defaults(handler=_audit)

    b = sub.add_parser("audit-booted", **examples(
            "appliance audit-booted out --console console.log",
            "appliance audit-booted out --console console.log --baseline images/compliance/baseline.json "
            "--json"),
        parents=[common],
                       help="the running node's own audit (Lynis, OpenSCAP), read from its serial console "
                            "and joined with the build's offline audit")
    b.add_argument("build", type=Path, help="the `appliance build --out` directory of the image the node "
                   "runs (its audit/summary.json)")
    b.add_argument("--console", type=Path, required=True,
                   help="the node's serial console log, with its appliance-lynis: and appliance-scap: lines "
                        "(a bench image: [diagnostics] console_lynis and console_scap)")
    b.add_argument("--baseline", type=Path, default=None,
                   help="fail when a figure is below this file's booted floors "
                        "(images/compliance/baseline.json)")
    b.add_argument("--write-baseline", type=Path, default=None, metavar="FILE",
                   help="record the figures as FILE's booted floors, rounded down (refused when --baseline "
                        "fails)")
    b.set_defaults(handler=_audit_booted)


def _audit_booted(args: argparse.Namespace) -> int:
    from provisioning.image.booted import booted_audit, floor_failures
    from provisioning.image.compliance import booted_floors, write_booted_floors

    try:
        console = args.console.read_text(errors="replace")
    except OSError as exc:
        raise ImageError(f"{args.console}: cannot read the console log: {exc.strerror}") from None
    result = booted_audit(args.build, console)
    failures = floor_failures(result, booted_floors(args.baseline), args.baseline) \
        if args.baseline is not None else []
    written = args.write_baseline is not None and not failures  # never lower a gate that failed
    if written:
        write_booted_floors(args.write_baseline, result.lynis_hardening_index, result.booted)
    if args.json:
        emit_json({**result.to_json(), "baseline_failures": failures,
                   "baseline_written": str(args.write_baseline) if written else None})
    else:
        for line in result.lines():
            print(line)
        if written:
            print(f"booted floors written to {args.write_baseline} (ratios rounded down)")
    if failures:
        raise ImageError("below the booted floors: " + "; ".join(failures))
    return 0


def _os_release(args: argparse.Namespace) -> int:
    from provisioning.image.osrelease import make_os_release, read_release, registry_version

    path = make_os_release(args.build, args.out)
    release = read_release(path)
    doc = {"file": str(path), "name": release.name, "version": release.version,
           "registry_version": registry_version(release.version), "roothash": release.roothash,
           "size": path.stat().st_size}
    if args.json:
        emit_json(doc)
    else:
        print(f"{path}: OS {release.name} {release.version} (root hash {release.roothash[:16]}...); "
              f"publish: appliance registry add REGISTRY {path} --kind os --name {release.name} "
              f"--version {doc['registry_version']}")
    return 0


def _sync(args: argparse.Namespace) -> int:
    from provisioning.image.mirror import sync_mirror
    from provisioning.image.pipeline import stage_packages
    from provisioning.image.profile import load_profile

    profile = load_profile(args.profile)
    with progress("mirror", None) as bar:
        lock = sync_mirror(profile, args.mirror, extra_packages=stage_packages(profile), bar=bar)
    size = sum(f.size for f in lock.files())
    summary = {"mirror": str(args.mirror), "lock_sha256": lock.sha256, "suite": lock.suite,
               "architecture": lock.architecture, "debs": len(lock.debs), "wheels": len(lock.wheels),
               "bytes": size}
    if args.json:
        emit_json(summary)
    else:
        print(f"mirror {args.mirror}: {len(lock.debs)} packages, {len(lock.wheels)} wheels, "
              f"{size / 1e6:.0f} MB; lock sha256 {lock.sha256}")
    return 0


def _sync_scanner(args: argparse.Namespace) -> int:
    from provisioning.image.mirror import sync_scanner

    lock = sync_scanner(args.mirror, archive=args.archive)
    summary = {"mirror": str(args.mirror), "lock_sha256": lock.sha256,
               "scanner_debs": len(lock.scanner_debs)}
    if args.json:
        emit_json(summary)
    else:
        print(f"mirror {args.mirror}: {len(lock.scanner_debs)} scanner packages; "
              f"lock sha256 {lock.sha256}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from provisioning.image.mirror import load_lock, verify_mirror

    total = len(load_lock(args.mirror).files())
    with progress("verify", total) as bar:
        lock = verify_mirror(args.mirror, step=lambda _name: bar.advance())
    if args.json:
        emit_json({"mirror": str(args.mirror), "verified": True, "files": total,
                   "lock_sha256": lock.sha256})
    else:
        print(f"mirror {args.mirror}: {total} files verified (debs back to Debian's signed "
              f"InRelease); lock sha256 {lock.sha256}")
    return 0


def _reexec_offline(args: argparse.Namespace) -> None:
    """Re-run this very command inside ``unshare --net`` (a namespace with only a down lo)."""
    argv = [sys.executable, "-m", "provisioning.cli"]
    argv += ["--debug"] if args.debug else []
    argv += ["build", str(args.profile.resolve()), "--mirror", str(args.mirror.resolve()),
             "--out", str(args.out.resolve())]
    argv += ["--json"] if args.json else []
    if args.source_date_epoch is not None:
        argv += ["--source-date-epoch", str(args.source_date_epoch)]
    if args.dry_run:
        argv.append("--dry-run")
    env = dict(os.environ, APPLIANCE_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[2]),
                                                    env.get("PYTHONPATH", "")) if p)
    log.info("re-running the build in a network namespace with no interfaces (unshare --net)")
    # An exec of ourselves, not a tool: the gate's clean environment would drop PYTHONPATH.
    os.execve("/usr/bin/unshare", ["unshare", "--net", "--", *argv], env)  # noqa: S606


def _check_offline() -> None:
    # /proc/self/net/dev is per network namespace (/sys/class/net is the mount's, not ours).
    lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    ifaces = sorted(line.split(":")[0].strip() for line in lines)
    if ifaces != ["lo"]:
        raise ImageError(f"--offline: this network namespace has interfaces {ifaces}")


def _build(args: argparse.Namespace) -> int:
    from provisioning.image.pipeline import build, plan_build

    if args.offline and os.environ.get("APPLIANCE_OFFLINE") != "1":
        _reexec_offline(args)
    if os.environ.get("APPLIANCE_OFFLINE") == "1":
        _check_offline()
    plan = plan_build(args.profile, args.mirror, args.out, args.source_date_epoch)
    if args.dry_run:
        rows = [(s.name, s.key[:16], "cached" if s.cached else "to build") for s in plan.stages]
        if args.json:
            emit_json({"stages": [{"name": s.name, "key": s.key, "cached": s.cached}
                                  for s in plan.stages]})
        else:
            print_table(("stage", "key", "state"), rows)
        return 0
    result = build(plan)
    if args.json:
        emit_json(result)
    else:
        for stage in result["stages"]:
            print(f"{stage['name']:<10} {'cached' if stage['cached'] else 'built':<7} "
                  f"{stage['seconds']:7.1f} s  {stage['key'][:16]}")
        for name, path in sorted(result["outputs"].items()):
            print(f"{name:<10} {path}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from provisioning.image.audit import DEFAULT_TAILORING, PROFILES, audit, print_report
    from provisioning.image.compliance import write_baseline

    result = audit(args.target, mirror=args.mirror, out=args.out, cache=args.cache,
                   profiles=tuple(args.profiles or PROFILES),
                   tailoring=args.tailoring or DEFAULT_TAILORING, baseline=args.baseline,
                   unit=args.unit)
    written = args.write_baseline is not None and not result.baseline  # never lower a gate that failed
    if written:
        write_baseline(args.write_baseline, result.profiles,
                       f"{result.scanner}; offline scan of {result.root}")
    if args.json:
        emit_json({**result.to_json(), "baseline_written": str(args.write_baseline) if written else None})
    else:
        print_report(result)
        if written:
            print(f"baseline written to {args.write_baseline} (ratios rounded down)")
    if result.baseline:
        raise ImageError("below the baseline: " + "; ".join(result.baseline))
    return 0
