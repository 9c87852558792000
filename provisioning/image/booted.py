"""The audit of the running node (issue #16, point 2), read from its serial console.

A bench image (``[diagnostics] console_lynis`` and ``console_scap``) runs the scanners itself,
once the agent serves: Lynis on the live system, and OpenSCAP on the rules the build's offline
audit failed or could not decide (plan.lynis_script, plan.scap_script).  Their results reach the console as
``appliance-lynis:`` and ``appliance-scap:`` lines.  :func:`booted_audit` joins them with the
build's offline audit (``OUT/audit/summary.json``): a rule the root's files pass holds on the
node too, whose root is those same bytes under dm-verity, so only the failed rules, and those a
directory cannot answer (what the running systemd says of its units), need the node.

``appliance audit-booted OUT --console LOG`` prints the result; the hil suite checks it against
the baseline's ``booted`` floors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provisioning.errors import ImageError
from provisioning.image.compliance import (
    BootedFloors,
    ProfileSummary,
    baseline_failures,
    booted_summary,
)
from provisioning.image.plan import BOOT_TIMES_PREFIX, LYNIS_PREFIX, SCAP_PREFIX

__all__ = ["BootedAudit", "boot_times_report", "booted_audit", "floor_failures", "lynis_report",
           "scap_report"]


def _last_report(console: str, prefix: str, what: str) -> list[str] | None:
    """The ``prefix`` lines (prefix stripped) of the console's last complete report, the one
    that ends at the last ``end`` line; None while there is none.

    Raises:
        ImageError: the node reported, after that, that the scan failed.
    """
    lines = [ln.split(prefix, 1)[1].strip() for ln in console.splitlines() if prefix in ln]
    ends = [i for i, ln in enumerate(lines) if ln == "end"]
    failed = [ln for ln in lines[ends[-1] + 1 if ends else 0:] if ln.startswith("failed:")]
    if failed:
        raise ImageError(f"{what} on the node: {failed[-1]}")
    if not ends:
        return None
    return lines[ends[-2] + 1 if len(ends) > 1 else 0:ends[-1]]


def lynis_report(console: str) -> tuple[dict[str, str], list[str]] | None:
    """The figures (key=value) and warnings of the console's last complete Lynis report, or
    None while there is none.

    Raises:
        ImageError: the node reported that Lynis failed, after its last complete report; the
            report's hardening index is not a whole number.
    """
    lines = _last_report(console, LYNIS_PREFIX, "Lynis")
    # the last figures line: a run cut short (a power cycle) printed none, or an earlier one
    start = max((i for i, ln in enumerate(lines or ()) if ln.startswith("hardening_index=")), default=None)
    if lines is None or start is None:
        return None
    figures = dict(f.split("=", 1) for f in lines[start].split() if "=" in f)
    if not figures["hardening_index"].isdigit():
        raise ImageError(f"Lynis on the node: hardening_index={figures['hardening_index']!r} is not "
                         "a whole number")
    return figures, [ln.removeprefix("warning ") for ln in lines[start + 1:]]


def boot_times_report(console: str) -> dict[str, list[str]] | None:
    """The console's last complete boot-times report (``[diagnostics] console_boot_times``):
    ``time`` (systemd-analyze time), ``chain`` (the agent's critical chain), ``blame`` (the
    slowest units), ``initrd`` (the initrd's systemd log) and ``gap`` (the journal lines around
    each silent stretch), each a list of lines; None while there is none.

    Raises:
        ImageError: the node reported, after that, that its boot never finished.
    """
    lines = _last_report(console, BOOT_TIMES_PREFIX, "the boot-times report")
    if lines is None:
        return None
    out: dict[str, list[str]] = {"time": [], "chain": [], "blame": [], "initrd": [], "gap": []}
    for line in lines:
        kind, _, rest = line.partition(" ")
        if kind in out:
            out[kind].append(rest)
    return out


def scap_report(console: str) -> dict[str, dict[str, str]] | None:
    """Profile -> rule -> result of the console's last complete OpenSCAP report, or None while
    there is none.

    Raises:
        ImageError: the node reported that the scan failed, after its last complete report.
    """
    lines = _last_report(console, SCAP_PREFIX, "OpenSCAP")
    if lines is None:
        return None
    out: dict[str, dict[str, str]] = {}
    for fields in (ln.split() for ln in lines):
        if len(fields) == 3:
            out.setdefault(fields[0], {})[fields[1]] = fields[2]
    return out


@dataclass(frozen=True)
class BootedAudit:
    """Per profile the offline and the booted result, and Lynis on the node."""

    offline: tuple[ProfileSummary, ...]
    booted: tuple[ProfileSummary, ...]
    node_results: Mapping[str, Mapping[str, str]]  # profile -> rule -> result, as the node gave them
    lynis: Mapping[str, str]  # hardening_index, tests, warnings, suggestions, version
    lynis_warnings: tuple[str, ...]

    @property
    def lynis_hardening_index(self) -> int:
        return int(self.lynis["hardening_index"])

    def to_json(self) -> dict[str, Any]:
        return {"scope": "the running node: its own scans, joined with the offline audit of its root",
                "openscap": [{"profile": b.profile, "offline": o.to_json(), "booted": b.to_json(),
                              "passing_only_on_the_node": sorted(
                                  r for r, res in self.node_results.get(b.profile, {}).items()
                                  if res == "pass")}
                             for o, b in zip(self.offline, self.booted, strict=True)],
                "lynis": {**self.lynis, "warnings": list(self.lynis_warnings)}}

    def lines(self) -> list[str]:
        out = []
        for o, b in zip(self.offline, self.booted, strict=True):
            out += [f"offline  {o.line()}", f"booted   {b.line()}"]
        figures = self.lynis
        out.append(f"Lynis on the node: hardening index {self.lynis_hardening_index} "
                   f"({figures.get('tests', '?')} tests, {len(self.lynis_warnings)} warnings, "
                   f"{figures.get('suggestions', '?')} suggestions; Lynis {figures.get('version', '?')})")
        out += [f"  warning {w}" for w in self.lynis_warnings]
        return out


def booted_audit(build: Path, console: str) -> BootedAudit:
    """Join the node's console reports with the offline audit of ``build`` (an ``appliance
    build --out`` directory whose profile had ``[compliance] audit``).

    Raises:
        ImageError: no offline audit in ``build``; a report missing, incomplete or failed on the
            console; the node evaluated other rules than the offline audit failed or left
            undecided.
    """
    summary = build / "audit" / "summary.json"
    try:
        doc = json.loads(summary.read_text())
        offline = tuple(ProfileSummary.from_json(p) for p in doc["openscap"])
    except OSError as exc:
        raise ImageError(f"{summary}: cannot read the build's offline audit ({exc.strerror}): "
                         "was the image built with [compliance] audit = true?") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ImageError(f"{summary}: not an audit summary ({exc!r})") from None
    except ImageError as exc:
        raise ImageError(f"{summary}: {exc}") from None
    scap = scap_report(console)
    if scap is None:
        raise ImageError("no complete OpenSCAP report (appliance-scap: lines) on the console: was the "
                         "image built with [diagnostics] console_scap = true, and has the node finished?")
    lynis = lynis_report(console)
    if lynis is None:
        raise ImageError("no complete Lynis report (appliance-lynis: lines) on the console: was the "
                         "image built with [diagnostics] console_lynis = true, and has the node finished?")
    booted = []
    for o in offline:
        node = scap.get(o.profile, {})
        if set(node) != set(o.recheck):
            missing, extra = sorted(set(o.recheck) - set(node)), sorted(set(node) - set(o.recheck))
            raise ImageError(f"{o.profile}: the node's results do not cover what the offline audit "
                             f"failed or left undecided (not evaluated: {missing[:10]}; "
                             f"neither failed nor undecided offline: {extra[:10]})")
        booted.append(booted_summary(o, node))
    return BootedAudit(offline, tuple(booted), scap, lynis[0], tuple(lynis[1]))


def floor_failures(result: BootedAudit, floors: BootedFloors, source: Path) -> list[str]:
    """One message per figure of ``floors`` that ``result`` does not reach (or lacks)."""
    out = baseline_failures(result.booted, floors.pass_ratios, source)
    index = floors.lynis_hardening_index
    if index is not None and result.lynis_hardening_index < index:
        out.append(f"Lynis hardening index {result.lynis_hardening_index} on the node is below "
                   f"{index} ({source})")
    return out
