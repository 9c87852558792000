"""What the agent's serving processes need before (and without) gRPC: logging, systemd's
notify protocol, the check that the ports are free, and the number of cores to serve with.

The supervisor of several serving processes (agent.workers) uses only this, so it does not
load gRPC and ONNX Runtime (about 70 MiB of RSS it would hold for nothing).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys

import psutil

from agent.config import AgentConfig
from agent.errors import ConfigError

__all__ = ["LOOPBACK", "physical_cores", "ports_free", "sd_notify", "setup_logging"]

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def physical_cores() -> int:
    """Physical cores within the CPUs this process may run on (at least 1)."""
    try:
        available = len(os.sched_getaffinity(0))
    except OSError:  # a sandbox that refuses even the question
        available = os.cpu_count() or 1
    try:
        physical = psutil.cpu_count(logical=False) or available
    except OSError:  # no topology in /sys and no /proc/cpuinfo
        physical = available
    return max(1, min(physical, available))


def ports_free(config: AgentConfig) -> None:
    """Fail before start-up writes anything when a port is taken (gRPC would find out later)."""
    https_host = config.server.listen if config.tls.cert else LOOPBACK
    wanted = ((config.server.listen, config.server.port), (https_host, config.server.metrics_port),
              (https_host, config.server.http_port))
    for host, port in wanted:
        if not port:
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state, when started by it."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    addr = "\0" + target[1:] if target.startswith("@") else target
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(message.encode(), addr)
        except OSError:
            log.debug("sd_notify failed", exc_info=True)


_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: signal.Signals) -> None:
    """Ask the kernel to send ``sig`` to this process when the thread that started it ends,
    however it ends (``PR_SET_PDEATHSIG``).  Best effort: a unit's system-call filter may
    deny it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)


def setup_logging(debug: bool, prefix: str = "") -> None:
    """Plain messages on stderr; with ``debug``, everything, with times and logger names.
    ``prefix`` starts every line (a worker process's name)."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format=prefix + ("%(message)s" if not debug else "%(asctime)s %(name)s: %(message)s"),
        stream=sys.stderr,
    )
