"""A language model as a decoupled KServe v2 model on ModelStreamInfer (Triton's LLM
convention), driven by ``tritonclient.grpc``'s streaming client over mTLS against the real
runtime on the tiny decoder."""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tg
from tritonclient.utils import InferenceServerException

from agent.config import InferenceSection, load_config
from agent.inference.repository import ModelRepository
from agent.inference.service import InferenceServicer
from agent.llm.engine import Limits
from agent.llm.load import load_language_model
from agent.llm.served import ServedGenerative
from agent.llm.types import Chunk, ModelCard, Sampling
from agent.metrics import REGISTRY
from agent.proto import grpc_service_pb2_grpc as pb_grpc
from agent.security import interceptors, server_credentials
from provisioning.demo.llm_models import DecoderShape, write_decoder
from testsupport.http_support import LoopThread, site_pki, tls_config

PROMPT = "The appliance keeps its models"
LONG = 4000


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return site_pki(tmp_path_factory.mktemp("pki") / "site", tmp_path_factory.mktemp("pki") / "other")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedGenerative]:
    tmp = tmp_path_factory.mktemp("models")
    models = ServedGenerative()
    for name, shape, limits in (("tiny-llm", DecoderShape(), Limits(256, 64, 4096, 5.0)),
                                ("long-llm", DecoderShape(context_length=LONG + 96),
                                 Limits(LONG + 96, LONG, LONG + 96, 5.0))):
        folder = write_decoder(tmp / name, shape)
        card = ModelCard(name, "1.0.0", "llm", limits.context_length, 0, "fp32", 0)
        models.add(load_language_model(folder, sorted(p.name for p in folder.iterdir()), card, limits,
                                       intra_op_threads=1, decode_threads=2))
    yield models
    for name in ("tiny-llm", "long-llm"):
        models.remove(name)


class _GrpcPort(LoopThread):
    def __init__(self, config_path: Path, state: Path, models: ServedGenerative) -> None:
        super().__init__()
        config = load_config(config_path)

        async def start() -> tuple[grpc.aio.Server, int]:
            server = grpc.aio.server(interceptors=interceptors(config))
            repo = ModelRepository.for_state_dir(state, InferenceSection())
            pb_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
                InferenceServicer(repo, generative=models), server)
            creds = server_credentials(config)
            assert creds is not None
            port = server.add_secure_port("127.0.0.1:0", creds)
            await server.start()
            return server, port

        self.server, self.port = self.call(start())

    def close(self) -> None:
        self.call(self.server.stop(None))
        self.stop()


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory, pki: Path,
         served: ServedGenerative) -> Iterator[_GrpcPort]:
    work = tmp_path_factory.mktemp("grpc")
    p = _GrpcPort(tls_config(work, pki), work / "state", served)
    yield p
    p.close()


def _client(port: _GrpcPort, pki: Path, who: str) -> Any:
    d = pki / "issued" / who
    return tg.InferenceServerClient(f"localhost:{port.port}", ssl=True,
                                    root_certificates=str(pki / "ca.crt"), private_key=str(d / f"{who}.key"),
                                    certificate_chain=str(d / f"{who}.crt"))


def _inputs(prompt: str, stream: bool, params: dict[str, Any] | str, exclude: bool = False) -> list[Any]:
    text = tg.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    flag = tg.InferInput("stream", [1], "BOOL")
    flag.set_data_from_numpy(np.array([stream]))
    sampling = tg.InferInput("sampling_parameters", [1], "BYTES")
    raw = params if isinstance(params, str) else json.dumps(params)
    sampling.set_data_from_numpy(np.array([raw.encode()], dtype=object))
    excl = tg.InferInput("exclude_input_in_output", [1], "BOOL")
    excl.set_data_from_numpy(np.array([exclude]))
    return [text, flag, sampling, excl]


def _stream(client: Any, model: str, inputs: list[Any], *, stop_after: int | None = None,
            final: bool = True) -> list[tuple[Any, Any]]:
    """Responses (result, error) of one streamed request, until the final one or ``stop_after``."""
    got: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    client.async_stream_infer(model, inputs, request_id="q1", enable_empty_final_response=final)
    out: list[tuple[Any, Any]] = []
    while True:
        result, error = got.get(timeout=60)
        out.append((result, error))
        if error is not None or (stop_after is not None and len(out) >= stop_after):
            break
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    client.stop_stream(cancel_requests=True)
    return out


def _texts(responses: list[tuple[Any, Any]]) -> list[str]:
    texts = []
    for result, error in responses:
        assert error is None, error
        array = result.as_numpy("text_output")
        if array is not None:
            texts.append(array.reshape(-1)[0].decode())
    return texts


def _direct(port: _GrpcPort, served: ServedGenerative, prompt: str, sampling: Sampling) -> list[Chunk]:
    async def collect() -> list[Chunk]:
        return [c async for c in served.language_model("tiny-llm").generate(prompt, sampling)]
    return port.call(collect())


