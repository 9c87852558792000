"""The HTTPS port's OpenAI-compatible routes, driven by the official ``openai`` client over
mTLS, against the real generative runtime (onnxruntime-genai on the tiny decoder, ONNX Runtime
on the tiny encoder made by provisioning.demo.llm_models)."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import logging
import re
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from agent.llm.engine import GenaiLanguageModel, Limits
from agent.llm.load import load_embedding_model, load_language_model
from agent.llm.served import ServedGenerative
from agent.llm.types import Chunk, Message, ModelCard, Sampling
from agent.metrics import REGISTRY, KvCacheCollector
from provisioning.demo.llm_models import DecoderShape, write_decoder, write_encoder
from testsupport.http_support import HttpsPort, site_pki, tls_config

PROMPT = "The appliance keeps its models"
LONG = 4000  # tokens of the long model's stream: far more than a client reads before leaving


def _members(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return site_pki(tmp_path_factory.mktemp("pki") / "site", tmp_path_factory.mktemp("pki") / "other")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedGenerative]:
    tmp = tmp_path_factory.mktemp("models")
    dec = write_decoder(tmp / "dec")
    long_dec = write_decoder(tmp / "long", DecoderShape(context_length=LONG + 96))
    enc = write_encoder(tmp / "enc")
    models = ServedGenerative()
    models.add(load_language_model(dec, _members(dec),
                                   ModelCard("tiny-llm", "1.0.0", "llm", 256, 0, "fp32", 7),
                                   Limits(256, 64, 4096, 5.0), intra_op_threads=1, decode_threads=2))
    models.add(load_language_model(long_dec, _members(long_dec),
                                   ModelCard("long-llm", "1.0.0", "llm", LONG + 96, 0, "fp32", 7),
                                   Limits(LONG + 96, LONG, LONG + 96, 5.0), intra_op_threads=1,
                                   decode_threads=2))
    # room for about six sequences of the 32-stream test at once: the rest wait for budget
    models.add(load_language_model(dec, _members(dec),
                                   ModelCard("narrow-llm", "1.0.0", "llm", 256, 0, "fp32", 7),
                                   Limits(256, 64, 6 * 64, 30.0), intra_op_threads=1, decode_threads=2))
    models.add(load_embedding_model(enc, _members(enc), "model.onnx",
                                    ModelCard("tiny-embed", "1.0.0", "embedding", 256, 0, "fp32", 7),
                                    intra_op_threads=1))
    yield models
    for name in ("tiny-llm", "long-llm", "narrow-llm", "tiny-embed"):
        models.remove(name)


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory, pki: Path,
         served: ServedGenerative) -> Iterator[HttpsPort]:
    p = HttpsPort(tls_config(tmp_path_factory.mktemp("cfg"), pki), served)
    kv = KvCacheCollector(served)  # as the agent registers it for its repository's models
    REGISTRY.register(kv)
    yield p
    REGISTRY.unregister(kv)
    p.close()


def _client(port: HttpsPort, pki: Path, who: str) -> openai.OpenAI:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    d = pki / "issued" / who
    ctx.load_cert_chain(str(d / f"{who}.crt"), str(d / f"{who}.key"))
    return openai.OpenAI(base_url=f"https://localhost:{port.port}/v1", api_key="unused", max_retries=0,
                         http_client=httpx.Client(verify=ctx, timeout=60))


@pytest.fixture
def client(port: HttpsPort, pki: Path) -> Iterator[openai.OpenAI]:
    c = _client(port, pki, "observer")  # the least role may use the whole API
    yield c
    c.close()


async def _collect(stream: AsyncIterator[Chunk]) -> list[Chunk]:
    return [c async for c in stream]


def _direct(port: HttpsPort, model: GenaiLanguageModel, prompt: str, sampling: Sampling) -> list[Chunk]:
    """The same generation driven in-process on the port's loop: what the API must relay."""
    return port.call(_collect(model.generate(prompt, sampling)))


