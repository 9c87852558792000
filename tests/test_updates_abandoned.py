"""An ApplyUpdate whose caller goes away during the golden run still ends applied or undone
(issue 19, finding 2).

The agent runs in its own process on loopback against a real TUF registry.  The new version's
model spends seconds in a Loop of matrix products before it answers (its output does not
depend on them), so the golden run outlasts the caller's deadline; the caller gets
DEADLINE_EXCEEDED and the update must still end in one consistent state: the journal closed,
staging empty, an event and a history line, the update lock held until the work ended, and
the next update working.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from agent.proto import node_pb2, node_pb2_grpc
from provisioning.bundle import create_bundle
from provisioning.demo.models import IR_VERSION, OPSET, save_golden
from testsupport.inference_support import Agent, with_wrong_golden
from testsupport.updates_support import X, affine_bundle_at, expected, node_state, registry_with, state_hash

DEADLINE_S = 1.0
SLOW_S = 4.0  # the golden run of the slow version takes at least this long


def _slow_affine_model(path: Path, scale: float, trips: int) -> Path:
    """``y = x * scale + 1 + 0 * mean(loop)``: the Loop runs ``trips`` 128x128 products."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n = 128
    body = helper.make_graph(
        [helper.make_node("MatMul", ["acc_in", "acc_in"], ["prod"]),
         helper.make_node("Tanh", ["prod"], ["acc_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [n, n])])
    inits = [numpy_helper.from_array(np.array(trips, np.int64), "trips"),
             numpy_helper.from_array(np.array(True), "go"),
             numpy_helper.from_array(np.array([n, n], np.int64), "square"),
             numpy_helper.from_array(np.array(0.001, np.float32), "small"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.full((4,), scale, np.float32), "scale"),
             numpy_helper.from_array(np.full((4,), 1.0, np.float32), "bias")]
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean_x"], keepdims=0),  # the loop depends on x
        helper.make_node("Mul", ["mean_x", "small"], ["seed"]),
        helper.make_node("Expand", ["seed", "square"], ["acc0"]),
        helper.make_node("Loop", ["trips", "go", "acc0"], ["acc"], body=body),
        helper.make_node("ReduceMean", ["acc"], ["mean_acc"], keepdims=0),
        helper.make_node("Mul", ["mean_acc", "zero"], ["nothing"]),
        helper.make_node("Mul", ["x", "scale"], ["t"]),
        helper.make_node("Add", ["t", "bias"], ["u"]),
        helper.make_node("Add", ["u", "nothing"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "slow_affine",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], inits)
    model = helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def _run_once(path: Path) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    start = time.monotonic()
    session.run(None, {"x": X})
    return time.monotonic() - start


def _slow_bundle(tmp: Path, version: str) -> Path:
    """Affine ``version`` (same function as the fast one) whose golden run takes >= SLOW_S."""
    work = tmp / "slow"
    trips = 200
    model = _slow_affine_model(work / "probe.onnx", 2.0, trips)
    per_trip = _run_once(model) / trips
    trips = max(trips, int(SLOW_S / max(per_trip, 1e-6)))
    scale = 2.0 if int(version.rsplit(".", 1)[-1]) % 2 else 3.0
    model = _slow_affine_model(work / f"affine-{version}.onnx", scale, trips)
    golden = save_golden(work / f"affine-{version}.npz", {"x": X})
    return create_bundle(model, name="affine", version=version, golden=[golden],
                         out=work / f"affine-{version}.bundle").path


def _node(agent: Agent) -> Any:
    return node_pb2_grpc.NodeStub(grpc.insecure_channel(agent.url))  # type: ignore[no-untyped-call]


def _update_events(node: Any) -> list[Any]:
    return list(node.GetEvents(node_pb2.GetEventsRequest(kind_prefix="update."), timeout=10).events)


def _wait_for_outcome(node: Any, timeout: float = 180) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [e for e in _update_events(node) if e.kind in ("update.applied", "update.refused")]
        if done:
            return done
        time.sleep(0.2)
    raise AssertionError("the abandoned update never reported an outcome")


@pytest.mark.parametrize("golden", ["right", "wrong"])
def test_update_whose_caller_times_out_still_ends_applied_or_undone(tmp_path: Path, golden: str) -> None:
    slow = _slow_bundle(tmp_path, "1.0.2")
    if golden == "wrong":
        slow = with_wrong_golden(slow, tmp_path / "affine-1.0.2-wrong.bundle")
    reg = registry_with(tmp_path, [affine_bundle_at(tmp_path, "1.0.1"), slow])
    state = node_state(tmp_path / "node" / "state", reg, affine_bundle_at(tmp_path, "1.0.1"))
    config = tmp_path / "agent.toml"
    config.write_text(f"[updates]\nsources = {json.dumps([str(reg / 'published')])}\nmount_glob = \"\"\n")
    agent = Agent(state, "--config", str(config))
    try:
        node = _node(agent)
        node.CheckUpdates(node_pb2.CheckUpdatesRequest(), timeout=30)
        before = state_hash(state)
        with pytest.raises(grpc.RpcError) as caught:
            node.ApplyUpdate(node_pb2.ApplyUpdateRequest(targets=["affine@1.0.2"]), timeout=DEADLINE_S)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        # The next update queues behind the abandoned one (the lock is held until it ends).
        registry_with(tmp_path, [affine_bundle_at(tmp_path, "1.0.3")], reg)
        later = node.ApplyUpdate(node_pb2.ApplyUpdateRequest(targets=["affine@1.0.3"]), timeout=180)
        assert later.results[0].outcome == "applied", later

        events = _update_events(node)
        kinds = [(e.kind, e.details["version"]) for e in events]
        first = "update.applied" if golden == "right" else "update.refused"
        assert kinds == [(first, "1.0.2"), ("update.applied", "1.0.3")], kinds
        history = node.UpdateHistory(node_pb2.UpdateHistoryRequest(), timeout=10).entries
        assert [(h.outcome, h.version) for h in history][:1] == [
            ("applied" if golden == "right" else "refused", "1.0.2")]
        if golden == "wrong":
            assert "golden" in events[0].details["reason"], events[0].details

        from tritonclient.grpc import InferenceServerClient, InferInput

        client = InferenceServerClient(agent.url)
        inp = InferInput("x", list(X.shape), "FP32")
        inp.set_data_from_numpy(X)
        result = client.infer("affine", [inp])
        assert result.get_response().model_version == "1.0.3"
        assert (result.as_numpy("y") == expected("1.0.3")).all()
        client.close()
    finally:
        agent.stop()

    updates = state / "updates"
    assert not (updates / "journal.json").exists()
    assert list((updates / "staging").iterdir()) == []
    lines = [json.loads(line) for line in (updates / "history.jsonl").read_text().splitlines()]
    applied = [(h["outcome"], h["to_version"]) for h in lines]
    if golden == "right":
        assert applied == [("applied", "1.0.2"), ("applied", "1.0.3")]
    else:
        assert applied == [("applied", "1.0.3")]
        # the undone 1.0.2 left nothing: no version directory, nothing else changed before 1.0.3
        assert not (state / "models" / "affine" / "1.0.2").exists()
        assert "models/affine/1.0.2" not in before
    assert "update work failed" not in agent.log()
