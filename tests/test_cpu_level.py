"""The image's x86-64 level: the node's check, the units that run it, the inventory, the boot refusal."""

from __future__ import annotations

import itertools
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cpu import (
    EXIT_CPU_BELOW_LEVEL,
    LEVELS,
    check_line,
    cpu_flags,
    image_level,
    main,
    missing_features,
    refusal,
)
from agent.health.inventory import collect_inventory
from agent.proto import node_pb2
from provisioning.cli import main as cli_main
from provisioning.commands.node import _print_inventory
from provisioning.errors import ImageError
from provisioning.image import boot as vm
from provisioning.image.configure import write_image_metadata
from provisioning.image.plan import (
    AGENT_UNIT,
    CPU_CHECK_UNIT,
    VENV,
    agent_unit,
    configure_plan,
    cpu_check_unit,
)
from provisioning.image.profile import load_profile

ROOT = Path(__file__).resolve().parent.parent
V2 = "cx16 lahf_lm popcnt sse4_1 sse4_2 ssse3"
V1 = "fpu cx8 cmov mmx fxsr sse sse2"
# A real qemu64 guest's flags (no SSSE3, SSE4.x, POPCNT) and a Haswell's (v3, no AVX-512).
QEMU64 = f"{V1} pni lm syscall nx hypervisor lahf_lm svm cx16"
HASWELL = f"{V1} {V2} pni lm avx avx2 bmi1 bmi2 f16c fma abm movbe xsave aes"


def _cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: {flags}\n\n"
                    f"processor\t: 1\nflags\t\t: {flags}\n")
    return path


