"""The agent speaks systemd's notify protocol (Type=notify, WatchdogSec=) on a real socket.

Started as the image's unit starts it: the node's own entry point (``appliance-agent serve``).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from testsupport.inference_support import notify_socket, stop_notified


def test_ready_watchdog_and_stopping_are_notified(tmp_path: Path) -> None:
    with notify_socket(tmp_path / "notify.sock", 200_000) as (sock, env):
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "serve", "--state-dir",
             str(tmp_path / "state"), "--port", "0", "--metrics-port", "0", "--http-port", "0"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            seen: list[str] = []
            deadline = time.monotonic() + 60
            while seen.count("WATCHDOG=1") < 3 and time.monotonic() < deadline:
                seen.append(sock.recv(256).decode())
            assert seen[0] == "READY=1", seen
            assert seen.count("WATCHDOG=1") >= 3, seen
            stop_notified(proc, sock)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_the_agent_serves_without_loading_the_update_stack(tmp_path: Path) -> None:
    """TUF, securesystemslib and urllib3 are for registry calls, which an operator asks for: the
    agent's way to READY (the boot's critical chain, issue #14) does not import them."""
    report = tmp_path / "importtime.txt"  # a file, not a pipe: ~60 KB would fill a pipe's buffer
    with notify_socket(tmp_path / "notify.sock", 200_000) as (sock, env), report.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "agent", "serve", "--state-dir",
             str(tmp_path / "state"), "--port", "0", "--metrics-port", "0", "--http-port", "0"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        try:
            assert sock.recv(256).decode() == "READY=1"
            stop_notified(proc, sock)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0]
                for line in report.read_text().splitlines() if line.startswith("import time:")}
    assert "agent" in imported and "grpc" in imported  # the report is read right
    assert not imported & {"tuf", "securesystemslib", "urllib3"}, sorted(imported)
