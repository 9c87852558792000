"""Benchmark: the batching gain (aggregate tokens/s at concurrency 8 over concurrency 1) of
onnxruntime-genai in-process, of the agent's HTTPS OpenAI API, and of a peer: llama-cpp-python's
OpenAI-compatible server on the same weights written as GGUF.

    python bench/llm_peer.py [--runs 5] [--tokens 64] [--layers 8] [--hidden 512]
                             [--peer-venv /var/tmp/llamacpp-venv] [--check-tokens 32] [--peer-threads 1]

The decoder is the seeded tiny one with GPT-2's GELU FFN, so that llama.cpp's ``gpt2``
architecture is the same model; bench/_gguf_peer.py (run by the peer venv's Python) writes its
weights and tokenizer as GGUF.  Before timing, a few prompts are tokenised and decoded greedily
by both runtimes and the token ids compared, so the figures are for the same computation.

The peer lives in its own venv, never in the project's (build it once; llama-cpp-python
compiles llama.cpp)::

    python3 -m venv /var/tmp/llamacpp-venv
    CMAKE_ARGS="-DGGML_NATIVE=OFF" /var/tmp/llamacpp-venv/bin/pip install "llama-cpp-python[server]" gguf

Without it the peer rows are skipped, saying so.  Clients are the official ``openai`` client,
one per concurrent stream, streaming ``/v1/completions`` greedily; in-process concurrency 8 is
one generator with a batch of 8.  Runs are interleaved; prints medians and ratios.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import numpy as np
import onnx
import onnxruntime_genai as og
import openai
from onnx import numpy_helper

from bench._llm_setup import (
    PROMPT,
    arguments,
    concurrently,
    describe,
    https_agent,
    median_rate,
    og_greedy,
    og_in_process,
    open_baseline,
    settle,
    shape_of,
    stream_completion,
)
from provisioning.demo.llm_models import SPECIAL_TOKENS, DecoderShape, write_decoder
from testsupport.inference_support import free_port

ROOT = Path(__file__).resolve().parent.parent
PEER_SCRIPT = ROOT / "bench" / "_gguf_peer.py"
CHECK_PROMPTS = (PROMPT, "Every bundle is signed", "The quick brown fox", "a client that leaves")
# The server's best settings for several users on this machine.  llama-cpp-python's server has
# no parallel slots or continuous batching (one Llama object behind a lock); what it does offer:
# threads for the token step and the prompt (--peer-threads; 1 by default: on a busy 2-core
# machine llama.cpp's OpenMP barriers spin while a thread waits for a core, and 2 threads ran
# 5-25x slower than 1), a float32 KV cache (as onnxruntime-genai's; its default is f16), and
# interrupt_requests off (on, a new request cuts the stream in progress short).
PEER_FLAGS = ("--n_ctx", "512", "--n_batch", "512", "--type_k", "0", "--type_v", "0",
              "--interrupt_requests", "False", "--verbose", "False")
PEER_SAMPLING = {"repeat_penalty": 1.0}  # its default 1.1 would not be greedy


def peer_python(venv: Path) -> tuple[Path | None, str]:
    """The peer venv's Python, or None and why not."""
    python = venv / "bin" / "python"
    if not python.exists():
        return None, f"no peer venv at {venv} (see this script's docstring to build one)"
    probe = subprocess.run([str(python), "-c", "import gguf, llama_cpp, llama_cpp.server; "
                            "print(llama_cpp.__version__, gguf.__name__)"],
                           capture_output=True, text=True, check=False)
    if probe.returncode:
        return None, f"{python} cannot import gguf and llama_cpp.server: {probe.stderr.strip()[-200:]}"
    return python, f"llama-cpp-python {probe.stdout.split()[0]}"


def export_gguf(python: Path, folder: Path, shape: DecoderShape, out: Path) -> Path:
    """The decoder's own weights (read back from its ONNX file) written as GGUF by the peer."""
    model = onnx.load(str(folder / "model.onnx"))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == 1}
    np.savez(out.parent / "weights.npz", **weights)
    config = {"hidden": shape.hidden, "layers": shape.layers, "heads": shape.heads, "ffn": shape.ffn,
              "context": shape.context_length, "eos": SPECIAL_TOKENS.index("<|endoftext|>")}
    (out.parent / "config.json").write_text(json.dumps(config))
    subprocess.run([str(python), str(PEER_SCRIPT), "write", str(out.parent / "weights.npz"),
                    str(folder / "tokenizer.json"), str(out.parent / "config.json"), str(out)],
                   check=True, stdin=subprocess.DEVNULL)
    return out


