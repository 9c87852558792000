"""``appliance audit``: a compliance report of a built root filesystem.

Three independent scanners, each run from outside the image:

- OpenSCAP (``oscap-chroot``) with the SCAP Security Guide's Debian 12 data stream from the
  ``ssg-debian`` package of Debian 13's archive (Debian 12's own package has content only for
  Debian 10/11).  The .deb is fetched with apt (signature checked, from a private apt state
  directory) and unpacked into a tools directory; nothing is installed on the host.
- Lynis' hardening index (``lynis audit system --rootdir``; some of its tests still read the
  host's /proc, so its index is indicative).
- ``systemd-analyze security --offline=yes --root=ROOT`` for the agent's unit.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

from agent.errors import NotFoundError
from provisioning.errors import ImageError, ToolError
from provisioning.tools import require_tool, run

__all__ = ["audit", "egress", "fetch_scap_content", "lynis", "print_report", "scap", "unit_exposure"]

log = logging.getLogger(__name__)

SCAP_SUITE = "trixie"
SCAP_DATASTREAM = "usr/share/xml/scap/ssg/content/ssg-debian12-ds.xml"
_XCCDF = "{http://checklists.nist.gov/xccdf/1.2}"


def _root_of(target: Path) -> Path:
    for candidate in (target / "rootfs", target / "stages/configure/root", target):
        if (candidate / "etc/os-release").exists() or (candidate / "usr/lib/os-release").exists():
            return candidate.resolve()
    if target.is_file():
        raise ImageError(f"{target}: auditing a disk image needs its root mounted; pass the build's "
                         "--out directory or a root filesystem directory")
    raise NotFoundError(f"{target}: not a root filesystem or build output directory")


def fetch_scap_content(tools: Path) -> tuple[Path, str]:
    """The ssg-debian12 data stream (and the package version), fetched once into ``tools``.

    Raises:
        ToolError: apt cannot fetch the package (no network and nothing cached).
    """
    dest = tools / "ssg-debian"
    stream = dest / SCAP_DATASTREAM
    version_file = dest / "VERSION"
    if stream.is_file() and version_file.is_file():
        return stream, version_file.read_text().strip()
    with tempfile.TemporaryDirectory(prefix="ssg-") as tmp:
        t = Path(tmp)
        (t / "lists/partial").mkdir(parents=True)
        (t / "archives/partial").mkdir(parents=True)
        (t / "sources.list").write_text(
            f"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
            f"http://deb.debian.org/debian {SCAP_SUITE} main\n")
        opts = ["-o", f"Dir::Etc::SourceList={t}/sources.list", "-o", "Dir::Etc::SourceParts=/dev/null",
                "-o", f"Dir::State::Lists={t}/lists", "-o", f"Dir::Cache={t}",
                "-o", f"Dir::Cache::Archives={t}/archives", "-o", "APT::Architecture=amd64",
                "-o", "Debug::NoLocking=1"]
        apt = require_tool("apt-get")
        run([apt, *opts, "update"])
        run([apt, *opts, "download", "ssg-debian"], cwd=t)
        deb = next(t.glob("ssg-debian_*.deb"))
        dest.mkdir(parents=True, exist_ok=True)
        run([require_tool("dpkg-deb"), "-x", deb, dest])
        version = run([require_tool("dpkg-deb"), "-f", deb, "Version"]).text.strip()
        version_file.write_text(version + "\n")
    return stream, version


def scap(root: Path, stream: Path, profile: str) -> dict[str, Any]:
    """Evaluate XCCDF profile ``profile`` (e.g. anssi_bp28_enhanced) on ``root``."""
    full = profile if profile.startswith("xccdf_") else f"xccdf_org.ssgproject.content_profile_{profile}"
    with tempfile.TemporaryDirectory(prefix="oscap-") as tmp:
        results = Path(tmp) / "results.xml"
        proc = run([require_tool("oscap-chroot"), root, "xccdf", "eval", "--profile", full,
                    "--results", results, stream], check=False, timeout=1800)
        if proc.returncode not in (0, 2) or not results.is_file():  # 2: some rule failed
            raise ToolError("oscap-chroot", proc.returncode, proc.stderr.decode(errors="replace"))
        tree = ET.parse(results)  # noqa: S314 - our own oscap's output
    rules = []
    benchmark_version = ""
    for el in tree.iter(f"{_XCCDF}Benchmark"):
        version = el.find(f"{_XCCDF}version")
        benchmark_version = version.text or "" if version is not None else ""
        break
    for rr in tree.iter(f"{_XCCDF}rule-result"):
        result = rr.find(f"{_XCCDF}result")
        rules.append({"rule": rr.get("idref", "").removeprefix("xccdf_org.ssgproject.content_rule_"),
                      "severity": rr.get("severity", ""),
                      "result": result.text if result is not None else "unknown"})
    counts = Counter(r["result"] for r in rules)
    applicable = counts["pass"] + counts["fail"]
    return {"profile": full, "content_version": benchmark_version, "counts": dict(counts),
            "pass_rate": round(counts["pass"] / applicable, 4) if applicable else None,
            "rules": rules}


def lynis(root: Path) -> dict[str, Any]:
    """Lynis' hardening index of ``root`` (``--rootdir``, quick mode)."""
    with tempfile.TemporaryDirectory(prefix="lynis-") as tmp:
        report = Path(tmp) / "report.dat"
        run([require_tool("lynis"), "audit", "system", "--rootdir", root, "--quick", "--no-colors",
             "--logfile", Path(tmp) / "lynis.log", "--report-file", report], check=False, timeout=1800)
        data = report.read_text(errors="replace") if report.is_file() else ""
    index = re.search(r"^hardening_index=(\d+)", data, re.MULTILINE)
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