def test_models_are_listed(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [(m.id, m.created) for m in models.data] == [
        ("long-llm", 7), ("narrow-llm", 7), ("tiny-embed", 7), ("tiny-llm", 7)]


def test_chat_matches_the_runtime_and_streams_the_same_text(client: openai.OpenAI, port: HttpsPort,
                                                            served: ServedGenerative) -> None:
    llm = served.language_model("tiny-llm")
    prompt = llm.chat_prompt([Message("user", PROMPT)])
    want = _direct(port, llm, prompt, Sampling(max_tokens=16, temperature=0))
    text = "".join(c.text for c in want)
    resp = client.chat.completions.create(model="tiny-llm", messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=16, temperature=0)
    assert resp.object == "chat.completion" and resp.model == "tiny-llm"
    assert resp.choices[0].message.role == "assistant" and resp.choices[0].message.content == text
    assert resp.choices[0].finish_reason == want[-1].finish_reason
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (want[-1].prompt_tokens,
                                                                         want[-1].completion_tokens)
    stream = client.chat.completions.create(model="tiny-llm", messages=[{"role": "user", "content": PROMPT}],
                                            max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want[-1].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == want[-1].completion_tokens


def test_completions_seed_and_stop(client: openai.OpenAI, port: HttpsPort, served: ServedGenerative) -> None:
    args: dict[str, Any] = {"model": "tiny-llm", "prompt": PROMPT, "max_tokens": 24, "temperature": 0.9,
                            "top_p": 0.95, "seed": 42, "extra_body": {"top_k": 20}}
    first = client.completions.create(**args)
    assert first.object == "text_completion"
    text = first.choices[0].text
    assert client.completions.create(**args).choices[0].text == text  # a seed repeats
    streamed = "".join(c.choices[0].text for c in client.completions.create(**args, stream=True))
    assert streamed == text
    want = _direct(port, served.language_model("tiny-llm"), PROMPT,
                   Sampling(max_tokens=24, temperature=0.9, top_p=0.95, top_k=20, seed=42))
    assert text == "".join(c.text for c in want)
    stop = text.strip()[3:6]
    assert stop, text
    cut = client.completions.create(**{**args, "stop": [stop]})
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text
    assert text.startswith(cut.choices[0].text)


def test_embeddings_float_and_base64(client: openai.OpenAI, port: HttpsPort,
                                     served: ServedGenerative) -> None:
    texts = ["a site's own documents", "retrieval over them"]
    want = port.call(served.embedding_model("tiny-embed").embed(texts))
    resp = client.embeddings.create(model="tiny-embed", input=texts)  # the client asks for base64
    got = np.array([d.embedding for d in resp.data])
    np.testing.assert_allclose(got, np.array(want.vectors), rtol=1e-6, atol=1e-6)
    assert resp.usage.prompt_tokens == want.prompt_tokens
    floats = client.embeddings.create(model="tiny-embed", input=texts[0], encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, want.vectors[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("kwargs", "param", "fragment"), [
    ({"temperature": 5}, "temperature", "temperature: expected a number in [0, 2], got '5'"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens: expected an integer >= 1, got '0'"),
    ({"stop": ["a", 3]}, "stop", "stop: expected a string or a list of up to 4 non-empty strings"),
    ({"n": 2}, "n", "n: expected 1"),
    ({"extra_body": {"top_k": -1}}, "top_k", "top_k: expected an integer >= 0"),
    ({"extra_body": {"best_of": 3}}, "best_of", "'best_of': unsupported parameter"),
    ({"messages": [{"role": "user", "content": 7}]}, "messages[0].content",
     "messages[0].content: expected a string or a list of text parts, got '7'"),
])
def test_bad_parameters_name_the_field(client: openai.OpenAI, kwargs: dict[str, Any], param: str,
                                       fragment: str) -> None:
    args: dict[str, Any] = {"model": "tiny-llm", "messages": [{"role": "user", "content": "hi"}], **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**args)
    body = err.value.body
    assert isinstance(body, dict)
    assert body["param"] == param and body["type"] == "invalid_request_error"
    assert fragment in body["message"]


def test_unknown_model_and_over_the_cap(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="unknown language model 'ghost'"):
        client.completions.create(model="ghost", prompt="x")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tiny-embed", prompt="x")  # an encoder does not generate
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny-llm", prompt="x", max_tokens=65)


@pytest.mark.parametrize(("who", "error"), [
    ("gone", openai.AuthenticationError),
    ("norole-None", openai.PermissionDeniedError),
    ("intruder", openai.APIConnectionError),
    ("old", openai.APIConnectionError),
])
def test_untrusted_certificates_are_refused(port: HttpsPort, pki: Path, who: str,
                                            error: type[Exception]) -> None:
    with _client(port, pki, who) as c, pytest.raises(error):
        c.completions.create(model="tiny-llm", prompt="x", max_tokens=1)


def test_a_client_that_leaves_mid_stream_frees_its_sequence(
        client: openai.OpenAI, served: ServedGenerative, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    long = served.language_model("long-llm")
    assert isinstance(long, GenaiLanguageModel)
    # Keep the model's streams referenced, so that only the handler's own close can end the
    # sequence (a stream nothing refers to would also be closed by the garbage collector).
    streams: list[AsyncIterator[Chunk]] = []

    def generate(prompt: str, sampling: Sampling, *, deadline: float | None = None) -> AsyncIterator[Chunk]:
        stream = GenaiLanguageModel.generate(long, prompt, sampling, deadline=deadline)
        streams.append(stream)
        return stream

    monkeypatch.setattr(long, "generate", generate)
    with caplog.at_level(logging.INFO, logger="agent.audit"):
        stream = client.completions.create(model="long-llm", prompt=PROMPT, max_tokens=LONG, temperature=1.0,
                                           seed=1, stream=True)
        first = next(iter(stream))
        assert first.choices[0].text is not None
        held = _sample("gen_ai_server_kv_cache_tokens", gen_ai_request_model="long-llm")
        assert held > 0 and _sample("gen_ai_server_active_sequences", gen_ai_request_model="long-llm") == 1
        stream.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("outcome=disconnected" in r.getMessage()
                                                       for r in caplog.records):
            time.sleep(0.05)
    line = next(r.getMessage() for r in caplog.records if "outcome=disconnected" in r.getMessage())
    assert "model=long-llm" in line
    produced = int(line.split("completion_tokens=")[1].split()[0])
    assert produced < LONG
    while time.monotonic() < deadline and long.active_sequences:
        time.sleep(0.05)
    assert len(streams) == 1 and long.active_sequences == 0
    assert _sample("gen_ai_server_kv_cache_tokens", gen_ai_request_model="long-llm") == 0
    assert _sample("gen_ai_server_kv_cache_budget_tokens", gen_ai_request_model="long-llm") == LONG + 96


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_audit_lines_and_metrics_carry_counts_not_text(client: openai.OpenAI,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    labels = {"gen_ai_operation_name": "text_completion", "gen_ai_request_model": "tiny-llm"}
    before = (_sample("gen_ai_server_time_to_first_token_seconds_count", **labels),
              _sample("gen_ai_server_token_usage_total", **labels, gen_ai_token_type="output"),
              _sample("gen_ai_server_request_queue_time_seconds_count", **labels))
    secret = "the launch code is 0000"
    with caplog.at_level(logging.INFO, logger="agent.audit"):
        resp = client.completions.create(model="tiny-llm", prompt=secret, max_tokens=8, temperature=0)
    assert resp.usage is not None
    lines = [r.getMessage() for r in caplog.records
             if r.name == "agent.audit" and "audit llm" in r.getMessage()]
    assert len(lines) == 1
    # exactly these fields, nothing that could carry the prompt or the completion
    assert re.fullmatch(r"audit llm route=/v1/completions subject='CN=observer,[^']*' serial=[0-9a-f]+ "
                        rf"model=tiny-llm prompt_tokens={resp.usage.prompt_tokens} "
                        rf"completion_tokens={resp.usage.completion_tokens} outcome=ok", lines[0]), lines[0]
    assert secret not in caplog.text
    after = (_sample("gen_ai_server_time_to_first_token_seconds_count", **labels),
             _sample("gen_ai_server_token_usage_total", **labels, gen_ai_token_type="output"),
             _sample("gen_ai_server_request_queue_time_seconds_count", **labels))
    assert after[0] == before[0] + 1
    assert after[1] == before[1] + resp.usage.completion_tokens
    assert after[2] == before[2] + 1


@pytest.mark.parametrize("route", ["completions", "chat/completions"])
@pytest.mark.parametrize("usage", [False, True])
def test_raw_sse_events_are_whole_openai_chunks(port: HttpsPort, pki: Path, served: ServedGenerative,
                                                route: str, usage: bool) -> None:
    """Every event, read off the wire without the ``openai`` client, is one complete chunk
    object of the kind OpenAI streams: the same id, object, created and model throughout."""
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    d = pki / "issued" / "observer"
    ctx.load_cert_chain(str(d / "observer.crt"), str(d / "observer.key"))
    chat = route.startswith("chat")
    body: dict[str, Any] = {"model": "tiny-llm", "max_tokens": 6, "temperature": 0, "stream": True}
    body.update({"messages": [{"role": "user", "content": PROMPT}]} if chat else {"prompt": PROMPT})
    if usage:
        body["stream_options"] = {"include_usage": True}
    with httpx.Client(verify=ctx) as c:
        r = c.post(f"https://localhost:{port.port}/v1/{route}", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    if usage:
        tail = chunks.pop()
        assert tail["choices"] == [] and tail["usage"]["completion_tokens"] == 6
    kind = "chat.completion.chunk" if chat else "text_completion"
    assert {(c["id"], c["object"], c["created"], c["model"]) for c in chunks} == \
        {(chunks[0]["id"], kind, chunks[0]["created"], "tiny-llm")}
    for c in chunks:
        assert set(c) == {"id", "object", "created", "model", "choices"} | ({"usage"} if usage else set())
        assert c.get("usage", None) is None
        (choice,) = c["choices"]
        assert set(choice) == {"index", "logprobs", "finish_reason", "delta" if chat else "text"}
        assert choice["index"] == 0 and choice["logprobs"] is None
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    assert reasons[:-1] == [None] * (len(chunks) - 1) and reasons[-1] == "length"
    if chat:
        deltas = [c["choices"][0]["delta"] for c in chunks]
        assert deltas[0] == {"role": "assistant", "content": ""}
        assert all(set(x) <= {"content"} for x in deltas[1:])
        text = "".join(x.get("content", "") for x in deltas[1:])
    else:
        text = "".join(c["choices"][0]["text"] for c in chunks)
    llm = served.language_model("tiny-llm")
    prompt = llm.chat_prompt([Message("user", PROMPT)]) if chat else PROMPT
    want = _direct(port, llm, prompt, Sampling(max_tokens=6, temperature=0))
    assert text == "".join(ch.text for ch in want)


def test_base64_is_little_endian_float32(client: openai.OpenAI, port: HttpsPort, pki: Path) -> None:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    d = pki / "issued" / "observer"
    ctx.load_cert_chain(str(d / "observer.crt"), str(d / "observer.key"))
    with httpx.Client(verify=ctx) as c:
        r = c.post(f"https://localhost:{port.port}/v1/embeddings",
                   json={"model": "tiny-embed", "input": "x", "encoding_format": "base64"})
    vec = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    assert abs(float(np.linalg.norm(vec)) - 1.0) < 1e-5



def test_32_concurrent_streams_complete_within_the_kv_budget(port: HttpsPort, pki: Path,
                                                            served: ServedGenerative) -> None:
    narrow = served.language_model("narrow-llm")
    assert isinstance(narrow, GenaiLanguageModel)
    budget = narrow.budget

    def one(i: int) -> tuple[str | None, int]:
        with _client(port, pki, "observer") as c:
            stream = c.completions.create(model="narrow-llm", prompt=f"{PROMPT} {i}", max_tokens=40,
                                          temperature=0.7, seed=i, stream=True,
                                          stream_options={"include_usage": True})
            reason, tokens = None, 0
            for chunk in stream:
                if chunk.choices and chunk.choices[0].finish_reason is not None:
                    reason = chunk.choices[0].finish_reason
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            return reason, tokens

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert all(reason in ("length", "stop") and tokens > 0 for reason, tokens in results), results
    assert budget.peak <= budget.total
    assert budget.peak > 2 * 64  # several ran at once
    assert narrow.active_sequences == 0 and budget.in_use == 0
