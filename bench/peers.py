#!/usr/bin/env python3
"""The agent against its Python peer, MLServer 1.7 (with an ONNX Runtime runtime), and against
ONNX Runtime called in-process: throughput, p50, p99 and server CPU per request, same client,
same run.  Prints figures and ratios; asserts nothing.

    PYTHONPATH=. python bench/peers.py [--seconds S] [--rounds N] [--json]

Models: tiny (y = 2x + 1 on 4 floats: a few us), mlp (4 dense layers of 1024: ~0.4 ms) and
heavy (6 dense layers of 2048); batch 1; concurrency 1 and 16.

- The client: one closed-loop load process per measurement (raw ``grpc.aio`` KServe v2
  ModelInfer, the request built once, ``raw_input_contents``), the same for both servers.
  perf_analyzer cannot drive MLServer: it asks for Triton's ModelConfig first, which
  MLServer does not implement.
- The agent: a real agent process with mTLS (site CA, client certificate, CRL), as shipped;
  heavy has dynamic batching (max 16, 500 us), tiny and mlp none.  Also ``agent-plain``:
  the same agent without TLS, the like-for-like row against MLServer.
- MLServer 1.7.x: in its own venv under /var/tmp (made from PyPI on first use; never a
  project dependency), with the minimal ONNX Runtime runtime below.  MLServer offers no TLS
  on its gRPC port, so it runs in plaintext.  Configuration chosen for it (the best found on
  2 cores): ``parallel_workers = 0`` (inference in the server process: each worker process
  adds an IPC hop per request, and tiny and mlp spend more in the hop than in compute),
  metrics off, adaptive batching for heavy (max 16, 500 us, as the agent), none for tiny and
  mlp (it only adds waiting at concurrency 1); ``--mlserver-workers N`` measures another
  choice.
- In-process: ``session.run`` in a loop (1 or 16 threads) in this process, same session
  settings; its CPU per request is this process's CPU over its runs.
- Server CPU per request: utime + stime of the server's processes (children included) over
  the measurement / requests answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MLSERVER_VENV = Path("/var/tmp/appliance-bench-mlserver")
# uvloop 0.22 stopped making an event loop on demand, and MLServer 1.7.1's parallel workers die
# at start asking for one ("There is no current event loop"): kept below it.
MLSERVER_PINS = ("mlserver>=1.7,<1.8", "onnxruntime==1.23.2", "uvloop<0.22")
MODELS = {"tiny": 4, "mlp": 1024, "heavy": 2048}  # input width
CONCURRENCY = (1, 16)
BATCH_MAX, BATCH_DELAY_US = 16, 500

RUNTIME = '''
"""A minimal ONNX Runtime runtime for MLServer (written for bench/peers.py)."""
import os

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OrtRuntime(MLModel):
    async def load(self) -> bool:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(os.environ.get("BENCH_ORT_THREADS", "0"))
        self._session = ort.InferenceSession(await get_model_uri(self._settings), opts,
                                             providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        results = self._session.run(self._outputs, feeds)
        return InferenceResponse(model_name=self.name, outputs=[
            NumpyCodec.encode_output(n, r) for n, r in zip(self._outputs, results)])
'''


# ------------------------------------------------------------------------------- the client

async def _client(url: str, model: str, width: int, concurrency: int, seconds: float,
                  tls: list[str]) -> dict[str, float]:
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    if tls:
        ca, key, cert = (Path(p).read_bytes() for p in tls)  # noqa: ASYNC240 - before the clock starts
        channel = grpc.aio.secure_channel(url, grpc.ssl_channel_credentials(ca, key, cert))
    else:
        channel = grpc.aio.insecure_channel(url)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[1, width])
    request.raw_input_contents.append(np.ones((1, width), np.float32).tobytes())
    start = time.perf_counter() + 1.0  # one second of warm-up
    end = start + seconds
    latencies: list[float] = []
    failed = 0

    async def caller() -> None:
        nonlocal failed
        while (t0 := time.perf_counter()) < end:
            try:
                await stub.ModelInfer(request, timeout=30)
            except grpc.aio.AioRpcError:
                failed += 1
                continue
            if t0 >= start:
                latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    await channel.close()
    return summary_of(latencies, seconds) | {"failed": failed}


def summary_of(latencies: list[float], seconds: float) -> dict[str, float]:
    lat = np.array(latencies) * 1e6
    return {"requests": len(lat), "throughput_per_s": len(lat) / seconds,
            "p50_us": float(np.percentile(lat, 50)), "p99_us": float(np.percentile(lat, 99))}


def process_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def tree(pid: int) -> list[int]:
    import psutil

    proc = psutil.Process(pid)
    return [pid, *(c.pid for c in proc.children(recursive=True))]


def drive(url: str, server_pid: int, model: str, concurrency: int, seconds: float,
          tls: list[str]) -> dict[str, float]:
    """One closed-loop client process against ``url``; the server's CPU taken around it."""
    pids = tree(server_pid)
    argv = [sys.executable, __file__, "--client", url, model, str(MODELS[model]), str(concurrency),
            str(seconds), *tls]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)  # the client's warm-up second
    cpu0 = process_cpu(pids)
    out, _ = proc.communicate(timeout=seconds + 120)
    cpu1 = process_cpu(pids)
    if proc.returncode != 0:
        raise RuntimeError(f"client failed against {url} {model}")
    result: dict[str, float] = json.loads(out)
    result["cpu_us_per_request"] = (cpu1 - cpu0) / max(1, result["requests"]) * 1e6
    return result


