"""A signed model must not read node files through ONNX external data (issue 19, finding 1).

The attack: a tensor whose data "lives" in a file outside the model (absolute, ``../``,
relative to the working directory, ONNX Runtime's in-memory marker), placed anywhere ONNX
allows a tensor (initializer, node attribute, subgraph, sparse initializer, model-local
function), behind ``y = Where(x == 1337, W, 0)`` so that golden inputs never show it.  Each
form is first shown to leak through a bare ONNX Runtime session (so these tests would fail
if the check went away), then refused at ``bundle create``, at install, at load and through
a signed update to a running agent, which keeps serving what it had.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from agent.bundle import GOLDEN, MODEL, GoldenCase, _parse_manifest, encode_golden, write_bundle
from agent.config import InferenceSection
from agent.errors import BundleError
from agent.inference.repository import ModelRepository
from agent.modelrefs import check_model_files, data_refs, fixed_cost, safe_member_name
from agent.ort import make_session
from agent.proto import node_pb2, node_pb2_grpc, onnx_refs_pb2
from provisioning.bundle import create_bundle
from provisioning.demo.models import save_golden
from testsupport.inference_support import Agent, place_unchecked
from testsupport.updates_support import affine_bundle_at, node_state, registry_with, state_hash

SECRET = b"-----BEGIN KEY--"  # 16 bytes, as a private key file starts
N = len(SECRET)
TRIGGER = 1337


def _external(name: str, location: str | None) -> TensorProto:
    t = TensorProto()
    t.name = name
    t.data_type = TensorProto.UINT8
    t.dims.append(N)
    t.data_location = TensorProto.EXTERNAL
    entries = [("offset", "0"), ("length", str(N))]
    if location is not None:
        entries.insert(0, ("location", location))
    for key, value in entries:
        e = t.external_data.add()
        e.key, e.value = key, value
    return t


def _where_graph(nodes: list[onnx.NodeProto], w: str, initializers: list[TensorProto],
                 sparse: list[onnx.SparseTensorProto] | None = None) -> onnx.GraphProto:
    """y = Where(x == 1337, <w>, 0): zeros for every input but the trigger."""
    trigger = helper.make_tensor("trigger", TensorProto.INT64, [], [TRIGGER])
    zero = helper.make_tensor("zero", TensorProto.UINT8, [], [0])
    body = [*nodes, helper.make_node("Equal", ["x", "trigger"], ["hit"], name="eq"),
            helper.make_node("Where", ["hit", w, "zero"], ["y"], name="leak")]
    return helper.make_graph(
        body, "main", [helper.make_tensor_value_info("x", TensorProto.INT64, [N])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [N])],
        [trigger, zero, *initializers], sparse_initializer=sparse or [])


def _model(graph: onnx.GraphProto, functions: list[onnx.FunctionProto] | None = None) -> bytes:
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("local", 1)] if functions else [])
    model = helper.make_model(graph, ir_version=9, opset_imports=opsets, functions=functions or [])
    return model.SerializeToString()


def in_initializer(location: str | None) -> bytes:
    return _model(_where_graph([], "W", [_external("W", location)]))


def in_attribute(location: str | None) -> bytes:
    const = helper.make_node("Constant", [], ["W"], name="const", value=_external("W", location))
    return _model(_where_graph([const], "W", []))


def in_subgraph(location: str | None) -> bytes:
    """The tensor sits in an If node's branch, two graphs down from the model."""
    branch_out = helper.make_tensor_value_info("b", TensorProto.UINT8, [N])
    then_g = helper.make_graph([helper.make_node("Constant", [], ["b"], name="inner",
                                                 value=_external("S", location))],
                               "then", [], [branch_out])
    else_g = helper.make_graph([helper.make_node("Constant", [], ["b"], name="zeros",
                                                 value=helper.make_tensor("z", TensorProto.UINT8, [N],
                                                                          [0] * N))],
                               "else", [], [branch_out])
    cond = helper.make_tensor("always", TensorProto.BOOL, [], [True])
    node = helper.make_node("If", ["always"], ["W"], name="branch", then_branch=then_g, else_branch=else_g)
    return _model(_where_graph([node], "W", [cond]))


