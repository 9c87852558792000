"""Fuzz a running agent's RPCs: generated and mutated requests, every reply a proper status.

The methods and their request types come from the server's own reflection, so the same
script covers whatever the agent serves (Node, KServe inference, health, reflection).
Requests are, by turns: valid messages drawn by hypothesis from the request descriptor,
byte-level mutations of such messages (bit flips, truncation, splices, inserted bytes,
duplicated fields) and raw random bytes.  A reply passes when it is OK or any status but
UNKNOWN (an unhandled exception in a servicer); a unary call that hits its deadline is a
hang.  Before and after, the server's resident memory is read (``--pid``) to see it return
to its baseline.

Against a running agent::

    python -m tests.fuzz_rpc --target localhost:8001 --ca ca.crt --cert admin.crt \\
        --key admin.key --pid $(pidof -s appliance-agent) --count 50000

Without ``--target`` it starts tests/secure_server.py with a throw-away PKI and fuzzes that.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import psutil
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
CALL_TIMEOUT_S = 10.0
STREAM_TIMEOUT_S = 2.0


@dataclasses.dataclass
class Method:
    path: str
    request: Descriptor
    client_streaming: bool
    server_streaming: bool


@dataclasses.dataclass
class FuzzReport:
    sent: int = 0
    codes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    failures: list[str] = dataclasses.field(default_factory=list)
    rss_baseline: int = 0
    rss_after: int = 0
    seconds: float = 0.0
    alive_after: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"sent": self.sent, "codes": dict(self.codes), "failures": self.failures[:20],
                "failure_count": len(self.failures), "rss_baseline": self.rss_baseline,
                "rss_after": self.rss_after, "seconds": round(self.seconds, 1),
                "alive_after": self.alive_after}


# ------------------------------------------------------------------ discovery by reflection


def discover(channel: grpc.Channel) -> list[Method]:
    """Every method the server lists by reflection, with its request descriptor."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    def ask(**kwargs: Any) -> reflection_pb2.ServerReflectionResponse:
        responses = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**kwargs)]),
                                                   timeout=CALL_TIMEOUT_S))
        return responses[0]

    services = [s.name for s in ask(list_services="").list_services_response.service]
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()
    for service in services:
        files = ask(file_containing_symbol=service).file_descriptor_response.file_descriptor_proto
        protos = [descriptor_pb2.FileDescriptorProto.FromString(raw) for raw in files]
        pending = [p for p in protos if p.name not in added]
        while pending:  # add files after their dependencies
            ready = [p for p in pending if all(d in added for d in p.dependency)]
            if not ready:
                for p in pending:  # dependencies reflection did not send: ask for them
                    for dep in p.dependency:
                        if dep not in added and dep not in {q.name for q in pending}:
                            raw = ask(file_by_filename=dep).file_descriptor_response.file_descriptor_proto
                            pending += [descriptor_pb2.FileDescriptorProto.FromString(r) for r in raw]
                ready = [p for p in pending if all(d in added for d in p.dependency)]
                if not ready:
                    raise RuntimeError(f"cannot resolve imports of {[p.name for p in pending]}")
            for p in ready:
                pool.Add(p)
                added.add(p.name)
            pending = [p for p in pending if p.name not in added]
    methods = []
    for service in services:
        sd = pool.FindServiceByName(service)
        m: MethodDescriptor
        for m in sd.methods:
            methods.append(Method(f"/{service}/{m.name}", m.input_type, m.client_streaming,
                                  m.server_streaming))
    return methods


# ------------------------------------------------------------------ strategies

_INTS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1), FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1), FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = field.type
    if t in _INTS:
        lo, hi = _INTS[t]
        return st.one_of(st.integers(lo, hi), st.sampled_from([0, 1, lo, hi]))
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        width = 64 if t == FieldDescriptor.TYPE_DOUBLE else 32
        return st.floats(allow_nan=True, allow_infinity=True, width=width)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_STRING:
        return st.text(max_size=40)
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FieldDescriptor.TYPE_ENUM:
        values = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(values), st.integers(-5, 1000))
    raise AssertionError(f"unhandled field type {t}")


