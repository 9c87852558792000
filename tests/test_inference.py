"""The inference service end to end: a real agent process on loopback, driven by tritonclient."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from onnx import TensorProto
from tritonclient.utils import InferenceServerException

from agent.bundle import Batching
from provisioning.demo.models import affine_model, identity_model
from testsupport.inference_support import (
    Agent,
    free_port,
    install,
    make_bundle,
    place_unchecked,
    raw_request,
    stub,
    with_wrong_golden,
)

IDENTITY = {
    "ident_bytes": (TensorProto.STRING, np.array([[b"a", b"", "\u00e9\x00x".encode()]], dtype=object)),
    "ident_fp16": (TensorProto.FLOAT16, np.array([[0.5, -2.0, 65504.0]], dtype=np.float16)),
    "ident_bool": (TensorProto.BOOL, np.array([[True, False, True]])),
    "ident_int8": (TensorProto.INT8, np.array([[-128, 0, 127]], dtype=np.int8)),
    "ident_u64": (TensorProto.UINT64, np.array([[0, 1, 2**64 - 1]], dtype=np.uint64)),
}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    tmp = tmp_path_factory.mktemp("inference")
    state = tmp / "state"
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    batching = Batching(max_batch_size=8, max_queue_delay_us=2000, preferred_batch_sizes=(4,))
    v1 = make_bundle(tmp, affine_model(tmp / "a1.onnx", scale=2.0), "affine", "1.0.0", {"x": x}, batching)
    v2 = make_bundle(tmp, affine_model(tmp / "a2.onnx", scale=3.0), "affine", "2.0.0", {"x": x}, batching)
    idents = [make_bundle(tmp, identity_model(tmp / f"{n}.onnx", t), n, "1", {"inp": a})
              for n, (t, a) in IDENTITY.items()]
    install(state, v1, v2, *idents)
    tampered = make_bundle(tmp, affine_model(tmp / "t.onnx"), "tampered", "1.0.0", {"x": x})
    install(state, tampered)
    model = state / "models" / "tampered" / "1.0.0" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-5] ^= 1
    model.write_bytes(bytes(data))
    good = make_bundle(tmp, affine_model(tmp / "b.onnx"), "badgold", "1.0.0", {"x": x})
    place_unchecked(state, with_wrong_golden(good, tmp / "badgold.bundle"))
    names = ["affine", "affine@1.0.0", *IDENTITY, "badgold", "tampered"]
    agent = Agent(state, *[a for n in names for a in ("--model", n)], metrics_port=free_port())
    yield agent
    assert agent.stop() == 0, agent.log()


@pytest.fixture
def client(served: Agent) -> Iterator[Any]:
    c = tc.InferenceServerClient(served.url)
    yield c
    c.close()


def _code(exc: InferenceServerException) -> str:
    return str(exc.status())


# ---------------------------------------------------------------- metadata and config

def test_server_live_ready_metadata(client: Any) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata(as_json=True)
    assert {"model_repository", "statistics"} <= set(meta["extensions"])


def test_model_metadata_and_versions(client: Any) -> None:
    meta = client.get_model_metadata("affine", as_json=True)
    assert meta["versions"] == ["1.0.0", "2.0.0"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "4"]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": ["-1", "4"]}]


def test_model_config_reports_batching_and_provider(client: Any) -> None:
    cfg = client.get_model_config("affine", as_json=True)["config"]
    assert cfg["max_batch_size"] == 8
    assert cfg["input"][0]["dims"] == ["4"] and cfg["input"][0]["data_type"] == "TYPE_FP32"
    assert cfg["dynamic_batching"]["preferred_batch_size"] == [4]
    assert cfg["dynamic_batching"]["max_queue_delay_microseconds"] == "2000"
    assert cfg["parameters"]["execution_provider"]["string_value"] == "CPUExecutionProvider"
    assert len(cfg["parameters"]["bundle_sha256"]["string_value"]) == 64
    plain = client.get_model_config("ident_bytes", as_json=True)["config"]
    assert plain.get("max_batch_size", 0) == 0 and "dynamic_batching" not in plain
    assert plain["input"][0]["data_type"] == "TYPE_STRING"


# ---------------------------------------------------------------- inference

def _affine(client: Any, x: np.ndarray, version: str = "") -> np.ndarray:
    inp = tc.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer("affine", [inp], model_version=version).as_numpy("y")


def test_infer_raw_and_versions(client: Any) -> None:
    x = np.array([[1, 2, 3, 4]], dtype=np.float32)
    np.testing.assert_allclose(_affine(client, x), x * 3 + 1)  # active: 2.0.0
    np.testing.assert_allclose(_affine(client, x, "1.0.0"), x * 2 + 1)
    with pytest.raises(InferenceServerException) as info:
        _affine(client, x, "9.9.9")
    assert "NOT_FOUND" in _code(info.value) and "9.9.9" in info.value.message()


def test_infer_typed_contents(served: Agent) -> None:
    stb, pb = stub(served.url)
    req = pb.ModelInferRequest(model_name="affine", model_version="1.0.0", id="typed-1")
    t = req.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    t.contents.fp32_contents.extend(range(8))
    resp = stb.ModelInfer(req, timeout=10)
    assert resp.id == "typed-1" and resp.model_version == "1.0.0"
    assert list(resp.outputs[0].shape) == [2, 4]
    y = np.frombuffer(resp.raw_output_contents[0], dtype="<f4")
    np.testing.assert_allclose(y, np.arange(8) * 2 + 1)

    req = pb.ModelInferRequest(model_name="ident_int8")
    t = req.inputs.add(name="inp", datatype="INT8", shape=[1, 3])
    t.contents.int_contents.extend([-5, 0, 7])
    resp = stb.ModelInfer(req, timeout=10)
    assert np.frombuffer(resp.raw_output_contents[0], dtype=np.int8).tolist() == [-5, 0, 7]


@pytest.mark.parametrize("name", list(IDENTITY))
def test_datatypes_round_trip(client: Any, name: str) -> None:
    _, array = IDENTITY[name]
    datatype = tc.np_to_triton_dtype(array.dtype) if array.dtype != object else "BYTES"
    inp = tc.InferInput("inp", list(array.shape), datatype)
    inp.set_data_from_numpy(array)
    got = client.infer(name, [inp]).as_numpy("out")
    assert got.shape == array.shape
    if array.dtype == object:
        assert got.reshape(-1).tolist() == array.reshape(-1).tolist()
    else:
        assert got.dtype == array.dtype
        np.testing.assert_array_equal(got, array)


def test_typed_bytes_contents(served: Agent) -> None:
    stb, pb = stub(served.url)
    req = pb.ModelInferRequest(model_name="ident_bytes")
    t = req.inputs.add(name="inp", datatype="BYTES", shape=[1, 3])
    t.contents.bytes_contents.extend([b"x", b"yz", "é".encode()])
    resp = stb.ModelInfer(req, timeout=10)
    raw = resp.raw_output_contents[0]
    assert raw == b"\x01\x00\x00\x00x\x02\x00\x00\x00yz\x02\x00\x00\x00" + "é".encode()


def test_requested_output_subset(client: Any) -> None:
    x = np.ones((1, 4), dtype=np.float32)
    inp = tc.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(x)
    res = client.infer("affine", [inp], outputs=[tc.InferRequestedOutput("y")])
    assert [o["name"] for o in res.get_response(as_json=True)["outputs"]] == ["y"]
    with pytest.raises(InferenceServerException) as info:
        client.infer("affine", [inp], outputs=[tc.InferRequestedOutput("nope")])
    assert "INVALID_ARGUMENT" in _code(info.value) and "'nope'" in info.value.message()


def test_streaming(client: Any) -> None:
    import queue

    results: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for i in range(5):
            x = np.full((1, 4), i, dtype=np.float32)
            inp = tc.InferInput("x", [1, 4], "FP32")
            inp.set_data_from_numpy(x)
            client.async_stream_infer("affine", [inp], request_id=str(i), model_version="1.0.0")
        bad = tc.InferInput("x", [1, 5], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 5), np.float32))
        client.async_stream_infer("affine", [bad], request_id="bad")
        got, errors = {}, []
        for _ in range(6):
            result, error = results.get(timeout=10)
            if error is not None:
                errors.append(str(error))
            else:
                got[result.get_response().id] = result.as_numpy("y")
    finally:
        client.stop_stream()
    assert sorted(got) == ["0", "1", "2", "3", "4"]
    for i, y in got.items():
        np.testing.assert_allclose(y, np.full((1, 4), int(i) * 2 + 1))
    assert len(errors) == 1 and "dimension 1 is 5" in errors[0]


def test_concurrent_requests_are_batched(served: Agent) -> None:
    import threading

    c = tc.InferenceServerClient(served.url)
    done: dict[int, Any] = {}
    lock = threading.Lock()
    finished = threading.Event()

    def callback(i: int) -> Any:
        def inner(result: Any, error: Any) -> None:
            with lock:
                done[i] = (result, error)
                if len(done) == 16:
                    finished.set()
        return inner

    try:
        before = c.get_inference_statistics("affine", "1.0.0", as_json=True)["model_stats"][0]
        for i in range(16):
            inp = tc.InferInput("x", [1, 4], "FP32")
            inp.set_data_from_numpy(np.full((1, 4), i, np.float32))
            c.async_infer("affine", [inp], callback=callback(i), model_version="1.0.0")
        assert finished.wait(20)
        after = c.get_inference_statistics("affine", "1.0.0", as_json=True)["model_stats"][0]
    finally:
        c.close()
    for i, (result, error) in done.items():
        assert error is None
        np.testing.assert_allclose(result.as_numpy("y"), np.full((1, 4), i * 2 + 1))
    requests = int(after["inference_count"]) - int(before.get("inference_count", 0))
    executions = int(after["execution_count"]) - int(before.get("execution_count", 0))
    assert requests == 16
    assert executions < 16  # some requests shared an execution
    assert any(int(b["batch_size"]) > 1 for b in after["batch_stats"])


def test_statistics(client: Any) -> None:
    x = np.ones((3, 4), dtype=np.float32)
    _affine(client, x, "1.0.0")
    stats = client.get_inference_statistics("affine", "1.0.0", as_json=True)["model_stats"]
    # Triton's integer version, as perf_analyzer reads it (1.0.0 and 2.0.0 are 1 and 2).
    assert [(s["name"], s["version"]) for s in stats] == [("affine", "1")]
    s = stats[0]
    assert int(s["inference_count"]) >= 3 and int(s["execution_count"]) >= 1
    for key in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert int(s["inference_stats"][key]["count"]) >= 1
    assert int(s["inference_stats"]["success"]["ns"]) > 0
    everything = client.get_inference_statistics(as_json=True)["model_stats"]
    assert {"affine", "ident_bytes"} <= {m["name"] for m in everything}


def test_triton_version_numbers_are_accepted_wherever_a_version_is(served: Agent, client: Any) -> None:
    """Bundle versions 1.0.0 and 2.0.0 are Triton versions 1 and 2 in every RPC that takes a
    version; the bundle version stays what metadata and parameters show."""
    x = np.array([[1, 2, 3, 4]], dtype=np.float32)
    np.testing.assert_allclose(_affine(client, x, "1"), x * 2 + 1)
    np.testing.assert_allclose(_affine(client, x, "2"), x * 3 + 1)
    assert client.is_model_ready("affine", "1") and client.is_model_ready("affine", "2.0.0")
    assert not client.is_model_ready("affine", "3")
    assert client.get_model_metadata("affine", "2", as_json=True)["versions"] == ["1.0.0", "2.0.0"]
    for version, semver in (("1", "1.0.0"), ("2", "2.0.0"), ("2.0.0", "2.0.0")):
        params = client.get_model_config("affine", version, as_json=True)["config"]["parameters"]
        assert params["version"]["string_value"] == semver
        assert params["triton_version"]["string_value"] == semver[0]
    stats = client.get_inference_statistics("affine", "2", as_json=True)["model_stats"]
    assert [s["version"] for s in stats] == ["2"]
    with pytest.raises(InferenceServerException) as info:
        _affine(client, x, "7")
    assert "(served: 1.0.0 (Triton version 1), 2.0.0 (Triton version 2))" in info.value.message()
    # Characters that str.isdigit() takes but int() refuses are a version like any unknown one.
    for odd in ("\u00b2", "\u0661", "9" * 40):
        with pytest.raises(InferenceServerException) as info:
            _affine(client, x, odd)
        assert info.value.status() == "StatusCode.NOT_FOUND", (odd, info.value.status())
    # Numbers are kept with the state: they stay the same across restarts and deletions.
    state = served.log_path.parent / "state"
    numbers = json.loads((state / "models" / "triton-versions.json").read_text())
    assert numbers["affine"] == {"1.0.0": 1, "2.0.0": 2}


def test_a_triton_number_works_before_anything_asked_for_one(tmp_path: Path) -> None:
    """perf_analyzer -x 2 asks ModelMetadata for version 2 first: nothing numbered yet."""
    import asyncio

    from agent.config import InferenceSection
    from agent.inference.repository import ModelRepository
    from testsupport.updates_support import affine_bundle_at

    state = tmp_path / "state"
    install(state, affine_bundle_at(tmp_path, "1.0.1"), affine_bundle_at(tmp_path, "1.0.2"))
    repo = ModelRepository.for_state_dir(state, InferenceSection())

    async def run() -> tuple[str, str, str]:
        await repo.load("affine", "2")
        await repo.load("affine", "1.0.1")
        try:
            return (repo.get("affine", "2").version, repo.get("affine", "1").version,
                    repo.get("affine").version)
        finally:
            await repo.close()

    assert asyncio.run(run()) == ("1.0.2", "1.0.1", "1.0.2")


def test_triton_numbers_are_stable_and_never_reused(tmp_path: Path) -> None:
    from agent.inference.versions import TritonVersions

    path = tmp_path / "triton-versions.json"
    numbers = TritonVersions(path)
    assert numbers.number("m", "1.10.0", lambda: ["1.9.0", "1.10.0"]) == 2  # version order, not text
    assert numbers.number("m", "1.9.0") == 1
    assert numbers.number("m", "0.5.0") == 3  # first seen later: the next number, never a shift
    assert numbers.number("other", "7") == 1
    again = TritonVersions(path)
    assert [again.version_of("m", n) for n in ("1", "2", "3", "4", "x")] == ["1.9.0", "1.10.0", "0.5.0",
                                                                           None, None]


# ---------------------------------------------------------------- errors

def _bad(served: Agent, req: Any) -> grpc.RpcError:
    stb, _ = stub(served.url)
    with pytest.raises(grpc.RpcError) as info:
        stb.ModelInfer(req, timeout=10)
    return info.value


@pytest.mark.parametrize(
    ("inputs", "needle"),
    [
        ([("z", "FP32", [1, 4], b"\0" * 16)], "unknown input 'z'"),
        ([("x", "FP64", [1, 4], b"\0" * 32)], "input 'x': datatype FP64, the model expects FP32"),
        ([("x", "FP32", [1, 5], b"\0" * 20)], "input 'x': shape [1, 5]: dimension 1 is 5"),
        ([("x", "FP32", [4], b"\0" * 16)], "input 'x': shape [4] has 1 dimensions"),
        ([("x", "FP32", [1, 4], b"\0" * 15)],
         "input 'x': 15 bytes of raw contents, shape [1, 4] of FP32 needs 16"),
        ([("x", "FP32", [9, 4], b"\0" * 144)], "batch of 9 exceeds the model's max_batch_size 8"),
        ([], "missing input(s) 'x'"),
    ],
)
def test_bad_requests_name_tensor_and_problem(served: Agent, inputs: list[Any], needle: str) -> None:
    _, pb = stub(served.url)
    err = _bad(served, raw_request(pb, "affine", inputs))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.details()


def test_unknown_model_not_found(served: Agent) -> None:
    _, pb = stub(served.url)
    err = _bad(served, raw_request(pb, "nosuch", [("x", "FP32", [1, 4], b"\0" * 16)]))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "nosuch" in err.details()


def test_fp16_has_no_typed_field(served: Agent) -> None:
    _, pb = stub(served.url)
    req = pb.ModelInferRequest(model_name="ident_fp16")
    t = req.inputs.add(name="inp", datatype="FP16", shape=[1, 3])
    t.contents.fp32_contents.extend([1, 2, 3])
    err = _bad(served, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "raw_input_contents" in err.details()


def test_typed_value_out_of_range(served: Agent) -> None:
    _, pb = stub(served.url)
    req = pb.ModelInferRequest(model_name="ident_int8")
    t = req.inputs.add(name="inp", datatype="INT8", shape=[1, 3])
    t.contents.int_contents.extend([1, 2, 300])
    err = _bad(served, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "out of range for INT8" in err.details()


def test_bytes_that_are_not_utf8(served: Agent) -> None:
    _, pb = stub(served.url)
    err = _bad(served, raw_request(pb, "ident_bytes", [("inp", "BYTES", [1, 3],
                                                        b"\1\0\0\0a\1\0\0\0\xff\0\0\0\0")]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'inp': BYTES element 1 is not valid UTF-8" in err.details()


def test_malformed_bytes_raw(served: Agent) -> None:
    _, pb = stub(served.url)
    err = _bad(served, raw_request(pb, "ident_bytes", [("inp", "BYTES", [1, 3], b"\x05\0\0\0ab")]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'inp': BYTES element 0 declares 5 bytes" in err.details()


# ---------------------------------------------------------------- verification at load

def test_golden_failure_and_tampered_files_are_not_served(client: Any, served: Agent) -> None:
    assert not client.is_model_ready("badgold")
    assert not client.is_model_ready("tampered")
    index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
    assert index["badgold"]["state"] == "UNAVAILABLE"
    assert "golden case 0, output 'y': differs" in index["badgold"]["reason"]
    assert "does not match the manifest" in index["tampered"]["reason"]
    with pytest.raises(InferenceServerException) as info:
        client.load_model("badgold")
    assert "FAILED_PRECONDITION" in _code(info.value)
    with pytest.raises(InferenceServerException) as info:
        _infer_on(client, "badgold")
    assert "NOT_FOUND" in _code(info.value)


def _infer_on(client: Any, model: str) -> Any:
    inp = tc.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), np.float32))
    return client.infer(model, [inp])


# ---------------------------------------------------------------- repository, health, reflection

def test_repository_index_unload_load_and_model_health(client: Any, served: Agent) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(served.url))

    def status(service: str) -> int:
        return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    serving = health_pb2.HealthCheckResponse.SERVING
    assert status("") == serving
    assert status("inference.GRPCInferenceService") == serving
    assert status("inference.model/ident_bool") == serving
    ready = {(m["name"], m["version"]) for m in client.get_model_repository_index(as_json=True)["models"]
             if m.get("state") == "READY"}
    assert {("affine", "1.0.0"), ("affine", "2.0.0"), ("ident_bool", "1")} <= ready

    client.unload_model("ident_bool")
    assert not client.is_model_ready("ident_bool")
    assert status("inference.model/ident_bool") == health_pb2.HealthCheckResponse.NOT_SERVING
    client.load_model("ident_bool")
    assert client.is_model_ready("ident_bool")
    assert status("inference.model/ident_bool") == serving
    with pytest.raises(InferenceServerException) as info:
        client.load_model("never-installed")
    assert "NOT_FOUND" in _code(info.value)


def test_reflection_lists_services(served: Agent) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    refl = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(served.url))
    reqs = [reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService")]
    responses = list(refl.ServerReflectionInfo(iter(reqs), timeout=10))
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    assert responses[1].file_descriptor_response.file_descriptor_proto


def test_prometheus_metrics(client: Any, served: Agent) -> None:
    _affine(client, np.ones((2, 4), np.float32), "1.0.0")
    port = int(served.log().split("metrics on http://127.0.0.1:", 1)[1].split("/")[0])
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for name in ("nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
                 "nv_inference_exec_count", "nv_inference_request_duration_us",
                 "nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us",
                 "nv_inference_pending_request_count"):
        assert f"# TYPE {name} " in text
    line = next(ln for ln in text.splitlines()
                if ln.startswith('nv_inference_count{model="affine",version="1.0.0"}'))
    assert float(line.split()[-1]) >= 2


def test_message_size_limit_is_enforced(served: Agent) -> None:
    _, pb = stub(served.url)
    big = 70 << 20  # over the 64 MiB default
    import grpc as g

    channel = g.insecure_channel(served.url, options=[("grpc.max_send_message_length", big + 1024)])
    from tritonclient.grpc import service_pb2_grpc

    stb = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    n = big // 16
    req = raw_request(pb, "affine", [("x", "FP32", [n, 4], b"\0" * (n * 16))])
    with pytest.raises(grpc.RpcError) as info:
        stb.ModelInfer(req, timeout=20)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_config_file_and_flags_agree(tmp_path: Path) -> None:
    from tests.conftest import run_appliance

    cfg = tmp_path / "agent.toml"
    cfg.write_text('[server]\nport = 9001\n[inference]\nmodels = ["a@1.0"]\nmax_queue = 7\n')
    proc = run_appliance("agent", "serve", "--config", cfg, "--max-queue", "9", "--model", "b",
                         "--print-config")
    assert proc.returncode == 0, proc.stderr
    import json

    doc = json.loads(proc.stdout)
    assert doc["server"]["port"] == 9001
    assert doc["inference"]["max_queue"] == 9
    assert doc["inference"]["models"] == ["b"]
    bad = run_appliance("agent", "serve", "--config", cfg, "--port", "70000", "--print-config")
    assert bad.returncode != 0 and "--port = '70000'" in bad.stderr and "Traceback" not in bad.stderr
