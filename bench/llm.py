"""Benchmark: tokens/s and time to first token of the generative engine vs onnxruntime-genai
driven in-process, on a seeded decoder sized so that one token step takes >= 5 ms.

    python bench/llm.py [--runs 5] [--tokens 64] [--layers 8] [--hidden 512]

Prints medians over the runs, and ratios against the in-process baseline measured in the same
run: concurrency 1 (the engine's overhead: executor hops, detokenising, the async stream) and
the aggregate at concurrency 8 (what serving several users at once gains on this machine).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.llm.engine import GenaiLanguageModel
from agent.llm.types import Sampling
from bench._llm_setup import (
    PROMPT,
    arguments,
    describe,
    median_rate,
    median_ttft,
    og_in_process,
    open_engine,
    settle,
    shape_of,
)
from provisioning.demo.llm_models import write_decoder


async def through_engine(engine: GenaiLanguageModel, tokens: int,
                         concurrency: int) -> tuple[float, int, float]:
    """(median seconds to the first chunk, tokens in all, seconds) of ``concurrency`` streams."""
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
    return statistics.median(firsts), sum(counts), time.perf_counter() - start


def main() -> int:
    args = arguments(__doc__).parse_args()
    shape = shape_of(args)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_decoder(Path(tmp) / "llm", shape)
        model, engine = open_engine(folder, args.tokens, args.intra_op_threads)
        og_in_process(model, 4)  # warm up
        asyncio.run(through_engine(engine, 4, 1))
        base, c1, c8 = [], [], []
        for _ in range(args.runs):  # interleaved, so that drift on a shared machine hits all three
            settle()
            base.append(og_in_process(model, args.tokens))
            settle()
            c1.append(asyncio.run(through_engine(engine, args.tokens, 1)))
            settle()
            c8.append(asyncio.run(through_engine(engine, args.tokens, 8)))
        engine.close()
    b_ttft, b_tps = median_ttft(base), median_rate(base)
    e_ttft, e_tps = median_ttft(c1), median_rate(c1)
    a_tps = median_rate(c8)
    print(describe(shape, args))
    print(f"token step in-process          {1000 / b_tps:8.2f} ms")
    print(f"in-process onnxruntime-genai   {b_tps:8.1f} tok/s   first token {b_ttft * 1000:7.2f} ms")
    print(f"engine, concurrency 1          {e_tps:8.1f} tok/s   first token {e_ttft * 1000:7.2f} ms")
    print(f"engine, concurrency 8 (total)  {a_tps:8.1f} tok/s")
    print(f"ratio engine/in-process c1     {e_tps / b_tps:8.3f}x   added TTFT "
          f"{(e_ttft - b_ttft) * 1000:+.2f} ms")
    print(f"ratio c8 total / c1            {a_tps / e_tps:8.3f}x")
    sizes = ", ".join(f"{rows}: {n}" for rows, n in sorted(engine.batching.sizes.items()))
    print(f"batches started (rows: count)  {sizes}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
