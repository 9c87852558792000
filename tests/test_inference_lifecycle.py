"""Agent lifecycle and robustness: SIGTERM drain, full queues, cancellation, malformed requests,
wire compatibility with Triton's own protocol definitions, and perf_analyzer against the agent."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.bundle import Batching
from provisioning.demo.models import affine_model, matmul_chain_model
from tests.conftest import run_appliance
from testsupport.inference_support import ROOT, Agent, install, make_bundle, raw_request, stub

WIDTH = 256


def _heavy_bundle(tmp: Path, batching: Batching | None = None) -> Path:
    model = matmul_chain_model(tmp / "heavy.onnx", width=WIDTH, depth=8)
    return make_bundle(tmp, model, "heavy", "1.0.0", {"x": np.ones((1, WIDTH), np.float32)}, batching)


def _heavy_request(pb: Any, rows: int) -> Any:
    x = np.ones((rows, WIDTH), np.float32)
    return raw_request(pb, "heavy", [("x", "FP32", [rows, WIDTH], x.tobytes())])


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("lifecycle")
    state = tmp / "state"
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    install(state, make_bundle(tmp, affine_model(tmp / "a.onnx"), "affine", "1.0.0", {"x": x},
                               Batching(8, 1000, ())),
            # waits up to 10 s to fill a batch of 4: requests stay queued until then
            make_bundle(tmp, affine_model(tmp / "s.onnx"), "slowbatch", "1.0.0", {"x": x},
                        Batching(4, 10_000_000, ())),
            # perf_analyzer matches statistics by integer versions (std::stoll): version "3"
            make_bundle(tmp, affine_model(tmp / "t.onnx"), "tiny", "3", {"x": x}, Batching(8, 200, ())),
            # and semver bundles, which it reaches through their Triton numbers (1, 2)
            make_bundle(tmp, affine_model(tmp / "s1.onnx"), "semver", "1.0.0", {"x": x},
                        Batching(8, 200, ())),
            make_bundle(tmp, affine_model(tmp / "s2.onnx", scale=3.0), "semver", "1.2.0", {"x": x},
                        Batching(8, 200, ())),
            _heavy_bundle(tmp))
    return state


# ---------------------------------------------------------------- SIGTERM

def test_sigterm_drains_in_flight_then_exits(state: Path) -> None:
    """An open stream is an in-flight call: after SIGTERM health says NOT_SERVING, the stream
    still answers, new calls are refused, and the agent exits 0 once the stream closes."""
    import queue

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    agent = Agent(state, "--grace-period-s", "60")
    try:
        stb, pb = stub(agent.url)
        watch = health_pb2_grpc.HealthStub(grpc.insecure_channel(agent.url)).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        requests: queue.Queue[Any] = queue.Queue()
        responses = stb.ModelStreamInfer(iter(requests.get, None), timeout=60)
        x = np.ones((1, 4), np.float32)
        requests.put(raw_request(pb, "affine", [("x", "FP32", [1, 4], x.tobytes())], id="before"))
        assert next(responses).infer_response.id == "before"

        agent.proc.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        requests.put(raw_request(pb, "affine", [("x", "FP32", [1, 4], x.tobytes())], id="during"))
        during = next(responses)
        assert during.error_message == "" and during.infer_response.id == "during"
        with pytest.raises(grpc.RpcError):
            stb.ServerLive(pb.ServerLiveRequest(), timeout=5)
        assert agent.proc.poll() is None  # still draining the open stream
        requests.put(None)
        assert list(responses) == []
        assert agent.proc.wait(30) == 0
    finally:
        code = agent.stop()
    assert code == 0
    assert "agent: stopping" in agent.log() and "agent: stopped" in agent.log()


# ---------------------------------------------------------------- queue, cancellation

def test_full_queue_gives_resource_exhausted(state: Path) -> None:
    """With room for one request, of two sent together one waits (for a batch that never
    fills) and the other is refused at once."""
    agent = Agent(state, "--max-queue", "1")
    try:
        stb, pb = stub(agent.url)
        x = np.ones((1, 4), np.float32).tobytes()
        futures = [stb.ModelInfer.future(raw_request(pb, "slowbatch", [("x", "FP32", [1, 4], x)]),
                                         timeout=2) for _ in range(2)]
        errors = []
        for f in futures:
            with pytest.raises(grpc.RpcError) as info:
                f.result()
            errors.append(info.value)
        codes = sorted(e.code().name for e in errors)
        assert codes == ["DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"]
        full = next(e for e in errors if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "slowbatch 1.0.0: queue full (1 requests waiting or running)" in full.details()
    finally:
        assert agent.stop() == 0


def test_timed_out_requests_leave_the_queue(state: Path) -> None:
    """Requests whose deadline passes while queued are never executed and free their place."""
    agent = Agent(state, "--max-queue", "4")
    try:
        stb, pb = stub(agent.url)
        x = np.ones((1, 4), np.float32).tobytes()

        def request() -> Any:
            return raw_request(pb, "slowbatch", [("x", "FP32", [1, 4], x)])

        doomed = [stb.ModelInfer.future(request(), timeout=0.3) for _ in range(3)]
        for f in doomed:
            with pytest.raises(grpc.RpcError) as info:
                f.result()
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # Had they stayed queued, three of these four would find the queue full.
        ok = [stb.ModelInfer.future(request(), timeout=60) for _ in range(4)]
        for f in ok:
            f.result()
        stats = stb.ModelStatistics(pb.ModelStatisticsRequest(name="slowbatch"), timeout=10).model_stats[0]
        assert stats.inference_stats.success.count == 4
        assert stats.execution_count == 1  # one batch of the four; the timed-out ones never ran
        assert [b.batch_size for b in stats.batch_stats] == [4]
    finally:
        assert agent.stop() == 0


# ---------------------------------------------------------------- malformed requests

DATATYPES = ["BOOL", "UINT8", "INT8", "INT32", "INT64", "UINT64", "FP16", "FP32", "FP64", "BYTES", "", "X"]


@st.composite
def infer_requests(draw: st.DrawFn, pb: Any) -> Any:
    req = pb.ModelInferRequest(model_name=draw(st.sampled_from(["affine", "affine", "nosuch", ""])),
                               model_version=draw(st.sampled_from(["", "", "1.0.0", "2"])))
    raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        t = req.inputs.add(name=draw(st.sampled_from(["x", "x", "y", ""])),
                           datatype=draw(st.sampled_from(DATATYPES)),
                           shape=draw(st.lists(st.integers(-2, 2**62), max_size=4)
                                      | st.lists(st.integers(0, 9), max_size=3)))
        if raw:
            req.raw_input_contents.append(draw(st.binary(max_size=200)))
        else:
            field = draw(st.sampled_from(["fp32_contents", "int_contents", "bytes_contents",
                                          "bool_contents", "uint64_contents", "fp64_contents"]))
            values: Any = {
                "fp32_contents": st.lists(st.floats(width=32), max_size=40),
                "fp64_contents": st.lists(st.floats(), max_size=40),
                "int_contents": st.lists(st.integers(-2**31, 2**31 - 1), max_size=40),
                "bytes_contents": st.lists(st.binary(max_size=8), max_size=40),
                "bool_contents": st.lists(st.booleans(), max_size=40),
                "uint64_contents": st.lists(st.integers(0, 2**64 - 1), max_size=40),
            }[field]
            getattr(t.contents, field).extend(draw(values))
    if draw(st.booleans()) and raw:
        req.raw_input_contents.append(draw(st.binary(max_size=20)))  # one too many
    for name in draw(st.lists(st.sampled_from(["y", "z", ""]), max_size=2)):
        req.outputs.add(name=name)
    return req


@pytest.fixture(scope="module")
def fuzz_agent(state: Path) -> Iterator[Agent]:
    agent = Agent(state)
    yield agent
    assert agent.stop() == 0


def test_malformed_requests_get_a_status_never_a_crash(fuzz_agent: Agent) -> None:
    stb, pb = stub(fuzz_agent.url)
    seen: set[str] = set()

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(req=infer_requests(pb))
    def check(req: Any) -> None:
        try:
            stb.ModelInfer(req, timeout=10)
            seen.add("OK")
        except grpc.RpcError as exc:
            assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), \
                (exc.code(), exc.details(), req)
            assert exc.details()
            seen.add(exc.code().name)

    check()
    assert {"INVALID_ARGUMENT", "NOT_FOUND"} <= seen
    assert stb.ServerLive(pb.ServerLiveRequest(), timeout=5).live
    assert fuzz_agent.proc.poll() is None


# ---------------------------------------------------------------- protocol facts

def _fields(desc: Any) -> dict[str, tuple[int, int, bool, str]]:
    out = {}
    for f in desc.fields:
        kind = f.message_type.full_name if f.message_type else (f.enum_type.full_name if f.enum_type else "")
        out[f.name] = (f.number, f.type, f.is_repeated, kind)
    return out


def _walk(desc: Any) -> Iterator[Any]:
    yield desc
    for nested in desc.nested_types:
        yield from _walk(nested)


def test_protos_are_wire_compatible_with_triton() -> None:
    """Every message and field we define exists in Triton's published protocol with the same
    number and type; every RPC has the same shape."""
    from tritonclient.grpc import model_config_pb2 as t_mc
    from tritonclient.grpc import service_pb2 as t_svc

    from agent.proto import grpc_service_pb2, model_config_pb2

    checked = 0
    for ours_file, theirs_file in ((grpc_service_pb2.DESCRIPTOR, t_svc.DESCRIPTOR),
                                   (model_config_pb2.DESCRIPTOR, t_mc.DESCRIPTOR)):
        assert ours_file.package == theirs_file.package == "inference"
        for top in ours_file.message_types_by_name.values():
            for desc in _walk(top):
                theirs = theirs_file.pool.FindMessageTypeByName(desc.full_name)
                want = _fields(theirs)
                for name, fact in _fields(desc).items():
                    assert want.get(name) == fact, f"{desc.full_name}.{name}: {fact} vs {want.get(name)}"
                    checked += 1
        for enum in ours_file.enum_types_by_name.values():
            theirs_enum = theirs_file.pool.FindEnumTypeByName(enum.full_name)
            assert {v.name: v.number for v in enum.values}.items() <= \
                {v.name: v.number for v in theirs_enum.values}.items()
    ours_svc = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs_svc = t_svc.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for m in ours_svc.methods:
        t = theirs_svc.methods_by_name[m.name]
        assert (m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming) == \
            (t.input_type.full_name, t.output_type.full_name, t.client_streaming, t.server_streaming)
    assert checked > 150


def test_named_model_missing_without_registry_refuses_to_start(tmp_path: Path) -> None:
    proc = run_appliance("agent", "serve", "--state-dir", tmp_path / "state", "--port", "0",
                         "--metrics-port", "0", "--http-port", "0", "--model", "ghost@1.0", timeout=60)
    assert proc.returncode == 6
    assert "model 'ghost' is not installed and no registry source is configured" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- perf_analyzer

def _perf_analyzer() -> str:
    wrapper = ROOT / ".tools" / "perf_analyzer"
    if not wrapper.exists():
        proc = subprocess.run([str(ROOT / "bench" / "tools" / "get-perf-analyzer")], capture_output=True,
                              text=True, env=os.environ | {"PYTHON": os.sys.executable}, timeout=600,
                              check=False)
        if proc.returncode != 0:
            pytest.skip(f"perf_analyzer cannot be obtained: {proc.stderr.strip()[-300:]}")
    return str(wrapper)


def test_perf_analyzer_benchmarks_the_agent(fuzz_agent: Agent) -> None:
    pa = _perf_analyzer()
    proc = subprocess.run([pa, "-i", "grpc", "-u", fuzz_agent.url, "-m", "tiny",
                           "--concurrency-range", "1:4", "--measurement-interval", "500",
                           "--stability-percentage", "999", "--max-trials", "3"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("Concurrency: ")]
    assert len(lines) == 4, proc.stdout
    for ln in lines:
        throughput = float(ln.split("throughput: ")[1].split()[0])
        assert throughput > 0


@pytest.mark.parametrize("version", [[], ["-x", "2"]], ids=["active", "numbered"])
def test_perf_analyzer_measures_semver_bundles(fuzz_agent: Agent, version: list[str]) -> None:
    """Bundle versions 1.0.0 and 1.2.0 (active, served): Triton versions 1 and 2, and
    perf_analyzer 2.41 reads statistics by integer version."""
    pa = _perf_analyzer()
    proc = subprocess.run([pa, "-i", "grpc", "-u", fuzz_agent.url, "-m", "semver", *version,
                           "--concurrency-range", "2", "--measurement-interval", "300",
                           "--stability-percentage", "999", "--max-trials", "3"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("Concurrency: ")]
    assert len(lines) == 1, proc.stdout
    assert float(lines[0].split("throughput: ")[1].split()[0]) > 0
    assert "Server:" in proc.stdout and "Inference count:" in proc.stdout  # server-side statistics
