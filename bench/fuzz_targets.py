"""The fuzz targets of ``bench/fuzz.py``: one per parser that takes outside bytes.

Each :class:`Target` turns one input (bytes) into a call of the real parser, the way the
agent or the CLI calls it, and names the errors that parser documents (its refusals).
:func:`run_one` is the contract every input must meet: the parser succeeds or raises one of
its refusals; any other exception is a finding.  Seeds are real, valid inputs made by the
project's own tools (a bundle made by ``create_bundle``, a site PKI's CRL and certificates,
the profiles under images/), so the fuzzer starts from the accepted format and mutates it.

This module needs no atheris: ``tests/test_fuzz_targets.py`` replays every seed and every
saved finding (``bench/fuzz_corpus/TARGET/``) through :func:`run_one`, so the harness
and the fixes stay checked in the fast tier.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CORPUS_DIR = ROOT / "bench" / "fuzz_corpus"  # saved findings (regression inputs), per target


@dataclass(frozen=True)
class Target:
    name: str
    what: str
    refusals: tuple[type[BaseException], ...]
    prepare: Callable[[Path], tuple[Callable[[bytes], None], list[bytes]]]
    """``prepare(work_dir)`` -> (the one-input function, the seed inputs)."""


def run_one(target: Target, fn: Callable[[bytes], None], data: bytes) -> bool:
    """Feed ``data`` to ``fn``; True when it was accepted, False when cleanly refused.

    Raises:
        whatever else ``fn`` raises: that is a finding.
    """
    try:
        fn(data)
    except target.refusals:
        return False
    return True


def saved_inputs(name: str) -> list[tuple[str, bytes]]:
    """The saved regression inputs of target ``name`` (file name, bytes)."""
    folder = CORPUS_DIR / name
    if not folder.is_dir():
        return []
    return [(p.name, p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file()]


# ------------------------------------------------------------------ seed material


def _tiny_models(work: Path) -> dict[str, bytes]:
    """Small ONNX models: an affine map (dynamic batch), one with external data, one whose
    weights hide in an If node's subgraph, and a string identity."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    def model(graph: Any) -> bytes:
        m = helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17)])
        return bytes(m.SerializeToString())

    w = numpy_helper.from_array(np.full((4,), 2.0, np.float32), "w")
    affine = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["y"], name="scale")], "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [w])
    ext = numpy_helper.from_array(np.zeros((4,), np.float32), "w")
    ext.ClearField("raw_data")
    ext.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "weights.bin"), ("offset", "0"), ("length", "16")):
        entry = ext.external_data.add()
        entry.key, entry.value = key, value
    external = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["y"])], "external",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [ext])
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=ext)], "then",
        [], [helper.make_tensor_value_info("c", TensorProto.FLOAT, [4])])
    cond = helper.make_graph(
        [helper.make_node("If", ["b"], ["y"], then_branch=branch, else_branch=branch)], "cond",
        [helper.make_tensor_value_info("b", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    text = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["t"])], "text",
        [helper.make_tensor_value_info("s", TensorProto.STRING, ["n"])],
        [helper.make_tensor_value_info("t", TensorProto.STRING, ["n"])])
    return {"affine": model(affine), "external": model(external), "subgraph": model(cond),
            "text": model(text)}


def _real_bundle(work: Path) -> Path:
    """A bundle made by the operator's own tool from the affine model."""
    import numpy as np

    from provisioning.bundle import create_bundle

    model_path = work / "affine.onnx"
    model_path.write_bytes(_tiny_models(work)["affine"])
    golden = work / "golden.npz"
    np.savez(golden, **{"inputs/x": np.arange(8, dtype=np.float32).reshape(2, 4)})
    return create_bundle(model_path, name="fuzz", version="1.0.0", golden=[golden],
                         out=work / "fuzz.bundle").path


def _members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        out = {}
        for m in tar.getmembers():
            f = tar.extractfile(m)
            assert f is not None
            out[m.name] = f.read()
        return out


def _pki(work: Path) -> Path:
    """A site PKI with a node and two client certificates, one of them revoked."""
    from provisioning import pki

    directory = work / "pki"
    if not (directory / "ca.crt").is_file():
        pki.init_pki(directory, organization="Fuzz Site")
        pki.issue_node(directory, "node1", dns=("node1.local",), ips=("192.0.2.10",))
        pki.issue_client(directory, "ops", "operator")
        pki.issue_client(directory, "gone", "observer")
        pki.revoke(directory, "gone", reason="key-compromise")
    return directory


def _file_writer(path: Path) -> Callable[[bytes], Path]:
    def write(data: bytes) -> Path:
        path.write_bytes(data)
        return path
    return write


# ------------------------------------------------------------------ the targets