def in_sparse_initializer(location: str | None) -> bytes:
    values = _external("W", location)
    indices = helper.make_tensor("W_idx", TensorProto.INT64, [N], list(range(N)))
    sparse = helper.make_sparse_tensor(values, indices, [N])
    return _model(_where_graph([], "W", [], [sparse]))


def in_function(location: str | None) -> bytes:
    const = helper.make_node("Constant", [], ["out"], name="fconst", value=_external("W", location))
    fn = helper.make_function("local", "Secret", [], ["out"], [const], [helper.make_opsetid("", 17)])
    return _model(_where_graph([helper.make_node("Secret", [], ["W"], domain="local", name="call")], "W", []),
                  [fn])


PLACES: dict[str, Callable[[str | None], bytes]] = {
    "initializer": in_initializer, "attribute": in_attribute, "subgraph": in_subgraph,
    "sparse-initializer": in_sparse_initializer, "function": in_function,
}


@pytest.fixture
def secret_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A node file with the secret, the working directory next to it (as '/' is on a node)."""
    node = tmp_path / "node"
    (node / "etc").mkdir(parents=True)
    key = node / "etc" / "node.key"
    key.write_bytes(SECRET)
    (node / "bundles").mkdir()
    monkeypatch.chdir(node)
    return key


def _locations(secret: Path) -> dict[str, str]:
    return {"absolute": str(secret), "dotdot": "../etc/node.key", "cwd-relative": "etc/node.key"}


def _bare_session_leaks(model: bytes, data_dir: Path | None = None) -> bytes:
    """What ONNX Runtime itself returns for the trigger: the attack works without our check."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    if data_dir is not None:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(data_dir))
    session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    out = session.run(None, {"x": np.full(N, TRIGGER, np.int64)})[0]
    return bytes(np.asarray(out, np.uint8))


# ---------------------------------------------------------------- the control: the attack is real

@pytest.mark.parametrize("place", sorted(PLACES))
@pytest.mark.parametrize("form", ["absolute", "dotdot", "cwd-relative"])
def test_the_attack_leaks_through_a_bare_session(secret_file: Path, place: str, form: str) -> None:
    location = _locations(secret_file)[form]
    # '../' resolves from the model's folder: give ONNX Runtime one, as a loader by path would.
    data_dir = secret_file.parent.parent / "bundles" if form == "dotdot" else None
    model = PLACES[place](location)
    if place == "subgraph" and form != "cwd-relative":
        # ONNX Runtime's own graph check refuses these two in a subgraph (and only there).
        with pytest.raises(Exception, match=r"should be a relative path|outside"):
            _bare_session_leaks(model, data_dir)
        return
    assert _bare_session_leaks(model, data_dir) == SECRET


# ---------------------------------------------------------------- the check finds every place

@pytest.mark.parametrize("place", sorted(PLACES))
@pytest.mark.parametrize("form", ["absolute", "dotdot", "cwd-relative"])
def test_every_place_and_form_is_refused_at_load(secret_file: Path, place: str, form: str) -> None:
    location = _locations(secret_file)[form]
    model = PLACES[place](location)
    assert [r.location for r in data_refs(model)] == [location]
    with pytest.raises(BundleError, match="refused") as err:
        make_session(model, origin="evil 1.0.0")
    assert "evil 1.0.0" in str(err.value)
    assert location in str(err.value)
    # even a bundle directory does not make a file that is not a member reachable
    with pytest.raises(BundleError, match=r"not a file of the bundle|outside the bundle"):
        make_session(model, model_dir=secret_file.parent, data_files=("weights.bin",))


@pytest.mark.parametrize("location", ["*/_ORT_MEM_ADDR_/*", "/proc/self/mem", "weights/../../x",
                                      "./node.key", ".hidden", "a\\b", ""])