def compare_greedy(python: Path, model: og.Model, gguf: Path, tokens: int) -> bool:
    """Tokenise and decode each check prompt with both runtimes; print where they part."""
    done = subprocess.run([str(python), str(PEER_SCRIPT), "greedy", str(gguf), str(tokens), *CHECK_PROMPTS],
                          capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL)
    peer = json.loads(done.stdout)
    same = True
    for prompt, theirs in zip(CHECK_PROMPTS, peer, strict=True):
        ids, ours = og_greedy(model, prompt, tokens)
        if ids != theirs["prompt_ids"]:
            print(f"  {prompt!r}: prompt tokenised differently: genai {ids} llama.cpp {theirs['prompt_ids']}")
            same = False
            continue
        n = min(len(ours), len(theirs["ids"]))
        at = next((i for i in range(n) if ours[i] != theirs["ids"][i]), None)
        if at is None and len(ours) == len(theirs["ids"]):
            print(f"  {prompt!r}: {len(ids)} prompt tokens, {len(ours)} greedy tokens identical")
        else:
            at = n if at is None else at
            print(f"  {prompt!r}: greedy ids part at token {at} of {len(ours)}: "
                  f"genai {ours[max(0, at - 2):at + 3]} llama.cpp {theirs['ids'][max(0, at - 2):at + 3]}")
            same = False
    return same


@contextmanager
def peer_server(python: Path, gguf: Path, log: Path, threads: int) -> Iterator[str]:
    """``python -m llama_cpp.server`` on a loopback port; yields its /v1 base URL."""
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen([str(python), "-m", "llama_cpp.server", "--model", str(gguf),
                                 "--model_alias", "bench", "--host", "127.0.0.1", "--port", str(port),
                                 "--n_threads", str(threads), "--n_threads_batch", str(threads),
                                 *PEER_FLAGS], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}/v1"
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"llama_cpp.server exited {proc.returncode}:\n{log.read_text()[-2000:]}")
                try:
                    if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit(f"llama_cpp.server not ready in 120 s:\n{log.read_text()[-2000:]}")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, check=False).stdout.strip()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{cpu}, {len(os.sched_getaffinity(0))} CPUs, load average {load}; commit {rev or '?'}"


def main() -> int:
    ap = arguments(__doc__)
    ap.add_argument("--peer-venv", type=Path, default=Path("/var/tmp/llamacpp-venv"))
    ap.add_argument("--check-tokens", type=int, default=32)
    ap.add_argument("--peer-threads", type=int, default=1)
    args = ap.parse_args()
    shape = shape_of(args, "gelu")
    python, about = peer_python(args.peer_venv)
    print(describe(shape, args))
    print(f"machine: {machine()}")
    print(f"peer: {about}, {args.peer_threads} thread(s), {' '.join(PEER_FLAGS)}" if python
          else f"PEER SKIPPED: {about}")
    rows: dict[str, list[list[tuple[float, int, float]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = write_decoder(work / "llm", shape)
        model = open_baseline(folder, args.intra_op_threads)
        gguf = None
        if python:
            (work / "gguf").mkdir()
            gguf = export_gguf(python, folder, shape, work / "gguf" / "bench.gguf")
            print(f"greedy token ids, onnxruntime-genai vs llama.cpp ({args.check_tokens} tokens):")
            if not compare_greedy(python, model, gguf, args.check_tokens):
                print("  NOT the same ids: the peer's figures are for a near, not the same, computation")
        with (https_agent(folder, args.tokens, args.intra_op_threads) as served,
              _maybe_peer(python, gguf, work, args.peer_threads) as peer_url):
            def peer_client() -> openai.OpenAI:
                return openai.OpenAI(base_url=peer_url, api_key="unused", max_retries=0,
                                     http_client=httpx.Client(timeout=300))

            paths = {
                "onnxruntime-genai in-process": lambda n: og_in_process(model, args.tokens, n),
                "agent HTTPS /v1/completions": lambda n: concurrently(served.client, args.tokens, n),
            }
            if peer_url:
                paths["llama-cpp-python server"] = (
                    lambda n: concurrently(peer_client, args.tokens, n, PEER_SAMPLING))
                with peer_client() as c:  # the stream must count tokens: usage, or a full-length stop
                    stream_completion(c, 4, extra=PEER_SAMPLING)
            for run in paths.values():  # warm up
                run(1)
            rows = {name: [[], []] for name in paths}
            for _ in range(args.runs):  # interleaved, so that drift on a shared machine hits every path
                for name, run in paths.items():
                    settle()
                    rows[name][0].append(run(1))
                    settle()
                    rows[name][1].append(run(8))
    print(f"{'aggregate tokens/s':32} {'c=1':>9} {'c=8':>9} {'c8/c1':>7}")
    c1 = {}
    for name, (one, eight) in rows.items():
        c1[name] = median_rate(one)
        print(f"{name:32} {c1[name]:9.1f} {median_rate(eight):9.1f} {median_rate(eight) / c1[name]:6.2f}x")
    names = list(rows)
    for name in names[1:]:
        print(f"ratio c=1 {name} / {names[0]}: {c1[name] / c1[names[0]]:.3f}x")
    print(f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


@contextmanager
def _maybe_peer(python: Path | None, gguf: Path | None, work: Path,
                threads: int) -> Iterator[str]:
    if python is None or gguf is None:
        yield ""
        return
    with peer_server(python, gguf, work / "peer.log", threads) as url:
        yield url


if __name__ == "__main__":
    raise SystemExit(main())
