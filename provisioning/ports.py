"""Picking a loopback TCP port for a server that another process will bind a moment later."""

from __future__ import annotations

import random
import socket
from pathlib import Path

_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_SPAN = 12000  # how far below the ephemeral range to look


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 now, drawn from below the kernel's ephemeral range.

    ``bind(0)`` answers with a port from the ephemeral range, which is also where the kernel
    draws every outgoing connection's source port: a server handed such a port can find it taken
    by some client's connection before it binds. Below that range only servers bind, so the
    window between picking and binding is left to another picker's bad luck alone.
    """
    try:
        low = int(_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    first = max(1024, low - _SPAN)
    for _ in range(64):
        port = random.randrange(first, low)  # noqa: S311 - not a secret, a spread
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
