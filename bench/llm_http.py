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

import asyncio
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
    https_agent,
    median_rate,
    median_ttft,
    open_engine,
    shape_of,
    stream_completion,
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
    args = arguments(__doc__).parse_args()
    shape = shape_of(args)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_decoder(Path(tmp) / "llm", shape)
        _, engine = open_engine(folder, args.tokens, args.intra_op_threads)
        with https_agent(folder, args.tokens, args.intra_op_threads) as served:
            client = served.client()
            try:
                asyncio.run(in_process(engine, 4))  # warm up both paths
                stream_completion(client, 4)
                base, api = [], []
                for _ in range(args.runs):  # interleaved, so that drift on a shared machine hits both
                    base.append(asyncio.run(in_process(engine, args.tokens)))
                    api.append(stream_completion(client, args.tokens))
            finally:
                client.close()
                engine.close()
    b_ttft, b_tps = median_ttft(base), median_rate(base)
    a_ttft, a_tps = median_ttft(api), median_rate(api)
    print(describe(shape, args) + "; concurrency 1")
    print(f"token step in-process          {1000 / b_tps:8.2f} ms")
    print(f"engine in-process              {b_tps:8.1f} tok/s   first token {b_ttft * 1000:7.2f} ms")
    print(f"HTTPS /v1/completions stream   {a_tps:8.1f} tok/s   first token {a_ttft * 1000:7.2f} ms")
    print(f"ratio API / in-process         {a_tps / b_tps:8.3f}x   added TTFT "
          f"{(a_ttft - b_ttft) * 1000:+.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
