"""``appliance audit``: a compliance report of a root filesystem, offline.

The scanners run from a scanner root, never from the host: a small trixie root built with
mmdebstrap from the mirror's ``scanner/`` packages (OpenSCAP 1.4, the ComplianceAsCode
content of ``ssg-debian`` 0.1.82+, Lynis; all pinned in the mirror's lock) and cached by the
hash of those packages.  Each scan runs in a private mount namespace, chrooted into the scanner
root, with the audited root bind-mounted read-only at ``/target`` and the output directory at
``/out``; OpenSCAP reads the target through its offline mode (``OSCAP_PROBE_ROOT``).  No /proc
or /sys is mounted in the scanner root, so nothing reads the build host's kernel state: rules
that check the running kernel (sysctl runtime values, loaded modules, mounts) fail offline and
are for the audit of the booted image.

:func:`audit` takes any root directory, so the same code can audit a booted image's ``/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import stat
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.errors import NotFoundError
from agent.fsutil import file_sha256
from provisioning.errors import ImageError, ToolError
from provisioning.image.compliance import (
    RULE_PREFIX,
    ProfileSummary,
    Tailoring,
    baseline_failures,
    load_baseline,
    load_tailoring,
    runtime_only,
    summarize,
)
from provisioning.image.egress import from_json
from provisioning.image.mirror import (
    DEBIAN_KEYRING,
    SCANNER_DIR,
    SCANNER_PACKAGES,
    SCANNER_SUITE,
    Lock,
    verify_mirror,
)
from provisioning.tools import Completed, require_tool, run

__all__ = [
    "BOOTED_SCAN_DIR",
    "PROFILES",
    "AuditResult",
    "audit",
    "egress",
    "enabled_services",
    "exposure_failures",
    "lynis",
    "print_report",
    "root_of",
    "rules_without_values",
    "scanner_root",
    "services_exposure",
    "stage_booted_scan",
    "tree_digest",
    "unit_exposure",
]

log = logging.getLogger(__name__)

PROFILES = ("anssi_bp28_enhanced", "anssi_bp28_high", "cis_level1_server", "cis_level2_server")
DATASTREAM = "/usr/share/xml/scap/ssg/content/ssg-debian13-ds.xml"
# What a bench image with [diagnostics] console_scap carries for its node's own scan (under /).
BOOTED_SCAN_DIR = "usr/share/appliance/scap"
CONTENT_NAME = DATASTREAM.rpartition("/")[2]
COMPLIANCE_DIR = Path(__file__).resolve().parents[2] / "images" / "compliance"
DEFAULT_TAILORING = COMPLIANCE_DIR / "tailoring.xml"
_SCANNER_FORMAT = "1"  # bump when the scanner root's recipe changes (its cache key)

# Runs as root in a new mount namespace: the target read-only at /target, the output at /out,
# then the command chrooted into the scanner root with an empty environment plus $ENV.
_IN_SCANNER = """set -eu
scanner=$1 target=$2 out=$3
shift 3
mount --bind "$scanner" "$scanner"
mount -o remount,bind,ro "$scanner"
for d in tmp var/tmp run; do mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$scanner/$d"; done
mount --bind "$target" "$scanner/target"
mount -o remount,bind,ro "$scanner/target"
mount --bind "$out" "$scanner/out"
exec chroot "$scanner" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 "$@"
"""


def root_of(target: Path) -> Path:
    """The root filesystem in ``target`` (itself, or a build's --out directory).

    Raises:
        NotFoundError: ``target`` holds no root filesystem.
        ImageError: ``target`` is a file (a disk image).
    """
    for candidate in (target / "rootfs", target / "stages/configure/root", target):
        if (candidate / "etc/os-release").exists() or (candidate / "usr/lib/os-release").exists():
            return candidate.resolve()
    if target.is_file():
        raise ImageError(f"{target}: auditing a disk image needs its root mounted; pass the build's "
                         "--out directory or a root filesystem directory")
    raise NotFoundError(f"{target}: not a root filesystem or build output directory")


def _scanner_key(lock: Lock) -> str:
    h = hashlib.sha256(_SCANNER_FORMAT.encode())
    for f in sorted(lock.scanner_debs, key=lambda f: f.path):
        h.update(f"{f.path} {f.sha256}\n".encode())
    h.update(" ".join(SCANNER_PACKAGES).encode())
    return h.hexdigest()


SERVICE_EXPOSURE_GOAL = 5.0  # "OK" or better in systemd-analyze's words (issue #16's goal)
_NOT_TREE = frozenset({"target", "out", ".complete"})  # mount points and the record itself


def tree_digest(root: Path) -> str:
    """A digest of every name, type, mode, link target and file content under ``root`` (not
    following links; the scanner's mount points left out): the cached scanner root must be
    exactly what mmdebstrap built from the verified packages.  The audit mounts it read-only,
    so its own runs do not change it."""
    h = hashlib.sha256()
    for top, dirs, names in os.walk(root):
        here = Path(top)
        rel = here.relative_to(root)
        files = sorted(names)
        if rel == Path():
            dirs[:] = [d for d in dirs if d not in _NOT_TREE]
            files = [f for f in files if f not in _NOT_TREE]
        dirs.sort()
        for name in files + dirs:
            path = here / name
            st = path.lstat()
            h.update(f"{rel / name}\0{st.st_mode:o}\0".encode())
            if stat.S_ISLNK(st.st_mode):
                h.update(str(path.readlink()).encode())
            elif stat.S_ISREG(st.st_mode):
                h.update(file_sha256(path).encode())
            h.update(b"\n")
    return h.hexdigest()


def scanner_root(mirror: Path, cache: Path, *, keyring: Path = DEBIAN_KEYRING) -> Path:
    """The scanner root for ``mirror``'s scanner packages, built once into ``cache``.

    The mirror is verified first (every .deb back to Debian's signatures).

    Raises:
        NotFoundError, ImageError: no lock, or a lock without scanner packages.
        VerificationError: the mirror does not verify.
        ToolError: mmdebstrap fails.
    """
    lock = verify_mirror(mirror, keyring=keyring)
    if not lock.scanner_debs:
        raise ImageError(f"{mirror}: the lock holds no scanner packages; run `appliance mirror "
                         f"sync-scanner --mirror {mirror}` (network) first")
    key = _scanner_key(lock)[:16]
    dest = cache / f"scanner-{key}"
    if (dest / ".complete").is_file():
        try:
            recorded = json.loads((dest / ".complete").read_text())
        except ValueError:
            recorded = None
        if recorded == {"key": key, "tree": tree_digest(dest)}:
            return dest
        log.warning("%s: the cached scanner root changed since it was built; building it again", dest)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".scanner-{key}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    log.info("building the scanner root %s from %s", dest, mirror / SCANNER_DIR)
    run([require_tool("mmdebstrap"), "--variant=minbase", f"--include={','.join(SCANNER_PACKAGES)}",
         "--format=directory", SCANNER_SUITE, tmp,
         f"deb [trusted=yes] copy://{(mirror / SCANNER_DIR).resolve()} ./"], timeout=1800)
    for sub in ("target", "out", "var/tmp", "run"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    (tmp / ".complete").write_text(json.dumps({"key": key, "tree": tree_digest(tmp)}) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def _in_scanner(scanner: Path, root: Path, out: Path, argv: list[str],
                env: dict[str, str] | None = None) -> Completed:
    if os.geteuid() != 0:
        raise ImageError("the audit needs root: it bind-mounts the target read-only and chroots "
                         "into the scanner root (run it with sudo)")
    assignments = [f"{k}={v}" for k, v in sorted((env or {}).items())]
    return run([require_tool("unshare"), "--mount", "--propagation", "private",
                require_tool("sh"), "-c", _IN_SCANNER, "sh", scanner, root, out.resolve(),
                *assignments, *argv], check=False, timeout=3600)


def scap(scanner: Path, root: Path, out: Path, profile: str, tailoring: Tailoring) -> ProfileSummary:
    """Evaluate ``profile`` (short id) tailored by ``tailoring`` on ``root``; results in ``out``.

    Writes PROFILE.arf.xml, PROFILE.xccdf.xml, PROFILE.html and PROFILE.log.

    Raises:
        ImageError: the tailoring file has no profile extending ``profile``.
        ToolError: oscap fails (other than "some rule failed").
    """
    tailored = tailoring.profile_id(profile)
    shutil.copyfile(tailoring.path, out / "tailoring.xml")
    proc = _in_scanner(scanner, root, out, [
        "oscap", "xccdf", "eval", "--profile", tailored, "--tailoring-file", "/out/tailoring.xml",
        "--results", f"/out/{profile}.xccdf.xml", "--results-arf", f"/out/{profile}.arf.xml",
        "--report", f"/out/{profile}.html", DATASTREAM], env={"OSCAP_PROBE_ROOT": "/target"})
    (out / f"{profile}.log").write_bytes(proc.stdout + proc.stderr)
    if proc.returncode not in (0, 2) or not (out / f"{profile}.xccdf.xml").is_file():  # 2: a rule failed
        raise ToolError("oscap", proc.returncode, proc.stderr.decode(errors="replace")[-2000:])
    summary = summarize(out / f"{profile}.xccdf.xml", profile, tailoring.waivers.get(profile, {}))
    return replace(summary, runtime_only=runtime_only(out / f"{profile}.arf.xml", summary.failed))


def _content_version(scanner: Path) -> str:
    status = (scanner / "var/lib/dpkg/status").read_text(errors="replace")
    versions = []
    for name in ("ssg-debian", "openscap-scanner", "lynis"):
        found = re.search(rf"^Package: {re.escape(name)}\n(?:[^\n]+\n)*?Version: (\S+)", status,
                          re.MULTILINE)
        versions.append(f"{name} {found.group(1) if found else '?'}")
    return ", ".join(versions)


def lynis(scanner: Path, root: Path, out: Path) -> dict[str, Any]:
    """Lynis' hardening index of ``root``, run from the scanner root (``--rootdir /target``).

    The scanner root has no /proc or /sys, so the tests that read the running kernel (sysctl
    values, processes, loaded modules, mounts) find nothing rather than the build host's state;
    the kernel release Lynis prints is the host's (uname), which no file test uses.
    """
    proc = _in_scanner(scanner, root, out, [
        "lynis", "audit", "system", "--rootdir", "/target/", "--quick", "--no-colors",
        "--logfile", "/out/lynis.log", "--report-file", "/out/lynis-report.dat"])
    report = out / "lynis-report.dat"
    data = report.read_text(errors="replace") if report.is_file() else ""
    index = re.search(r"^hardening_index=(\d+)", data, re.MULTILINE)
    if index is None:  # Lynis writes the index last: without it the run did not finish
        raise ToolError("lynis", proc.returncode,
                        f"no hardening_index in {report}: "
                        + (proc.stderr.decode(errors="replace") or proc.text)[-2000:])
    if proc.returncode != 0:
        log.warning("lynis exited %d after a complete report (%s)", proc.returncode, report)
    version = re.search(r"^lynis_version=(.+)$", data, re.MULTILINE)
    warnings = re.findall(r"^warning\[\]=(.+)$", data, re.MULTILINE)
    suggestions = re.findall(r"^suggestion\[\]=(.+)$", data, re.MULTILINE)
    return {"hardening_index": int(index.group(1)) if index else None,
            "version": version.group(1) if version else "", "warnings": warnings,
            "suggestions": len(suggestions)}


def unit_exposure(root: Path, unit: str) -> dict[str, Any]:
    """``systemd-analyze security --offline`` of ``unit`` in ``root``: exposure 0 (best) to 10."""
    proc = run([require_tool("systemd-analyze"), "security", "--offline=yes", f"--root={root}",
                "--no-pager", unit], check=False)
    text = proc.text + proc.stderr.decode(errors="replace")
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\S+)", text)
    if not found:
        raise ToolError("systemd-analyze", proc.returncode, text[-2000:])
    failing = [line.strip() for line in proc.text.splitlines() if line.startswith("✗")]
    return {"unit": unit, "exposure": float(found.group(1)), "verdict": found.group(2),
            "failing": failing}


# Targets whose static wants (the packages' own, under /usr) run in the booted system
_BOOT_TARGETS = ("sysinit", "basic", "sockets", "multi-user", "graphical", "timers")
_UNIT_DIRS = ("etc/systemd/system", "usr/lib/systemd/system", "lib/systemd/system")


def _template(name: str) -> str:
    """The template of an instance (getty@tty1.service -> getty@.service); other names as they are."""
    return re.sub(r"@[^.]+\.", "@.", name)


def _unit_file(root: Path, name: str) -> Path | None:
    for d in _UNIT_DIRS:
        for candidate in (name, _template(name)):
            path = root / d / candidate
            if path.is_file() and not path.resolve().samefile(os.devnull):
                return path
    return None


def _masked(root: Path, name: str) -> bool:
    """``name`` is masked in /etc, itself or (an instance) through its template."""
    for candidate in {name, _template(name)}:
        link = root / "etc/systemd/system" / candidate
        if link.is_symlink() and str(link.readlink()) == os.devnull:
            return True
    return False


def enabled_services(root: Path) -> list[str]:
    """The services the booted image runs: those enabled in /etc (``*.wants``, ``*.requires``),
    those the boot targets want statically, and the services behind enabled sockets and
    paths; masked units and one-shot jobs that run and exit (they serve nothing) left out."""
    links: set[str] = set()
    for d, targets in (("etc/systemd/system", ("*",)), ("usr/lib/systemd/system", _BOOT_TARGETS),
                       ("lib/systemd/system", _BOOT_TARGETS)):
        for target in targets:
            for kind in ("wants", "requires"):
                pattern = f"{target}.target.{kind}" if target != "*" else f"*.{kind}"
                for wants in sorted((root / d).glob(pattern)):
                    if not _masked(root, wants.name.rpartition(".")[0]):  # a masked unit wants nothing
                        links.update(p.name for p in wants.iterdir())
    names: set[str] = set()
    for link in links:
        stem, _, kind = link.rpartition(".")
        if kind == "service":
            names.add(link)
        elif kind in ("socket", "path"):  # activates the service of the same name
            names.add(f"{stem.removesuffix('@')}{'@' if stem.endswith('@') else ''}.service")
    out = []
    for name in sorted(names):
        unit = _unit_file(root, name)
        if unit is None or _masked(root, name) or name.endswith("@.service"):
            continue
        service_type = re.search(r"^\s*Type\s*=\s*(\S+)", unit.read_text(errors="replace"), re.MULTILINE)
        if service_type is not None and service_type.group(1) == "oneshot":
            continue
        out.append(name)
    return out


def services_exposure(root: Path) -> list[dict[str, Any]]:
    """``systemd-analyze security`` of every service :func:`enabled_services` lists."""
    return [unit_exposure(root, name) for name in enabled_services(root)]


def exposure_failures(services: Iterable[Mapping[str, Any]],
                      goal: float = SERVICE_EXPOSURE_GOAL) -> list[str]:
    """One message per service above ``goal``: with a baseline, the audit fails on them too
    (every enabled service of the hil image meets the goal, so a new or loosened one is loud)."""
    return [f"{s['unit']}: systemd-analyze security exposure {s['exposure']} is above the goal {goal}"
            for s in services if float(s["exposure"]) > goal]


def egress(root: Path) -> dict[str, Any]:
    """What the image is configured to send to: the allowlist its metadata lists
    (``usr/lib/appliance/image.json``) and whether its firewall's output chain drops the rest."""
    path = root / "usr/lib/appliance/image.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        meta = {}
    try:
        rules = (root / "etc/nftables.conf").read_text()
    except OSError:
        rules = ""
    chain = re.search(r"hook output priority filter; policy (\w+);", rules)
    listed = meta.get("egress") if isinstance(meta, dict) else None
    allowed = None
    if listed is not None:
        if not isinstance(listed, list):
            raise ImageError(f"{path}: egress is {type(listed).__name__}, not a list of destinations")
        try:
            allowed = [asdict(d) for d in from_json(listed)]
        except ValueError as exc:
            raise ImageError(f"{path}: egress: {exc}") from None
    return {"allowed": allowed, "output_policy": chain.group(1) if chain else "none"}


@dataclass(frozen=True)
class AuditResult:
    root: Path
    scanner: str
    profiles: tuple[ProfileSummary, ...]
    lynis: dict[str, Any]
    systemd: dict[str, Any]
    egress: dict[str, Any]
    baseline: tuple[str, ...] = ()  # a message per profile below the baseline
    services: tuple[dict[str, Any], ...] = ()  # systemd-analyze security of every enabled service
    # profile -> ComplianceAsCode value -> the tailoring's value for it (stricter than the profile's)
    values: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    content: Path | None = None  # the datastream the scan used, in the scanner root

    def to_json(self) -> dict[str, Any]:
        return {"root": str(self.root), "scanner": self.scanner,
                "openscap": [s.to_json() for s in self.profiles], "lynis": self.lynis,
                "systemd": self.systemd, "services": list(self.services), "egress": self.egress,
                "baseline_failures": list(self.baseline),
                "tailored_values": {p: dict(v) for p, v in self.values.items()}}

    def compact(self, scope: str) -> dict[str, Any]:
        """The figures a node reports in its inventory (image.json's ``compliance``): per
        profile the pass ratio and counts, Lynis' index, the exposure of every enabled service;
        ``scope`` says what was audited.  No rule lists: those stay in the reports."""
        def profile(s: ProfileSummary) -> dict[str, Any]:
            c = s.counts
            return {"profile": s.profile, "pass_ratio": round(s.pass_ratio or 0.0, 4),
                    **{k: int(c.get(k, 0)) for k in ("pass", "fail", "waived", "notapplicable", "other")}}

        return {"scope": scope, "scanner": self.scanner, "profiles": [profile(s) for s in self.profiles],
                "lynis_hardening_index": int(self.lynis.get("hardening_index") or 0),
                "agent_exposure": float(self.systemd.get("exposure") or 0.0),
                "services": [{"unit": str(s["unit"]), "exposure": float(s["exposure"])}
                             for s in self.services]}


def audit(target: Path, *, mirror: Path, out: Path, cache: Path | None = None,
          profiles: tuple[str, ...] = PROFILES, tailoring: Path = DEFAULT_TAILORING,
          baseline: Path | None = None, unit: str = "appliance-agent.service",
          keyring: Path = DEBIAN_KEYRING) -> AuditResult:
    """Audit ``target`` (a root directory or a build's --out directory) offline.

    ``out`` receives, per profile, the ARF and XCCDF results, an HTML report and the log, plus
    Lynis' report and ``summary.json``.  The scanner root is cached in ``cache`` (default:
    ``MIRROR/../scanner-cache``).

    Raises:
        NotFoundError, ImageError: ``target`` is not a root filesystem; the mirror has no
            scanner; the tailoring or baseline file is malformed.
        VerificationError: the mirror does not verify.
        ToolError: a scanner fails.
    """
    root = root_of(target)
    tailor = load_tailoring(tailoring)
    floors = load_baseline(baseline) if baseline is not None else {}
    for profile in profiles:
        tailor.profile_id(profile)  # fail before the scans, not after the first
    scanner = scanner_root(mirror, cache or mirror.resolve().parent / "scanner-cache", keyring=keyring)
    out.mkdir(parents=True, exist_ok=True)
    summaries = tuple(scap(scanner, root, out, p, tailor) for p in profiles)
    services = tuple(services_exposure(root))
    result = AuditResult(
        root, _content_version(scanner), summaries, lynis(scanner, root, out),
        unit_exposure(root, unit), egress(root),
        (*baseline_failures(summaries, floors, baseline), *exposure_failures(services))
        if baseline is not None else (),
        services,
        {p: tailor.values.get(p, {}) for p in profiles}, scanner / DATASTREAM.lstrip("/"))
    (out / "summary.json").write_text(json.dumps(result.to_json(), indent=1) + "\n")
    return result


def rules_without_values(content: Path) -> frozenset[str]:
    """Short ids of ``content``'s rules whose check takes no XCCDF value (no ``check-export``).

    Such a rule's result cannot depend on the profile it is evaluated in: a profile (and the
    tailoring's ``set-value``) reaches a check only through the values it exports to it.

    Raises:
        ImageError: ``content`` is not XML.
    """
    free: set[str] = set()
    try:
        for _, el in ET.iterparse(content):  # noqa: S314 - the mirror's ssg content, signature checked
            tag = el.tag.rpartition("}")[2]
            if tag == "Rule":
                rule = el.get("id", "")
                if rule.startswith(RULE_PREFIX) and \
                        not any(c.tag.endswith("}check-export") for c in el.iter()):
                    free.add(rule.removeprefix(RULE_PREFIX))
                el.clear()
            elif tag == "component":  # one datastream component at a time in memory
                el.clear()
    except ET.ParseError as exc:
        raise ImageError(f"{content}: not SCAP content ({exc})") from None
    return frozenset(free)


def stage_booted_scan(root: Path, result: AuditResult, tailoring: Path = DEFAULT_TAILORING) -> Path:
    """Give ``root`` what its node needs to evaluate, running, what ``result`` (its offline
    audit) failed or could not decide (``ProfileSummary.recheck``: the checks that ask the
    running systemd about units read "unknown" on a directory): the content the audit used,
    the tailoring, and in ``BOOTED_SCAN_DIR``:

    - ``profiles``: a line per profile, ``PROFILE TAILORED_PROFILE_ID RULE...`` (short rule
      ids), the rules to evaluate in that profile;
    - ``same``: a line ``PROFILE RULE FROM_PROFILE`` for each failed rule that takes no value
      (:func:`rules_without_values`) and an earlier profile evaluates already: its result there
      is its result here.  Each such rule is evaluated once, not once per profile: under TCG
      ``audit_rules_privileged_commands``, which walks every file system the node can execute
      from, took most of a profile's 11 minutes, and three profiles fail it.

    Returns that directory.

    Raises:
        ImageError: ``result`` names no content (an audit result without a scanner root).
    """
    if result.content is None or not result.content.is_file():
        raise ImageError(f"the audit of {result.root} names no content to give the node "
                         f"({result.content})")
    tailor = load_tailoring(tailoring)
    free = rules_without_values(result.content)
    d = root / BOOTED_SCAN_DIR
    d.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.content, d / CONTENT_NAME)
    shutil.copyfile(tailoring, d / "tailoring.xml")
    lines, same = [], []
    first: dict[str, str] = {}  # a value-free rule -> the profile that evaluates it
    for s in result.profiles:
        here = []
        for rule in s.recheck:
            if rule in first:
                same.append(f"{s.profile} {rule} {first[rule]}\n")
                continue
            if rule in free:
                first[rule] = s.profile
            here.append(rule)
        if here:  # an empty --rule list would make oscap evaluate the whole profile
            lines.append(f"{s.profile} {tailor.profile_id(s.profile)} {' '.join(here)}\n")
    (d / "profiles").write_text("".join(lines))
    (d / "same").write_text("".join(same))
    for path in (d / CONTENT_NAME, d / "tailoring.xml", d / "profiles", d / "same"):
        path.chmod(0o644)
    return d


def print_report(result: AuditResult) -> None:
    """The report for people: one line per profile, then Lynis, systemd and egress."""
    print(f"root {result.root}; scanner: {result.scanner}")  # noqa: T201
    for s in result.profiles:
        print(s.line())  # noqa: T201
    ly = result.lynis
    print(f"Lynis {ly['version']}: hardening index {ly['hardening_index']}, "  # noqa: T201
          f"{len(ly['warnings'])} warnings, {ly['suggestions']} suggestions")
    sd = result.systemd
    print(f"systemd-analyze security {sd['unit']}: exposure {sd['exposure']} {sd['verdict']}")  # noqa: T201
    if result.services:
        worst = sorted(result.services, key=lambda s: -float(s["exposure"]))
        over = [s for s in worst if float(s["exposure"]) > SERVICE_EXPOSURE_GOAL]
        listed = ", ".join(f"{s['unit']} {s['exposure']}" for s in over) or "none"
        print(f"enabled services: {len(worst)}, {len(over)} above exposure "  # noqa: T201
              f"{SERVICE_EXPOSURE_GOAL}: {listed}")
    e = result.egress
    allowed = e["allowed"]
    listed = ", ".join(f"{d['why']} {d['proto']} {d['host'] or '*'}:{d['port']}" for d in allowed) \
        if allowed is not None else "not recorded in image.json"
    print(f"egress: output policy {e['output_policy']}; allowed: {listed or 'nothing'}")  # noqa: T201
    for profile, values in result.values.items():
        if values:
            print(f"{profile}: tailored values "  # noqa: T201
                  + ", ".join(f"{k} = {v}" for k, v in sorted(values.items())))
    for line in result.baseline:
        print(f"below baseline: {line}")  # noqa: T201
