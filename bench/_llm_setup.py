"""What the LLM benchmarks share: their options, the seeded decoder, onnxruntime-genai driven
in-process (the baseline), a real agent serving the decoder over HTTPS as an installed
generative bundle, and a client that times one streamed completion."""

from __future__ import annotations

import argparse
import json
import ssl
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
import onnxruntime_genai as og
import openai

from agent.config import InferenceSection
from agent.inference.repository import ModelRepository
from agent.llm.engine import GenaiLanguageModel, Limits, open_genai_model
from agent.llm.types import ModelCard
from provisioning.demo.llm_models import DecoderShape
from provisioning.genbundle import create_generative_bundle
from testsupport.http_support import site_pki, tls_config
from testsupport.inference_support import Agent, free_port

PROMPT = "The appliance keeps its models on the node and answers the fleet"
CONTEXT = 512


def arguments(doc: str | None) -> argparse.ArgumentParser:
    """The options every LLM benchmark takes (a script adds its own)."""
    ap = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intra-op-threads", type=int, default=0,
                    help="ONNX Runtime intra-op threads of every path (0: the agent's default, one "
                         "per physical core); 1 leaves a core to the server and the client")
    return ap


def shape_of(args: argparse.Namespace, activation: Literal["relu", "gelu"] = "relu") -> DecoderShape:
    return DecoderShape(layers=args.layers, hidden=args.hidden, heads=8, ffn=4 * args.hidden,
                        context_length=CONTEXT, activation=activation)


def describe(shape: DecoderShape, args: argparse.Namespace) -> str:
    threads = args.intra_op_threads or "default"
    return (f"decoder: {shape.layers} layers, hidden {shape.hidden}, {shape.activation} FFN; "
            f"{args.tokens} tokens; {args.runs} runs; medians; intra-op threads {threads}")


def open_baseline(folder: Path, threads: int = 0) -> og.Model:
    """The decoder opened with onnxruntime-genai's own Python module, with the session options
    the engine gives it (the engine calls the same library through agent.llm.oga)."""
    return open_genai_model(folder, intra_op_threads=threads, binding=og)


def open_engine(folder: Path, tokens: int, threads: int = 0) -> tuple[og.Model, GenaiLanguageModel]:
    """The decoder opened for the baseline, and the agent's engine over its own copy."""
    card = ModelCard("bench", "1.0.0", "llm", CONTEXT, 0, "fp32", 0)
    engine = GenaiLanguageModel(open_genai_model(folder, intra_op_threads=threads), card,
                                Limits(CONTEXT, tokens, CONTEXT * 16, 60.0))
    return open_baseline(folder, threads), engine


def og_in_process(model: og.Model, tokens: int, batch: int = 1) -> tuple[float, int, float]:
    """onnxruntime-genai driven directly: one generator decoding ``batch`` copies of the prompt
    greedily.  Returns (seconds to the first token with text, tokens in all, seconds)."""
    tok = og.Tokenizer(model)
    ids = tok.encode(PROMPT)
    stream = tok.create_stream()
    params = og.GeneratorParams(model)
    # seeded as the engine seeds every generator: unseeded, the Generator reads std::random_device,
    # 12-15 ms here (RDSEED traps on this VM), which would load the baseline's first token
    params.set_search_options(max_length=len(ids) + tokens, do_sample=False, batch_size=batch,
                              random_seed=0)
    start = time.perf_counter()
    gen = og.Generator(model, params)
    gen.append_tokens(np.tile(np.asarray(ids, np.int32), (batch, 1)) if batch > 1 else ids)
    first = 0.0
    steps = 0
    while not gen.is_done():
        gen.generate_next_token()
        text = stream.decode(int(gen.get_next_tokens()[0]))
        steps += 1
        if text and not first:  # as the engine's first chunk: the first token with text
            first = time.perf_counter() - start
    return first, steps * batch, time.perf_counter() - start


def og_greedy(model: og.Model, prompt: str, tokens: int) -> tuple[list[int], list[int]]:
    """(prompt token ids, greedy continuation ids, ending at the end-of-text token if any)."""
    ids = list(og.Tokenizer(model).encode(prompt))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    out: list[int] = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return ids, out


@dataclass
class Served:
    """The agent serving the decoder: its HTTPS base URL and an mTLS context for clients."""

    base_url: str
    tls: ssl.SSLContext

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key="unused", max_retries=0,
                             http_client=httpx.Client(verify=self.tls, timeout=300))

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key="unused", max_retries=0,
                                  http_client=httpx.AsyncClient(verify=self.tls, timeout=300))