def _bundle_archive(work: Path) -> tuple[Callable[[bytes], None], list[bytes]]:
    from agent.bundle import read_bundle

    seed = _real_bundle(work).read_bytes()
    write = _file_writer(work / "input.bundle")
    dest = work / "extracted"

    def fn(data: bytes) -> None:
        bundle = read_bundle(write(data))
        bundle.read_model()
        bundle.golden_cases()
        bundle.extract(dest)

    return fn, [seed]


def _bundle_manifest(work: Path) -> tuple[Callable[[bytes], None], list[bytes]]:
    from agent.bundle import MANIFEST, _parse_manifest

    manifest = _members(_real_bundle(work).read_bytes())[MANIFEST]
    batched = json.loads(manifest)
    batched["batching"] = {"max_batch_size": 8, "max_queue_delay_us": 100,
                           "preferred_batch_sizes": [2, 4]}
    batched["accelerator"] = {"providers": ["CPUExecutionProvider"], "requires_gpu": False,
                              "min_cuda": "12.4", "tf32": True}

    def fn(data: bytes) -> None:
        _parse_manifest(data, "fuzz: manifest.json").canonical()

    return fn, [manifest, json.dumps(batched).encode()]


def _golden(work: Path) -> tuple[Callable[[bytes], None], list[bytes]]:
    import numpy as np

    from agent.bundle import GOLDEN, GoldenCase, decode_golden, encode_golden

    golden = _members(_real_bundle(work).read_bytes())[GOLDEN]
    texts = np.array([b"alpha", b"", b"\xff\x00"], dtype=object)
    kinds = encode_golden([GoldenCase({"s": texts, "i": np.array([[1, -2]], np.int64)},
                                      {"b": np.array([True, False])})],
                          {"s": "BYTES", "i": "INT64", "b": "BOOL"})

    def fn(data: bytes) -> None:
        decode_golden(data)

    return fn, [golden, kinds]


def _model_refs(work: Path) -> tuple[Callable[[bytes], None], list[bytes]]:
    from agent.modelrefs import check_model_files

    models = _tiny_models(work)

    def fn(data: bytes) -> None:
        check_model_files(data, ("weights.bin", "dir/more.bin"), "fuzz: model.onnx")

    return fn, list(models.values())


def _model_signature(work: Path) -> tuple[Callable[[bytes], None], list[bytes]]:
    """A manifest (fuzzed) against real ONNX Runtime sessions (fixed): the install-time check
    that what a bundle declares is what its model runs."""
    from agent.bundle import MANIFEST, _parse_manifest
    from agent.inference.signature import check_signature, signature_mismatches
    from agent.ort import make_session

    models = _tiny_models(work)
    sessions = [make_session(models[k], providers=["CPUExecutionProvider"]) for k in ("affine", "text")]
    manifest = _members(_real_bundle(work).read_bytes())[MANIFEST]
    text = json.loads(manifest)
    text["inputs"] = [{"name": "s", "datatype": "BYTES", "shape": [-1]}]
    text["outputs"] = [{"name": "t", "datatype": "BYTES", "shape": [-1]}]

    def fn(data: bytes) -> None:
        parsed = _parse_manifest(data, "fuzz: manifest.json")
        if all(signature_mismatches(parsed, session) for session in sessions):
            check_signature(parsed, sessions[0])  # refused: say why, as the agent does

    return fn, [manifest, json.dumps(text).encode()]


def _agent_toml(work: Path) -> tuple[Callable[[bytes], None], list[bytes]]:
    from agent.config import load_config
    from agent.security import check_listen

    write = _file_writer(work / "agent.toml")
    seeds = [
        b'[server]\nlisten = "127.0.0.1"\nport = 8001\nmetrics_port = 0\n'
        b'state_dir = "/var/lib/appliance"\ngrace_period_s = 2.5\n'
        b'[inference]\nmodels = ["fuzz", "fuzz@1.0.0"]\nintra_op_threads = 2\n'
        b'[tls]\ncert = "/etc/appliance/tls/node.crt"\nkey = "/etc/appliance/tls/node.key"\n'
        b'ca = "/etc/appliance/tls/ca.crt"\ncrl = "/etc/appliance/tls/crl.pem"\n',
        b'[server]\nlisten = "0.0.0.0"\n[health]\n[limits]\n[updates]\n',
    ]

    def fn(data: bytes) -> None:
        config = load_config(write(data))
        config.to_json()
        check_listen(config)

    return fn, seeds


def _image_profile(work: Path) -> tuple[Callable[[bytes], None], list[bytes]]:
    from provisioning.image.profile import load_profile

    # The profile sits where images/ does, so a seed's relative references resolve as in the repo.
    (work / "images").mkdir(exist_ok=True)
    link = work / "firmware-manifests"
    if not link.exists():
        link.symlink_to(ROOT / "firmware-manifests")
    write = _file_writer(work / "images" / "fuzz.toml")

    def fn(data: bytes) -> None:
        load_profile(write(data)).to_json()

    return fn, [p.read_bytes() for p in sorted((ROOT / "images").glob("*.toml"))]


