"""Carry one guest connection to a host port: qemu's ``guestfwd=...-cmd:`` runs this per
connection, with the guest's end of the connection as standard input and output.

Run as a script by path (``python _relay.py HOST PORT``), so it imports only the standard
library: qemu starts it with its own (clean) environment.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import sys


def relay(guest: socket.socket, host: str, port: int) -> None:
    """Copy bytes both ways until both sides have closed; half-closes are passed on."""
    upstream = socket.create_connection((host, port), timeout=30)
    upstream.settimeout(None)
    peers = {guest: upstream, upstream: guest}
    sel = selectors.DefaultSelector()
    for s in peers:
        sel.register(s, selectors.EVENT_READ)
    while sel.get_map():
        for key, _ in sel.select():
            src = key.fileobj
            assert isinstance(src, socket.socket)
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if data:
                peers[src].sendall(data)
                continue
            sel.unregister(src)
            with contextlib.suppress(OSError):
                peers[src].shutdown(socket.SHUT_WR)
    upstream.close()


def main(argv: list[str]) -> int:
    # standard error is the guest's connection too: a message there would reach the guest's
    # client as if the server had sent it
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115, PTH123 - for the life of the process
    guest = socket.socket(fileno=0)  # slirp's end of the guest connection (a socket pair)
    try:
        relay(guest, argv[1], int(argv[2]))
    except OSError:
        return 1  # nothing listens on the host port: the guest sees its connection closed
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