@contextmanager
def https_agent(folder: Path, tokens: int, threads: int = 0) -> Iterator[Served]:
    """A real agent process (``appliance agent serve``) with the decoder folder installed as a
    signed-off generative bundle named ``bench``, its HTTPS port on loopback, mTLS with a site
    PKI made here; the client certificate is the observer's."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pki = site_pki(work / "pki", work / "other")
        bundle = work / "bench.bundle"
        create_generative_bundle(folder, bundle, kind="llm", name="bench", version="1.0.0",
                                 context_length=CONTEXT, max_tokens=tokens, kv_budget_tokens=CONTEXT * 16,
                                 golden_tokens=2)
        state = work / "state"
        ModelRepository.for_state_dir(state, InferenceSection()).install(bundle)
        http_port = free_port()
        config = tls_config(work, pki, f"[inference]\nintra_op_threads = {threads}" if threads else "")
        agent = Agent(state, "--config", str(config), "--model", "bench", http_port=http_port)
        try:
            ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
            d = pki / "issued" / "observer"
            ctx.load_cert_chain(str(d / "observer.crt"), str(d / "observer.key"))
            yield Served(f"https://localhost:{http_port}/v1", ctx)
        finally:
            agent.stop()


class _Tally:
    """What one streamed completion gave, event by event (the ``openai`` client's chunks):
    seconds to the first chunk with text, the finish reason, the server's ``usage`` count."""

    def __init__(self, model: str, tokens: int) -> None:
        self.model, self.tokens = model, tokens
        self.start = time.perf_counter()
        self.first = 0.0
        self.count = 0
        self.finish: str | None = None

    def saw(self, event: Any) -> None:
        if event.choices and event.choices[0].text and not self.first:
            self.first = time.perf_counter() - self.start
        if event.choices and event.choices[0].finish_reason:
            self.finish = event.choices[0].finish_reason
        if event.usage is not None:
            self.count = event.usage.completion_tokens

    def result(self) -> tuple[float, int, float]:
        """(first, tokens, seconds); the count is ``usage``'s, else ``max_tokens`` when the
        stream ended for length.

        Raises:
            RuntimeError: the server sent no usage and stopped before ``max_tokens``.
        """
        seconds = time.perf_counter() - self.start
        if not self.count:
            if self.finish != "length":
                raise RuntimeError(f"{self.model}: stream ended with {self.finish!r} and no usage: "
                                   "tokens unknown")
            self.count = self.tokens
        return self.first, self.count, seconds


def stream_completion(client: openai.OpenAI, tokens: int, model: str = "bench",
                      extra: dict[str, Any] | None = None) -> tuple[float, int, float]:
    """One streamed ``/v1/completions`` of :data:`PROMPT`, greedy.  Returns (seconds to the
    first chunk with text, completion tokens, seconds) (see :class:`_Tally`).

    Raises:
        RuntimeError: the server sent no usage and stopped before ``max_tokens``.
    """
    tally = _Tally(model, tokens)
    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=tokens, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body=extra)
    for event in stream:
        tally.saw(event)
    return tally.result()


async def stream_completion_async(client: openai.AsyncOpenAI, tokens: int,
                                  model: str = "bench") -> tuple[float, int, float]:
    """As :func:`stream_completion`, with the ``openai`` client's asyncio twin.  Unlike the
    synchronous client (openai 3.57), it reads an HTTP/1.1 stream to its end after ``[DONE]``
    and so keeps the connection for the next request: the difference between the two is the TLS
    handshake the synchronous client pays on every streamed request."""
    tally = _Tally(model, tokens)
    stream = await client.completions.create(model=model, prompt=PROMPT, max_tokens=tokens,
                                             temperature=0, stream=True,
                                             stream_options={"include_usage": True})
    async for event in stream:
        tally.saw(event)
    return tally.result()


def stream_completion_plain(http: httpx.Client, base_url: str, tokens: int,
                            model: str = "bench") -> tuple[float, int, float]:
    """As :func:`stream_completion`, read with a plain SSE loop (httpx and ``json``) instead of
    the ``openai`` client: what the API costs without that client's own parsing.  The stream is
    read to its end, so the connection is kept for the next request (the ``openai`` client closes
    it at ``[DONE]``, which makes every streamed request a new TLS handshake)."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = 0.0
    count = 0
    with http.stream("POST", f"{base_url}/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event["choices"] and event["choices"][0]["text"] and not first:
                first = time.perf_counter() - start
            if event.get("usage"):
                count = event["usage"]["completion_tokens"]
    seconds = time.perf_counter() - start
    if not count:
        raise RuntimeError(f"{model}: the stream sent no usage: tokens unknown")
    return first, count, seconds


def concurrently(make: Callable[[], openai.OpenAI], tokens: int, n: int,
                 extra: dict[str, Any] | None = None) -> tuple[float, int, float]:
    """``n`` streams at once, each on its own client and thread.  Returns (median seconds to
    the first chunk, completion tokens in all, wall seconds from the first start to the last end)."""
    clients = [make() for _ in range(n)]
    results: list[tuple[float, int, float]] = []
    errors: list[Exception] = []
    gate = threading.Barrier(n + 1)

    def one(c: openai.OpenAI) -> None:
        gate.wait()
        try:
            results.append(stream_completion(c, tokens, extra=extra))
        except Exception as exc:  # noqa: BLE001 - re-raised below, on the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    gate.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    for c in clients:
        c.close()
    if errors:
        raise errors[0]
    return statistics.median(r[0] for r in results), sum(r[1] for r in results), wall


SETTLE_S = 0.05


def settle() -> None:
    """Wait before a timed run until the previous path's threads are idle.  ONNX Runtime's pool
    workers spin for about 10 ms after their last work before they sleep; on this 2-core machine
    a run that starts in that window shares the cores with another path's spinning threads
    (measured: a baseline run started 2 ms after an agent stream took 10 ms longer to its first
    token; started 10 ms after, nothing).  Without the pause, each path pays for the one before
    it, which the interleaving turns into a bias against whichever path follows another process."""
    time.sleep(SETTLE_S)


def median_rate(runs: Sequence[tuple[float, int, float]]) -> float:
    """Median tokens per second over runs of (ttft, tokens, seconds)."""
    return statistics.median(n / s for _, n, s in runs)


def median_ttft(runs: Sequence[tuple[float, int, float]]) -> float:
    return statistics.median(f for f, _, _ in runs)


def median_step(runs: Sequence[tuple[float, int, float]]) -> float:
    """Median seconds per token after the first: (seconds - ttft) / (tokens - 1)."""
    return statistics.median((s - f) / (n - 1) for f, n, s in runs)
