"""Helpers for the inference tests: bundles of small models, a state dir, an agent process."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle import GOLDEN, Accelerator, Batching, FileEntry, encode_golden, read_bundle, write_bundle
from agent.config import InferenceSection
from agent.inference.repository import ModelRepository
from provisioning.bundle import create_bundle
from provisioning.demo.models import save_golden
from provisioning.ports import free_loopback_port

ROOT = Path(__file__).resolve().parent.parent


def bytes_read() -> int | None:
    """Bytes this process has read through system calls so far (``rchar`` of /proc/self/io),
    if the kernel says: a test's check that a file was read once, not twice."""
    try:
        lines = Path("/proc/self/io").read_text().splitlines()
    except OSError:
        return None
    return next((int(ln.split()[1]) for ln in lines if ln.startswith("rchar:")), None)


def free_port() -> int:
    """A TCP port free on loopback right now (see :func:`provisioning.ports.free_loopback_port`)."""
    return free_loopback_port()


def make_bundle(tmp: Path, model: Path, name: str, version: str, inputs: dict[str, np.ndarray],
                batching: Batching | None = None, accelerator: Accelerator | None = None) -> Path:
    # .npz files hold BYTES as fixed-size byte strings (object arrays would need pickle)
    inputs = {k: v.astype(np.bytes_) if v.dtype == object else v for k, v in inputs.items()}
    golden = save_golden(tmp / f"{name}-{version}.npz", inputs)
    return create_bundle(model, name=name, version=version, golden=[golden],
                         out=tmp / f"{name}-{version}.bundle", batching=batching,
                         accelerator=accelerator).path


def with_wrong_golden(bundle_path: Path, out: Path) -> Path:
    """A copy of a bundle whose golden outputs are off by one (hashes consistent): what a
    packager with a broken build machine might ship."""
    bundle = read_bundle(bundle_path)
    cases = bundle.golden_cases()
    bad = [dataclasses.replace(c, outputs={k: v + 1 for k, v in c.outputs.items()}) for c in cases]
    specs = {s.name: s.datatype for s in bundle.manifest.inputs + bundle.manifest.outputs}
    golden = encode_golden(bad, specs)
    files = dict(bundle.manifest.files)
    files[GOLDEN] = FileEntry(hashlib.sha256(golden).hexdigest(), len(golden))
    manifest = dataclasses.replace(bundle.manifest, files=files)
    buf = io.BytesIO()
    write_bundle(buf, manifest, bundle.read_model(), golden)
    out.write_bytes(buf.getvalue())
    return out


def place_unchecked(state: Path, bundle_path: Path) -> Path:
    """Put a bundle's files into the store as if an install had verified it (to test the
    checks made at load time, which must refuse it on their own)."""
    bundle = read_bundle(bundle_path)
    m = bundle.manifest
    vdir = state / "models" / m.name / m.version
    bundle.extract(vdir)
    (vdir / "install.json").write_text(
        f'{{"name": "{m.name}", "version": "{m.version}", "sha256": "{bundle.sha256}", '
        f'"length": {bundle.length}, "installed_at": 0, "verified": true}}\n')
    (state / "models" / m.name / "active").write_text(m.version + "\n")
    return vdir


def install(state: Path, *bundles: Path, activate: bool = True) -> None:
    repo = ModelRepository.for_state_dir(state, InferenceSection())
    for b in bundles:
        repo.install(b, activate=activate)


@contextlib.contextmanager
def notify_socket(path: Path, watchdog_usec: int) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    """A systemd notify socket bound at ``path`` (60 s receive timeout) and the environment
    that points an agent started from this tree at it with a watchdog of ``watchdog_usec``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(60)
        env = dict(os.environ, NOTIFY_SOCKET=str(path), WATCHDOG_USEC=str(watchdog_usec),
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("WATCHDOG_PID", None)
        yield sock, env


def stop_notified(proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
    """SIGTERM ``proc``; assert that it notifies STOPPING=1 after any WATCHDOG=1 and exits 0."""
    proc.send_signal(signal.SIGTERM)
    while (msg := sock.recv(256).decode()) == "WATCHDOG=1":
        pass
    assert msg == "STOPPING=1", msg
    assert proc.wait(60) == 0


class Agent:
    """``appliance agent serve`` in its own process; stderr goes to a file.  ``entry``: the
    module that runs it (``("agent",)``: the node's own ``appliance-agent``)."""

    def __init__(self, state: Path, *args: str, metrics_port: int = 0, http_port: int = 0,
                 env: dict[str, str] | None = None,
                 entry: Sequence[str] = ("provisioning.cli", "agent")) -> None:
        self.log_path = state.parent / f"agent-{os.getpid()}-{time.monotonic_ns()}.log"
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env.update(env or {})
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *entry, "serve", "--state-dir", str(state),
             "--port", "0", "--metrics-port", str(metrics_port), "--http-port", str(http_port), *args],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)
        self.port = self._wait_ready()
        self.metrics_port = metrics_port
        self.http_port = http_port
        self.url = f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_ready(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        marker = "agent: serving on 127.0.0.1:"
        while time.monotonic() < deadline:
            text = self.log()
            if marker in text:
                return int(text.split(marker, 1)[1].split()[0])
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        self.proc.kill()
        raise RuntimeError(f"agent did not become ready:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def stub(url: str) -> tuple[Any, Any]:
    """A raw GRPCInferenceService stub built from Triton's own client modules, and its pb2."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    channel = grpc.insecure_channel(url, options=[("grpc.max_receive_message_length", 64 << 20)])
    return service_pb2_grpc.GRPCInferenceServiceStub(channel), service_pb2


def raw_request(pb: Any, model: str, inputs: Sequence[tuple[str, str, list[int], bytes]], **kw: Any) -> Any:
    req = pb.ModelInferRequest(model_name=model, **kw)
    for name, datatype, shape, data in inputs:
        req.inputs.add(name=name, datatype=datatype, shape=shape)
        req.raw_input_contents.append(data)
    return req