def test_levels_nest_and_name_the_psabi_flags() -> None:
    order = list(LEVELS)
    assert order == ["x86-64", "x86-64-v2", "x86-64-v3", "x86-64-v4"]
    for lower, higher in itertools.pairwise(order):
        assert set(LEVELS[lower]) < set(LEVELS[higher])
    assert set(LEVELS["x86-64-v2"]) - set(LEVELS["x86-64"]) == set(V2.split())
    assert {"avx2", "fma", "movbe", "abm"} <= set(LEVELS["x86-64-v3"])
    assert set(LEVELS["x86-64-v4"]) - set(LEVELS["x86-64-v3"]) == {
        "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


def test_missing_features_of_a_qemu64_and_a_haswell() -> None:
    assert missing_features("x86-64-v2", QEMU64.split()) == ("popcnt", "sse4_1", "sse4_2", "ssse3")
    assert missing_features("x86-64-v2", HASWELL.split()) == ()
    assert missing_features("x86-64-v3", HASWELL.split()) == ()
    assert missing_features("x86-64-v4", HASWELL.split()) == (
        "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")
    with pytest.raises(ValueError, match="unknown x86-64 level 'x86-64-v9'"):
        missing_features("x86-64-v9", ())


def test_cpu_flags_reads_the_first_processor(tmp_path: Path) -> None:
    assert cpu_flags(_cpuinfo(tmp_path, QEMU64)) == frozenset(QEMU64.split())
    empty = tmp_path / "empty"
    empty.write_text("processor : 0\n")
    assert cpu_flags(empty) == frozenset()


def test_check_exits_1_naming_the_missing_features_and_writes_the_console(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    console = tmp_path / "console"
    code = main(["--level", "x86-64-v2", "--cpuinfo", str(_cpuinfo(tmp_path, QEMU64)), "--console",
                 "--console-path", str(console)])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "lacks popcnt sse4_1 sse4_2 ssse3, needed by x86-64-v2" in err
    assert console.read_text() == err


def test_check_passes_quietly_on_a_cpu_with_the_level(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    console = tmp_path / "console"
    code = main(["--level", "x86-64-v3", "--cpuinfo", str(_cpuinfo(tmp_path, HASWELL)), "--console",
                 "--console-path", str(console)])
    assert code == 0 and not console.exists()
    assert capsys.readouterr().out == check_line("x86-64-v3", ()) + "\n"
    assert main(["--cpuinfo", str(tmp_path / "absent")]) == 2


def test_check_runs_as_a_module_without_numpy_or_onnxruntime(tmp_path: Path) -> None:
    # It runs before anything that could need the missing instructions.
    code = ("import sys, runpy; sys.argv = ['agent.cpu', '--level', 'x86-64-v2', '--cpuinfo', "
            f"{str(_cpuinfo(tmp_path, QEMU64))!r}]\n"
            "try:\n    runpy.run_module('agent.cpu', run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('numpy', 'onnxruntime', 'grpc', 'google'))\n"
            "    print(e.code, heavy)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          timeout=60)
    assert done.stdout.strip() == "1 []", done.stderr
    assert "lacks popcnt" in done.stderr


def test_image_level_from_metadata(tmp_path: Path) -> None:
    meta = tmp_path / "image.json"
    assert image_level(meta) == "x86-64-v2"
    meta.write_text(json.dumps({"cpu_level": "x86-64-v3"}))
    assert image_level(meta) == "x86-64-v3"
    meta.write_text(json.dumps({"cpu_level": "bogus"}))
    assert image_level(meta) == "x86-64-v2"


# ---------------------------------------------------------------------- the image


def _profile(tmp_path: Path, text: str = "") -> object:
    path = tmp_path / "images" / "p.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return load_profile(path)


def test_profile_level_defaults_to_numpys_baseline_and_lands_in_image_json(tmp_path: Path) -> None:
    p = load_profile(ROOT / "images/minimal.toml")
    assert p.image.cpu_level == "x86-64-v2"
    q = _profile(tmp_path, '[image]\ncpu_level = "x86-64-v3"\n')
    doc = write_image_metadata(q, tmp_path / "root", 1767225600)  # type: ignore[arg-type]
    assert doc["cpu_level"] == "x86-64-v3"
    assert image_level(tmp_path / "root/usr/lib/appliance/image.json") == "x86-64-v3"


def test_agent_unit_has_the_agent_check_the_cpu_itself(tmp_path: Path) -> None:
    p = _profile(tmp_path, '[image]\ncpu_level = "x86-64-v3"\n')
    unit = agent_unit(p).splitlines()  # type: ignore[arg-type]
    start = next(line for line in unit if line.startswith("ExecStart="))
    assert start.endswith(" serve --config /etc/appliance/agent.toml --cpu-level x86-64-v3")
    # one interpreter per boot: no separate check on the critical path before the agent
    assert "agent.cpu" not in "\n".join(unit)
    assert not any(line.startswith(("Requires=", "After=")) and CPU_CHECK_UNIT in line for line in unit)
    # below the level: no Restart= loop, and the console hears why from the root oneshot
    assert f"RestartPreventExitStatus={EXIT_CPU_BELOW_LEVEL}" in unit
    assert f"OnFailure={CPU_CHECK_UNIT}" in unit


def test_cpu_check_unit_is_a_root_oneshot_run_only_on_the_agents_failure(tmp_path: Path) -> None:
    p = _profile(tmp_path)
    unit = cpu_check_unit(p).splitlines()  # type: ignore[arg-type]
    assert f"ExecStart={VENV}/bin/python -m agent.cpu --level x86-64-v2 --console" in unit
    assert "Type=oneshot" in unit
    assert not any(line.startswith(("User=", "PrivateDevices=")) for line in unit)  # /dev/console
    # not part of a good boot: nothing pulls it in but the agent's OnFailure=
    assert "[Install]" not in unit and not any(AGENT_UNIT in line for line in unit)
    plan = configure_plan(p, pip_wheel="/usr/share/python-wheels")  # type: ignore[arg-type]
    assert CPU_CHECK_UNIT not in plan.enable
    assert plan.file(f"/etc/systemd/system/{CPU_CHECK_UNIT}").content == cpu_check_unit(p)  # type: ignore[arg-type]


_SERVE_ON = """\
import sys
from pathlib import Path
import agent.cpu
from agent.cli import main
agent.cpu.CPUINFO = Path(sys.argv[1])
code = main(["serve", "--state-dir", sys.argv[2], "--cpu-level", sys.argv[3], "--print-config"])
heavy = sorted({m.split('.')[0] for m in sys.modules} & {'numpy', 'onnxruntime', 'grpc'})
print(code, heavy)
"""


def test_serve_refuses_a_cpu_below_its_level_before_numpy_loads(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", _SERVE_ON, str(_cpuinfo(tmp_path, QEMU64)),
                           str(tmp_path / "state"), "x86-64-v2"],
                          capture_output=True, text=True, check=False, timeout=60)
    assert done.stdout.strip() == f"{EXIT_CPU_BELOW_LEVEL} []", done.stderr
    assert "lacks popcnt sse4_1 sse4_2 ssse3, needed by x86-64-v2" in done.stderr
    unreadable = subprocess.run([sys.executable, "-c", _SERVE_ON, str(tmp_path / "absent"),
                                 str(tmp_path / "state"), "x86-64-v2"],
                                capture_output=True, text=True, check=False, timeout=60)
    assert unreadable.stdout.strip() == f"{EXIT_CPU_BELOW_LEVEL} []", unreadable.stderr
    assert "unreadable" in unreadable.stderr and "cannot check x86-64-v2" in unreadable.stderr


def test_serve_goes_on_when_the_cpu_reaches_its_level(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", _SERVE_ON, str(_cpuinfo(tmp_path, HASWELL)),
                           str(tmp_path / "state"), "x86-64-v3"],
                          capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0 and done.stdout.splitlines()[-1].startswith("0 "), done.stderr
    assert '"state_dir"' in done.stdout  # it went on to print the configuration
    assert refusal("x86-64-v4", _cpuinfo(tmp_path, HASWELL)) == check_line(
        "x86-64-v4", ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"))


def test_arm64_images_have_no_x86_check(tmp_path: Path) -> None:
    p = _profile(tmp_path, '[debian]\narchitecture = "arm64"\n')
    unit = agent_unit(p)  # type: ignore[arg-type]
    assert "--cpu-level" not in unit and CPU_CHECK_UNIT not in unit and "RestartPrevent" not in unit
    assert CPU_CHECK_UNIT not in configure_plan(p, pip_wheel="/w").enable  # type: ignore[arg-type]


# ---------------------------------------------------------------------- the node reports it


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 flags")
def test_inventory_reports_the_level_and_the_missing_features(tmp_path: Path) -> None:
    meta = tmp_path / "image.json"
    meta.write_text(json.dumps({"version": "1", "cpu_level": "x86-64-v3"}))
    inv = collect_inventory(tmp_path / "state", image_metadata=meta,
                            cpuinfo=_cpuinfo(tmp_path, f"{V1} {V2}"))
    assert inv.cpu_level_required == "x86-64-v3"
    assert inv.cpu_missing_features == ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe",
                                        "xsave")


def test_node_inventory_prints_the_cpu_level(capsys: pytest.CaptureFixture[str]) -> None:
    inv = node_pb2.Inventory(node_id="n", cpu_level_required="x86-64-v2",
                             cpu_missing_features=["popcnt", "sse4_2"])
    _print_inventory(inv)
    assert "cpu level            x86-64-v2 NOT MET: missing popcnt sse4_2" in capsys.readouterr().out
    _print_inventory(node_pb2.Inventory(node_id="n", cpu_level_required="x86-64-v2"))
    assert "x86-64-v2 (met)" in capsys.readouterr().out


# ---------------------------------------------------------------------- appliance boot


@pytest.mark.parametrize(("model", "level", "refused"), [
    ("qemu64", "x86-64-v2", True),
    ("kvm64", "x86-64-v2", True),
    ("Nehalem", "x86-64-v2", False),
    ("Westmere-IBRS", "x86-64-v2", False),
    ("Nehalem", "x86-64-v3", True),
    ("Haswell-noTSX-IBRS", "x86-64-v3", False),
    ("Skylake-Client-v2", "x86-64-v4", True),
    ("Icelake-Server", "x86-64-v4", False),
    ("host", "x86-64-v4", False),
    ("max", "x86-64-v4", False),
    ("qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt", "x86-64-v2", False),  # extra flags: not judged here
    ("SomeFutureModel", "x86-64-v2", False),
])
def test_cpu_model_table(model: str, level: str, refused: bool) -> None:
    if refused:
        with pytest.raises(ImageError, match=rf"--cpu {model}: .* is x86-64(-v\d)?, below the {level}"):
            vm.check_cpu_model(model, level)
    else:
        vm.check_cpu_model(model, level)


def test_image_level_comes_from_the_manifest_beside_the_disk(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    assert vm.image_cpu_level(disk) == "x86-64-v2"
    (tmp_path / "image-manifest.json").write_text(json.dumps({"cpu_level": "x86-64-v4"}))
    assert vm.image_cpu_level(disk) == "x86-64-v4"


def test_qemu_argv_uses_the_chosen_model(tmp_path: Path) -> None:
    def cpu(plan: vm.BootPlan) -> str:
        argv = vm.qemu_argv(plan)
        return argv[argv.index("-cpu") + 1]

    assert cpu(vm.BootPlan(tmp_path / "d", tmp_path / "s", kvm=True)) == "host"
    assert cpu(vm.BootPlan(tmp_path / "d", tmp_path / "s", kvm=False)) == "max"
    assert cpu(vm.BootPlan(tmp_path / "d", tmp_path / "s", kvm=False, cpu_model="Haswell")) == "Haswell"


def test_boot_refuses_qemu64_before_any_qemu_starts(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\0" * 512)
    (tmp_path / "image-manifest.json").write_text(json.dumps({"cpu_level": "x86-64-v3"}))
    state = tmp_path / "vm"
    code = cli_main(["boot", str(disk), "--state", str(state), "--cpu", "Nehalem", "--accel", "tcg"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert "--cpu Nehalem: qemu's Nehalem model is x86-64-v2, below the x86-64-v3" in err
    assert not state.exists()  # refused before the state (overlay, qemu) was touched
