"""Shared fixtures: small real models, bundles and a CLI runner (in-process and as a process)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from provisioning.cli import main as cli_main
from provisioning.demo.models import affine_model, save_golden

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """Run ``appliance ARGS`` in-process and capture what it printed."""

    def run(*args: str | Path) -> CliResult:
        code = cli_main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def run_appliance(*args: str | Path, env: dict[str, str] | None = None,
                  timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a separate process (same interpreter, this checkout first on the path)."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "provisioning.cli", *[str(a) for a in args]],
        capture_output=True, text=True, env=full_env, timeout=timeout, check=False,
    )


@pytest.fixture
def affine_bundle(tmp_path: Path) -> Path:
    """A real bundle of the tiny affine model (y = 2x + 1), created through the library."""
    from provisioning.bundle import create_bundle

    model = affine_model(tmp_path / "affine.onnx")
    golden = save_golden(tmp_path / "golden.npz",
                         {"x": np.arange(8, dtype=np.float32).reshape(2, 4)})
    return create_bundle(model, name="affine", version="1.0.0", golden=[golden],
                         out=tmp_path / "affine-1.0.0.bundle").path