def message_strategy(desc: Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    """Valid messages of type ``desc`` (bounded size and depth)."""
    cls = message_factory.GetMessageClass(desc)
    parts: dict[str, st.SearchStrategy[Any]] = {}
    for field in desc.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key = _scalar(field.message_type.fields_by_name["key"])
            vfield = field.message_type.fields_by_name["value"]
            if vfield.message_type is not None:
                continue
            parts[field.name] = st.dictionaries(key, _scalar(vfield), max_size=3)
        elif field.message_type is not None:
            if depth >= 3 or field.message_type.full_name.startswith("google.protobuf.Struct"):
                continue
            sub = message_strategy(field.message_type, depth + 1)
            parts[field.name] = st.lists(sub, max_size=2) if _repeated(field) else sub
        else:
            parts[field.name] = st.lists(_scalar(field), max_size=4) if _repeated(field) else _scalar(field)

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        msg = cls()
        for name, strategy in parts.items():
            if not draw(st.booleans()):
                continue
            value = draw(strategy)
            field = desc.fields_by_name[name]
            try:
                if field.message_type is not None and field.message_type.GetOptions().map_entry:
                    getattr(msg, name).update(value)
                elif field.message_type is not None:
                    if _repeated(field):
                        getattr(msg, name).extend(value)
                    else:
                        getattr(msg, name).CopyFrom(value)
                elif _repeated(field):
                    getattr(msg, name).extend(value)
                elif field.containing_oneof is None or not msg.WhichOneof(field.containing_oneof.name):
                    setattr(msg, name, value)
            except (ValueError, TypeError):
                continue  # e.g. an open enum value a closed enum refuses
        return msg

    return build()


def _repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "splice", "duplicate", "varint"]))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate" and data:
            del data[draw(st.integers(0, len(data) - 1)):]
        elif op == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "splice" and data:
            i, j = sorted(draw(st.lists(st.integers(0, len(data)), min_size=2, max_size=2)))
            data[i:j] = data[i:j][::-1]
        elif op == "duplicate":
            data.extend(bytes(data))
        elif op == "varint":  # a field header with a huge length or an overlong varint
            data += bytes([draw(st.integers(0, 255))]) + b"\xff" * draw(st.integers(1, 11))
    return bytes(data)


def payloads(method: Method) -> st.SearchStrategy[bytes]:
    valid = message_strategy(method.request).map(lambda m: m.SerializeToString())
    return st.one_of(valid, mutated(valid), st.binary(max_size=256))


# ------------------------------------------------------------------ sending


def _send(channel: grpc.Channel, method: Method, messages: list[bytes]) -> tuple[str, str]:
    """One call; returns (status name, failure or '')."""
    timeout = STREAM_TIMEOUT_S if method.server_streaming else CALL_TIMEOUT_S
    try:
        if not method.client_streaming and not method.server_streaming:
            channel.unary_unary(method.path)(messages[0], timeout=timeout)
        elif not method.client_streaming:
            call = channel.unary_stream(method.path)(messages[0], timeout=timeout)
            for _ in call:  # the first reply shows it works; a watch would go on forever
                call.cancel()
                break
        elif not method.server_streaming:
            channel.stream_unary(method.path)(iter(messages), timeout=timeout)
        else:
            call = channel.stream_stream(method.path)(iter(messages), timeout=timeout)
            for n, _ in enumerate(call):
                if n >= 4:
                    call.cancel()
                    break
    except grpc.RpcError as err:
        code = err.code()  # type: ignore[attr-defined]
        if code == grpc.StatusCode.CANCELLED:
            return "OK", ""
        if code == grpc.StatusCode.UNKNOWN:
            return code.name, f"{method.path}: UNKNOWN (unhandled exception?): {err.details()}"  # type: ignore[attr-defined]
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and not method.server_streaming:
            return code.name, f"{method.path}: hung past {timeout} s"
        if code == grpc.StatusCode.UNAVAILABLE:
            return code.name, f"{method.path}: server unavailable: {err.details()}"  # type: ignore[attr-defined]
        return code.name, ""
    return "OK", ""


def fuzz(channel: grpc.Channel, count: int, report: FuzzReport, *, seed: int | None = None,
         progress: Callable[[int], None] | None = None) -> None:
    """Send ``count`` generated or mutated requests over ``channel``; record into ``report``."""
    methods = discover(channel)
    if not methods:
        raise RuntimeError("the server lists no methods by reflection")
    strategies = {m.path: payloads(m) for m in methods}
    target = report.sent + count

    def batch() -> None:
        @settings(max_examples=max(1, target - report.sent), database=None, deadline=None,
                  phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck), derandomize=seed is not None)
        @given(data=st.data())
        def one(data: st.DataObject) -> None:
            method = data.draw(st.sampled_from(methods))
            n = data.draw(st.integers(1, 3)) if method.client_streaming else 1
            messages = [data.draw(strategies[method.path]) for _ in range(n)]
            code, failure = _send(channel, method, messages)
            report.sent += 1
            report.codes[code] += 1
            if failure:
                report.failures.append(failure)
            if progress is not None and report.sent % 1000 == 0:
                progress(report.sent)
        one()

    while report.sent < target and len(report.failures) <= 50:
        before = report.sent
        batch()
        if report.sent == before:
            break


