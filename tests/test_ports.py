"""Ports for servers started by another process: from below the ephemeral range, free now."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import pytest

from provisioning import ports


def test_a_port_from_below_the_ephemeral_range_that_binds() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(20):
        port = ports.free_loopback_port()
        assert 1024 <= port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_taken_port_is_not_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    port = int(taken.getsockname()[1])
    draws = iter([port, port, port + 1 if port < 65535 else port - 1])
    monkeypatch.setattr(random, "randrange", lambda a, b: next(draws))
    try:
        assert ports.free_loopback_port() != port
    finally:
        taken.close()
