"""The CUDA provider through the agent itself, against the CPU provider, in one run.

Needs a machine with an NVIDIA GPU, onnxruntime-gpu whose CUDA libraries load there, and this
project installed from its wheel.  Run it with that installation first on ``PYTHONPATH``:

    python3 bench/gpu_provider.py [--width 1024] [--depth 16] [--batch 64] [--requests 100] [--json]

1. makes a compute-heavy model (a chain of dense layers) and a bundle whose golden vectors
   come from the CPU provider (``bundle create``); the bundle's tolerance is ``--atol/--rtol``;
2. signs it into a local TUF registry;
3. starts ``appliance agent serve`` twice from the installed package, once with
   ``--providers CPUExecutionProvider`` and once with ``--providers CUDAExecutionProvider``.
   Each installs the bundle from the registry with full verification, which runs the golden
   vectors on that agent's own serving session;
4. over the KServe v2 gRPC API: the CUDA agent's model reports CUDAExecutionProvider, both
   agents answer the same random requests, and the answers agree within the bundle's tolerance;
   then ``--requests`` sequential requests to each, median and p90, and the ratio;
5. over ``appliance.v1.Node``: the CUDA agent's health comes from real NVML.

Exits 1 when a check fails, naming it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
MODEL = "chain"
VERSION = "1.0.0"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Agent:
    """``appliance agent serve`` from the installed package, in its own process."""

    def __init__(self, work: Path, provider: str, registry: Path, root: Any, name: str) -> None:
        from agent.updates.client import RegistryClient

        self.state = work / f"state-{name}"
        RegistryClient.initialize(self.state, root)
        self.log = work / f"agent-{name}.log"
        port = _port()
        argv = [sys.executable, "-m", "provisioning.cli", "agent", "serve", "--state-dir",
                str(self.state), "--listen", "127.0.0.1", "--port", str(port), "--metrics-port",
                str(_port()), "--providers", provider, "--model", f"{MODEL}@{VERSION}",
                "--registry", str(registry)]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        self.url = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while "agent: serving on" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the {provider} agent did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return int(self.proc.wait())


def _request(x: np.ndarray[Any, Any]) -> Any:
    from agent.proto import grpc_service_pb2 as pb

    req = pb.ModelInferRequest(model_name=MODEL)
    req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    return req


def _infer(stub: Any, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    reply = stub.ModelInfer(_request(x), timeout=60)
    return np.frombuffer(reply.raw_output_contents[0], dtype=np.float32).reshape(x.shape)


def _timed(stub: Any, x: np.ndarray[Any, Any], n: int) -> list[float]:
    req = _request(x)
    for _ in range(5):
        stub.ModelInfer(req, timeout=60)  # warm-up: CUDA kernels, allocator, thread pools
    seconds = []
    for _ in range(n):
        t = time.perf_counter()
        stub.ModelInfer(req, timeout=60)
        seconds.append(time.perf_counter() - t)
    return seconds


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import grpc
    import onnxruntime

    import agent
    from agent.bundle import Accelerator, Batching, Tolerance
    from agent.ort import usable_providers
    from agent.proto import grpc_service_pb2 as pb
    from agent.proto import grpc_service_pb2_grpc as pbg
    from agent.proto import node_pb2, node_pb2_grpc
    from provisioning.bundle import create_bundle
    from provisioning.demo.models import matmul_chain_model, save_golden
    from provisioning.registry import init_registry, publish_bundle, trusted_root

    found: dict[str, Any] = {
        "agent_package": str(Path(agent.__file__).parent),
        "onnxruntime": onnxruntime.__version__,
        "usable_providers": list(usable_providers()),
        "model": f"{args.depth} x MatMul({args.width}x{args.width})+Tanh, batch {args.batch}",
        "bundle allows TF32": args.tf32,
    }
    under_test = args.provider
    if under_test not in usable_providers():
        raise SystemExit(f"{under_test} not usable here: {usable_providers()}")
    rng = np.random.default_rng(1)
    model = matmul_chain_model(work / "chain.onnx", width=args.width, depth=args.depth)
    golden = save_golden(work / "golden.npz",
                         {"x": rng.standard_normal((args.batch, args.width)).astype(np.float32)})
    bundle = create_bundle(model, name=MODEL, version=VERSION, golden=[golden],
                           out=work / f"{MODEL}.bundle", batching=Batching(max_batch_size=args.batch),
                           tolerance=Tolerance(atol=args.atol, rtol=args.rtol),
                           accelerator=Accelerator(tf32=args.tf32),
                           description="GPU provider check: dense chain")
    registry = work / "registry"
    init_registry(registry)
    publish_bundle(registry, bundle.path)
    root = trusted_root(registry)
    roles = {"baseline": CPU, "tested": under_test}
    agents: dict[str, _Agent] = {}
    try:
        for role, provider in roles.items():
            t = time.perf_counter()
            agents[role] = _Agent(work, provider, registry / "published", root, name=role)
            found[f"{role}: start to serving (s)"] = round(time.perf_counter() - t, 2)
        stubs = {r: pbg.GRPCInferenceServiceStub(grpc.insecure_channel(a.url)) for r, a in agents.items()}
        for role, stub in stubs.items():
            cfg = stub.ModelConfig(pb.ModelConfigRequest(name=MODEL), timeout=30).config
            used = cfg.parameters["execution_provider"].string_value
            found[f"{role}: execution provider"] = used
            if used != roles[role]:
                raise SystemExit(f"the {role} agent (--providers {roles[role]}) serves on {used}")
        worst = 0.0
        for _ in range(10):
            x = rng.standard_normal((args.batch, args.width)).astype(np.float32)
            want, got = _infer(stubs["baseline"], x), _infer(stubs["tested"], x)
            worst = max(worst, float(np.max(np.abs(want - got))))
            if not np.allclose(got, want, atol=args.atol, rtol=args.rtol):
                raise SystemExit(f"{under_test} and CPU answers differ beyond atol={args.atol} "
                                 f"rtol={args.rtol}: max |diff| {worst:.3g}")
        found["max |tested - CPU| over 10 requests"] = worst
        found["bundle tolerance"] = {"atol": args.atol, "rtol": args.rtol}
        medians = {}
        for role, stub in stubs.items():
            s = sorted(_timed(stub, x, args.requests))
            medians[role] = s[len(s) // 2]
            found[f"{role}: request latency (ms)"] = {"median": round(s[len(s) // 2] * 1e3, 3),
                                                      "p90": round(s[int(len(s) * 0.9)] * 1e3, 3)}
        found["median CPU / median tested"] = round(medians["baseline"] / medians["tested"], 2)
        node = node_pb2_grpc.NodeStub(grpc.insecure_channel(agents["tested"].url))
        health = node.GetHealth(node_pb2.GetHealthRequest(), timeout=30)
        found["tested: nvml available"] = health.nvml_available
        found["tested: gpus"] = [{"name": g.name, "temperature_c": g.temperature_c,
                                  "memory_used_bytes": g.memory_used_bytes,
                                  "power_w": round(g.power_w, 1),
                                  "utilization_gpu_pct": g.utilization_gpu_pct} for g in health.gpus]
        found["tested: health"] = node_pb2.Verdict.Name(health.overall)
        if under_test != CPU and (not health.nvml_available or not health.gpus):
            raise SystemExit(f"the {under_test} agent's health has no NVML data: {health.nvml_reason}")
    finally:
        for role, a in agents.items():
            found[f"{role}: agent exit code"] = a.stop()
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--provider", default=CUDA,
                        help="the provider under test, against CPUExecutionProvider (default: CUDA)")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--atol", type=float, default=1e-3, help="the bundle's tolerance")
    parser.add_argument("--rtol", type=float, default=1e-3, help="the bundle's tolerance")
    parser.add_argument("--tf32", action="store_true",
                        help="make the bundle allow TF32 (accelerator.tf32); default: full FP32")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", type=Path, help="work here and keep it (logs) instead of a temp dir")
    args = parser.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        found = run(args, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="gpu-provider-") as work:
            found = run(args, Path(work))
    if args.json:
        print(json.dumps(found, indent=2))
    else:
        for key, value in found.items():
            print(f"{key:<40} {value}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
