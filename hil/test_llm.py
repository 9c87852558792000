"""The baked tiny LLM, asked from outside on the HTTPS port (8000) with the official ``openai``
client over mTLS, as a site's application would; a client without a certificate is refused."""

from __future__ import annotations

import socket
import ssl
import urllib.parse
from typing import Any

import httpx
import openai
import pytest

from provisioning.demo.bench import LLM
from testsupport.appliance import Appliance

pytestmark = pytest.mark.timeout(900)  # the first reply under TCG can take a while
MESSAGES: Any = [{"role": "user", "content": "Hello, appliance"}]


class _NodeNamed(ssl.SSLContext):
    """A client context that checks the node's certificate for the node's name even though
    the connection goes to a forwarded loopback port (httpx names the URL's host)."""

    node_name = ""

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["server_hostname"] = self.node_name or kwargs.get("server_hostname")
        return super().wrap_socket(sock, *args, **kwargs)


def _context(appliance: Appliance, *, with_cert: bool) -> ssl.SSLContext:
    assert appliance.tls_files is not None
    ca, cert, key = appliance.tls_files
    ctx = _NodeNamed(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the name
    ctx.node_name = appliance.tls_name or ""
    ctx.load_verify_locations(cafile=str(ca))
    if with_cert:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def _client(appliance: Appliance, *, with_cert: bool = True) -> openai.OpenAI:
    http = httpx.Client(verify=_context(appliance, with_cert=with_cert), timeout=300)
    return openai.OpenAI(base_url=f"{appliance.https_base()}/v1", api_key="unused", max_retries=0,
                         http_client=http)


def test_chat_completion_over_mtls(appliance: Appliance) -> None:
    with _client(appliance) as client:
        assert LLM in {m.id for m in client.models.list().data}
        whole = client.chat.completions.create(model=LLM, messages=MESSAGES, max_tokens=12,
                                               temperature=0)
        text = whole.choices[0].message.content
        assert text, whole
        assert whole.usage is not None and whole.usage.completion_tokens > 0
        assert whole.usage.prompt_tokens > 0
        print(f"\nhil: {LLM} answered {text!r} ({whole.usage.completion_tokens} tokens)")
        streamed = client.chat.completions.create(model=LLM, messages=MESSAGES, max_tokens=12,
                                                  temperature=0, stream=True,
                                                  stream_options={"include_usage": True})
        pieces: list[str] = []
        usage = None
        for chunk in streamed:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
            if chunk.usage is not None:
                usage = chunk.usage
        # greedy decoding: the stream spells the same reply, in more than one piece
        assert "".join(pieces) == text
        assert sum(1 for p in pieces if p) > 1, pieces
        assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_client_without_certificate_is_refused(appliance: Appliance) -> None:
    url = urllib.parse.urlsplit(appliance.https_base())
    host, port = url.hostname or "localhost", url.port or 443
    ctx = _context(appliance, with_cert=False)
    # The node's certificate verifies (chain and name): the refusal below is the node's, not a
    # dead port or another server.
    with socket.create_connection((host, port), timeout=120) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as tls:
        assert tls.version() == "TLSv1.3"
        tls.sendall(b"GET /v1/models HTTP/1.1\r\nHost: node\r\n\r\n")
        try:
            answer = tls.recv(4096)
        except (ssl.SSLError, ConnectionResetError):
            answer = b""
    assert answer == b"", f"the node answered a client without a certificate: {answer[:80]!r}"
    # the same port, asked with the site's certificate a moment later, answers
    with _client(appliance) as client:
        assert LLM in {m.id for m in client.models.list().data}