_TOML_INVENTORY = (b'port = 8001\n[[nodes]]\nname = "edge-1"\naddress = "192.0.2.10"\n'
                   b'groups = ["edge", "canary"]\ntls_name = "edge-1.local"\n'
                   b'[[nodes]]\nname = "edge-2"\nport = 9001\n')


def _inventory_toml(work: Path) -> tuple[Callable[[bytes], None], list[bytes]]:
    from provisioning.fleet import load_inventory

    write = _file_writer(work / "inventory.toml")

    def fn(data: bytes) -> None:
        load_inventory(write(data))
        load_inventory(write(data), "edge,c*")

    return fn, [_TOML_INVENTORY]


def _inventory_ansible(work: Path) -> tuple[Callable[[bytes], None], list[bytes]]:
    from provisioning.fleet import load_inventory

    # The file's name picks the parser ansible reports on (.yml: YAML, else INI).
    ini, yaml = _file_writer(work / "hosts"), _file_writer(work / "hosts.yml")
    seeds = [
        b"[edge]\ne1 ansible_host=192.0.2.10 appliance_port=8001\ne2 appliance_tls_name=e2.local\n"
        b"[core]\nc1\n[site:children]\nedge\ncore\n[edge:vars]\nappliance_port=9001\n",
        b"all:\n  children:\n    edge:\n      hosts:\n        e1:\n          ansible_host: 192.0.2.10\n"
        b"          appliance_port: 8001\n        e2: {}\n",
    ]

    def fn(data: bytes) -> None:
        load_inventory((yaml if data.startswith((b"all:", b"---")) else ini)(data))

    return fn, seeds


def _crl(work: Path) -> tuple[Callable[[bytes], None], list[bytes]]:
    from cryptography import x509

    from agent.security import RevocationList

    directory = _pki(work)
    ca = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    write = _file_writer(work / "crl.pem")

    def fn(data: bytes) -> None:
        crl = RevocationList(write(data), ca)
        crl.is_revoked(1)
        assert crl.facts is not None
        crl.facts.describe()

    return fn, [(directory / "crl.pem").read_bytes()]


def _certificate(work: Path) -> tuple[Callable[[bytes], None], list[bytes]]:
    """A certificate two ways: a client's, as the access interceptor reads it (one it cannot
    parse is an identity with a problem: UNAUTHENTICATED), and the node's own [tls] cert,
    as the agent checks it at start against its key and the site CA."""
    from agent.config import AgentConfig, TlsSection
    from agent.security import _check_material, client_identity

    directory = _pki(work)
    certs = sorted(directory.rglob("*.crt"))
    node_key = next(p for p in directory.rglob("*.key") if "node1" in p.name)
    write = _file_writer(work / "cert.pem")
    config = AgentConfig(tls=TlsSection(cert=work / "cert.pem", key=node_key, ca=directory / "ca.crt"))

    def fn(data: bytes) -> None:
        client_identity(data)  # never raises: an unparsable one carries its problem
        write(data)
        _check_material(config)

    return fn, [p.read_bytes() for p in certs]