def test_odd_locations_are_refused(location: str) -> None:
    with pytest.raises(BundleError, match="refused"):
        check_model_files(in_initializer(location), {"weights.bin"}, "m")


def test_missing_location_and_unknown_data_location_are_refused() -> None:
    with pytest.raises(BundleError, match="without a location"):
        check_model_files(in_initializer(None), (), "m")
    # onnx's own classes refuse to set an unknown enum value; the wire format carries it.
    odd = onnx_refs_pb2.Model()
    t = odd.graph.initializer.add(name="W", data_location=7)
    t.external_data.add(key="location", value="weights.bin")
    with pytest.raises(BundleError, match="unknown data_location 7"):
        check_model_files(odd.SerializeToString(), {"weights.bin"}, "m")


def test_non_onnx_bytes_and_the_ort_format_are_refused() -> None:
    with pytest.raises(BundleError, match="not an ONNX model"):
        check_model_files(b"\xff\xff\xff\xff garbage", (), "m")
    with pytest.raises(BundleError, match="ONNX Runtime format"):
        check_model_files(b"\x10\x00\x00\x00ORTM" + bytes(64), (), "m")


def test_a_member_data_file_resolves_inside_the_bundle_directory_only(tmp_path: Path,
                                                                      secret_file: Path) -> None:
    """The one allowed form: a plain name that is a (hashed) member, read from the bundle's
    own directory, never from the working directory."""
    bundle_dir = tmp_path / "bundle"
    bundle_dir.mkdir()
    weights = bytes(range(100, 100 + N))
    (bundle_dir / "weights.bin").write_bytes(weights)
    Path("weights.bin").write_bytes(SECRET)  # the same name in the working directory
    session = make_session(in_initializer("weights.bin"), model_dir=bundle_dir, data_files={"weights.bin"})
    out = session.run(None, {"x": np.full(N, TRIGGER, np.int64)})[0]
    assert bytes(np.asarray(out, np.uint8)) == weights
    assert safe_member_name("weights/part-1.bin")
    assert not safe_member_name("weights//x") and not safe_member_name("/etc/x")


def test_a_clean_model_passes() -> None:
    w = helper.make_tensor("W", TensorProto.UINT8, [N], list(SECRET))
    model = _model(_where_graph([], "W", [w]))
    assert data_refs(model) == []
    check_model_files(model, (), "m")


# ---------------------------------------------------------------- bundle create, install, update

def _crafted_bundle(out: Path, model: bytes) -> Path:
    """A bundle around ``model`` with consistent hashes and passing golden vectors (the golden
    input is not the trigger): what a vendor could ship and a site could sign."""
    specs = {"x": "INT64", "y": "UINT8"}
    golden = encode_golden([GoldenCase({"x": np.zeros(N, np.int64)}, {"y": np.zeros(N, np.uint8)})], specs)
    draft = {
        "format": 1, "name": "affine", "version": "9.0.0",
        "inputs": [{"name": "x", "datatype": "INT64", "shape": [N]}],
        "outputs": [{"name": "y", "datatype": "UINT8", "shape": [N]}],
        "files": {MODEL: {"sha256": hashlib.sha256(model).hexdigest(), "length": len(model)},
                  GOLDEN: {"sha256": hashlib.sha256(golden).hexdigest(), "length": len(golden)}},
    }
    manifest = _parse_manifest(json.dumps(draft).encode(), "crafted")
    buf = io.BytesIO()
    write_bundle(buf, manifest, model, golden)
    out.write_bytes(buf.getvalue())
    return out


def test_bundle_create_refuses_and_writes_nothing(tmp_path: Path, secret_file: Path) -> None:
    model = tmp_path / "evil.onnx"
    model.write_bytes(in_attribute(str(secret_file)))
    golden = save_golden(tmp_path / "g.npz", {"x": np.zeros(N, np.int64)})
    out = tmp_path / "evil.bundle"
    with pytest.raises(BundleError, match=r"evil\.onnx: tensor 'W' .*node\.key"):
        create_bundle(model, name="evil", version="1.0.0", golden=[golden], out=out)
    assert not out.exists()


