"""Benchmark: tokens/s and time to first token streamed through a real agent's HTTPS port
(``/v1/completions``, mTLS, server-sent events; the agent serves the decoder as an installed
generative bundle) vs the same decoder driven in-process with onnxruntime-genai (the baseline
issue #15 names, >= 0.9x tokens/s and <= 10 ms added time to first token at concurrency 1), on
a seeded decoder sized so that one token step takes >= 5 ms.

    python bench/llm_http.py [--runs 30] [--tokens 64] [--layers 14] [--hidden 512]

Five paths, interleaved run by run so that drift on a shared machine hits them all:
onnxruntime-genai in-process (the baseline), the agent's engine in-process, the API read by the
official ``openai`` client (its synchronous client, which closes the connection at ``[DONE]`` and
so opens a new TLS connection for every stream, and its asyncio client, which keeps it), and the
API read by a plain SSE loop (httpx and ``json``: the API without that client's own parsing,
which shares the cores with the server here).  Prints
medians, the ratios to the baseline, and the split of the difference into first token and
time per later token.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from agent.llm.engine import GenaiLanguageModel
from agent.llm.types import Sampling
from bench._llm_setup import (
    PROMPT,
    arguments,
    describe,
    https_agent,
    median_rate,
    median_step,
    median_ttft,
    og_in_process,
    open_engine,
    settle,
    shape_of,
    stream_completion,
    stream_completion_async,
    stream_completion_plain,
)
from provisioning.demo.llm_models import write_decoder


async def in_process(engine: GenaiLanguageModel, tokens: int) -> tuple[float, int, float]:
    """(seconds to the first chunk with text, tokens, seconds) from the engine itself."""
    start = time.perf_counter()
    first = 0.0
    count = 0
    async for chunk in engine.generate(PROMPT, Sampling(max_tokens=tokens, temperature=0)):
        if chunk.text and not first:
            first = time.perf_counter() - start
        count = chunk.completion_tokens or count
    return first, count, time.perf_counter() - start


def main() -> int:
    ap = arguments(__doc__)
    ap.set_defaults(runs=30, layers=14)
    args = ap.parse_args()
    shape = shape_of(args)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_decoder(Path(tmp) / "llm", shape)
        baseline, engine = open_engine(folder, args.tokens, args.intra_op_threads)
        with https_agent(folder, args.tokens, args.intra_op_threads) as served:
            client = served.client()
            loop = asyncio.new_event_loop()  # one loop for the async client: it keeps its connection
            aclient = served.async_client()
            plain = httpx.Client(verify=served.tls, timeout=300)
            paths: dict[str, Callable[[], tuple[float, int, float]]] = {
                "onnxruntime-genai in-process": lambda: og_in_process(baseline, args.tokens),
                "engine in-process": lambda: asyncio.run(in_process(engine, args.tokens)),
                "API, openai client": lambda: stream_completion(client, args.tokens),
                "API, openai async client": lambda: loop.run_until_complete(
                    stream_completion_async(aclient, args.tokens)),
                "API, plain SSE reader": lambda: stream_completion_plain(plain, served.base_url,
                                                                         args.tokens),
            }
            try:
                og_in_process(baseline, 4)  # warm up every path
                asyncio.run(in_process(engine, 4))
                stream_completion(client, 4)
                loop.run_until_complete(stream_completion_async(aclient, 4))
                stream_completion_plain(plain, served.base_url, 4)
                runs: dict[str, list[tuple[float, int, float]]] = {name: [] for name in paths}
                for _ in range(args.runs):  # interleaved, so that drift on a shared machine hits all
                    for name, run in paths.items():
                        settle()
                        runs[name].append(run())
            finally:
                plain.close()
                client.close()
                loop.run_until_complete(aclient.close())
                loop.close()
                engine.close()
    print(describe(shape, args) + "; concurrency 1")
    print(f"machine: {os.cpu_count()} CPUs, load average at the end "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    base = runs["onnxruntime-genai in-process"]
    b_tps, b_ttft, b_step = median_rate(base), median_ttft(base), median_step(base)
    print(f"token step in-process (after the first): {b_step * 1000:.2f} ms")
    print(f"{'path':30} {'tok/s':>8} {'ratio':>7} {'first token':>12} {'added':>9} {'step':>8} {'added':>8}")
    for name, rows in runs.items():
        tps, ttft, step = median_rate(rows), median_ttft(rows), median_step(rows)
        print(f"{name:30} {tps:8.1f} {tps / b_tps:6.3f}x {ttft * 1000:9.2f} ms "
              f"{(ttft - b_ttft) * 1000:+6.2f} ms {step * 1000:5.2f} ms {(step - b_step) * 1000:+5.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
