"""Compliance summary, tailoring waivers and the baseline gate, on a real OpenSCAP result excerpt.

The fixture is trimmed from a real ``oscap xccdf eval`` results file (OpenSCAP 1.4.2,
ssg-debian 0.1.82, cis_level1_server, the hil image before remediation): 4 pass, 7 fail,
2 notapplicable, 3 notselected, 1 notchecked, 1 unknown.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from provisioning.errors import ImageError
from provisioning.image.audit import DEFAULT_TAILORING, PROFILES
from provisioning.image.compliance import (
    BootedFloors,
    ProfileSummary,
    Waiver,
    baseline_failures,
    booted_floors,
    booted_summary,
    load_baseline,
    load_tailoring,
    runtime_only,
    summarize,
    write_baseline,
)

RESULTS = Path(__file__).parent / "data/compliance/cis_level1_server.xccdf.xml"
ARF = Path(__file__).parent / "data/compliance/cis_level1_server.arf-excerpt.xml"
TAILORED = Path(__file__).parent / "data/compliance/cis_level1_server.tailored.xccdf.xml"
BASELINE = DEFAULT_TAILORING.parent / "baseline.json"
_NS = 'xmlns:xccdf="http://checklists.nist.gov/xccdf/1.2"'


def _tailoring(tmp_path: Path, refine: str, extends: str = "cis_level1_server") -> Path:
    path = tmp_path / "tailoring.xml"
    path.write_text(
        f'<xccdf:Tailoring {_NS} id="xccdf_t_tailoring_t">'
        f'<xccdf:Profile id="xccdf_t_profile_{extends}" '
        f'extends="xccdf_org.ssgproject.content_profile_{extends}">'
        f"<xccdf:title>t</xccdf:title>{refine}</xccdf:Profile></xccdf:Tailoring>")
    return path


def _waiver(rule: str, *remarks: str, role: str = "unscored") -> str:
    body = "".join(f"<xccdf:remark>{r}</xccdf:remark>" for r in remarks)
    return (f'<xccdf:refine-rule idref="xccdf_org.ssgproject.content_rule_{rule}" role="{role}">'
            f"{body}</xccdf:refine-rule>")


def test_summary_counts_a_real_result() -> None:
    s = summarize(RESULTS, "cis_level1_server")
    assert {k: s.counts[k] for k in ("pass", "fail", "waived", "notapplicable", "other")} == \
        {"pass": 4, "fail": 7, "waived": 0, "notapplicable": 2, "other": 2}
    assert s.applicable == 12  # pass + fail + unknown; notchecked and notselected are not counted
    assert s.pass_ratio == pytest.approx(4 / 12)
    assert "sysctl_kernel_kptr_restrict" in s.failed and "partition_for_home" not in s.failed
    assert s.line().startswith("cis_level1_server: 33.3% pass (4 pass, 7 fail, 0 waived")


def test_waivers_count_as_waived_never_as_pass() -> None:
    waivers = {r: Waiver(r, "why", "instead") for r in
               ("package_aide_installed", "aide_build_database", "disable_prelink", "partition_for_home")}
    s = summarize(RESULTS, "cis_level1_server", waivers)
    assert (s.counts["pass"], s.counts["fail"], s.counts["waived"]) == (3, 5, 3)
    assert s.pass_ratio == pytest.approx(3 / 12)  # the waiver lowers the passes, not the denominator
    assert "partition_for_home" not in s.waived  # not selected by the profile: nothing to waive


def test_tailored_result_counts_unscored_rules_as_waived() -> None:
    """Under the tailoring OpenSCAP reports a waived rule as "informational"."""
    waivers = load_tailoring(DEFAULT_TAILORING).waivers["cis_level1_server"]
    s = summarize(TAILORED, "cis_level1_server", waivers)
    assert set(s.waived) == {"package_aide_installed", "aide_build_database", "grub2_enable_apparmor"}
    assert {k: s.counts[k] for k in ("pass", "fail", "waived", "other")} == \
        {"pass": 5, "fail": 1, "waived": 3, "other": 0}
    assert s.pass_ratio == pytest.approx(5 / 9)
    unwaived = summarize(TAILORED, "cis_level1_server")  # without the table: just "informational"
    assert (unwaived.counts["waived"], unwaived.counts["other"]) == (0, 3)
    assert unwaived.pass_ratio == pytest.approx(5 / 6)


def test_results_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "r.xml"
    bad.write_text("<x>")
    with pytest.raises(ImageError, match=r"r\.xml: cannot read the XCCDF results"):
        summarize(bad, "p")
    bad.write_text(f"<xccdf:Benchmark {_NS}/>")
    with pytest.raises(ImageError, match="no xccdf:TestResult"):
        summarize(bad, "p")


def test_tailoring_reads_reason_and_control(tmp_path: Path) -> None:
    t = load_tailoring(_tailoring(tmp_path, _waiver("partition_for_home", "No users.",
                                                    "Control: read-only verity root")))
    assert t.profile_id("cis_level1_server") == "xccdf_t_profile_cis_level1_server"
    assert t.waivers["cis_level1_server"]["partition_for_home"] == \
        Waiver("partition_for_home", "No users.", "read-only verity root")
    with pytest.raises(ImageError, match=r"no tailored profile extends .*cis_level2_server"):
        t.profile_id("cis_level2_server")


@pytest.mark.parametrize(("refine", "message"), [
    (_waiver("partition_for_home", "No users."), "needs a reason remark and a 'Control: ...'"),
    (_waiver("partition_for_home", "Control: verity"), "needs a reason remark"),
    (_waiver("partition_for_home", "r", "Control: c", role="full"), "role = 'full': a waiver is"),
    (_waiver("x", "r", "Control: c") * 2, "rule x: waived twice"),
])
def test_tailoring_rejects_a_waiver_without_its_reasons(tmp_path: Path, refine: str, message: str) -> None:
    with pytest.raises(ImageError, match=message) as err:
        load_tailoring(_tailoring(tmp_path, refine))
    assert "tailoring.xml: profile xccdf_t_profile_cis_level1_server" in str(err.value)


def test_tailoring_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot read the tailoring file"):
        load_tailoring(tmp_path / "missing.xml")
    path = tmp_path / "t.xml"
    path.write_text(f'<xccdf:Tailoring {_NS}><xccdf:Profile id="p" extends="xccdf_other"/>'
                    "</xccdf:Tailoring>")
    with pytest.raises(ImageError, match="extends = 'xccdf_other': not a ComplianceAsCode profile"):
        load_tailoring(path)
    (tmp_path / "b.xml").write_text(f"<xccdf:Benchmark {_NS}/>")
    with pytest.raises(ImageError, match="not xccdf:Tailoring"):
        load_tailoring(tmp_path / "b.xml")


def test_the_shipped_tailoring_covers_every_audited_profile() -> None:
    t = load_tailoring(DEFAULT_TAILORING)
    for profile in PROFILES:
        assert t.profile_id(profile).endswith(profile)
        for w in t.waivers[profile].values():
            assert len(w.reason) > 20 and len(w.control) > 10, w


def test_baseline_gate_names_profile_and_both_ratios(tmp_path: Path) -> None:
    s = summarize(RESULTS, "cis_level1_server")
    path = tmp_path / "baseline.json"
    write_baseline(path, [s], "test")
    assert load_baseline(path) == {"cis_level1_server": 0.3333}
    assert baseline_failures([s], load_baseline(path), path) == []
    path.write_text(json.dumps({"format": 1, "profiles": {"cis_level1_server": {"pass_ratio": 0.5},
                                                          "anssi_bp28_high": {"pass_ratio": 0.9}}}))
    failures = baseline_failures([s], load_baseline(path), path)
    assert failures == [f"anssi_bp28_high: in the baseline {path} but not audited",
                        f"cis_level1_server: pass ratio 0.3333 ({s.counts['pass']}/{s.applicable} = "
                        f"{s.pass_ratio:.6f}) is below the baseline's 0.5000 ({path})"]
    assert s.pass_ratio is not None and round(s.pass_ratio, 4) == 0.3333  # the written floor met it


def test_the_booted_figures_are_read_checked_and_kept_when_the_ratios_are_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps({"format": 1, "profiles": {"p": {"pass_ratio": 0.5}}}))
    assert booted_floors(path) == BootedFloors()  # none measured yet
    booted = {"lynis_hardening_index": 61, "profiles": {"cis_level1_server": {"pass_ratio": 0.9}}}
    path.write_text(json.dumps({"format": 1, "profiles": {"p": {"pass_ratio": 0.5}}, "booted": booted}))
    assert booted_floors(path) == BootedFloors(61, {"cis_level1_server": 0.9})
    write_baseline(path, [summarize(RESULTS, "cis_level1_server")], "test")  # the offline ratios
    assert booted_floors(path) == BootedFloors(61, {"cis_level1_server": 0.9})
    assert load_baseline(path) == {"cis_level1_server": 0.3333}
    for bad in ('"booted": [61]', '"booted": {"lynis_hardening_index": 61.5}',
                '"booted": {"lynis_hardening_index": true}', '"booted": {"lynis_hardening_index": 101}',
                '"booted": {"profiles": [1]}', '"booted": {"profiles": {"p": {"pass_ratio": 1.2}}}',
                '"booted": {"profiles": {"p": 0.9}}'):
        path.write_text('{"format": 1, "profiles": {"p": {"pass_ratio": 0.5}}, ' + bad + "}")
        with pytest.raises(ImageError, match=re.escape(str(path)) + ": .*booted"):
            booted_floors(path)


def test_the_nodes_results_replace_the_offline_fails_they_name() -> None:
    offline = summarize(RESULTS, "cis_level1_server")
    assert ProfileSummary.from_json(offline.to_json()) == offline
    a, b, c, d = offline.failed[:4]
    after = booted_summary(offline, {a: "pass", b: "fail", c: "notapplicable", d: "error"})
    n = offline.counts
    assert after.counts["pass"] == n["pass"] + 1 and after.counts["fail"] == n["fail"] - 3
    assert after.counts["notapplicable"] == n["notapplicable"] + 1
    assert after.counts["other"] == n["other"] + 1 and after.counts.get("error", 0) == n.get("error", 0) + 1
    assert after.applicable == offline.applicable - 1  # the notapplicable one left the denominator
    assert after.failed == tuple(r for r in offline.failed if r not in (a, c, d))
    assert after.pass_ratio == (n["pass"] + 1) / after.applicable
    assert booted_summary(offline, {}) == offline
    passed_offline = "no_such_rule_failed_offline"
    with pytest.raises(ImageError, match=f"the node evaluated {passed_offline} .pass., which the offline"):
        booted_summary(offline, {passed_offline: "pass"})
    with pytest.raises(ImageError, match="not an audit summary's profile entry"):
        ProfileSummary.from_json({"profile": "p", "counts": {"pass": "x"}, "failed": [], "waived": []})


def test_the_node_decides_what_the_offline_scan_could_not() -> None:
    offline = summarize(RESULTS, "cis_level1_server")
    (rule, was), = offline.undecided.items()  # the fixture's one "unknown"
    assert was == "unknown" and offline.recheck == (*offline.failed, rule)
    assert ProfileSummary.from_json(offline.to_json()) == offline
    n = offline.counts
    passed = booted_summary(offline, {rule: "pass"})
    assert passed.undecided == {}
    assert passed.counts["pass"] == n["pass"] + 1 and passed.counts["unknown"] == n["unknown"] - 1
    assert passed.counts["other"] == n["other"] - 1 and passed.applicable == offline.applicable
    failed = booted_summary(offline, {rule: "fail"})
    assert failed.failed == (*offline.failed, rule) and failed.counts["fail"] == n["fail"] + 1
    assert failed.pass_ratio == offline.pass_ratio  # unknown and fail both count against the score
    still = booted_summary(offline, {rule: "error"})
    assert still.undecided == {rule: "error"} and still.counts["error"] == n.get("error", 0) + 1
    assert still.counts["other"] == n["other"]
    with pytest.raises(ImageError, match="undecided results must be error or unknown"):
        ProfileSummary.from_json({**offline.to_json(), "undecided": {rule: "pass"}})
    old = {k: v for k, v in offline.to_json().items() if k != "undecided"}  # a summary of before
    assert ProfileSummary.from_json(old).undecided == {}


def test_baseline_gate_with_no_applicable_rule(tmp_path: Path) -> None:
    empty = ProfileSummary("p", {"notapplicable": 3}, (), ())
    assert empty.pass_ratio is None
    assert baseline_failures([empty], {"p": 0.1}, tmp_path) == \
        [f"p: pass ratio n/a is below the baseline's 0.1000 ({tmp_path})"]


@pytest.mark.parametrize(("text", "message"), [
    ("{", "not valid JSON"),
    ('{"format": 2, "profiles": {}}', "format = 2: this version reads 1"),
    ('{"format": 1, "profiles": {}}', "'profiles' must map"),
    ('{"format": 1, "profiles": {"p": {"pass_ratio": 1.5}}}', r"profiles\.p\.pass_ratio = 1\.5"),
    ('{"format": 1, "profiles": {"p": {"pass_ratio": true}}}', r"profiles\.p\.pass_ratio = True"),
])
def test_baseline_file_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "baseline.json"
    path.write_text(text)
    with pytest.raises(ImageError, match=message):
        load_baseline(path)
    with pytest.raises(ImageError, match="cannot read the baseline"):
        load_baseline(tmp_path / "none.json")


def test_the_shipped_baseline_covers_every_audited_profile() -> None:
    floors = load_baseline(BASELINE)
    assert set(floors) == set(PROFILES)


def test_runtime_only_fails_are_named_from_the_oval_results(tmp_path: Path) -> None:
    """dmesg_restrict and forwarding: file right, kernel unseen; kptr_restrict: the file holds 2
    where CIS wants exactly 1, a real failure of the configuration."""
    failed = ("sysctl_kernel_kptr_restrict", "sysctl_kernel_dmesg_restrict",
              "sysctl_net_ipv4_conf_all_forwarding", "partition_for_var", "package_sudo_installed")
    assert runtime_only(ARF, failed) == ("sysctl_kernel_dmesg_restrict",
                                         "sysctl_net_ipv4_conf_all_forwarding")
    s = ProfileSummary("p", {"pass": 1, "fail": 2}, failed[:2], (), runtime_only(ARF, failed[:2]))
    assert s.line().endswith("; 1 of the fails check only the running kernel")
    assert s.to_json()["runtime_only"] == ["sysctl_kernel_dmesg_restrict"]
    with pytest.raises(ImageError, match="cannot read the ARF results"):
        runtime_only(tmp_path / "none.xml", failed)


def test_tailored_values_are_read_and_must_name_a_value(tmp_path: Path) -> None:
    sv = ('<xccdf:set-value idref="xccdf_org.ssgproject.content_value_sysctl_kernel_yama_ptrace_scope_value">'
          "2</xccdf:set-value>")
    t = load_tailoring(_tailoring(tmp_path, sv))
    assert t.values == {"cis_level1_server": {"sysctl_kernel_yama_ptrace_scope_value": "2"}}
    assert t.waivers == {"cis_level1_server": {}}
    for bad in ('<xccdf:set-value idref="xccdf_other_value_x">2</xccdf:set-value>',
                '<xccdf:set-value idref="xccdf_org.ssgproject.content_value_x"> </xccdf:set-value>'):
        with pytest.raises(ImageError, match=r"set-value idref = .*a ComplianceAsCode value"):
            load_tailoring(_tailoring(tmp_path, bad))


def test_the_compact_summary_is_what_a_node_reports() -> None:
    """AuditResult.compact is image.json's ``compliance``; the agent's reader accepts it whole."""
    from agent.health.inventory import compliance_from_json
    from provisioning.image.audit import AuditResult

    summary = ProfileSummary("cis_level1_server", {"pass": 3, "fail": 1, "waived": 1, "notapplicable": 2,
                                                   "other": 1, "unknown": 1}, ("a",), ("w",))
    empty = ProfileSummary("anssi_bp28_high", {"notapplicable": 4}, (), ())
    result = AuditResult(Path("/r"), "ssg-debian 0.1.82-1", (summary, empty),
                         {"hardening_index": 61}, {"unit": "appliance-agent.service", "exposure": 1.2},
                         {}, services=({"unit": "a.service", "exposure": 1.2, "verdict": "OK"},
                                       {"unit": "getty@tty1.service", "exposure": 9.6}))
    doc = result.compact("offline scan of the built root")
    assert doc["profiles"][0] == {"profile": "cis_level1_server", "pass_ratio": round(3 / 6, 4), "pass": 3,
                                  "fail": 1, "waived": 1, "notapplicable": 2, "other": 1}
    assert doc["profiles"][1]["pass_ratio"] == 0.0  # nothing applicable: no pass to claim
    assert doc["services"] == [{"unit": "a.service", "exposure": 1.2},
                               {"unit": "getty@tty1.service", "exposure": 9.6}]
    assert "failed" not in json.dumps(doc)  # rule lists stay in the reports
    read = compliance_from_json(json.loads(json.dumps(doc)))
    assert read is not None and read.lynis_hardening_index == 61 and read.agent_exposure == 1.2
    assert [(p.profile, p.passed) for p in read.profiles] == [("cis_level1_server", 3),
                                                              ("anssi_bp28_high", 0)]


def test_audit_write_baseline_records_what_the_scan_reached_and_never_lowers_a_failed_gate(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`appliance audit --write-baseline` writes the ratios rounded down, so that the same root
    passes its own new baseline; when --baseline fails, nothing is written. The scanners need a
    mirror and mmdebstrap (system tier), so the audit's result comes from the real excerpt."""
    import argparse

    from provisioning.commands import image as commands
    from provisioning.image import audit as audit_module

    s = summarize(RESULTS, "cis_level1_server")
    floors = {"cis_level1_server": 0.9}

    def fake_audit(target: Path, *, baseline: Path | None = None, **_: object) -> audit_module.AuditResult:
        failures = baseline_failures([s], floors, baseline) if baseline is not None else []
        return audit_module.AuditResult(target, "ssg-debian test", (s,), {}, {}, {}, tuple(failures))

    monkeypatch.setattr(audit_module, "audit", fake_audit)
    written = tmp_path / "new.json"

    def run(baseline: Path | None) -> dict[str, object]:
        args = argparse.Namespace(target=tmp_path, mirror=tmp_path, out=tmp_path / "out", cache=None,
                                  profiles=None, tailoring=None, baseline=baseline, unit="a.service",
                                  write_baseline=written, json=True)
        try:
            commands._audit(args)
        finally:
            doc: dict[str, object] = json.loads(capsys.readouterr().out)
        return doc

    assert run(None)["baseline_written"] == str(written)
    assert load_baseline(written) == {"cis_level1_server": 0.3333}
    assert s.pass_ratio is not None and s.pass_ratio >= 0.3333  # the rerun meets it
    assert "offline scan of" in json.loads(written.read_text())["content"]
    written.unlink()
    with pytest.raises(ImageError, match="below the baseline"):
        run(tmp_path / "old.json")
    assert not written.exists()
