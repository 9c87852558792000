"""bench/soak.py cannot rot: its checks are tested on their own (fast), and a 20-second run
against a real agent with one update must pass with zero failed requests (slow)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SOAK = ROOT / "bench" / "soak.py"


@pytest.fixture(scope="module")
def soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_soak", SOAK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_soak"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_versions_allowed_around_a_switch(soak: ModuleType) -> None:
    s = soak.Serving()
    assert s.allowed(1.0, 2.0) == {"1.0.1"}
    s.switches.append(soak.Switch("1.0.2", 10.0))  # under way
    assert s.allowed(5.0, 11.0) == {"1.0.1", "1.0.2"}  # the swap may land while in flight
    assert s.allowed(5.0, 9.0) == {"1.0.1"}  # ended before the update began
    s.switches[-1] = soak.Switch("1.0.2", 10.0, 12.0)
    assert s.current == "1.0.2"
    assert s.allowed(11.0, 13.0) == {"1.0.1", "1.0.2"}
    assert s.allowed(12.5, 13.0) == {"1.0.2"}  # started after ApplyUpdate returned: new only
    s.switches.append(soak.Switch("1.0.3", 20.0, 21.0))
    assert s.allowed(12.5, 30.0) == {"1.0.2", "1.0.3"}
    assert s.allowed(22.0, 23.0) == {"1.0.3"}


def test_answers_are_checked_against_the_version_that_computed_them(soak: ModuleType) -> None:
    class Reply:
        def __init__(self, version: str, y: np.ndarray) -> None:
            self.model_version = version
            self.raw_output_contents = [y.astype(np.float32).tobytes()]

    assert soak.check_answer(Reply("1.0.2", soak.expected_y("1.0.2"))) is None
    assert "not its function" in soak.check_answer(Reply("1.0.3", soak.expected_y("1.0.2")))
    assert "unreadable" in soak.check_answer(Reply("1.0.2", np.zeros(3)))
    assert len({soak.scale_of(v) for v in (soak.FIRST, soak.SECOND, soak.THIRD)}) == 3


def test_plan_events_and_growth(soak: ModuleType) -> None:
    steps = soak.plan(2, True)
    assert [(s.op, s.version, s.at) for s in steps] == [
        ("apply", "1.0.2", 0.3), ("apply", "1.0.3", 0.5), ("rollback", "1.0.2", 0.7)]
    assert [(s.op, s.at) for s in soak.plan(1, False)] == [("apply", 0.3)]
    wanted = soak.expected_events(steps)
    assert wanted == [("update.applied", "1.0.2"), ("update.applied", "1.0.3"),
                      ("update.rolled_back", "1.0.2")]
    assert soak.in_order([("update.refused", "9"), *wanted], wanted)
    assert not soak.in_order([wanted[1], wanted[0], wanted[2]], wanted)
    assert not soak.in_order(wanted[:2], wanted)

    samples = [(float(t), 100 + t, 20, 10, 21) for t in range(0, 60, 10)]
    g = soak.growth(samples, 1, 20.0)
    assert (g["first_after_warmup"], g["max_after_warmup"]) == (120, 150)
    assert math.isclose(g["growth_pct"], 25.0)
    assert "growth_pct" not in soak.growth(samples, 1, 55.0)  # one sample is no trend

    # fds: one more for a single sample comes and goes; one that stays is a leak
    fds = [19, 19, 20, 19, 19, 20, 19, 19]
    blip = [(float(t), 0, n, 0, n) for t, n in enumerate(fds)]
    assert soak.growth(blip, 2, 0.0)["growth_pct"] > 5
    assert soak.growth(blip, 2, 0.0, 3)["growth_pct"] == 0
    leak = [(float(t), 0, n, 0, n) for t, n in enumerate([19, 19, 19, 20, 20, 20, 20, 21])]
    assert soak.growth(leak, 2, 0.0, 3)["growth_pct"] > 5


@pytest.mark.slow
def test_twenty_second_soak_passes(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(SOAK), "--minutes", str(20 / 60), "--concurrency", "6", "--updates", "1",
         "--no-rollback", "--sample-s", "1", "--json", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["failures"] == 0
    assert result["kinds"]["infer"]["requests"] > 0 and result["kinds"]["watch"]["requests"] > 0
    assert result["events"] == [["update.applied", "1.0.2"]]
    assert result["final_version"] == "1.0.2"
    assert result["answers_by_version"].keys() == {"1.0.1", "1.0.2"}
    assert all(c["ok"] for c in result["criteria"].values())