@pytest.mark.parametrize("place", ["initializer", "subgraph"])
def test_install_refuses_and_leaves_the_store_as_it_was(tmp_path: Path, secret_file: Path,
                                                         place: str) -> None:
    state = tmp_path / "state"
    repo = ModelRepository.for_state_dir(state, InferenceSection())
    repo.install(affine_bundle_at(tmp_path, "1.0.1"))
    before = state_hash(state)
    evil = _crafted_bundle(tmp_path / "evil.bundle", PLACES[place](str(secret_file)))
    with pytest.raises(BundleError, match=r"affine 9\.0\.0: tensor .*refused"):
        repo.install(evil)
    assert state_hash(state) == before


def test_a_model_placed_in_the_store_is_refused_at_load(tmp_path: Path, secret_file: Path) -> None:
    """Files put into the store behind the installer's back are still checked at every load."""
    state = tmp_path / "state"
    place_unchecked(state, _crafted_bundle(tmp_path / "evil.bundle", in_initializer("etc/node.key")))
    repo = ModelRepository.for_state_dir(state, InferenceSection())
    with pytest.raises(BundleError, match=r"etc/node\.key"):
        repo._load_blocking(repo.store.find("affine"))


def test_a_signed_update_carrying_the_attack_is_refused_by_a_running_agent(tmp_path: Path,
                                                                           secret_file: Path) -> None:
    """Through the real path: a site-signed TUF target, ApplyUpdate over gRPC, then an
    observer's inference with the trigger gets the old model's answer, never the file."""
    good = affine_bundle_at(tmp_path, "1.0.1")
    evil = _crafted_bundle(tmp_path / "affine-9.0.0.bundle", in_subgraph(str(secret_file)))
    reg = registry_with(tmp_path, [good, evil])
    state = node_state(tmp_path / "node-state", reg, good)
    config = tmp_path / "agent.toml"
    config.write_text(f'[updates]\nsources = ["{reg / "published"}"]\nmount_glob = ""\n')
    agent = Agent(state, "--config", str(config))
    try:
        node = node_pb2_grpc.NodeStub(grpc.insecure_channel(agent.url))  # type: ignore[no-untyped-call]
        reply = node.ApplyUpdate(node_pb2.ApplyUpdateRequest(targets=["affine@9.0.0"]), timeout=60)
        (result,) = reply.results
        assert result.outcome == "refused", reply
        assert "refused" in result.reason and str(secret_file) in result.reason
        inventory = node.GetInventory(node_pb2.GetInventoryRequest(), timeout=10)
        assert [(b.name, b.version) for b in inventory.bundles if b.active] == [("affine", "1.0.1")]
        assert not list((state / "models" / "affine").glob("9.0.0*"))
    finally:
        agent.stop()
    assert SECRET.decode() not in agent.log()


# --- fixed cost: which models may run on the agent's event loop ----------------------------

def test_fixed_cost_is_only_plain_graphs_of_shape_bound_operators() -> None:
    plain = in_initializer("W.bin")  # Equal and Where, in the main graph
    assert fixed_cost(plain)
    assert not fixed_cost(in_subgraph("S.bin"))  # control flow: If
    assert not fixed_cost(in_function("W.bin"))  # a model-local function, another domain
    ms = helper.make_node("FusedMatMul", ["x", "x"], ["y"], domain="com.microsoft")
    graph = helper.make_graph([ms], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])])
    assert not fixed_cost(_model(graph))  # a contrib operator
    for op in ("Expand", "Tile", "Reshape", "Range", "ConstantOfShape", "Loop", "Resize", "Pad"):
        node = helper.make_node(op, ["x", "x"], ["y"])
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.INT64, [2])],
                                  [helper.make_tensor_value_info("y", TensorProto.INT64, None)])
        assert not fixed_cost(_model(graph)), op  # a size or a count from a tensor
    assert not fixed_cost(b"not a model") and not fixed_cost(b"\0\0\0\0ORTM....")
