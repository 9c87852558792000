"""The generative runtime on the tiny decoder and encoder made here: real onnxruntime-genai."""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import onnxruntime_genai as og
import pytest

from agent.errors import BundleError, CapacityError, InferenceError, NotFoundError
from agent.llm.budget import KvBudget
from agent.llm.embedding import OrtEmbeddingModel
from agent.llm.engine import GenaiLanguageModel, Limits
from agent.llm.load import load_embedding_model, load_language_model
from agent.llm.served import ServedGenerative
from agent.llm.stops import StopScanner
from agent.llm.types import Chunk, Message, ModelCard, Sampling
from provisioning.demo.llm_models import write_decoder, write_encoder

LLM_CARD = ModelCard("tiny-llm", "1.0.0", "llm", 256, 0, "fp32", 0)
EMB_CARD = ModelCard("tiny-embed", "1.0.0", "embedding", 256, 0, "fp32", 0)
PROMPT = "The appliance keeps its models"


def _members(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_decoder(tmp_path_factory.mktemp("decoder"))


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_encoder(tmp_path_factory.mktemp("encoder"))


def _llm(folder: Path, budget: int = 4096, wait_s: float = 30.0) -> GenaiLanguageModel:
    return load_language_model(folder, _members(folder), LLM_CARD, Limits(256, 64, budget, wait_s),
                               intra_op_threads=1, decode_threads=4)


@pytest.fixture(scope="module")
def llm(decoder_dir: Path) -> GenaiLanguageModel:
    return _llm(decoder_dir)


async def _collect(stream: AsyncIterator[Chunk]) -> list[Chunk]:
    return [c async for c in stream]


def _run(model: GenaiLanguageModel, prompt: str, sampling: Sampling) -> list[Chunk]:
    return asyncio.run(_collect(model.generate(prompt, sampling)))


def _ids(chunks: list[Chunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def test_greedy_matches_onnxruntime_genai_in_process(llm: GenaiLanguageModel, decoder_dir: Path) -> None:
    chunks = _run(llm, PROMPT, Sampling(max_tokens=24, temperature=0))
    assert chunks == _run(llm, PROMPT, Sampling(max_tokens=24, temperature=0))
    last = chunks[-1]
    assert last.finish_reason in ("length", "stop") and last.completion_tokens == len(_ids(chunks))
    assert last.prompt_tokens == len(llm.encode(PROMPT))
    config = og.Config(str(decoder_dir))
    config.clear_providers()
    model = og.Model(config)
    prompt = og.Tokenizer(model).encode(PROMPT)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 24, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    direct = []
    while not gen.is_done():
        gen.generate_next_token()
        direct.append(int(gen.get_next_tokens()[0]))
    assert _ids(chunks) == direct


def test_seed_makes_sampling_repeatable(llm: GenaiLanguageModel) -> None:
    def sample(seed: int) -> list[int]:
        return _ids(_run(llm, PROMPT, Sampling(max_tokens=32, temperature=1.5, seed=seed)))

    assert sample(7) == sample(7)
    assert len({tuple(sample(s)) for s in (1, 2, 3)}) > 1


def test_unseeded_sampling_differs_from_request_to_request(llm: GenaiLanguageModel) -> None:
    """Without a seed each request samples afresh (the engine seeds every generator from the
    OS's generator, not from a constant)."""
    runs = {tuple(_ids(_run(llm, PROMPT, Sampling(max_tokens=32, temperature=1.5)))) for _ in range(4)}
    assert len(runs) == 4


def test_stop_string_ends_the_completion_before_it(llm: GenaiLanguageModel) -> None:
    full = "".join(c.text for c in _run(llm, PROMPT, Sampling(max_tokens=48, temperature=0)))
    assert len(full) >= 8
    stop = full[4:6]
    chunks = _run(llm, PROMPT, Sampling(max_tokens=48, temperature=0, stop=(stop, "\x00never")))
    assert "".join(c.text for c in chunks) == full[:full.find(stop)]
    assert chunks[-1].finish_reason == "stop"


def test_stop_scanner_holds_text_that_may_start_a_stop_string() -> None:
    scan = StopScanner(("END",))
    assert scan.feed("abcE") == ("abc", False)
    assert scan.feed("N") == ("", False)
    assert scan.feed("x") == ("ENx", False)
    assert scan.feed("yyEND tail") == ("yy", True)
    assert StopScanner(()).feed("E") == ("E", False)
    held = StopScanner(("ab",))
    assert held.feed("xa") == ("x", False) and held.flush() == "a"


def test_aclose_frees_the_sequence(llm: GenaiLanguageModel) -> None:
    async def main() -> None:
        stream = llm.generate(PROMPT, Sampling(max_tokens=64, temperature=0.8, seed=1))
        await stream.__anext__()
        assert llm.active_sequences == 1
        await stream.aclose()  # type: ignore[attr-defined]
        assert llm.active_sequences == 0
        assert llm.budget.in_use == 0

    asyncio.run(main())


def test_cancelled_task_frees_the_sequence(llm: GenaiLanguageModel) -> None:
    async def main() -> None:
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in llm.generate(PROMPT, Sampling(max_tokens=64, temperature=0.8, seed=2)):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):  # the step in flight returns, then the generator is freed
            if llm.active_sequences == 0:
                break
            await asyncio.sleep(0.01)
        assert llm.active_sequences == 0 and llm.budget.in_use == 0

    asyncio.run(main())


def test_deadline_ends_the_stream_as_cancelled(llm: GenaiLanguageModel) -> None:
    async def main() -> list[Chunk]:
        return await _collect(llm.generate(PROMPT, Sampling(max_tokens=64), deadline=time.monotonic()))

    chunks = asyncio.run(main())
    assert chunks[-1].finish_reason == "cancelled" and llm.active_sequences == 0


def test_32_concurrent_streams_complete_within_the_kv_budget(decoder_dir: Path) -> None:
    model = _llm(decoder_dir, budget=6 * 64 + 64)  # room for about six sequences at once
    prompts = [f"{PROMPT} {i}" for i in range(32)]

    async def main() -> list[list[Chunk]]:
        return await asyncio.gather(*(_collect(model.generate(p, Sampling(max_tokens=40, temperature=0.7,
                                                                           seed=i)))
                                      for i, p in enumerate(prompts)))

    try:
        results = asyncio.run(main())
    finally:
        model.close()
    assert all(r[-1].finish_reason in ("length", "stop") for r in results)
    assert model.budget.peak <= model.budget.total
    assert model.budget.peak > 2 * 64  # several ran at once
    assert model.active_sequences == 0 and model.budget.in_use == 0


def test_full_budget_refuses_after_the_bounded_wait(decoder_dir: Path) -> None:
    model = load_language_model(decoder_dir, _members(decoder_dir), LLM_CARD, Limits(256, 200, 256, 0.05),
                                intra_op_threads=1)

    async def main() -> None:
        first = model.generate(PROMPT, Sampling(max_tokens=200))
        await first.__anext__()
        with pytest.raises(CapacityError, match="KV-cache budget of 256 tokens"):
            await model.generate(PROMPT, Sampling(max_tokens=200)).__anext__()
        await first.aclose()  # type: ignore[attr-defined]

    try:
        asyncio.run(main())
    finally:
        model.close()
    assert model.budget.in_use == 0


def test_requests_the_model_cannot_take_are_refused(llm: GenaiLanguageModel) -> None:
    with pytest.raises(InferenceError, match="context length is 256"):
        llm.generate("fox " * 400, Sampling())
    with pytest.raises(InferenceError, match=r"max_tokens 65 is outside 1\.\.64"):
        llm.generate(PROMPT, Sampling(max_tokens=65))
    with pytest.raises(InferenceError, match="temperature"):
        llm.generate(PROMPT, Sampling(temperature=math.nan))
    with pytest.raises(InferenceError, match=r"top_k 4294967296 is outside 0\.\.1048576"):
        llm.generate(PROMPT, Sampling(top_k=1 << 32))
    with pytest.raises(InferenceError, match="prompt is empty"):
        llm.generate("", Sampling())
    with pytest.raises(InferenceError, match="role 'robot'"):
        llm.chat_prompt([Message("robot", "hi")])


def test_chat_prompt_follows_the_bundle_template(llm: GenaiLanguageModel) -> None:
    prompt = llm.chat_prompt([Message("system", "be brief"), Message("user", "hello")])
    assert prompt == "<|system|>be brief<|end|><|user|>hello<|end|><|assistant|>"


def test_embeddings_are_unit_length_and_deterministic(encoder_dir: Path) -> None:
    model = load_embedding_model(encoder_dir, _members(encoder_dir), "model.onnx", EMB_CARD,
                                 intra_op_threads=1)
    texts = ["the quick brown fox", "a signed bundle", "the quick brown fox"]
    first = asyncio.run(model.embed(texts))
    again = asyncio.run(model.embed(texts[:1]))
    vectors = np.array(first.vectors)
    assert vectors.shape == (3, 64)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.allclose(vectors[0], vectors[2], atol=1e-6)  # padding in the batch changes nothing
    assert np.allclose(vectors[0], again.vectors[0], atol=1e-6)
    assert not np.allclose(vectors[0], vectors[1])
    assert first.prompt_tokens > 3
    with pytest.raises(InferenceError, match="context length is 256"):
        asyncio.run(model.embed(["fox " * 400]))


def test_served_models_are_found_by_name_and_kind(llm: GenaiLanguageModel, encoder_dir: Path) -> None:
    served = ServedGenerative()
    served.add(llm)
    served.add(load_embedding_model(encoder_dir, _members(encoder_dir), "model.onnx", EMB_CARD))
    assert [c.name for c in served.cards()] == ["tiny-embed", "tiny-llm"]
    assert served.language_model("tiny-llm") is llm
    assert isinstance(served.embedding_model("tiny-embed"), OrtEmbeddingModel)
    with pytest.raises(NotFoundError, match="served: tiny-llm"):
        served.language_model("tiny-embed")
    assert served.remove("tiny-embed") and not served.remove("tiny-embed")


# ---------------------------------------------------------------- hostile folders

def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _edit_config(folder: Path, edit: dict[str, object]) -> None:
    path = folder / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["decoder"]["session_options"].update(edit)
    path.write_text(json.dumps(config))


def test_config_key_that_may_name_a_file_is_refused(decoder_dir: Path, tmp_path: Path) -> None:
    folder = _copy(decoder_dir, tmp_path / "m")
    _edit_config(folder, {"custom_ops_library": "/tmp/evil.so"})
    with pytest.raises(BundleError, match=r"session_options: unknown key.*'custom_ops_library'"):
        _llm(folder)


def test_graph_outside_the_folder_is_refused(decoder_dir: Path, tmp_path: Path) -> None:
    folder = _copy(decoder_dir, tmp_path / "m")
    path = folder / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["decoder"]["filename"] = "../model.onnx"
    path.write_text(json.dumps(config))
    with pytest.raises(BundleError, match=re.escape("'../model.onnx' is not a file of the bundle")):
        _llm(folder)


def test_external_data_outside_the_bundle_is_refused(decoder_dir: Path, tmp_path: Path) -> None:
    import onnx

    folder = _copy(decoder_dir, tmp_path / "m")
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "/etc/appliance/tls/node.key"
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(BundleError, match="outside the bundle"):
        _llm(folder)


def test_unloading_ends_streams_and_refuses_new_ones(decoder_dir: Path) -> None:
    model = _llm(decoder_dir)

    async def main() -> list[Chunk]:
        stream = model.generate(PROMPT, Sampling(max_tokens=64, temperature=0.8, seed=3))
        chunks = [await stream.__anext__()]
        model.close()
        chunks += [c async for c in stream]
        return chunks

    chunks = asyncio.run(main())
    assert chunks[-1].finish_reason == "cancelled" and model.active_sequences == 0
    with pytest.raises(NotFoundError, match="was unloaded"):
        model.generate(PROMPT, Sampling())


def test_budget_waiters_are_served_in_order_and_a_cancelled_one_leaves() -> None:
    from agent.llm.budget import KvBudget

    budget = KvBudget(100, "m")

    async def main() -> list[str]:
        order: list[str] = []
        await budget.acquire(80, 1)

        async def want(tag: str, tokens: int) -> None:
            await budget.acquire(tokens, 5)
            order.append(tag)

        gone = asyncio.create_task(want("cancelled", 50))
        first = asyncio.create_task(want("first", 60))
        second = asyncio.create_task(want("second", 30))
        await asyncio.sleep(0)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        budget.release(80)  # 60 fits, then 30 fits beside it
        await asyncio.gather(first, second)
        return order

    assert asyncio.run(main()) == ["first", "second"]
    assert budget.in_use == 90 and budget.peak == 90 and budget.sequences == 2
    with pytest.raises(CapacityError, match="more than the model's whole budget"):
        asyncio.run(budget.acquire(101, 1))


def test_budget_extends_only_within_its_total_and_counts_no_sequence() -> None:
    budget = KvBudget(100, "m")
    asyncio.run(budget.acquire(60, 1))
    assert budget.try_extend(40) and not budget.try_extend(1)
    assert (budget.in_use, budget.sequences, budget.peak) == (100, 1, 100)
    budget.release(40, 0)
    budget.release(60)
    assert (budget.in_use, budget.sequences) == (0, 0)


def test_a_step_waiting_for_a_thread_when_the_model_closes_ends_the_stream_as_cancelled(
        decoder_dir: Path) -> None:
    """close() drops queued steps; their streams end with a "cancelled" chunk and free their
    budget, never with a CancelledError the caller did not ask for."""
    model = load_language_model(decoder_dir, _members(decoder_dir), LLM_CARD, Limits(256, 64, 4096, 5.0),
                                intra_op_threads=1, decode_threads=1)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        release.wait()

    async def main() -> tuple[list[Chunk], list[Chunk]]:
        running = model.generate(PROMPT, Sampling(max_tokens=64, temperature=0))
        first = [await anext(running)]
        model._pool.submit(hold)  # the one decode thread is busy: the next steps queue
        queued = model.generate(PROMPT, Sampling(max_tokens=8))
        waiting = asyncio.ensure_future(_collect(queued))  # its prefill waits for the thread
        rest = asyncio.ensure_future(_collect(running))  # its next step waits too
        work = model._pool._work_queue  # type: ignore[attr-defined]
        for _ in range(3000):  # both queued behind the held thread, however loaded the machine
            if holding.is_set() and model.active_sequences == 2 and work.qsize() >= 2:
                break
            await asyncio.sleep(0.01)
        assert holding.is_set() and model.active_sequences == 2 and work.qsize() >= 2
        model.close()
        release.set()
        return await waiting, first + await rest

    waiting, running = asyncio.run(main())
    assert [(c.finish_reason, c.completion_tokens) for c in waiting] == [("cancelled", 0)]
    assert running[-1].finish_reason == "cancelled"
    assert model.active_sequences == 0 and model.budget.in_use == 0
