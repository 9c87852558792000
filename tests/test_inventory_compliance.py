"""The node reports its image's compliance summary (image.json ``compliance``) in GetInventory,
over real gRPC on loopback; a malformed summary is logged and reported as absent."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.health import inventory
from agent.health.inventory import ProfileScore, ServiceExposure, compliance_from_json
from agent.proto import node_pb2
from provisioning.commands.fleet import _print_data
from provisioning.fleet import _as_dict
from tests.test_node_service import Node, node  # noqa: F401 - the node fixture

SUMMARY: dict[str, Any] = {
    "scope": "offline scan of the built root",
    "scanner": "ssg-debian 0.1.82-1, openscap-scanner 1.4.2+dfsg-1, lynis 3.1.4-1",
    "profiles": [
        {"profile": "anssi_bp28_enhanced", "pass_ratio": 0.5823, "pass": 145, "fail": 76, "waived": 26,
         "notapplicable": 73, "other": 3},
        {"profile": "cis_level2_server", "pass_ratio": 0.7154, "pass": 211, "fail": 80, "waived": 4,
         "notapplicable": 101, "other": 0},
    ],
    "lynis_hardening_index": 47,
    "agent_exposure": 1.2,
    "services": [
        {"unit": "appliance-agent.service", "exposure": 1.2},
        {"unit": "getty@tty1.service", "exposure": 9.6},
        {"unit": "systemd-networkd.service", "exposure": 2.6},
        {"unit": "chrony.service", "exposure": 5.3},
    ],
}


def _image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **extra: Any) -> Path:
    """An image.json the node reads as its own (in place of /usr/lib/appliance/image.json)."""
    meta = tmp_path / "image.json"
    meta.write_text(json.dumps({"version": "2026.1.0", "slot": "A", **extra}))
    monkeypatch.setattr(inventory, "IMAGE_METADATA", meta)
    return meta


def _inventory(n: Node) -> Any:
    return n.stub.GetInventory(node_pb2.GetInventoryRequest(), timeout=30)


def test_node_reports_the_image_compliance_summary(node: Node, tmp_path: Path,  # noqa: F811
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _image(tmp_path, monkeypatch, compliance=SUMMARY)
    inv = _inventory(node)
    assert inv.HasField("compliance") and inv.image_version == "2026.1.0"
    c = inv.compliance
    assert c.scope == "offline scan of the built root"
    assert c.scanner == "ssg-debian 0.1.82-1, openscap-scanner 1.4.2+dfsg-1, lynis 3.1.4-1"
    assert [(p.profile, p.pass_ratio, p.passed, p.fail, p.waived, p.notapplicable, p.other)
            for p in c.profiles] == [("anssi_bp28_enhanced", 0.5823, 145, 76, 26, 73, 3),
                                     ("cis_level2_server", 0.7154, 211, 80, 4, 101, 0)]
    assert c.lynis_hardening_index == 47 and c.agent_exposure == 1.2
    assert [(s.unit, s.exposure) for s in c.services] == [
        ("appliance-agent.service", 1.2), ("getty@tty1.service", 9.6),
        ("systemd-networkd.service", 2.6), ("chrony.service", 5.3)]


def test_node_without_a_compliance_summary_reports_it_unset(node: Node, tmp_path: Path,  # noqa: F811
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    _image(tmp_path, monkeypatch)
    with caplog.at_level(logging.WARNING):
        inv = _inventory(node)
    assert inv.image_version == "2026.1.0" and not inv.HasField("compliance")
    assert "compliance" not in caplog.text  # recording none is no fault
    monkeypatch.setattr(inventory, "IMAGE_METADATA", tmp_path / "absent.json")
    assert not _inventory(node).HasField("compliance")


_DROP = object()


def _with(path: str, value: Any) -> dict[str, Any]:
    """SUMMARY with the field at ``path`` ("profiles.0.pass_ratio") set to ``value``, or
    removed where ``value`` is ``_DROP``."""
    doc = copy.deepcopy(SUMMARY)
    *parents, last = path.split(".")
    at: Any = doc
    for key in parents:
        at = at[int(key)] if isinstance(at, list) else at[key]
    if value is _DROP:
        del at[last]
    else:
        at[int(last) if isinstance(at, list) else last] = value
    return doc


MALFORMED = [
    ("yes", "compliance is 'yes', not an object"),
    (None, "compliance is None, not an object"),
    (_with("scanner", _DROP), "compliance.scanner is missing"),
    (_with("scope", 7), "compliance.scope is 7, not a string"),
    (_with("scope", "x" * 5000), "compliance.scope is 5000 characters long (at most 1000)"),
    (_with("profiles", {"anssi": 1}), "compliance.profiles is {'anssi': 1}, not a list"),
    (_with("profiles", [SUMMARY["profiles"][0]] * 1001), "compliance.profiles has 1001 entries"),
    (_with("profiles.0", "anssi"), "compliance.profiles[0] is 'anssi', not an object"),
    (_with("profiles.0.pass", _DROP), "compliance.profiles[0].pass is missing"),
    (_with("profiles.0.pass_ratio", 1.5), "compliance.profiles[0].pass_ratio is 1.5, not in 0..1"),
    (_with("profiles.1.pass_ratio", -0.1), "compliance.profiles[1].pass_ratio is -0.1, not in 0..1"),
    (_with("profiles.0.pass_ratio", "0.58"), "compliance.profiles[0].pass_ratio is '0.58', not a number"),
    (_with("profiles.0.pass_ratio", float("nan")), "compliance.profiles[0].pass_ratio is nan"),
    (_with("profiles.0.fail", -1), "compliance.profiles[0].fail is -1, not in 0..4294967295"),
    (_with("profiles.1.waived", 3.0), "compliance.profiles[1].waived is 3.0, not an integer"),
    (_with("profiles.1.other", True), "compliance.profiles[1].other is True, not an integer"),
    (_with("profiles.0.notapplicable", 2**32), "compliance.profiles[0].notapplicable is 4294967296"),
    (_with("profiles.0.profile", ["a"]), "compliance.profiles[0].profile is ['a'], not a string"),
    (_with("lynis_hardening_index", 101), "compliance.lynis_hardening_index is 101, not in 0..100"),
    (_with("lynis_hardening_index", "47"), "compliance.lynis_hardening_index is '47', not an integer"),
    (_with("agent_exposure", float("inf")), "compliance.agent_exposure is inf, not in 0..10"),
    (_with("agent_exposure", None), "compliance.agent_exposure is None, not a number"),
    (_with("services", "getty"), "compliance.services is 'getty', not a list"),
    (_with("services", [{"unit": "a.service", "exposure": 1.0}] * 1001),
     "compliance.services has 1001 entries (at most 1000)"),
    (_with("services.1.exposure", 10.5), "compliance.services[1].exposure is 10.5, not in 0..10"),
    (_with("services.2.unit", 5), "compliance.services[2].unit is 5, not a string"),
    (_with("services.3.exposure", _DROP), "compliance.services[3].exposure is missing"),
]


@pytest.mark.parametrize(("value", "fault"), MALFORMED, ids=[f for _, f in MALFORMED])
def test_a_malformed_summary_is_reported_unset_with_a_warning_naming_the_field(
        node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        caplog: pytest.LogCaptureFixture, value: Any, fault: str) -> None:
    meta = _image(tmp_path, monkeypatch, compliance=value)
    with caplog.at_level(logging.WARNING, logger="agent.health.inventory"):
        inv = _inventory(node)
    assert not inv.HasField("compliance")
    assert inv.image_version == "2026.1.0" and inv.active_slot == "A"  # the rest still answers
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "compliance" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(f"{meta}: compliance not reported: {fault}")


def test_the_bounds_themselves_are_accepted() -> None:
    doc = _with("services", [{"unit": f"s{i}.service", "exposure": 10} for i in range(1000)])
    doc["profiles"][0] |= {"pass_ratio": 1, "pass": 2**32 - 1, "fail": 0}
    doc["lynis_hardening_index"], doc["agent_exposure"] = 100, 0
    c = compliance_from_json(doc)
    assert len(c.services) == 1000 and c.services[999] == ServiceExposure("s999.service", 10.0)
    assert c.profiles[0] == ProfileScore("anssi_bp28_enhanced", 1.0, 2**32 - 1, 0, 26, 73, 3)
    assert (c.lynis_hardening_index, c.agent_exposure) == (100, 0.0)


def test_a_newer_builders_extra_keys_are_ignored() -> None:
    doc = _with("profiles.0.runtime_only", 12) | {"openscap_version": "1.4.2"}
    assert compliance_from_json(doc) == compliance_from_json(SUMMARY)


# ---------------------------------------------------------------------- the operator's view


def test_node_cli_prints_the_compliance_rows(node: Node, cli: Callable[..., Any],  # noqa: F811
                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _image(tmp_path, monkeypatch, compliance=SUMMARY)
    out = cli("node", "inventory", "--target", node.target)
    assert out.code == 0
    rows = [line for line in out.out.splitlines()
            if line.startswith(("compliance", "lynis", "agent exposure", "exposed"))]
    assert rows == [
        "compliance scan      offline scan of the built root (ssg-debian 0.1.82-1, "
        "openscap-scanner 1.4.2+dfsg-1, lynis 3.1.4-1)",
        "compliance           anssi_bp28_enhanced 58.2% pass (145 pass, 76 fail, 26 waived)",
        "compliance           cis_level2_server 71.5% pass (211 pass, 80 fail, 4 waived)",
        "lynis index          47",
        "agent exposure       1.2",
        "exposed services     2 of 4 above 5.0: getty@tty1.service 9.6, chrony.service 5.3",
    ]
    data = json.loads(cli("node", "inventory", "--target", node.target, "--json").out)
    assert data["compliance"]["lynis_hardening_index"] == 47
    assert data["compliance"]["profiles"][0] == {
        "profile": "anssi_bp28_enhanced", "pass_ratio": 0.5823, "passed": 145, "fail": 76, "waived": 26,
        "notapplicable": 73, "other": 3}
    assert data["compliance"]["services"][1] == {"unit": "getty@tty1.service", "exposure": 9.6}


def test_node_cli_without_a_summary_prints_a_dash(node: Node, cli: Callable[..., Any],  # noqa: F811
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _image(tmp_path, monkeypatch)
    out = cli("node", "inventory", "--target", node.target)
    assert "compliance           -" in out.out
    assert "lynis" not in out.out and "exposed services" not in out.out
    assert "compliance" not in json.loads(cli("node", "inventory", "--target", node.target, "--json").out)


def test_fleet_inventory_lists_the_summary_nested(node: Node, tmp_path: Path,  # noqa: F811
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`appliance fleet inventory` prints each node's inventory as nested keys."""
    _image(tmp_path, monkeypatch, compliance=SUMMARY)
    _print_data(_as_dict(_inventory(node)), "  ")
    out = capsys.readouterr().out
    assert ("  compliance:\n    scope: offline scan of the built root\n"
            "    scanner: ssg-debian 0.1.82-1, openscap-scanner 1.4.2+dfsg-1, lynis 3.1.4-1\n"
            "    profiles:\n      -\n        profile: anssi_bp28_enhanced\n        pass_ratio: 0.5823\n"
            "        passed: 145\n") in out
    assert "    lynis_hardening_index: 47\n    agent_exposure: 1.2\n" in out
