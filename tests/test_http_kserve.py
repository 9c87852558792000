"""The HTTPS port's KServe v2 REST routes, driven by ``tritonclient.http`` over mTLS against a
real agent process serving real ONNX Runtime sessions; hostile bodies and refused
certificates with a plain TLS client."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as th
from google.protobuf import json_format
from onnx import TensorProto
from tritonclient.utils import InferenceServerException

from agent.bundle import Batching
from provisioning.demo.models import affine_model, identity_model
from provisioning.pki import init_pki, issue_client, issue_node, revoke
from testsupport.inference_support import Agent, free_port, install, make_bundle
from testsupport.secure_server import roleless_client

MAX_BODY = 1 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki") / "site"
    init_pki(d, organization="Test Site")
    issue_node(d, "node1", dns=["localhost"], ips=["127.0.0.1"])
    issue_client(d, "observer", "observer")
    issue_client(d, "operator", "operator")
    issue_client(d, "gone", "admin")
    revoke(d, "gone", reason="key-compromise")
    issue_client(d, "old", "admin", days=1, valid_from=dt.datetime.now(dt.UTC) - dt.timedelta(days=10))
    roleless_client(d, None)
    other = tmp_path_factory.mktemp("pki") / "other"
    init_pki(other, organization="Someone Else")
    issue_client(other, "intruder", "admin", out=d / "issued" / "intruder")
    return d


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[Agent]:
    tmp = tmp_path_factory.mktemp("http")
    state = tmp / "state"
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    batching = Batching(max_batch_size=8, max_queue_delay_us=2000, preferred_batch_sizes=(4,))
    v1 = make_bundle(tmp, affine_model(tmp / "a1.onnx", scale=2.0), "affine", "1.0.0", {"x": x}, batching)
    v2 = make_bundle(tmp, affine_model(tmp / "a2.onnx", scale=3.0), "affine", "2.0.0", {"x": x}, batching)
    words = np.array([[b"a", b"", "\u00e9".encode()]], dtype=object)
    ident = make_bundle(tmp, identity_model(tmp / "b.onnx", TensorProto.STRING), "ident_bytes", "1",
                        {"inp": words})
    install(state, v1, v2, ident)
    node = pki / "issued" / "node1"
    config = tmp / "agent.toml"
    config.write_text(f'[server]\nlisten = "127.0.0.1"\nmax_message_bytes = {MAX_BODY}\n'
                      f'[tls]\ncert = "{node / "node1.crt"}"\nkey = "{node / "node1.key"}"\n'
                      f'ca = "{pki / "ca.crt"}"\ncrl = "{pki / "crl.pem"}"\n')
    a = Agent(state, "--config", str(config), "--model", "affine", "--model", "affine@1.0.0",
              "--model", "ident_bytes", http_port=free_port())
    yield a
    assert a.stop() == 0, a.log()


def _http_port(agent: Agent) -> int:
    text = agent.log()
    return int(text.split("http: https://127.0.0.1:", 1)[1].split()[0])


def _files(pki: Path, name: str) -> dict[str, str]:
    d = pki / "issued" / name
    return {"certfile": str(d / f"{name}.crt"), "keyfile": str(d / f"{name}.key"),
            "ca_certs": str(pki / "ca.crt")}


@pytest.fixture
def client(agent: Agent, pki: Path) -> Iterator[Any]:
    c = th.InferenceServerClient(f"localhost:{_http_port(agent)}", ssl=True,
                                 ssl_options=_files(pki, "observer"))
    yield c
    c.close()


def _request(agent: Agent, pki: Path, who: str | None, method: str, path: str, body: bytes = b"",
             headers: dict[str, str] | None = None) -> tuple[int, Any]:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if who is not None:
        f = _files(pki, who)
        ctx.load_cert_chain(f["certfile"], f["keyfile"])
    conn = http.client.HTTPSConnection("localhost", _http_port(agent), context=ctx, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    return resp.status, json.loads(data) if data else None


def test_health_and_metadata(client: Any) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "sovereign-appliance" and "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata("affine")
    assert model["versions"] == ["1.0.0", "2.0.0"]
    assert model["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert client.is_model_ready("affine") and client.is_model_ready("affine", "1.0.0")
    assert not client.is_model_ready("ghost")


@pytest.mark.parametrize("binary", [False, True])
def test_infer_json_and_binary_on_the_served_versions(client: Any, binary: bool) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    for version, scale in (("", 3.0), ("1.0.0", 2.0)):
        inp = th.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = th.InferRequestedOutput("y", binary_data=binary)
        result = client.infer("affine", [inp], model_version=version, outputs=[out], request_id="r1")
        np.testing.assert_allclose(result.as_numpy("y"), x * scale + 1.0)
        assert result.get_response()["id"] == "r1"


def test_bytes_round_trip(client: Any) -> None:
    words = np.array([[b"a", b"", "\u00e9\x00x".encode()]], dtype=object)
    for binary in (True, False):
        inp = th.InferInput("inp", [1, 3], "BYTES")
        if binary:
            inp.set_data_from_numpy(words, binary_data=True)
            got = client.infer("ident_bytes", [inp], outputs=[th.InferRequestedOutput("out")]).as_numpy("out")
            assert got.tolist() == words.tolist()
        else:
            text = np.array([["a", "", "\u00e9"]], dtype=object)
            inp.set_data_from_numpy(text, binary_data=False)
            got = client.infer("ident_bytes", [inp], outputs=[
                th.InferRequestedOutput("out", binary_data=False)]).as_numpy("out")
            assert [v.decode() if isinstance(v, bytes) else v for v in got.reshape(-1)] == ["a", "", "\u00e9"]


def test_request_path_errors_come_from_the_grpc_validation(client: Any) -> None:
    inp = th.InferInput("x", [1, 5], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 5), dtype=np.float32))
    with pytest.raises(InferenceServerException, match=r"input 'x': shape \[1, 5\]: dimension 1 is 5"):
        client.infer("affine", [inp])
    with pytest.raises(InferenceServerException, match="model 'ghost'"):
        client.get_model_metadata("ghost")


def _infer_body(data: Any, datatype: str = "FP32", shape: list[int] | None = None) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "datatype": datatype, "shape": shape or [1, 4],
                                   "data": data}]}).encode()


@pytest.mark.parametrize(("body", "status", "fragment"), [
    (b"{", 400, "not JSON"),
    (b"[1]", 400, "must be a JSON object"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [NaN, 1, 2, 3]}]}',
     400, "NaN is not a JSON number"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    (_infer_body([1, 2, "3", 4]), 400, "inputs[0].data: element '\"3\"' is not a FP32 value"),
    (_infer_body([True, 2, 3, 4]), 400, "is not a FP32 value"),
    (_infer_body([[1, 2], [3, 4]], shape=[1, "4"]), 400, "inputs[0].shape: expected a list of integers"),
    (json.dumps({"inputs": "x"}).encode(), 400, "request.inputs: expected list"),
    (b'{"inputs": []}', 400, "missing input(s) 'x'"),
    (_infer_body([1, 2, 3, 4], datatype="FP16"), 400, "travels only as binary data"),
    (b" " * (MAX_BODY + 1), 413, ""),
])
def test_hostile_bodies_get_a_clear_error(agent: Agent, pki: Path, body: bytes, status: int,
                                          fragment: str) -> None:
    got, doc = _request(agent, pki, "observer", "POST", "/v2/models/affine/infer", body,
                        {"Content-Type": "application/json"})
    assert got == status, doc
    assert isinstance(doc["error"], str) and fragment in doc["error"]


def test_binary_sizes_must_add_up(agent: Agent, pki: Path) -> None:
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                     "parameters": {"binary_data_size": 16}}]}).encode()
    for tail, fragment in ((b"\0" * 15, "declare 16 bytes of binary data, the body carries 15"),
                           (b"\0" * 17, "declare 16 bytes of binary data, the body carries 17")):
        status, doc = _request(agent, pki, "observer", "POST", "/v2/models/affine/infer", header + tail,
                               {"Inference-Header-Content-Length": str(len(header))})
        assert status == 400 and fragment in doc["error"]
    status, doc = _request(agent, pki, "observer", "POST", "/v2/models/affine/infer", header,
                           {"Inference-Header-Content-Length": str(len(header) + 1)})
    assert status == 400 and "Inference-Header-Content-Length" in doc["error"]


@pytest.mark.parametrize(("who", "status", "fragment"), [
    ("norole-None", 403, "certificate carries no role"),
    ("gone", 401, "certificate is revoked"),
    ("old", None, ""),  # expired: the TLS layer refuses it
    ("intruder", None, ""),  # another CA: the TLS layer refuses it
    (None, None, ""),  # no client certificate
])
def test_untrusted_clients_are_refused(agent: Agent, pki: Path, who: str | None, status: int | None,
                                       fragment: str) -> None:
    if status is None:
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            _request(agent, pki, who, "GET", "/v2/health/live")
        return
    got, doc = _request(agent, pki, who, "GET", "/v2/health/live")
    assert got == status and fragment in doc["error"]
    got, doc = _request(agent, pki, who, "GET", "/v2/no/such/route")
    assert got == status, "an unknown route tells an untrusted client nothing either"


def test_refusals_are_audited(agent: Agent, pki: Path) -> None:
    _request(agent, pki, "gone", "GET", "/v2/models/affine")
    line = next(ln for ln in agent.log().splitlines()
                if "decision=deny" in ln and "CN=gone" in ln and "ModelMetadata" in ln)
    assert "revoked" in line


# ------------------------------------------------------------------ Triton's extensions over REST


def test_model_config_in_tritons_shape(client: Any, agent: Agent, pki: Path) -> None:
    config = client.get_model_config("affine")
    assert config["name"] == "affine" and config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == 8, "64-bit fields are JSON numbers, as Triton writes them"
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [4],
                                **{k: v for k, v in config["input"][0].items()
                                   if k not in ("name", "data_type", "dims")}}]
    assert config["dynamic_batching"]["preferred_batch_size"] == [4]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 2000
    assert config["parameters"]["version"] == {"string_value": "2.0.0"}
    for version in ("1.0.0", "1"):  # a bundle version or its Triton number, as on gRPC
        old = client.get_model_config("affine", version)
        assert old["parameters"]["version"] == {"string_value": "1.0.0"}
        assert old["parameters"]["triton_version"] == {"string_value": "1"}
    with pytest.raises(InferenceServerException, match="model 'ghost'"):
        client.get_model_config("ghost")
    with grpcclient.InferenceServerClient(agent.url, ssl=True, root_certificates=str(pki / "ca.crt"),
                                          private_key=_files(pki, "observer")["keyfile"],
                                          certificate_chain=_files(pki, "observer")["certfile"]) as g:
        over_grpc = g.get_model_config("affine").config
    assert json_format.ParseDict(config, type(over_grpc)()) == over_grpc, "the same config on both ports"


def test_statistics_count_the_inferences(client: Any) -> None:
    before = client.get_inference_statistics("affine", "1.0.0")["model_stats"]
    assert [(s["name"], s["version"]) for s in before] == [("affine", "1")]
    x = np.ones((3, 4), dtype=np.float32)
    inp = th.InferInput("x", [3, 4], "FP32")
    inp.set_data_from_numpy(x)
    for _ in range(2):
        client.infer("affine", [inp], model_version="1.0.0")
    after = client.get_inference_statistics("affine", "1")["model_stats"][0]
    success = after["inference_stats"]["success"]
    assert success["count"] == before[0]["inference_stats"]["success"]["count"] + 2
    assert after["inference_count"] == before[0]["inference_count"] + 6
    assert isinstance(success["ns"], int) and success["ns"] > 0
    assert after["last_inference"] > 0
    every = client.get_inference_statistics()["model_stats"]
    assert {(s["name"], s["version"]) for s in every} == {("affine", "1"), ("affine", "2"),
                                                           ("ident_bytes", "1")}
    with pytest.raises(InferenceServerException, match="model 'ghost'"):
        client.get_inference_statistics("ghost")


def test_repository_index(client: Any, agent: Agent, pki: Path) -> None:
    index = client.get_model_repository_index()
    assert sorted((m["name"], m["version"], m["state"]) for m in index) == [
        ("affine", "1.0.0", "READY"), ("affine", "2.0.0", "READY"), ("ident_bytes", "1", "READY")]
    status, doc = _request(agent, pki, "observer", "POST", "/v2/repository/index", b'{"ready": "yes"}')
    assert status == 400 and "request.ready: expected bool" in doc["error"]


@pytest.mark.parametrize(("who", "status", "code", "fragment"), [
    ("norole-None", 403, grpc.StatusCode.PERMISSION_DENIED, "certificate carries no role"),
    ("gone", 401, grpc.StatusCode.UNAUTHENTICATED, "certificate is revoked"),
])
@pytest.mark.parametrize("path", ["/v2/models/affine/config", "/v2/models/affine/versions/1/stats",
                                  "/v2/models/stats"])
def test_extensions_refuse_as_grpc_does(agent: Agent, pki: Path, who: str, status: int,
                                        code: grpc.StatusCode, fragment: str, path: str) -> None:
    got, doc = _request(agent, pki, who, "GET", path)
    assert got == status and fragment in doc["error"]
    got, doc = _request(agent, pki, who, "POST", "/v2/repository/index")
    assert got == status and fragment in doc["error"]
    f = _files(pki, who)
    with grpcclient.InferenceServerClient(agent.url, ssl=True, root_certificates=str(pki / "ca.crt"),
                                          private_key=f["keyfile"], certificate_chain=f["certfile"]) as g, \
            pytest.raises(InferenceServerException) as err:
        g.get_model_config("affine")
    assert err.value.status() == f"StatusCode.{code.name}" and fragment in err.value.message()


def test_load_and_unload_need_an_operator(agent: Agent, pki: Path, client: Any) -> None:
    with pytest.raises(InferenceServerException, match=r"role observer may not call .*RepositoryModelUnload "
                                                       r"\(needs operator\)") as err:
        client.unload_model("ident_bytes")
    assert err.value.status() == "403"
    assert client.is_model_ready("ident_bytes"), "a refused unload changes nothing"
    operator = th.InferenceServerClient(f"localhost:{_http_port(agent)}", ssl=True,
                                        ssl_options=_files(pki, "operator"))
    try:
        operator.unload_model("ident_bytes")
        assert not client.is_model_ready("ident_bytes")
        assert [m["state"] for m in client.get_model_repository_index() if m["name"] == "ident_bytes"] == [
            "UNAVAILABLE"]
        with pytest.raises(InferenceServerException, match=r"parameters: 'config' is not accepted here"):
            operator.load_model("ident_bytes", config='{"backend": "python"}')
        assert not client.is_model_ready("ident_bytes"), "a refused load changes nothing"
        with pytest.raises(InferenceServerException, match="'ghost'"):
            operator.load_model("ghost")
        operator.load_model("ident_bytes")
        assert client.is_model_ready("ident_bytes")
        status, doc = _request(agent, pki, "operator", "POST", "/v2/repository/models/affine/load",
                               b'{"parameters": {"version": "9.9.9"}}')
        assert status == 404 and "9.9.9" in doc["error"], "the version parameter reaches the repository"
        status, doc = _request(agent, pki, "operator", "POST", "/v2/repository/models/affine/load",
                               b'{"parameters": {"version": 1}}')
        assert status == 400 and "request.parameters.version: expected str" in doc["error"]
    finally:
        operator.close()
