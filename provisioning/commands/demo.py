"""``appliance demo``: the whole path on one machine, in a temporary directory.

1. make a small ONNX model (y = 2x + 1) and bundle it with golden vectors;
2. sign it into a fresh local TUF registry and give a node state directory its trusted root;
3. start the agent on loopback (free ports), which installs the model from the registry
   with full verification (signatures, hashes, golden vectors on its own session);
4. run inference through Triton's official client, print outputs, statistics and the
   execution provider;
5. the same path for a generative bundle: a tiny decoder LLM made on the spot, bundled with
   golden token ids, signed into the same registry and installed by the agent, which streams a
   chat reply to the official ``openai`` client on its HTTP port (plain HTTP: the demo's agent
   listens on loopback without TLS, as its gRPC port does);
6. stop the agent (SIGTERM) and remove everything.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle import Batching
from agent.errors import ApplianceError
from provisioning.demo.bench import LLM, LLM_VERSION, tiny_llm_bundle
from provisioning.output import emit_json, examples, print_table
from provisioning.ports import free_loopback_port

__all__ = ["register", "run_demo"]

MODEL = "affine"
VERSION = "1"  # an integer version: perf_analyzer matches statistics by integer versions
CHAT_PROMPT = "What does the appliance keep?"


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser("demo", **examples(
            "appliance demo",
            "appliance demo --image --work /var/tmp/appliance-hil --json"),
        parents=[common],
                       help="sign a small model and a tiny LLM into a local registry, serve them, "
                       "run inference and a streamed chat on them")
    p.add_argument("--work", type=Path, default=None, metavar="DIR",
                   help="the quick demo: keep everything in this new or empty directory (default: a "
                   "temporary one, removed); --image: the bench's cache "
                   "(default: $APPLIANCE_HIL_CACHE or /var/tmp/appliance-hil)")
    p.add_argument("--requests", type=int, default=20, help="inference requests to send (default: 20)")
    i = p.add_argument_group("the main job (--image): build the default image, boot it, ask it")
    i.add_argument("--image", action="store_true",
                   help="build images/hil.toml with a site PKI and registry of its own (cached in "
                   "--work), boot it under qemu and query its agent over mTLS with the fleet CLI "
                   "(needs root and the system packages; the first run syncs a mirror: ~10 min)")
    i.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto", help="qemu accelerator")
    i.add_argument("--bound", type=float, default=900.0,
                   help="seconds from power-on for the agent to answer (default 900)")
    i.add_argument("--keep-running", action="store_true", help="leave the machine running")
    p.set_defaults(handler=_demo)


def _step(message: str) -> None:
    print(f"demo: {message}", file=sys.stderr, flush=True)


def _free_port() -> int:
    """A TCP port free on loopback right now (see :func:`provisioning.ports.free_loopback_port`)."""
    return free_loopback_port()


def _make_bundle(work: Path) -> Path:
    from provisioning.bundle import create_bundle
    from provisioning.demo.models import affine_model, save_golden

    model = affine_model(work / "model" / "affine.onnx")
    golden = save_golden(work / "model" / "golden.npz", {"x": np.arange(8, dtype=np.float32).reshape(2, 4)})
    bundle = create_bundle(model, name=MODEL, version=VERSION, golden=[golden],
                           out=work / "model" / f"{MODEL}-{VERSION}.bundle",
                           batching=Batching(max_batch_size=8, max_queue_delay_us=500),
                           description="demo: y = 2x + 1")
    return bundle.path


def publish_to_registry(work: Path, bundles: list[Path], state: Path) -> dict[str, Any]:
    """Sign ``bundles`` into a new registry under ``work`` and initialise the node's trust.

    Returns what the agent needs: ``{"source": ..., "mode": "signed local TUF registry"}``.

    Raises:
        ApplianceError: the registry refused the bundle.
    """
    from agent.updates.client import RegistryClient
    from provisioning.registry import init_registry, publish_bundle, trusted_root

    registry = work / "registry"
    init_registry(registry)
    for bundle in bundles:
        publish_bundle(registry, bundle)
    RegistryClient.initialize(state, trusted_root(registry))
    return {"mode": "signed local TUF registry", "source": str(registry / "published")}


@dataclass
class _AgentProcess:
    proc: subprocess.Popen[bytes]
    log: Path
    url: str
    metrics_url: str
    http_url: str  # the HTTP port's base (plain HTTP on loopback)


@contextlib.contextmanager
def _agent(state: Path, work: Path, source: str) -> Iterator[_AgentProcess]:
    # The metrics and HTTP ports are picked here and bound by the agent a moment later; another
    # process can take one in between (the test suite starts many servers at once). The agent
    # then exits naming the port, and a start on fresh ports is the cure, not an error to show.
    for attempt in range(1, _PORT_ATTEMPTS + 1):
        log = work / f"agent-{attempt}.log"
        metrics_port, http_port = _free_port(), _free_port()
        proc = _spawn_agent(state, source, log, metrics_port, http_port)
        try:
            try:
                url = _wait_ready(proc, log)
            except ApplianceError:
                if attempt < _PORT_ATTEMPTS and proc.poll() is not None and _port_taken(log):
                    _step(f"a port was taken before the agent bound it; starting again ({attempt})")
                    continue
                raise
            yield _AgentProcess(proc, log, url, f"http://127.0.0.1:{metrics_port}/metrics",
                                f"http://127.0.0.1:{http_port}")
            return
        finally:
            _stop(proc)
    raise AssertionError("unreachable: the last attempt raises or yields")


_PORT_ATTEMPTS = 3


def _port_taken(log: Path) -> bool:
    return "address already in use" in log.read_text(errors="replace").lower()


def _spawn_agent(state: Path, source: str, log: Path, metrics_port: int,
                 http_port: int) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "provisioning.cli", "agent", "serve", "--state-dir", str(state),
            "--listen", "127.0.0.1", "--port", "0", "--metrics-port", str(metrics_port),
            "--http-port", str(http_port), "--model", f"{MODEL}@{VERSION}",
            "--model", f"{LLM}@{LLM_VERSION}"]
    if source:
        argv += ["--registry", source]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> str:
    marker = "agent: serving on "
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if marker in text:
            return text.split(marker, 1)[1].split()[0]
        if proc.poll() is not None:
            tail = "\n".join(text.splitlines()[-15:])
            raise ApplianceError(f"the agent exited with code {proc.returncode}:\n{tail}")
        time.sleep(0.05)
    raise ApplianceError(f"the agent did not start within {timeout:.0f} s (log: {log})")


def _infer(url: str, requests: int) -> dict[str, Any]:
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(url)
    try:
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        latencies = []
        y = None
        for _ in range(max(1, requests)):
            inp = tc.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            start = time.perf_counter()
            y = client.infer(MODEL, [inp]).as_numpy("y")
            latencies.append(time.perf_counter() - start)
        config = client.get_model_config(MODEL, as_json=True)["config"]
        stats = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
        meta = client.get_model_metadata(MODEL, as_json=True)
    finally:
        client.close()
    assert y is not None
    if not np.allclose(y, x * 2 + 1):
        raise ApplianceError(f"the model answered {y.tolist()}, expected {(x * 2 + 1).tolist()}")
    infer = stats["inference_stats"]
    return {
        "model": MODEL,
        "version": config["parameters"]["version"]["string_value"],
        "versions": meta["versions"],
        "provider": config["parameters"]["execution_provider"]["string_value"],
        "bundle_sha256": config["parameters"]["bundle_sha256"]["string_value"],
        "input": x.tolist(),
        "output": y.tolist(),
        "client_p50_ms": round(float(np.median(latencies)) * 1000, 3),
        "statistics": {
            "requests": int(infer["success"]["count"]),
            "inference_count": int(stats["inference_count"]),
            "execution_count": int(stats["execution_count"]),
            "avg_request_us": round(int(infer["success"]["ns"])
                                    / max(1, int(infer["success"]["count"])) / 1000, 1),
            "avg_compute_us": round(int(infer["compute_infer"]["ns"])
                                    / max(1, int(infer["compute_infer"]["count"])) / 1000, 1),
        },
    }


def _chat(http_url: str) -> dict[str, Any]:
    """Ask the LLM for a streamed chat reply with the official ``openai`` client."""
    import openai

    # the openai client's HTTP library logs every request at INFO; the demo prints its own
    # line for the one it makes (the library is httpx, or its fork httpx2 in newer clients)
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with openai.OpenAI(base_url=f"{http_url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        start = time.perf_counter()
        stream = client.chat.completions.create(
            model=LLM, messages=[{"role": "user", "content": CHAT_PROMPT}], max_tokens=24,
            temperature=0, stream=True, stream_options={"include_usage": True})
        pieces: list[str] = []
        first_ms = None
        usage = None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if first_ms is None:
                    first_ms = (time.perf_counter() - start) * 1000
                pieces.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
    if usage is None or usage.completion_tokens <= 0 or not pieces:
        raise ApplianceError(f"{LLM}: the streamed reply was empty (usage {usage})")
    return {"model": LLM, "version": LLM_VERSION, "prompt": CHAT_PROMPT, "reply": "".join(pieces),
            "chunks": len(pieces), "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "first_token_ms": round(first_ms or 0.0, 1)}


def run_demo(work: Path, requests: int = 20) -> dict[str, Any]:
    """Run the demo in ``work``; return its findings.

    Raises:
        ApplianceError: any step failed (the message says which and why).
    """
    state = work / "state"
    _step("making a small ONNX model and a bundle with golden vectors")
    bundle = _make_bundle(work)
    _step("making a tiny decoder LLM and a bundle with golden token ids")
    llm = tiny_llm_bundle(work / "llm")
    _step("signing both bundles into a local registry")
    registry = publish_to_registry(work, [bundle, llm], state)
    _step("starting the agent on loopback")
    with _agent(state, work, registry["source"]) as agent:
        _step(f"agent listening on {agent.url}; running {requests} requests with tritonclient")
        result = _infer(agent.url, requests)
        import urllib.request

        with urllib.request.urlopen(agent.metrics_url, timeout=10) as resp:  # noqa: S310 - loopback URL we built
            metrics = resp.read().decode()
        result["metrics_sample"] = [ln for ln in metrics.splitlines()
                                    if ln.startswith("nv_inference_count{")]
        _step(f"asking {LLM} for a streamed chat reply with the openai client on {agent.http_url}")
        result["chat"] = _chat(agent.http_url)
    _step("agent stopped")
    if agent.proc.returncode != 0:
        raise ApplianceError(f"the agent exited with code {agent.proc.returncode} on SIGTERM")
    result["registry"] = registry["mode"]
    result["agent"] = agent.url
    return result


def _image_demo(args: argparse.Namespace) -> int:
    from provisioning.demo.bench import DEFAULT_CACHE
    from provisioning.demo.image import run_image_demo

    if os.geteuid() != 0:
        raise ApplianceError("appliance demo --image: building an image needs root "
                             "(mmdebstrap, loop devices, a network namespace)")
    result = run_image_demo(args.work or DEFAULT_CACHE, accel=args.accel, bound=args.bound,
                            keep_running=args.keep_running, show=not args.json)
    if args.json:
        emit_json(result)
    else:
        print(f"image {result['image']}: built/cached in {result['prepare_seconds']} s, agent answered "
              f"{result['power_on_to_answer_seconds']} s after power-on ({result['accel']})")
    return 0


def _demo(args: argparse.Namespace) -> int:
    if args.image:
        return _image_demo(args)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        if any(args.work.iterdir()):
            raise ApplianceError(f"--work {args.work}: not empty")
        result = run_demo(args.work, args.requests)
    else:
        with tempfile.TemporaryDirectory(prefix="appliance-demo-") as tmp:
            result = run_demo(Path(tmp), args.requests)
    if args.json:
        emit_json(result)
        return 0
    s = result["statistics"]
    print(f"model     {result['model']} {result['version']}  (sha256 {result['bundle_sha256'][:16]}...)")
    print(f"registry  {result['registry']}")
    print(f"provider  {result['provider']}")
    print(f"input     {result['input']}")
    print(f"output    {result['output']}")
    print_table(["requests", "inferences", "executions", "avg request µs", "avg compute µs",
                 "client p50 ms"],
                [[s["requests"], s["inference_count"], s["execution_count"], s["avg_request_us"],
                  s["avg_compute_us"], result["client_p50_ms"]]])
    for line in result["metrics_sample"]:
        print(f"metrics   {line}")
    c = result["chat"]
    print(f"chat      {c['model']} {c['version']}: {c['prompt']!r} -> {c['reply']!r}")
    print(f"          streamed in {c['chunks']} chunks; {c['prompt_tokens']} prompt + "
          f"{c['completion_tokens']} completion tokens; first token after {c['first_token_ms']} ms")
    return 0
