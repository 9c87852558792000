"""The baked tiny LLM, asked from outside on the HTTPS port (8000) with the official ``openai``
client over mTLS, as a site's application would; a client without a certificate is refused."""

from __future__ import annotations

import ssl
from typing import Any

import httpx
import openai
import pytest

from provisioning.demo.bench import LLM
from testsupport.appliance import Appliance

pytestmark = pytest.mark.timeout(900)  # the first reply under TCG can take a while
MESSAGES: Any = [{"role": "user", "content": "Hello, appliance"}]


def _context(appliance: Appliance, *, with_cert: bool) -> ssl.SSLContext:
    assert appliance.tls_files is not None
    ca, cert, key = appliance.tls_files
    ctx = ssl.create_default_context(cafile=str(ca))
    if appliance.tls_name:
        ctx.check_hostname = False  # the node's name is checked by the gRPC channel's override
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
    with _client(appliance, with_cert=False) as client, pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model=LLM, messages=MESSAGES, max_tokens=4)