def _os_release_bytes(members: dict[str, bytes]) -> bytes:
    from agent.osrelease import SCHEMA

    doc = {"schema": SCHEMA, "name": "appliance", "version": "20261129.120000", "roothash": "ab" * 32,
           "files": {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
                     for n, d in members.items()}}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (("release.json", json.dumps(doc, indent=1).encode()), *members.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _os_release(work: Path) -> tuple[Callable[[bytes], None], list[bytes]]:
    from agent.osrelease import read_release

    write = _file_writer(work / "release.tar")
    seed = _os_release_bytes({"root.squashfs": b"hsqs" + bytes(60), "root.verity": b"verity\0" * 4,
                              "uki.efi": b"MZ" + bytes(30)})

    def fn(data: bytes) -> None:
        read_release(write(data))

    return fn, [seed]


def _proto_requests(work: Path) -> tuple[Callable[[bytes], None], list[bytes]]:
    """Every request message of the gRPC services, parsed from bytes as grpc does, then
    passed through the servicers' pure request handling (tensor decoding, output names,
    event queries).  The first byte picks the message type."""
    import numpy as np

    from agent.bundle import TensorSpec
    from agent.events import EventLog
    from agent.inference.tensors import check_requested_outputs, decode_inputs
    from agent.proto import grpc_service_pb2 as kserve
    from agent.proto import node_pb2 as node

    types: list[Any] = []
    for module in (kserve, node):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                cls = getattr(module, method.input_type.name)
                if cls not in types:
                    types.append(cls)
    kinds = ("BOOL", "INT8", "UINT16", "INT32", "INT64", "UINT64", "FP16", "FP32", "FP64", "BYTES")
    specs = {f"in_{k.lower()}": TensorSpec(f"in_{k.lower()}", k, (-1, 2)) for k in kinds}
    specs["fixed"] = TensorSpec("fixed", "FP32", (1, 3))
    out_specs = {n: TensorSpec(n, "FP32", (-1,)) for n in ("y", "z")}
    events = EventLog(None)
    for i in range(5):
        events.record(f"update.step{i}", "info", "fuzz", "seeded")

    def fn(data: bytes) -> None:
        if not data:
            return
        cls = types[data[0] % len(types)]
        request = cls.FromString(data[1:])
        name = cls.DESCRIPTOR.name
        if name == "ModelInferRequest":
            for max_batch in (0, 4):
                only = {t.name: specs[t.name] for t in request.inputs if t.name in specs}
                decode_inputs(request, only or specs, max_batch)
            check_requested_outputs(request, out_specs)
        elif name == "GetEventsRequest":
            events.recent(request.after_seq, min(request.limit or 100, 1000), request.kind_prefix)

    seeds = []
    req = kserve.ModelInferRequest(model_name="fuzz", model_version="1")
    for k in kinds:
        t = req.inputs.add(name=f"in_{k.lower()}", datatype=k, shape=[1, 2])
        if k == "BYTES":
            t.contents.bytes_contents.extend([b"a", b"bc"])
    req.outputs.add(name="y")
    raw = kserve.ModelInferRequest(model_name="fuzz")
    raw.inputs.add(name="fixed", datatype="FP32", shape=[1, 3])
    raw.raw_input_contents.append(np.arange(3, dtype="<f4").tobytes())
    typed = kserve.ModelInferRequest(model_name="fuzz")
    small = typed.inputs.add(name="in_int8", datatype="INT8", shape=[2, 2])
    small.contents.int_contents.extend([1, -2, 3, 4])
    for message in (req, raw, typed, node.GetEventsRequest(after_seq=2, limit=2, kind_prefix="update"),
                    node.ApplyUpdateRequest(targets=["fuzz/1.0.0"], dry_run=True)):
        seeds.append(bytes([types.index(type(message))]) + message.SerializeToString())
    return fn, seeds


def _refusals() -> dict[str, tuple[type[BaseException], ...]]:
    from google.protobuf.message import DecodeError

    from agent.errors import BundleError, ConfigError, InferenceError, VerificationError
    from provisioning.errors import ProfileError

    return {
        "bundle_archive": (BundleError, VerificationError),
        "bundle_manifest": (BundleError,),
        "golden": (BundleError,),
        "model_refs": (BundleError,),
        "model_signature": (BundleError,),
        "agent_toml": (ConfigError,),
        "image_profile": (ProfileError,),
        "inventory_toml": (ConfigError,),
        "inventory_ansible": (ConfigError,),
        "crl": (ConfigError, VerificationError),
        "certificate": (ConfigError, VerificationError),
        "os_release": (VerificationError,),
        "proto_requests": (DecodeError, InferenceError),
    }


_PREPARE: dict[str, tuple[str, Callable[[Path], tuple[Callable[[bytes], None], list[bytes]]]]] = {
    "bundle_archive": ("agent.bundle.read_bundle on a bundle file, then its members", _bundle_archive),
    "bundle_manifest": ("agent.bundle._parse_manifest", _bundle_manifest),
    "golden": ("agent.bundle.decode_golden", _golden),
    "model_refs": ("agent.modelrefs.check_model_files", _model_refs),
    "model_signature": ("manifest vs session: agent.inference.signature.check_signature", _model_signature),
    "agent_toml": ("agent.config.load_config + security.check_listen", _agent_toml),
    "image_profile": ("provisioning.image.profile.load_profile", _image_profile),
    "inventory_toml": ("provisioning.fleet.load_inventory (.toml)", _inventory_toml),
    "inventory_ansible": ("provisioning.fleet.load_inventory (Ansible INI/YAML)", _inventory_ansible),
    "crl": ("agent.security.RevocationList", _crl),
    "certificate": ("agent.security client_identity / _check_material", _certificate),
    "os_release": ("agent.osrelease.read_release", _os_release),
    "proto_requests": ("gRPC request decoders + inference.tensors", _proto_requests),
}

NAMES = tuple(_PREPARE)


def target(name: str) -> Target:
    """The target called ``name`` (one of :data:`NAMES`)."""
    what, prepare = _PREPARE[name]
    return Target(name, what, _refusals()[name], prepare)
