"""The running node's own audit (issue #16, point 2), joined with the build's offline audit:
`appliance audit-booted OUT --console LOG` and the booted floors of the baseline."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from provisioning.errors import ImageError
from provisioning.image.booted import boot_times_report, booted_audit, floor_failures
from provisioning.image.compliance import BootedFloors, booted_floors, summarize, write_booted_floors

RESULTS = Path(__file__).parent / "data/compliance/cis_level1_server.xccdf.xml"
LYNIS = ("appliance-lynis: hardening_index=64 tests=251 warnings=1 suggestions=2 version=3.1.4\n"
         "appliance-lynis: warning AUTH-9262|No PAM module|-|-|\n"
         "appliance-lynis: end\n")


def _build(tmp_path: Path) -> tuple[Path, list[str]]:
    """An `appliance build --out` directory whose offline audit is a real OpenSCAP result, and
    the rules its node evaluates again (the fails, then the one "unknown")."""
    offline = summarize(RESULTS, "cis_level1_server")
    (tmp_path / "out/audit").mkdir(parents=True)
    (tmp_path / "out/audit/summary.json").write_text(json.dumps({"openscap": [offline.to_json()]}))
    return tmp_path / "out", list(offline.recheck)


def _console(failed: list[str], passing: int) -> str:
    """What the node prints: the first ``passing`` of the rules it evaluates pass on it."""
    scap = "".join(f"appliance-scap: cis_level1_server {rule} {'pass' if i < passing else 'fail'}\n"
                   for i, rule in enumerate(failed))
    return f"[  OK  ] Started appliance-agent.service\n{LYNIS}{scap}appliance-scap: end\n"


def test_the_node_turns_offline_fails_into_passes_and_the_ratio_follows(tmp_path: Path) -> None:
    build, failed = _build(tmp_path)
    result = booted_audit(build, _console(failed, passing=5))
    (offline,), (booted,) = result.offline, result.booted
    assert booted.counts["pass"] == offline.counts["pass"] + 5
    assert booted.failed == tuple(failed[5:]) and booted.applicable == offline.applicable
    assert result.lynis_hardening_index == 64 and result.lynis_warnings == ("AUTH-9262|No PAM module|-|-|",)
    doc = result.to_json()
    assert doc["openscap"][0]["passing_only_on_the_node"] == sorted(failed[:5])
    assert doc["openscap"][0]["booted"]["pass_ratio"] == round(booted.pass_ratio or 0, 4)
    assert any(line.startswith("booted   cis_level1_server:") for line in result.lines())


@pytest.mark.parametrize(("console", "message"), [
    ("", "no complete OpenSCAP report"),
    ("appliance-scap: end\n", "no complete Lynis report"),
    (f"{LYNIS}appliance-scap: end\n",
     "the node's results do not cover what the offline audit failed or left undecided"),
    (f"{LYNIS}appliance-scap: cis_level1_server not_a_failed_rule pass\nappliance-scap: end\n",
     "neither failed nor undecided offline: ['not_a_failed_rule']"),
    (f"{LYNIS}appliance-scap: failed: oscap exited 1 on cis_level1_server (see x)\n",
     "OpenSCAP on the node: failed: oscap exited 1"),
    ("appliance-scap: end\n" + LYNIS.replace("hardening_index=64", "hardening_index=6x"),
     "hardening_index='6x' is not a whole number"),
])
def test_a_report_missing_incomplete_or_failed_is_refused(tmp_path: Path, console: str, message: str) -> None:
    build, _ = _build(tmp_path)
    with pytest.raises(ImageError, match=re.escape(message)):
        booted_audit(build, console)


def test_a_build_without_an_offline_audit_says_so(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"summary\.json: cannot read the build's offline audit"):
        booted_audit(tmp_path, LYNIS)


def test_floors_are_written_rounded_down_and_then_met(tmp_path: Path) -> None:
    build, failed = _build(tmp_path)
    result = booted_audit(build, _console(failed, passing=3))
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"format": 1, "profiles": {"cis_level1_server": {"pass_ratio": 0.3}}}))
    write_booted_floors(baseline, result.lynis_hardening_index, result.booted)
    floors = booted_floors(baseline)
    ratio = result.booted[0].pass_ratio or 0
    assert floors == BootedFloors(64, {"cis_level1_server": int(ratio * 10000) / 10000})
    assert json.loads(baseline.read_text())["profiles"] == {"cis_level1_server": {"pass_ratio": 0.3}}  # kept
    assert floor_failures(result, floors, baseline) == []
    worse_console = _console(failed, passing=2).replace("hardening_index=64", "hardening_index=60")
    worse = booted_audit(build, worse_console)
    failures = floor_failures(worse, floors, baseline)
    assert len(failures) == 2
    assert failures[0].startswith("cis_level1_server: pass ratio")
    assert failures[1] == f"Lynis hardening index 60 on the node is below 64 ({baseline})"
    assert floor_failures(result, BootedFloors(None, {"anssi_bp28_high": 0.5}), baseline) == [
        f"anssi_bp28_high: in the baseline {baseline} but not audited"]


def test_the_cli_reports_gates_and_records(tmp_path: Path, cli: Callable[..., Any]) -> None:
    build, failed = _build(tmp_path)
    console = tmp_path / "console.log"
    console.write_text(_console(failed, passing=4))
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"format": 1, "profiles": {"cis_level1_server": {"pass_ratio": 0.3}}}))
    done = cli("audit-booted", build, "--console", console, "--write-baseline", baseline, "--json")
    assert done.code == 0, done.err
    doc = json.loads(done.out)
    assert doc["baseline_written"] == str(baseline) and doc["lynis"]["hardening_index"] == "64"
    recorded = booted_floors(baseline)
    assert recorded.lynis_hardening_index == 64
    console.write_text(_console(failed, passing=1))  # the node got worse
    done = cli("audit-booted", build, "--console", console, "--baseline", baseline,
               "--write-baseline", baseline)
    assert done.code == 1 and "below the booted floors: cis_level1_server: pass ratio" in done.err
    assert "booted   cis_level1_server:" in done.out
    assert booted_floors(baseline) == recorded  # a gate that failed is never lowered
    done = cli("audit-booted", build, "--console", tmp_path / "none.log")
    assert done.code != 0 and "none.log: cannot read the console log" in done.err


def test_the_boot_times_report_is_the_consoles_last_complete_one() -> None:
    first = ("appliance-boot: time Startup finished in 90s\n"
             "appliance-boot: chain appliance-agent.service +9s\nappliance-boot: end\n")
    second = ("appliance-boot: time Startup finished in 1.2s (firmware) + 80s (userspace) = 81s\n"
              "[  OK  ] Reached target multi-user.target\n"
              "appliance-boot: chain appliance-agent.service @70s +9s\n"
              "appliance-boot: chain \u2514\u2500basic.target @20s\n"
              "appliance-boot: blame 9s appliance-agent.service\n"
              "appliance-boot: initrd [    3.1] appliance systemd[1]: Switching root.\n"
              "appliance-boot: end\n")
    assert boot_times_report("no report yet\n") is None
    assert boot_times_report(first + "appliance-boot: time Startup finished in 10s\n") == {
        "time": ["Startup finished in 90s"], "chain": ["appliance-agent.service +9s"], "blame": [],
        "initrd": [], "gap": []}
    assert boot_times_report(first + second) == {
        "time": ["Startup finished in 1.2s (firmware) + 80s (userspace) = 81s"],
        "chain": ["appliance-agent.service @70s +9s", "\u2514\u2500basic.target @20s"],
        "blame": ["9s appliance-agent.service"],
        "initrd": ["[    3.1] appliance systemd[1]: Switching root."], "gap": []}
    with pytest.raises(ImageError, match="the boot-times report on the node: failed: the boot had not"):
        boot_times_report(f"{first}appliance-boot: failed: the boot had not finished after 1800 s "
                          "(starting)\n")
