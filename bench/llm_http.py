"""Benchmark: tokens/s and time to first token streamed through a real agent's HTTPS port
(``/v1/completions``, the official ``openai`` client over mTLS, server-sent events; the agent
serves the decoder as an installed generative bundle) vs the same engine driven in-process,
on a seeded decoder sized so that one token step takes >= 5 ms.

    python bench/llm_http.py [--runs 5] [--tokens 64] [--layers 8] [--hidden 512]

The baseline is measured in the same run, interleaved with the API runs so that drift on a
shared machine hits both; prints medians and the ratios (issue #15 asks for >= 0.9x tokens/s
and <= 10 ms added time to first token at concurrency 1).
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import openai

from agent.config import InferenceSection
from agent.inference.repository import ModelRepository
from agent.llm.engine import GenaiLanguageModel, Limits, open_genai_model
from agent.llm.types import ModelCard, Sampling
from provisioning.demo.llm_models import DecoderShape, write_decoder
from provisioning.genbundle import create_generative_bundle
from testsupport.http_support import site_pki, tls_config
from testsupport.inference_support import Agent, free_port

PROMPT = "The appliance keeps its models on the node and answers the fleet"


async def in_process(engine: GenaiLanguageModel, tokens: int) -> tuple[float, float]:
    """(seconds to the first chunk with text, tokens per second) from the engine itself."""
    start = time.perf_counter()
    first = 0.0
    count = 0
    async for chunk in engine.generate(PROMPT, Sampling(max_tokens=tokens, temperature=0)):
        if chunk.text and not first:
            first = time.perf_counter() - start
        count = chunk.completion_tokens or count
    return first, count / (time.perf_counter() - start)


def through_api(client: openai.OpenAI, tokens: int) -> tuple[float, float]:
    """The same, as a client of the HTTPS port sees it."""
    start = time.perf_counter()
    first = 0.0
    count = 0
    stream = client.completions.create(model="bench", prompt=PROMPT, max_tokens=tokens, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    for event in stream:
        if event.choices and event.choices[0].text and not first:
            first = time.perf_counter() - start
        if event.usage is not None:
            count = event.usage.completion_tokens
    return first, count / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    args = ap.parse_args()
    shape = DecoderShape(layers=args.layers, hidden=args.hidden, heads=8, ffn=4 * args.hidden,
                         context_length=512)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pki = site_pki(work / "pki", work / "other")
        folder = write_decoder(work / "llm", shape)
        bundle = work / "bench.bundle"
        create_generative_bundle(folder, bundle, kind="llm", name="bench", version="1.0.0",
                                 context_length=512, max_tokens=args.tokens, kv_budget_tokens=512 * 16,
                                 golden_tokens=2)
        state = work / "state"
        ModelRepository.for_state_dir(state, InferenceSection()).install(bundle)
        http_port = free_port()
        agent = Agent(state, "--config", str(tls_config(work, pki)), "--model", "bench", http_port=http_port)
        card = ModelCard("bench", "1.0.0", "llm", 512, 0, "fp32", 0)
        engine = GenaiLanguageModel(open_genai_model(folder), card, Limits(512, args.tokens, 512 * 16, 60.0))
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        d = pki / "issued" / "observer"
        ctx.load_cert_chain(str(d / "observer.crt"), str(d / "observer.key"))
        client = openai.OpenAI(base_url=f"https://localhost:{http_port}/v1", api_key="unused",
                               http_client=httpx.Client(verify=ctx, timeout=300), max_retries=0)
        try:
            asyncio.run(in_process(engine, 4))  # warm up both paths
            through_api(client, 4)
            base, api = [], []
            for _ in range(args.runs):  # interleaved, so that drift on a shared machine hits both
                base.append(asyncio.run(in_process(engine, args.tokens)))
                api.append(through_api(client, args.tokens))
        finally:
            client.close()
            engine.close()
            agent.stop()
    b_ttft, b_tps = statistics.median(f for f, _ in base), statistics.median(t for _, t in base)
    a_ttft, a_tps = statistics.median(f for f, _ in api), statistics.median(t for _, t in api)
    print(f"decoder: {shape.layers} layers, hidden {shape.hidden}; {args.tokens} tokens; "
          f"{args.runs} runs; medians; concurrency 1")
    print(f"token step in-process          {1000 / b_tps:8.2f} ms")
    print(f"engine in-process              {b_tps:8.1f} tok/s   first token {b_ttft * 1000:7.2f} ms")
    print(f"HTTPS /v1/completions stream   {a_tps:8.1f} tok/s   first token {a_ttft * 1000:7.2f} ms")
    print(f"ratio API / in-process         {a_tps / b_tps:8.3f}x   added TTFT "
          f"{(a_ttft - b_ttft) * 1000:+.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
