"""Benchmark: tokens/s and time to first token of the generative engine vs onnxruntime-genai
driven in-process, on a seeded decoder sized so that one token step takes >= 5 ms.

    python bench/llm.py [--runs 5] [--tokens 64] [--layers 8] [--hidden 512]

Prints medians over the runs, and ratios against the in-process baseline measured in the same
run: concurrency 1 (the engine's overhead: executor hops, detokenising, the async stream) and
the aggregate at concurrency 8 (what serving several users at once gains on this machine).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnxruntime_genai as og

from agent.llm.engine import GenaiLanguageModel, Limits, open_genai_model
from agent.llm.types import ModelCard, Sampling
from provisioning.demo.llm_models import DecoderShape, write_decoder

PROMPT = "The appliance keeps its models on the node and answers the fleet"


def in_process(model: og.Model, tokens: int) -> tuple[float, float]:
    """(seconds to the first token, tokens per second) driving og directly."""
    tok = og.Tokenizer(model)
    ids = tok.encode(PROMPT)
    stream = tok.create_stream()
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + tokens, do_sample=False)
    start = time.perf_counter()
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    first = 0.0
    n = 0
    while not gen.is_done():
        gen.generate_next_token()
        text = stream.decode(int(gen.get_next_tokens()[0]))
        n += 1
        if text and not first:  # as the engine's first chunk: the first token with text
            first = time.perf_counter() - start
    return first, n / (time.perf_counter() - start)


async def through_engine(engine: GenaiLanguageModel, tokens: int, concurrency: int) -> tuple[float, float]:
    """(median seconds to the first chunk, aggregate tokens per second) of ``concurrency`` streams."""
    firsts: list[float] = []

    async def one() -> int:
        start = time.perf_counter()
        first: float | None = None
        count = 0
        async for chunk in engine.generate(PROMPT, Sampling(max_tokens=tokens, temperature=0)):
            if first is None:  # what a client sees: the first chunk with text
                first = time.perf_counter() - start
            count = chunk.completion_tokens or count
        firsts.append(first or 0.0)
        return count

    start = time.perf_counter()
    counts = await asyncio.gather(*(one() for _ in range(concurrency)))
    return statistics.median(firsts), sum(counts) / (time.perf_counter() - start)


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
        folder = write_decoder(Path(tmp) / "llm", shape)
        model = open_genai_model(folder)
        card = ModelCard("bench", "1.0.0", "llm", 512, 0, "fp32", 0)
        engine = GenaiLanguageModel(model, card, Limits(512, args.tokens, 512 * 16, 60.0))
        in_process(model, 4)  # warm up
        asyncio.run(through_engine(engine, 4, 1))
        base, c1, c8 = [], [], []
        for _ in range(args.runs):  # interleaved, so that drift on a shared machine hits all three
            base.append(in_process(model, args.tokens))
            c1.append(asyncio.run(through_engine(engine, args.tokens, 1)))
            c8.append(asyncio.run(through_engine(engine, args.tokens, 8)))
        engine.close()
    step_ms = 1000 / statistics.median(t for _, t in base)
    b_ttft, b_tps = statistics.median(f for f, _ in base), statistics.median(t for _, t in base)
    e_ttft, e_tps = statistics.median(f for f, _ in c1), statistics.median(t for _, t in c1)
    a_tps = statistics.median(t for _, t in c8)
    print(f"decoder: {shape.layers} layers, hidden {shape.hidden}; {args.tokens} tokens; "
          f"{args.runs} runs; medians")
    print(f"token step in-process          {step_ms:8.2f} ms")
    print(f"in-process onnxruntime-genai   {b_tps:8.1f} tok/s   first token {b_ttft * 1000:7.2f} ms")
    print(f"engine, concurrency 1          {e_tps:8.1f} tok/s   first token {e_ttft * 1000:7.2f} ms")
    print(f"engine, concurrency 8 (total)  {a_tps:8.1f} tok/s")
    print(f"ratio engine/in-process c1     {e_tps / b_tps:8.3f}x   added TTFT "
          f"{(e_ttft - b_ttft) * 1000:+.2f} ms")
    print(f"ratio c8 total / c1            {a_tps / e_tps:8.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
