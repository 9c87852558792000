"""The agent speaks systemd's notify protocol (Type=notify, WatchdogSec=) on a real socket.

Started as the image's unit starts it: the node's own entry point (``appliance-agent serve``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT


def test_ready_watchdog_and_stopping_are_notified(tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(60)
        env = dict(os.environ, NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="200000",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("WATCHDOG_PID", None)
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
            proc.send_signal(signal.SIGTERM)
            while (msg := sock.recv(256).decode()) == "WATCHDOG=1":
                pass
            assert msg == "STOPPING=1"
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
