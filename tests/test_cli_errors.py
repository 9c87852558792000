"""Errors a newcomer meets first: each says what went wrong, with the exit code scripts expect."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from provisioning.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _appliance(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "provisioning.cli", *map(str, args)], cwd=cwd, text=True,
                          capture_output=True, timeout=120, check=False,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(cwd)})


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_target_without_a_port_means_8001() -> None:
    parser = build_parser()
    assert parser.parse_args(["node", "health", "--target", "node7"]).target == "node7:8001"
    assert parser.parse_args(["node", "health", "--target", "node7:9"]).target == "node7:9"
    assert parser.parse_args(["node", "inventory", "--target", "fd00::7"]).target == "[fd00::7]:8001"
    assert parser.parse_args(["node", "update", "check", "--target", "[fd00::7]"]).target == "[fd00::7]:8001"


def test_health_check_of_an_unreachable_node_is_unknown(tmp_path: Path) -> None:
    target = f"127.0.0.1:{_closed_port()}"
    checked = _appliance("node", "health", "--check", "--target", target, "--timeout", "2", cwd=tmp_path)
    assert checked.returncode == 3, checked.stderr
    assert "UNKNOWN" in checked.stderr and "Traceback" not in checked.stderr
    plain = _appliance("--json", "node", "health", "--target", target, "--timeout", "2", cwd=tmp_path)
    assert plain.returncode == 1 and json.loads(plain.stdout)["exit_code"] == 1  # not a plugin: an error


def test_a_malformed_inventory_reports_the_parse_failure(tmp_path: Path) -> None:
    (tmp_path / "bad.yml").write_text("all:\n  hosts: [a, b\n")
    r = _appliance("fleet", "status", "-i", "bad.yml", "--insecure", cwd=tmp_path)
    assert r.returncode == 6
    assert "bad.yml: not an Ansible inventory: YAML parsing failed" in r.stderr
    assert "no nodes match" not in r.stderr and "[WARNING]" not in r.stderr


def test_bundle_create_checks_its_cheap_arguments_before_the_model(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"not a model")  # loading it would fail differently
    base = ["bundle", "create", "model.onnx", "--golden", "g.npz", "--out", "o.bundle"]
    name = _appliance(*base, "--name", "Bad Name", "--version", "1.0.0", cwd=tmp_path)
    assert name.returncode == 1 and "--name 'Bad Name'" in name.stderr
    version = _appliance(*base, "--name", "ok", "--version", "v1", cwd=tmp_path)
    assert version.returncode == 1 and "--version: version 'v1'" in version.stderr
    golden = _appliance(*base, "--name", "ok", "--version", "1.0.0", cwd=tmp_path)
    assert golden.returncode == 4 and "g.npz: no such golden-vector file" in golden.stderr
    assert not (tmp_path / "o.bundle").exists()


def test_an_agent_that_cannot_start_leaves_the_state_directory_alone(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flags in (["--port", port, "--metrics-port", "0", "--http-port", "0"],
                      ["--port", "0", "--metrics-port", port, "--http-port", "0"],
                      ["--port", "0", "--metrics-port", "0", "--http-port", port]):
            r = _appliance("agent", "serve", "--state-dir", "state", *flags, cwd=tmp_path)
            assert r.returncode == 6 and f"cannot listen on 127.0.0.1:{port}" in r.stderr, r.stderr
            assert not (tmp_path / "state").exists()
    bad = _appliance("agent", "serve", "--state-dir", "state", "--listen", "0.0.0.0", cwd=tmp_path)
    assert bad.returncode == 6 and "beyond loopback" in bad.stderr
    assert not (tmp_path / "state").exists()
    shown = _appliance("agent", "serve", "--state-dir", "state", "--listen", "0.0.0.0", "--print-config",
                       cwd=tmp_path)
    assert shown.returncode == 6 and "beyond loopback" in shown.stderr and shown.stdout == ""
