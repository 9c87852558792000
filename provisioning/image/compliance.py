"""Compliance results, waivers and the regression baseline, free of scanners and subprocesses.

The audit (:mod:`provisioning.image.audit`) runs OpenSCAP; this module reads what it wrote:

- the tailoring file (``images/compliance/tailoring.xml``): one tailored profile per
  ComplianceAsCode profile, each waiver an ``xccdf:refine-rule`` with ``role="unscored"``
  (OpenSCAP keeps the rule in its report, marked "informational", and out of its score) and
  two remarks: the reason, then ``Control: `` and what replaces the rule;
- an XCCDF results file: the per-rule results, counted into one :class:`ProfileSummary`,
  where a waived rule counts as ``waived`` whatever its result, never as a pass;
- the baseline (``images/compliance/baseline.json``): the pass ratio each profile reached,
  which a later audit may not fall below.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.fsutil import atomic_write_text
from provisioning.errors import ImageError

__all__ = [
    "RULE_PREFIX",
    "SSG_PROFILE_PREFIX",
    "BootedFloors",
    "ProfileSummary",
    "Tailoring",
    "Waiver",
    "baseline_failures",
    "booted_floors",
    "booted_summary",
    "load_baseline",
    "load_tailoring",
    "runtime_only",
    "summarize",
    "write_baseline",
    "write_booted_floors",
]

XCCDF_NS = "http://checklists.nist.gov/xccdf/1.2"
_X = f"{{{XCCDF_NS}}}"
RULE_PREFIX = "xccdf_org.ssgproject.content_rule_"
VALUE_PREFIX = "xccdf_org.ssgproject.content_value_"
SSG_PROFILE_PREFIX = "xccdf_org.ssgproject.content_profile_"
_CONTROL = "Control: "
# Results that say the rule was evaluated on this system; the ratio's denominator.  error and
# unknown count against the system: a rule the scanner could not decide is not a pass.
_APPLICABLE = ("pass", "fail", "error", "unknown")
_UNDECIDED = ("error", "unknown")  # applicable, neither pass nor fail
BASELINE_FORMAT = 1


@dataclass(frozen=True)
class Waiver:
    rule: str  # short id, without RULE_PREFIX
    reason: str
    control: str  # what replaces the rule on the appliance


@dataclass(frozen=True)
class Tailoring:
    """The tailored profiles of one tailoring file: base profile (short id) -> tailored id,
    and its waivers by rule."""

    path: Path
    tailored: Mapping[str, str]
    waivers: Mapping[str, Mapping[str, Waiver]]
    # base profile -> value id (short, without VALUE_PREFIX) -> the appliance's value
    values: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def profile_id(self, profile: str) -> str:
        """The tailored profile that extends ``profile`` (short id such as ``cis_level1_server``).

        Raises:
            ImageError: the file tailors no such profile.
        """
        try:
            return self.tailored[profile]
        except KeyError:
            raise ImageError(f"{self.path}: no tailored profile extends {SSG_PROFILE_PREFIX}{profile} "
                             f"(tailored: {', '.join(sorted(self.tailored)) or 'none'})") from None


def _short_rule(idref: str) -> str:
    return idref.removeprefix(RULE_PREFIX)


def load_tailoring(path: Path) -> Tailoring:
    """Read a tailoring file; every waiver must give a reason and a replacing control.

    Raises:
        ImageError: the file is missing or not XML, a profile extends no ComplianceAsCode
            profile, or a waiver lacks its reason or ``Control:`` remark or is not unscored.
    """
    try:
        root = ET.parse(path).getroot()  # noqa: S314 - a file of this repository
    except (OSError, ET.ParseError) as exc:
        raise ImageError(f"{path}: cannot read the tailoring file: {exc}") from None
    if root.tag != f"{_X}Tailoring":
        raise ImageError(f"{path}: root element is {root.tag}, not xccdf:Tailoring (XCCDF 1.2)")
    tailored: dict[str, str] = {}
    waivers: dict[str, dict[str, Waiver]] = {}
    values: dict[str, dict[str, str]] = {}
    for prof in root.iter(f"{_X}Profile"):
        pid, extends = prof.get("id", ""), prof.get("extends", "")
        if not extends.startswith(SSG_PROFILE_PREFIX):
            raise ImageError(f"{path}: profile {pid!r}: extends = {extends!r}: not a "
                             f"ComplianceAsCode profile ({SSG_PROFILE_PREFIX}...)")
        base = extends.removeprefix(SSG_PROFILE_PREFIX)
        tailored[base] = pid
        found: dict[str, Waiver] = {}
        for refine in prof.iter(f"{_X}refine-rule"):
            rule = _short_rule(refine.get("idref", ""))
            remarks = [(r.text or "").strip() for r in refine.iter(f"{_X}remark")]
            where = f"{path}: profile {pid}: rule {rule}"
            if refine.get("role") != "unscored":
                raise ImageError(f"{where}: role = {refine.get('role')!r}: a waiver is "
                                 "role=\"unscored\" (evaluated, shown, not scored)")
            control = [r for r in remarks if r.startswith(_CONTROL)]
            reason = [r for r in remarks if r and not r.startswith(_CONTROL)]
            if not reason or not control:
                raise ImageError(f"{where}: a waiver needs a reason remark and a "
                                 f"'{_CONTROL}...' remark naming what replaces the rule")
            if rule in found:
                raise ImageError(f"{where}: waived twice")
            found[rule] = Waiver(rule, reason[0], control[0].removeprefix(_CONTROL).strip())
        waivers[base] = found
        set_values: dict[str, str] = {}
        for sv in prof.iter(f"{_X}set-value"):
            idref = sv.get("idref", "")
            value = (sv.text or "").strip()
            if not idref.startswith(VALUE_PREFIX) or not value:
                raise ImageError(f"{path}: profile {pid}: set-value idref = {idref!r}, value = "
                                 f"{value!r}: a ComplianceAsCode value ({VALUE_PREFIX}...) and "
                                 "a non-empty value")
            set_values[idref.removeprefix(VALUE_PREFIX)] = value
        values[base] = set_values
    if not tailored:
        raise ImageError(f"{path}: no xccdf:Profile in the tailoring file")
    return Tailoring(path, tailored, waivers, values)


@dataclass(frozen=True)
class ProfileSummary:
    """One profile's results.  ``pass_ratio`` = pass / (pass + fail + waived + error +
    unknown): waived rules stay in the denominator, so a waiver never raises the score."""

    profile: str
    counts: Mapping[str, int]
    failed: tuple[str, ...]
    waived: tuple[str, ...]
    # Failed rules whose configuration part passed and whose running-kernel part failed:
    # an offline scan cannot pass them (see :func:`runtime_only`); still counted as fail.
    runtime_only: tuple[str, ...] = ()
    # Applicable rules the scan could not decide (rule -> "error" or "unknown"): offline, the
    # checks that ask the running systemd about its units.  Counted against the score.
    undecided: Mapping[str, str] = field(default_factory=dict)

    @property
    def recheck(self) -> tuple[str, ...]:
        """What the running node evaluates again: the fails, then the undecided rules."""
        return (*self.failed, *sorted(self.undecided))

    @property
    def applicable(self) -> int:
        return sum(self.counts.get(k, 0) for k in (*_APPLICABLE, "waived"))

    @property
    def pass_ratio(self) -> float | None:
        return self.counts.get("pass", 0) / self.applicable if self.applicable else None

    def to_json(self) -> dict[str, Any]:
        ratio = self.pass_ratio
        return {"profile": self.profile, "counts": dict(self.counts), "applicable": self.applicable,
                "pass_ratio": round(ratio, 4) if ratio is not None else None,
                "failed": list(self.failed), "waived": list(self.waived),
                "runtime_only": list(self.runtime_only), "undecided": dict(self.undecided)}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ProfileSummary:
        """The inverse of :meth:`to_json` (an audit's summary.json entry).

        Raises:
            ImageError: a field is missing or of the wrong type.
        """
        try:
            counts = {str(k): int(v) for k, v in doc["counts"].items()}
            undecided = {str(k): str(v) for k, v in doc.get("undecided", {}).items()}
            summary = cls(str(doc["profile"]), counts, tuple(map(str, doc["failed"])),
                          tuple(map(str, doc["waived"])), tuple(map(str, doc.get("runtime_only", ()))),
                          undecided)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ImageError(f"not an audit summary's profile entry ({exc!r}): {str(doc)[:200]}") from None
        if bad := {k: v for k, v in undecided.items() if v not in _UNDECIDED}:
            raise ImageError(f"not an audit summary's profile entry (undecided results must be error "
                             f"or unknown: {bad}): {str(doc)[:200]}")
        return summary

    def line(self) -> str:
        c = self.counts
        ratio = f"{self.pass_ratio * 100:.1f}%" if self.pass_ratio is not None else "n/a"
        return (f"{self.profile}: {ratio} pass ({c.get('pass', 0)} pass, {c.get('fail', 0)} fail, "
                f"{c.get('waived', 0)} waived, {c.get('notapplicable', 0)} notapplicable, "
                f"{c.get('other', 0)} other)"
                + (f"; {len(self.runtime_only)} of the fails check only the running kernel"
                   if self.runtime_only else ""))


def _buckets(result: str, waived: bool) -> tuple[str, ...]:
    """The counters one rule result adds to."""
    if result == "notselected":
        return ()
    if waived and result in (*_APPLICABLE, "informational"):  # unscored: "informational"
        return ("waived",)
    if result in ("pass", "fail", "notapplicable"):
        return (result,)
    return ("other", result) if result in _APPLICABLE else ("other",)


def summarize(results: Path, profile: str, waivers: Mapping[str, Waiver] | None = None) -> ProfileSummary:
    """Count an XCCDF results file (``oscap xccdf eval --results``, or the ARF holding one).

    Buckets: pass, fail, waived (a rule in ``waivers`` that applies: OpenSCAP reports it
    "informational" under the tailoring, or its real result without it), notapplicable and
    other (error, unknown, notchecked, informational, fixed); notselected rules are not counted.

    Raises:
        ImageError: the file is missing, not XML, or holds no TestResult.
    """
    waivers = waivers or {}
    counts: Counter[str] = Counter()
    by_bucket: dict[str, list[str]] = {"fail": [], "waived": []}
    undecided: dict[str, str] = {}
    seen = False
    try:
        for _, el in ET.iterparse(results):  # noqa: S314 - our own scanner's output
            seen = seen or el.tag == f"{_X}TestResult"
            if el.tag != f"{_X}rule-result":
                continue
            rule = _short_rule(el.get("idref", ""))
            res = el.find(f"{_X}result")
            result = (res.text or "").strip() if res is not None else "unknown"
            el.clear()
            for bucket in _buckets(result, rule in waivers):
                counts[bucket] += 1
                if bucket in by_bucket:
                    by_bucket[bucket].append(rule)
                elif bucket in _UNDECIDED:
                    undecided[rule] = bucket
    except (OSError, ET.ParseError) as exc:
        raise ImageError(f"{results}: cannot read the XCCDF results: {exc}") from None
    if not seen:
        raise ImageError(f"{results}: no xccdf:TestResult (not an `oscap xccdf eval` result)")
    for key in ("pass", "fail", "waived", "notapplicable", "other"):
        counts.setdefault(key, 0)
    return ProfileSummary(profile, dict(counts), tuple(by_bucket["fail"]), tuple(by_bucket["waived"]),
                          undecided=undecided)


_OVAL_RESULTS = "{http://oval.mitre.org/XMLSchema/oval-results-5}"


def runtime_only(arf: Path, failed: Iterable[str]) -> tuple[str, ...]:
    """The rules of ``failed`` whose OVAL check splits into a configuration part that passed
    (``RULE_static`` true) and a running-kernel part that did not (``RULE_runtime``).

    ComplianceAsCode checks a sysctl both in /etc/sysctl.d and in /proc/sys; the offline scan
    has no running kernel of the image, so such a rule fails there whatever the image holds.

    Raises:
        ImageError: the ARF file is missing or not XML.
    """
    results: dict[str, str] = {}
    try:
        for _, el in ET.iterparse(arf):  # noqa: S314 - our own scanner's output
            if el.tag == f"{_OVAL_RESULTS}definition" and el.get("result"):
                results.setdefault(el.get("definition_id", ""), el.get("result", ""))
            el.clear()
    except (OSError, ET.ParseError) as exc:
        raise ImageError(f"{arf}: cannot read the ARF results: {exc}") from None
    return tuple(r for r in failed
                 if results.get(f"oval:ssg-{r}_static:def:1") == "true"
                 and results.get(f"oval:ssg-{r}_runtime:def:1") not in (None, "true"))


# ------------------------------------------------------------------ baseline


def _read_baseline(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ImageError(f"{path}: cannot read the baseline: {exc.strerror}") from None
    except ValueError as exc:
        raise ImageError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != BASELINE_FORMAT:
        raise ImageError(f"{path}: format = {data.get('format') if isinstance(data, dict) else None!r}: "
                         f"this version reads {BASELINE_FORMAT}")
    return data


@dataclass(frozen=True)
class BootedFloors:
    """What the audit of the running node must reach (the baseline's ``booted`` object)."""

    lynis_hardening_index: int | None = None
    pass_ratios: Mapping[str, float] = field(default_factory=dict)


def booted_floors(path: Path) -> BootedFloors:
    """The baseline's ``booted`` object: ``{"lynis_hardening_index": 60, "profiles": {PROFILE:
    {"pass_ratio": 0.8}}}``, either part absent until it is measured.

    Raises:
        ImageError: unreadable baseline; an index that is not a whole number in 0..100, or a
            ratio not in 0..1.
    """
    return _booted_of(_read_baseline(path), path)


def _booted_of(data: Mapping[str, Any], path: Path) -> BootedFloors:
    booted = data.get("booted", {})
    if not isinstance(booted, dict):
        raise ImageError(f"{path}: 'booted' must be an object (lynis_hardening_index, profiles)")
    index = booted.get("lynis_hardening_index")
    if index is not None and (isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= 100):
        raise ImageError(f"{path}: booted.lynis_hardening_index = {index!r}: not a whole number in 0..100")
    profiles = booted.get("profiles", {})
    return BootedFloors(index, _pass_ratios(profiles, path, "booted.profiles") if profiles else {})


def booted_summary(offline: ProfileSummary, booted: Mapping[str, str]) -> ProfileSummary:
    """``offline`` with the results the running node gave (rule -> result) for the rules it
    evaluated again (:attr:`ProfileSummary.recheck`).  The node evaluates only what the offline
    scan failed or could not decide: a rule the root's files pass holds on the node too, whose
    root is those same bytes (dm-verity).

    Raises:
        ImageError: the node reported a rule the offline scan neither failed nor left undecided.
    """
    counts = Counter(dict(offline.counts))
    failed = list(offline.failed)
    undecided = dict(offline.undecided)
    for rule, result in sorted(booted.items()):
        if rule in failed:
            if result == "fail":
                continue
            failed.remove(rule)
            counts["fail"] -= 1
        elif rule in undecided:
            for bucket in _buckets(undecided.pop(rule), False):
                counts[bucket] -= 1
            if result == "fail":
                failed.append(rule)
        else:
            raise ImageError(f"{offline.profile}: the node evaluated {rule} ({result}), "
                             "which the offline scan neither failed nor left undecided")
        for bucket in _buckets(result, False):
            counts[bucket] += 1
        if result in _UNDECIDED:
            undecided[rule] = result
    return ProfileSummary(offline.profile, dict(counts), tuple(failed), offline.waived,
                          undecided=undecided)


def load_baseline(path: Path) -> dict[str, float]:
    """Profile -> the pass ratio it must reach.

    Raises:
        ImageError: missing file, bad JSON, wrong format, or a ratio outside 0..1.
    """
    return _pass_ratios(_read_baseline(path).get("profiles"), path, "profiles")


def _pass_ratios(profiles: object, path: Path, where: str) -> dict[str, float]:
    """``{PROFILE: {"pass_ratio": 0..1}}`` at ``where`` in the baseline ``path``, checked."""
    if not isinstance(profiles, dict) or not profiles:
        raise ImageError(f"{path}: '{where}' must map profile ids to {{\"pass_ratio\": 0..1}}")
    out: dict[str, float] = {}
    for name, entry in profiles.items():
        ratio = entry.get("pass_ratio") if isinstance(entry, dict) else None
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio <= 1:
            raise ImageError(f"{path}: {where}.{name}.pass_ratio = {ratio!r}: not a number in 0..1")
        out[name] = float(ratio)
    return out


def baseline_failures(summaries: Iterable[ProfileSummary], baseline: Mapping[str, float],
                      source: Path) -> list[str]:
    """One message per profile of ``baseline`` that was not audited or fell below its ratio."""
    by_profile = {s.profile: s for s in summaries}
    out = []
    for profile, floor in sorted(baseline.items()):
        s = by_profile.get(profile)
        if s is None:
            out.append(f"{profile}: in the baseline {source} but not audited")
        elif s.pass_ratio is None or s.pass_ratio + 1e-9 < floor:
            # the exact fraction too: 167/259 is 0.64479, which four places alone print as 0.6448
            now = "n/a" if s.pass_ratio is None else \
                f"{s.pass_ratio:.4f} ({s.counts.get('pass', 0)}/{s.applicable} = {s.pass_ratio:.6f})"
            out.append(f"{profile}: pass ratio {now} is below the baseline's {floor:.4f} ({source})")
    return out


def write_baseline(path: Path, summaries: Iterable[ProfileSummary], content: str) -> None:
    """Record the ratios reached (rounded down to 4 places, so a rerun meets them); the booted
    image's figures already in ``path`` stay (the offline audit does not measure them)."""
    profiles = {s.profile: {"pass_ratio": int(s.pass_ratio * 10000) / 10000}
                for s in summaries if s.pass_ratio is not None}
    doc: dict[str, Any] = {"format": BASELINE_FORMAT, "content": content, "profiles": profiles}
    if path.is_file() and "booted" in (previous := _read_baseline(path)):
        _booted_of(previous, path)  # a malformed one is not carried over
        doc["booted"] = previous["booted"]
    atomic_write_text(path, json.dumps(doc, indent=1, sort_keys=True) + "\n")


def write_booted_floors(path: Path, lynis_hardening_index: int, booted: Iterable[ProfileSummary]) -> None:
    """Record the running node's figures as ``path``'s ``booted`` floors (ratios rounded down to
    4 places, so that the same node meets them again); the rest of the file stays.

    Raises:
        ImageError: ``path`` is not a baseline this version reads.
    """
    doc = _read_baseline(path)
    _booted_of(doc, path)  # its "booted", if it has one, is well-formed
    doc["booted"] = {"lynis_hardening_index": lynis_hardening_index,
                     "profiles": {b.profile: {"pass_ratio": int(b.pass_ratio * 10000) / 10000}
                                  for b in booted if b.pass_ratio is not None}}
    atomic_write_text(path, json.dumps(doc, indent=1, sort_keys=True) + "\n")