def egress(root: Path) -> dict[str, Any]:
    """What the image is configured to send to: the allowlist its metadata lists
    (``usr/lib/appliance/image.json``) and whether its firewall's output chain drops the rest."""
    try:
        meta = json.loads((root / "usr/lib/appliance/image.json").read_text())
    except (OSError, ValueError):
        meta = {}
    try:
        rules = (root / "etc/nftables.conf").read_text()
    except OSError:
        rules = ""
    chain = re.search(r"hook output priority filter; policy (\w+);", rules)
    allowed = meta.get("egress") if isinstance(meta, dict) else None
    return {"allowed": allowed if isinstance(allowed, list) else None,
            "output_policy": chain.group(1) if chain else "none"}


def audit(target: Path, *, tools: Path | None = None, scap_profile: str = "anssi_bp28_enhanced",
          unit: str = "appliance-agent.service") -> dict[str, Any]:
    """Run all three scanners on ``target`` (a root directory or a build's --out directory).

    Raises:
        NotFoundError, ImageError: ``target`` is not a root filesystem.
        ToolError: a scanner is missing or fails.
    """
    root = _root_of(target)
    tools = tools or (target / ".tools" if (target / "stages").is_dir() else Path(".tools"))
    stream, ssg_version = fetch_scap_content(tools.resolve())
    result = scap(root, stream, scap_profile)
    result["ssg_package"] = f"ssg-debian {ssg_version} (Debian {SCAP_SUITE})"
    return {"root": str(root), "openscap": result, "lynis": lynis(root),
            "systemd": unit_exposure(root, unit), "egress": egress(root)}


def print_report(report: dict[str, Any]) -> None:
    """The report for people: per-rule results, then the three headline figures."""
    o = report["openscap"]
    for rule in o["rules"]:
        if rule["result"] in ("pass", "fail"):
            print(f"{rule['result']:<5} {rule['severity']:<7} {rule['rule']}")  # noqa: T201
    rate = f"{o['pass_rate'] * 100:.1f}%" if o["pass_rate"] is not None else "n/a"
    print(f"OpenSCAP {o['profile']} ({o['ssg_package']}, content {o['content_version']}): "  # noqa: T201
          f"{rate} of applicable rules pass; {o['counts']}")
    ly = report["lynis"]
    print(f"Lynis {ly['version']}: hardening index {ly['hardening_index']}, "  # noqa: T201
          f"{len(ly['warnings'])} warnings, {ly['suggestions']} suggestions")
    s = report["systemd"]
    print(f"systemd-analyze security {s['unit']}: exposure {s['exposure']} {s['verdict']}")  # noqa: T201
    e = report["egress"]
    allowed = e["allowed"]
    listed = ", ".join(f"{d['why']} {d['proto']} {d['host'] or '*'}:{d['port']}" for d in allowed) \
        if allowed is not None else "not recorded in image.json"
    print(f"egress: output policy {e['output_policy']}; allowed: {listed or 'nothing'}")  # noqa: T201