def alive(channel: grpc.Channel) -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    except grpc.RpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def run(channel: grpc.Channel, pid: int | None, count: int, *, warmup: int = 1000,
        seed: int | None = None, progress: Callable[[int], None] | None = None) -> FuzzReport:
    """Warm up, take the server's RSS, fuzz ``count`` requests, settle, take its RSS again."""
    proc = psutil.Process(pid) if pid else None
    report = FuzzReport()
    fuzz(channel, warmup, report, seed=seed)
    time.sleep(0.5)
    report.rss_baseline = proc.memory_info().rss if proc else 0
    report.sent, report.codes = 0, collections.Counter()
    start = time.monotonic()
    fuzz(channel, count, report, seed=seed, progress=progress)
    report.seconds = time.monotonic() - start
    time.sleep(1.0)
    report.rss_after = proc.memory_info().rss if proc else 0
    report.alive_after = alive(channel)
    return report


# ------------------------------------------------------------------ a local server to fuzz


@contextmanager
def local_server(workdir: Path) -> Iterator[tuple[str, grpc.ChannelCredentials, int]]:
    """Start the real agent (``appliance agent serve``) under mTLS with a fresh PKI and a
    verified model installed; yield target, admin credentials and the agent's pid."""
    import subprocess
    import time

    import numpy as np

    from agent.config import InferenceSection
    from agent.inference.repository import ModelRepository
    from provisioning.bundle import create_bundle
    from provisioning.demo.models import affine_model, save_golden
    from provisioning.pki import init_pki, issue_client, issue_node
    from testsupport.secure_server import ROOT, mtls_config

    pki = workdir / "pki"
    init_pki(pki, organization="Fuzz Site")
    issue_node(pki, "node", dns=["localhost"], ips=["127.0.0.1"])
    issue_client(pki, "fuzzer", "admin")
    state = workdir / "state"
    model = affine_model(workdir / "affine.onnx")
    golden = save_golden(workdir / "golden.npz", {"x": np.ones((2, 4), np.float32)})
    bundle = create_bundle(model, name="affine", version="1", golden=[golden],
                           out=workdir / "affine.bundle")
    ModelRepository.for_state_dir(state, InferenceSection()).install(bundle.path)
    config = mtls_config(workdir, pki, extra=f'max_message_bytes = 1048576\nmetrics_port = 0\nhttp_port = 0\n'
                                          f'state_dir = "{state}"')
    log = workdir / "agent.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "provisioning.cli", "agent", "serve",
                                 "--config", str(config)], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        marker, deadline = "agent: serving on ", time.monotonic() + 120
        while marker not in (text := log.read_text(errors="replace")):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"agent did not start (exit {proc.returncode}):\n{text[-2000:]}")
            time.sleep(0.05)
        port = int(text.split(marker, 1)[1].split()[0].rsplit(":", 1)[1])
        d = pki / "issued" / "fuzzer"
        creds = grpc.ssl_channel_credentials((pki / "ca.crt").read_bytes(),
                                             (d / "fuzzer.key").read_bytes(),
                                             (d / "fuzzer.crt").read_bytes())
        yield f"localhost:{port}", creds, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", help="HOST:PORT of a running agent (default: start a test server)")
    parser.add_argument("--ca", type=Path)
    parser.add_argument("--cert", type=Path, help="an admin client certificate, so every RPC is reached")
    parser.add_argument("--key", type=Path)
    parser.add_argument("--insecure", action="store_true", help="plain loopback agent without TLS")
    parser.add_argument("--pid", type=int, help="the agent's process id, to watch its memory")
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--max-growth-mib", type=float, default=16.0)
    args = parser.parse_args()

    def go(target: str, creds: grpc.ChannelCredentials | None, pid: int | None) -> FuzzReport:
        options = [("grpc.max_send_message_length", 64 << 20)]
        with (grpc.secure_channel(target, creds, options) if creds else
              grpc.insecure_channel(target, options)) as ch:
            return run(ch, pid, args.count, progress=lambda n: print(f"fuzz: {n}", file=sys.stderr))

    if args.target:
        creds = None if args.insecure else grpc.ssl_channel_credentials(
            args.ca.read_bytes(), args.key.read_bytes(), args.cert.read_bytes())
        report = go(args.target, creds, args.pid)
    else:
        with tempfile.TemporaryDirectory() as tmp, local_server(Path(tmp)) as (target, creds, pid):
            report = go(target, creds, pid)
    print(json.dumps(report.to_json(), indent=2))
    growth = (report.rss_after - report.rss_baseline) / 2**20
    ok = not report.failures and report.alive_after and growth <= args.max_growth_mib
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
