"""`./dev test` runs the fast tier with the system-tier packages' programs out of sight.

That is what makes "the fast tier needs nothing the system set-up installs" checked: a fast
test that calls sfdisk or mmdebstrap fails under `./dev test` (and so in CI's first phase).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEV = ROOT / "dev"


def _system_packages() -> list[str]:
    script = f'eval "$(sed -n "/^APT_SYSTEM=/,/)/p" {DEV})"; printf "%s\\n" "${{APT_SYSTEM[@]}}"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    return out.split()


def _installed_programs(package: str) -> set[str]:
    status = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True,
                            check=False)
    if "install ok installed" not in status.stdout:
        return set()
    files = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True).stdout
    return {Path(f).name for f in files.splitlines()
            if ("/bin/" in f or "/sbin/" in f) and os.access(f, os.X_OK) and not Path(f).is_dir()}


@pytest.fixture(scope="module")
def shadow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fast-path")
    subprocess.run([str(DEV), "fast-path", str(folder)], check=True, stdin=subprocess.DEVNULL)
    return folder


def test_the_fast_path_hides_every_program_of_the_system_packages(shadow: Path) -> None:
    if shutil.which("dpkg-query") is None:
        pytest.skip("not a Debian machine: nothing to hide by package")
    packages = _system_packages()
    assert "mmdebstrap" in packages and "fdisk" in packages  # the list was read
    hidden = set().union(*(_installed_programs(p) for p in packages))
    visible = {p.name for p in shadow.iterdir()}
    assert not hidden & visible, f"system-tier programs on the fast tier's PATH: {sorted(hidden & visible)}"
    assert {"sh", "bash", "python3", "tar"} <= visible  # everything else stays


def test_the_tool_gate_searches_only_the_fast_path(shadow: Path) -> None:
    hidden = sorted(set().union(*(_installed_programs(p) for p in _system_packages())))
    if not hidden:
        pytest.skip("no system-tier package installed here: nothing to hide")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{shadow}", APPLIANCE_TOOL_PATH=str(shadow))
    probe = ("import sys; from provisioning.tools import require_tool\n"
             "from provisioning.errors import ToolError\n"
             "try:\n    require_tool(sys.argv[1])\nexcept ToolError:\n    sys.exit(7)\n")
    done = subprocess.run([sys.executable, "-c", probe, hidden[0]], env=env, cwd=ROOT, check=False)
    assert done.returncode == 7, f"{hidden[0]} was found through the tool gate"
    found = subprocess.run([sys.executable, "-c", probe, "tar"], env=env, cwd=ROOT, check=False)
    assert found.returncode == 0
