"""A software TPM (swtpm) on loopback for system tests, and tpm2-tools run against it."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from provisioning.tools import run

__all__ = ["swtpm_server", "tpm"]


def _free_port_pair() -> int:
    """A port P with P+1 free too: tpm2-tools' swtpm TCTI finds the control channel at P+1."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two adjacent free ports on loopback")


@contextmanager
def swtpm_server(tmp: Path) -> Iterator[str]:
    """A fresh swtpm with its state in ``tmp``; yields the TCTI string that points tpm2-tools at
    it (``TPM2TOOLS_TCTI``).  Stopped by PID at the end."""
    state = tmp / "state"
    state.mkdir()
    port = _free_port_pair()
    pid_file = tmp / "swtpm.pid"
    run(["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}", "--server", f"type=tcp,port={port}",
         "--ctrl", f"type=tcp,port={port + 1}", "--flags", "not-need-init,startup-clear", "--daemon",
         "--pid", f"file={pid_file}"])
    try:
        yield f"swtpm:host=127.0.0.1,port={port}"
    finally:
        os.kill(int(pid_file.read_text()), signal.SIGTERM)


def tpm(tcti: str, *argv: str | Path) -> None:
    """Run one tpm2-tools command against ``tcti``.  There is no resource manager between the
    tools and swtpm, so no transient object or session is left behind."""
    env = dict(os.environ, TPM2TOOLS_TCTI=tcti)
    run(list(argv), env=env)
    run(["tpm2_flushcontext", "-t"], env=env)
    run(["tpm2_flushcontext", "-s"], env=env)