def test_streamed_chunks_match_the_runtime(port: _GrpcPort, pki: Path, served: ServedGenerative) -> None:
    want = _direct(port, served, PROMPT, Sampling(max_tokens=16, temperature=0))
    client = _client(port, pki, "observer")
    responses = _stream(client, "tiny-llm", _inputs(PROMPT, True, {"max_tokens": 16, "temperature": 0}))
    texts = _texts(responses)
    assert len(texts) > 1, "one response per chunk"
    assert "".join(texts) == "".join(c.text for c in want)
    last = responses[-1][0].get_response()
    assert last.parameters["triton_final_response"].bool_param and not last.outputs
    assert responses[0][0].get_response().id == "q1"


def test_unstreamed_reply_has_the_prompt_unless_excluded(port: _GrpcPort, pki: Path,
                                                         served: ServedGenerative) -> None:
    want = "".join(c.text for c in _direct(port, served, PROMPT, Sampling(max_tokens=8, temperature=0)))
    client = _client(port, pki, "observer")
    params = {"max_tokens": 8, "temperature": 0}
    assert _texts(_stream(client, "tiny-llm", _inputs(PROMPT, False, params))) == [PROMPT + want]
    assert _texts(_stream(client, "tiny-llm", _inputs(PROMPT, False, params, exclude=True))) == [want]


@pytest.mark.parametrize(("params", "fragment"), [
    ({"temperature": "hot"}, "temperature: expected a number in [0, 2]"),
    ({"max_tokens": 65}, "max_tokens"),
    ({"best_of": 2}, "'best_of': unsupported parameter"),
    ("{not json", "input 'sampling_parameters' is not JSON"),
])
def test_bad_sampling_parameters_are_named(port: _GrpcPort, pki: Path, params: Any, fragment: str) -> None:
    responses = _stream(_client(port, pki, "observer"), "tiny-llm", _inputs(PROMPT, True, params))
    error = responses[-1][1]
    assert error is not None and fragment in str(error)


def _audit_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "agent.audit" and "audit llm" in r.getMessage()]


def test_cancelled_stream_frees_its_sequence(port: _GrpcPort, pki: Path, served: ServedGenerative,
                                             caplog: pytest.LogCaptureFixture) -> None:
    long = served.language_model("long-llm")
    client = _client(port, pki, "observer")
    params = {"max_tokens": LONG, "temperature": 1.0, "seed": 1}
    with caplog.at_level(logging.INFO, logger="agent.audit"):
        responses = _stream(client, "long-llm", _inputs(PROMPT, True, params), stop_after=1)
        assert responses[0][1] is None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("outcome=cancelled" in s for s in _audit_lines(caplog)):
            time.sleep(0.05)
    # the sequence ended because the client went away, not because it ran out of tokens
    line = next(s for s in _audit_lines(caplog) if "outcome=cancelled" in s)
    assert "model=long-llm" in line
    assert int(line.split("completion_tokens=")[1].split()[0]) < LONG
    while time.monotonic() < deadline and long.active_sequences:
        time.sleep(0.05)
    assert long.active_sequences == 0


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_streams_are_audited_and_measured_like_the_https_routes(port: _GrpcPort, pki: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    labels = {"gen_ai_operation_name": "text_completion", "gen_ai_request_model": "tiny-llm"}
    names = ("gen_ai_server_time_to_first_token_seconds_count",
             "gen_ai_server_request_queue_time_seconds_count", "gen_ai_server_request_duration_seconds_count")
    before = [_sample(n, **labels) for n in names[:2]]
    before.append(_sample(names[2], **labels, error_type=""))
    out_before = _sample("gen_ai_server_token_usage_total", **labels, gen_ai_token_type="output")
    secret = "the launch code is 0000"
    with caplog.at_level(logging.INFO, logger="agent.audit"):
        texts = _texts(_stream(_client(port, pki, "observer"), "tiny-llm",
                               _inputs(secret, True, {"max_tokens": 8, "temperature": 0})))
    assert texts
    lines = _audit_lines(caplog)
    assert len(lines) == 1
    m = re.fullmatch(r"audit llm route=/inference.GRPCInferenceService/ModelStreamInfer "
                     r"subject='CN=observer,[^']*' serial=[0-9a-f]+ model=tiny-llm "
                     r"prompt_tokens=(\d+) completion_tokens=(\d+) outcome=ok", lines[0])
    assert m, lines[0]
    assert int(m[1]) > 0 and 0 < int(m[2]) <= 8
    assert secret not in caplog.text and "".join(texts) not in caplog.text
    after = [_sample(n, **labels) for n in names[:2]]
    after.append(_sample(names[2], **labels, error_type=""))
    assert after == [b + 1 for b in before]
    assert _sample("gen_ai_server_token_usage_total", **labels, gen_ai_token_type="output") == \
        out_before + int(m[2])


def test_revoked_certificate_is_refused(port: _GrpcPort, pki: Path) -> None:
    client = _client(port, pki, "gone")
    got: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    # the refusal may end the stream before the request is even queued; it reaches the callback
    with contextlib.suppress(InferenceServerException):
        client.async_stream_infer("tiny-llm", _inputs(PROMPT, True, {}))
    result, error = got.get(timeout=60)
    client.stop_stream()
    assert result is None and "revoked" in str(error)
