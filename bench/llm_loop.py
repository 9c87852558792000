"""Benchmark: how long the agent's event loop stalls while its engine decodes, with the engine
calling onnxruntime-genai through agent.llm.oga (ctypes, the GIL let go during a step) vs
through onnxruntime-genai's own Python module (which holds the GIL through each step).

    python bench/llm_loop.py [--runs 5] [--tokens 64] [--layers 8] [--hidden 512]

While one stream decodes, a ticker task on the same loop asks to wake every millisecond; its
lateness is what any other request on the node (a health call, a tensor inference, the next
SSE write) waits for the loop.  Prints, per binding, the median and 99th percentile lateness
and the stream's tokens/s, medians over the runs, bindings interleaved.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnxruntime_genai as og

from agent.llm import _batcher, engine, oga
from agent.llm.engine import GenaiLanguageModel, Limits, open_genai_model
from agent.llm.types import ModelCard, Sampling
from bench._llm_setup import CONTEXT, PROMPT, arguments, describe, settle, shape_of
from provisioning.demo.llm_models import write_decoder

TICK_S = 0.001


def use(binding: Any) -> None:
    """Make the engine call ``binding`` (both modules name their classes alike)."""
    engine.oga = _batcher.oga = binding  # type: ignore[attr-defined]


def load(folder: Path, binding: Any, tokens: int) -> GenaiLanguageModel:
    """The engine over ``binding``."""
    use(binding)
    card = ModelCard("bench", "1.0.0", "llm", CONTEXT, 0, "fp32", 0)
    return GenaiLanguageModel(open_genai_model(folder, binding=binding), card,
                              Limits(CONTEXT, tokens, CONTEXT * 16, 60.0), decode_threads=1)


async def one_run(model: GenaiLanguageModel, tokens: int) -> tuple[list[float], float]:
    """(lateness of each tick in seconds, tokens/s of the stream)."""
    late: list[float] = []
    done = False

    async def ticker() -> None:
        while not done:
            asked = time.perf_counter()
            await asyncio.sleep(TICK_S)
            late.append(time.perf_counter() - asked - TICK_S)

    tick = asyncio.ensure_future(ticker())
    start = time.perf_counter()
    count = 0
    async for chunk in model.generate(PROMPT, Sampling(max_tokens=tokens, temperature=0)):
        count = chunk.completion_tokens or count
    elapsed = time.perf_counter() - start
    done = True
    await tick
    return late, count / elapsed


def main() -> int:
    args = arguments(__doc__).parse_args()
    shape = shape_of(args)
    bindings = {"agent.llm.oga (ctypes)": oga, "onnxruntime_genai module": og}
    results: dict[str, list[tuple[list[float], float]]] = {name: [] for name in bindings}
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_decoder(Path(tmp) / "llm", shape)
        models = {name: load(folder, b, args.tokens) for name, b in bindings.items()}
        for name, model in models.items():  # warm up
            use(bindings[name])
            asyncio.run(one_run(model, 4))
        for _ in range(args.runs):
            for name, model in models.items():
                use(bindings[name])
                settle()
                results[name].append(asyncio.run(one_run(model, args.tokens)))
        for model in models.values():
            model.close()
    print(describe(shape, args))
    print(f"{'binding':28} {'loop late p50':>14} {'p99':>10} {'tok/s':>8}")
    for name, runs in results.items():
        p50 = statistics.median(statistics.median(late) for late, _ in runs)
        p99 = statistics.median(statistics.quantiles(late, n=100)[98] for late, _ in runs)
        tps = statistics.median(rate for _, rate in runs)
        print(f"{name:28} {p50 * 1000:11.2f} ms {p99 * 1000:7.2f} ms {tps:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
