"""The HTTPS port's limits: the gRPC port's ``[limits]`` (requests in progress per peer address
and overall) answered with 429 and ``Retry-After``, and ``[server] max_message_bytes`` answered
with 413 before an over-large body is read.  Real TLS clients on loopback; requests are held in
progress by clients that send their headers and only part of their body, and peers told apart
by their source address (127.0.0.x)."""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from agent.proto import node_pb2, node_pb2_grpc
from testsupport.http_support import HttpsPort, site_pki, tls_config
from testsupport.inference_support import Agent, free_port

MAX_BODY = 64 << 10
PER_PEER = 2
OVERALL = 3


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return site_pki(tmp_path_factory.mktemp("pki") / "site", tmp_path_factory.mktemp("pki") / "other")


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[HttpsPort]:
    extra = (f"max_message_bytes = {MAX_BODY}\n"
             f"[limits]\nmax_calls_per_peer = {PER_PEER}\nmax_concurrent_rpcs = {OVERALL}")
    p = HttpsPort(tls_config(tmp_path_factory.mktemp("cfg"), pki, extra), None)
    yield p
    p.close()


def _context(pki: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    d = pki / "issued" / "observer"
    ctx.load_cert_chain(str(d / "observer.crt"), str(d / "observer.key"))
    return ctx


def _client(port: int, pki: Path, source: str) -> httpx.Client:
    ctx = _context(pki)
    return httpx.Client(base_url=f"https://127.0.0.1:{port}", timeout=30,
                        transport=httpx.HTTPTransport(verify=ctx, local_address=source))


def _raw(port: int, pki: Path, source: str, head: bytes) -> ssl.SSLSocket:
    """A TLS connection from ``source`` that has sent ``head`` (and nothing more)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    tls = _context(pki).wrap_socket(sock, server_hostname="127.0.0.1")
    tls.sendall(head)
    return tls


def _hold(port: int, pki: Path, source: str) -> ssl.SSLSocket:
    """A request in progress from ``source``: its handler waits for the rest of the body."""
    return _raw(port, pki, source, b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                   b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")


def _until(check: Callable[[], bool]) -> bool:
    """Poll ``check`` until it holds (the server sees connections come and go on its own loop)."""
    deadline = time.monotonic() + 30
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _status(client: httpx.Client) -> int:
    return client.get("/v1/models").status_code


def test_requests_in_progress_are_limited_per_peer_and_overall(port: HttpsPort, pki: Path) -> None:
    held: list[ssl.SSLSocket] = []
    with _client(port.port, pki, "127.0.0.1") as one, _client(port.port, pki, "127.0.0.2") as two, \
            _client(port.port, pki, "127.0.0.3") as three:
        try:
            held += [_hold(port.port, pki, "127.0.0.1") for _ in range(PER_PEER)]
            assert _until(lambda: _status(one) == 429), "a peer's requests in progress are limited"
            resp = one.get("/v1/models")
            assert resp.status_code == 429 and resp.headers["Retry-After"] == "1"
            error = resp.json()["error"]
            assert error["message"] == f"peer 127.0.0.1 already has {PER_PEER} calls in progress"
            assert error["type"] == "rate_limit_exceeded"
            assert _status(two) == 200, "another peer is not held back by the first one's requests"

            held.append(_hold(port.port, pki, "127.0.0.2"))
            assert _until(lambda: _status(three) == 429), "requests in progress are limited overall"
            resp = three.get("/v1/models")
            assert resp.json()["error"]["message"] == f"the node already has {OVERALL} calls in progress"
            assert resp.headers["Retry-After"] == "1"
        finally:
            for sock in held:
                sock.close()
        assert _until(lambda: _status(one) == 200 and _status(three) == 200), \
            "a request that ends (here: its client went away) no longer counts"


def test_a_body_over_the_limit_is_refused_by_its_declared_size(port: HttpsPort, pki: Path) -> None:
    # Only the headers are sent: the answer comes without waiting for (or reading) the body.
    size = 10 << 30
    with _raw(port.port, pki, "127.0.0.1", b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                      b"Content-Type: application/json\r\n"
                                      b"Content-Length: %d\r\n\r\n" % size) as sock:
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), head
    error = json.loads(body)["error"]
    assert error["message"] == (f"request body of {size} bytes is over the node's limit of {MAX_BODY} "
                                "bytes ([server] max_message_bytes)")


def test_a_chunked_body_over_the_limit_is_refused(port: HttpsPort, pki: Path) -> None:
    def body() -> Iterator[bytes]:
        yield b'{"model": "m", "input": "'
        for _ in range(2 * MAX_BODY // 4096):
            yield b"x" * 4096
        yield b'"}'

    with _client(port.port, pki, "127.0.0.1") as client:
        resp = client.post("/v1/embeddings", content=body(), headers={"Content-Type": "application/json"})
    assert resp.status_code == 413
    assert resp.json()["error"]["message"] == (f"request body is over the node's limit of {MAX_BODY} "
                                               "bytes ([server] max_message_bytes)")


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[Agent]:
    """A real agent process with both ports and the small limits above."""
    tmp = tmp_path_factory.mktemp("agent")
    limits = f"[limits]\nmax_calls_per_peer = {PER_PEER}\nmax_concurrent_rpcs = {OVERALL}"
    config = tls_config(tmp, pki, limits)
    a = Agent(tmp / "state", "--config", str(config), http_port=free_port())
    yield a
    assert a.stop() == 0, a.log()


def _node_stub(agent: Agent, pki: Path) -> tuple[grpc.Channel, Any]:
    d = pki / "issued" / "observer"
    creds = grpc.ssl_channel_credentials((pki / "ca.crt").read_bytes(), (d / "observer.key").read_bytes(),
                                         (d / "observer.crt").read_bytes())
    channel = grpc.secure_channel(f"127.0.0.1:{agent.port}", creds)
    return channel, node_pb2_grpc.NodeStub(channel)


def test_a_peers_calls_on_both_ports_count_against_one_limit(agent: Agent, pki: Path) -> None:
    """Two health watches held open on gRPC leave the same peer no call on HTTPS, and two
    requests held on HTTPS none on gRPC: ``max_calls_per_peer`` is the peer's, not a port's."""
    channel, node = _node_stub(agent, pki)
    with channel, _client(agent.http_port, pki, "127.0.0.1") as client:
        watches = [node.WatchHealth(node_pb2.WatchHealthRequest(interval_ms=60_000)) for _ in range(PER_PEER)]
        try:
            assert _until(lambda: _status(client) == 429), "held gRPC calls count on the HTTPS port"
            error = client.get("/v1/models").json()["error"]
            assert error["message"] == f"peer 127.0.0.1 already has {PER_PEER} calls in progress"
        finally:
            for watch in watches:
                watch.cancel()
        assert _until(lambda: _status(client) == 200), "cancelled gRPC calls no longer count"

        def health() -> grpc.StatusCode:
            try:
                node.GetHealth(node_pb2.GetHealthRequest(), timeout=10)
            except grpc.RpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        held = [_hold(agent.http_port, pki, "127.0.0.1") for _ in range(PER_PEER)]
        try:
            assert _until(lambda: health() == grpc.StatusCode.RESOURCE_EXHAUSTED), \
                "held HTTPS requests count on the gRPC port"
            with pytest.raises(grpc.RpcError) as caught:
                node.GetHealth(node_pb2.GetHealthRequest(), timeout=10)
            assert caught.value.details() == f"peer 127.0.0.1 already has {PER_PEER} calls in progress"
        finally:
            for sock in held:
                sock.close()
        assert _until(lambda: health() == grpc.StatusCode.OK), "closed HTTPS requests no longer count"