# ------------------------------------------------------------------------------- servers

def models(tmp: Path) -> dict[str, Path]:
    from provisioning.demo.models import affine_model, matmul_chain_model

    return {"tiny": affine_model(tmp / "tiny.onnx"),
            "mlp": matmul_chain_model(tmp / "mlp.onnx", width=1024, depth=4),
            "heavy": matmul_chain_model(tmp / "heavy.onnx", width=2048, depth=6)}


def start_agent(tmp: Path, files: dict[str, Path], pki: Any | None) -> Any:
    from agent.bundle import Batching
    from testsupport.inference_support import Agent, install, make_bundle

    state = tmp / ("state-tls" if pki else "state-plain")
    bundles = []
    for name, path in files.items():
        batching = Batching(BATCH_MAX, BATCH_DELAY_US) if name == "heavy" else None
        x = np.ones((1, MODELS[name]), np.float32)
        bundles.append(make_bundle(tmp, path, name, "1", {"x": x}, batching=batching))
    install(state, *bundles)
    if pki is None:
        return Agent(state)
    return Agent(state, "--config", str(pki.agent_toml(tmp / "agent.toml")))


def ensure_mlserver() -> Path:
    python = MLSERVER_VENV / "bin" / "python"
    if not (MLSERVER_VENV / "bin" / "mlserver").exists():
        print(f"creating {MLSERVER_VENV} with {', '.join(MLSERVER_PINS)} (first use only)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(MLSERVER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *MLSERVER_PINS], check=True)
    return MLSERVER_VENV / "bin" / "mlserver"


class MLServer:
    def __init__(self, tmp: Path, files: dict[str, Path], workers: int) -> None:
        from testsupport.inference_support import free_port

        root = tmp / "mlserver"
        root.mkdir()
        (root / "ortruntime.py").write_text(RUNTIME)
        self.port = free_port()
        (root / "settings.json").write_text(json.dumps({
            "http_port": free_port(), "grpc_port": self.port, "metrics_port": free_port(),
            "host": "127.0.0.1", "parallel_workers": workers, "metrics_endpoint": None,
            "debug": False, "load_models_at_startup": True}))
        for name, path in files.items():
            mdir = root / name
            mdir.mkdir()
            (mdir / "model.onnx").write_bytes(path.read_bytes())
            settings: dict[str, Any] = {"name": name, "implementation": "ortruntime.OrtRuntime",
                                        "parameters": {"uri": "./model.onnx"}}
            if name == "heavy":
                settings |= {"max_batch_size": BATCH_MAX, "max_batch_time": BATCH_DELAY_US / 1e6}
            (mdir / "model-settings.json").write_text(json.dumps(settings))
        self.log = (tmp / "mlserver.log").open("wb")
        self.proc = subprocess.Popen([str(ensure_mlserver()), "start", str(root)], cwd=root,
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=dict(os.environ, PYTHONPATH=str(root)))
        self.url = f"127.0.0.1:{self.port}"
        self._wait(list(files), tmp / "mlserver.log")

    def _wait(self, names: list[str], log: Path, timeout: float = 180) -> None:
        import tritonclient.grpc as tc

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlserver exited:\n{log.read_text()[-3000:]}")
            try:
                client = tc.InferenceServerClient(self.url)
                if all(client.is_model_ready(n) for n in names):
                    client.close()
                    return
                client.close()
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.5)
        raise RuntimeError(f"mlserver did not become ready:\n{log.read_text()[-3000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def in_process(path: Path, width: int, concurrency: int, seconds: float) -> dict[str, float]:
    from agent.ort import make_session

    session = make_session(path.read_bytes())
    x = np.ones((1, width), np.float32)
    for _ in range(20):
        session.run(None, {"x": x})
    latencies: list[float] = []
    end = time.perf_counter() + seconds

    def loop() -> None:
        while (t0 := time.perf_counter()) < end:
            session.run(None, {"x": x})
            latencies.append(time.perf_counter() - t0)

    cpu0 = process_cpu([os.getpid()])
    threads = [threading.Thread(target=loop) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu1 = process_cpu([os.getpid()])
    result = summary_of(latencies, seconds)
    result["cpu_us_per_request"] = (cpu1 - cpu0) / max(1, len(latencies)) * 1e6
    return result


# ------------------------------------------------------------------------------- the run

def run(args: argparse.Namespace, tmp: Path) -> dict[str, dict[str, float]]:
    from bench.request_cpu import Pki

    files = models(tmp)
    pki = Pki(tmp / "pki")
    tls = [str(pki.ca), str(pki.key), str(pki.cert)]
    runs: dict[str, list[dict[str, float]]] = {}
    servers: list[Any] = []
    try:
        agent = start_agent(tmp, files, pki)
        servers.append(agent)
        plain = start_agent(tmp, files, None)
        servers.append(plain)
        mls = MLServer(tmp, files, args.mlserver_workers)
        servers.append(mls)
        targets = [("agent", agent.url, agent.proc.pid, tls), ("agent-plain", plain.url, plain.proc.pid, []),
                   ("mlserver", mls.url, mls.proc.pid, [])]
        for _ in range(args.rounds):
            for model, width in MODELS.items():
                for conc in CONCURRENCY:
                    for server, url, pid, creds in targets:
                        key = f"{server} {model} c{conc}"
                        runs.setdefault(key, []).append(drive(url, pid, model, conc, args.seconds, creds))
                    key = f"in-process {model} c{conc}"
                    runs.setdefault(key, []).append(in_process(files[model], width, conc, args.seconds))
    finally:
        for server in servers:
            server.stop()
    return {k: {f: float(statistics.median(r[f] for r in v)) for f in v[0]} for k, v in runs.items()}


def ratios(results: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    out = {}
    for model in MODELS:
        for conc in CONCURRENCY:
            agent = results[f"agent {model} c{conc}"]["throughput_per_s"]
            out[f"{model} c{conc}"] = {
                "agent/mlserver": agent / results[f"mlserver {model} c{conc}"]["throughput_per_s"],
                "agent-plain/mlserver": results[f"agent-plain {model} c{conc}"]["throughput_per_s"]
                / results[f"mlserver {model} c{conc}"]["throughput_per_s"],
                "agent/in-process": agent / results[f"in-process {model} c{conc}"]["throughput_per_s"]}
    return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        url, model, width, conc, seconds, *tls = sys.argv[2:]
        MODELS[model] = int(width)
        print(json.dumps(asyncio.run(_client(url, model, int(width), int(conc), float(seconds), tls))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="measurement window per figure")
    ap.add_argument("--rounds", type=int, default=1, help="repeat everything; print medians")
    ap.add_argument("--mlserver-workers", type=int, default=0, help="MLServer parallel_workers")
    ap.add_argument("--json", action="store_true", help="print JSON only")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        results = run(args, Path(tmp))
    rat = ratios(results)
    if args.json:
        print(json.dumps({"results": results, "ratios": rat, "mlserver_workers": args.mlserver_workers},
                         indent=2))
        return 0
    print(f"closed loop, batch 1, {args.seconds:g} s windows, median of {args.rounds} round(s); "
          f"MLServer parallel_workers={args.mlserver_workers}, plaintext; agent with mTLS")
    print(f"{'server':12} {'model':6} {'conc':>4} {'req/s':>8} {'p50 us':>8} {'p99 us':>8} "
          f"{'CPU us/req':>10}")
    for model in MODELS:
        for conc in CONCURRENCY:
            for server in ("agent", "agent-plain", "mlserver", "in-process"):
                r = results[f"{server} {model} c{conc}"]
                print(f"{server:12} {model:6} {conc:>4} {r['throughput_per_s']:>8.0f} {r['p50_us']:>8.0f} "
                      f"{r['p99_us']:>8.0f} {r['cpu_us_per_request']:>10.0f}")
    print(f"{'model':6} {'conc':>4} {'agent/MLServer':>15} {'plain/MLServer':>15} {'agent/in-process':>17}")
    for key, r in rat.items():
        model, conc = key.split()
        print(f"{model:6} {conc[1:]:>4} {r['agent/mlserver']:>14.2f}x {r['agent-plain/mlserver']:>14.2f}x "
              f"{r['agent/in-process']:>16.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
