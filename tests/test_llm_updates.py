"""Hot-swap updates of generative bundles (issue 15): a signed LLM or embedding bundle offered by
a real TUF registry is verified, streamed into the store, opened, golden-checked on the model
object that then serves, and switched to while streams on the old version finish.

The two LLM versions are the tiny decoder with different seeds, so their greedy token ids
differ: which version answered is read off the tokens (and the bundle's own golden ids say
what each version must give).  In-process tests drive the real UpdateManager and repository
(a suspended stream keeps a sequence open across the switch deterministically); the last
test does it through a real agent with two serving processes on loopback.
"""

from __future__ import annotations

import asyncio
import json
import queue
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from agent.config import InferenceSection, UpdatesSection
from agent.errors import BundleError, NotFoundError
from agent.events import EventLog
from agent.inference.repository import ModelRepository
from agent.inference.store import ModelStore
from agent.llm.bundle import GenManifest, GoldenPrompt, write_bundle
from agent.llm.engine import GenaiLanguageModel
from agent.llm.types import Chunk, Sampling
from agent.proto import node_pb2, node_pb2_grpc
from agent.updates.manager import Outcome, UpdateManager
from provisioning.demo.llm_models import write_decoder, write_encoder
from provisioning.genbundle import DEFAULT_PROMPTS, DEFAULT_TEXTS, create_generative_bundle
from testsupport.inference_support import Agent
from testsupport.updates_support import affine_bundle_at, node_state, registry_with, state_hash

LLM = "tiny-llm"
EMBED = "tiny-embed"
PROMPT = DEFAULT_PROMPTS[0]  # its greedy ids are each bundle's first golden case
LIMITS: dict[str, Any] = {"context_length": 256, "max_tokens": 64, "kv_budget_tokens": 2048}
EMBED_LIMITS: dict[str, Any] = {"context_length": 256, "max_tokens": 1, "kv_budget_tokens": 256}


@dataclass(frozen=True)
class Made:
    path: Path
    manifest: GenManifest

    @property
    def golden_ids(self) -> tuple[int, ...]:
        return self.manifest.golden_prompts[0].token_ids


@dataclass(frozen=True)
class Bundles:
    llm: dict[str, Made]  # version -> bundle; 1.0.0 and 1.0.1 differ (seeds), 1.0.2 lies about its golden ids
    embed: dict[str, Made]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    root = tmp_path_factory.mktemp("llm-updates")
    llm, embed = {}, {}
    for version, seed in (("1.0.0", 0), ("1.0.1", 1)):
        folder = write_decoder(root / f"dec-{seed}", seed=seed)
        out = root / f"{LLM}-{version}.bundle"
        llm[version] = Made(out, create_generative_bundle(folder, out, kind="llm", name=LLM, version=version,
                                                          **LIMITS))
    # 1.0.2: the decoder of 1.0.1, signed as released, but its recorded ids are not what it decodes
    good = llm["1.0.1"].manifest
    wrong = tuple((t + 1) % 320 for t in good.golden_prompts[0].token_ids)
    lying = replace(good, version="1.0.2",
                    golden_prompts=(GoldenPrompt(PROMPT, wrong), *good.golden_prompts[1:]))
    out = root / f"{LLM}-1.0.2.bundle"
    with out.open("wb") as handle:
        write_bundle(handle, lying, root / "dec-1")
    llm["1.0.2"] = Made(out, lying)
    for version, seed in (("1.0.0", 1), ("1.0.1", 2)):
        folder = write_encoder(root / f"enc-{seed}", seed=seed)
        out = root / f"{EMBED}-{version}.bundle"
        embed[version] = Made(out, create_generative_bundle(folder, out, kind="embedding", name=EMBED,
                                                            version=version, **EMBED_LIMITS))
    assert llm["1.0.0"].golden_ids != llm["1.0.1"].golden_ids, "the two seeds must decode differently"
    return Bundles(llm, embed)


@dataclass
class Node:
    state: Path
    registry: Path
    repo: ModelRepository
    manager: UpdateManager
    events: EventLog


def _node(tmp: Path, installed: list[Path], offered: list[Path], drain_s: float = 30.0) -> Node:
    registry = registry_with(tmp, offered)
    state = node_state(tmp / "node" / "state", registry, *installed)
    repo = ModelRepository.for_state_dir(state, InferenceSection(intra_op_threads=1))
    events = EventLog.open(state)
    settings = UpdatesSection(sources=(str(registry / "published"),), mount_glob="", keep_versions=2)
    return Node(state, registry, repo, UpdateManager(state, settings, repo, events, drain_s=drain_s), events)


def _llm(node: Node) -> GenaiLanguageModel:
    return node.repo.generative.language_model(LLM)


GREEDY = Sampling(max_tokens=16, temperature=0)


async def _ids(chunks: AsyncIterator[Chunk]) -> tuple[tuple[int, ...], str | None]:
    ids: list[int] = []
    finish = None
    async for chunk in chunks:
        ids.extend(chunk.token_ids)
        finish = chunk.finish_reason
    return tuple(ids), finish


async def _switched(node: Node, old: object) -> None:
    """Until new requests no longer get ``old`` (at most two minutes)."""
    for _ in range(12_000):
        if _llm(node) is not old:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the update never switched")


def _update_kinds(node: Node) -> list[tuple[str, str]]:
    return [(e.kind, str(e.details.get("version"))) for e in node.events.recent(0, 0, "update.")]


# ---------------------------------------------------------------- LLM: update, drain, rollback

def test_an_llm_update_serves_new_requests_at_once_and_lets_a_running_stream_finish(
        tmp_path: Path, bundles: Bundles) -> None:
    v0, v1 = bundles.llm["1.0.0"], bundles.llm["1.0.1"]
    node = _node(tmp_path, [v0.path], [v1.path])

    async def main() -> tuple[Outcome, Outcome]:
        await node.repo.serve(LLM)
        old = _llm(node)
        running = old.generate(PROMPT, GREEDY)
        first = await anext(running)  # the sequence runs, holding KV budget, suspended at this chunk
        assert old.active_sequences == 1
        applying = asyncio.create_task(node.manager.apply([f"{LLM}@1.0.1"]))
        await _switched(node, old)
        new = _llm(node)
        assert new.card.version == "1.0.1"
        assert (await _ids(new.generate(PROMPT, GREEDY)))[0] == v1.golden_ids
        assert not applying.done(), "the update returned while a stream on the old version ran"
        rest, finish = await _ids(running)
        assert first.token_ids + rest == v0.golden_ids and finish == "length"  # all of it, on 1.0.0
        (applied,) = await applying
        assert old.active_sequences == 0 and old.budget.in_use == 0
        with pytest.raises(NotFoundError, match="unloaded"):
            old.generate(PROMPT, GREEDY)  # closed once drained

        rolled = await node.manager.rollback(LLM, "1.0.0", "field report")
        assert _llm(node).card.version == "1.0.0"
        assert (await _ids(_llm(node).generate(PROMPT, GREEDY)))[0] == v0.golden_ids
        await node.repo.close()
        return applied, rolled

    applied, rolled = asyncio.run(main())
    assert (applied.outcome, applied.reason) == ("applied", "1.0.0 -> 1.0.1"), applied
    assert rolled.outcome == "rolled-back", rolled
    assert _update_kinds(node) == [("update.applied", "1.0.1"), ("update.rolled_back", "1.0.0")]
    shown = {(m.version, m.active, m.rolled_back, m.kind) for m in node.repo.store.installed(LLM)}
    assert shown == {("1.0.0", True, True, "llm"), ("1.0.1", False, False, "llm")}
    assert [h.outcome for h in node.manager.history()] == ["applied", "rolled-back"]


def test_a_stream_outlasting_the_drain_ends_cancelled_and_frees_the_budget(
        tmp_path: Path, bundles: Bundles) -> None:
    node = _node(tmp_path, [bundles.llm["1.0.0"].path], [bundles.llm["1.0.1"].path], drain_s=0.2)

    async def main() -> None:
        await node.repo.serve(LLM)
        old = _llm(node)
        running = old.generate(PROMPT, Sampling(max_tokens=48, temperature=0))
        first = await anext(running)
        (applied,) = await node.manager.apply([f"{LLM}@1.0.1"])  # waits 0.2 s for the stream, no more
        assert applied.outcome == "applied", applied
        rest, finish = await _ids(running)
        assert finish == "cancelled" and len(first.token_ids + rest) < 48
        assert old.active_sequences == 0 and old.budget.in_use == 0
        assert _llm(node).card.version == "1.0.1"
        await node.repo.close()

    asyncio.run(main())


def test_refused_llm_updates_change_nothing_and_the_old_version_keeps_serving(
        tmp_path: Path, bundles: Bundles) -> None:
    v0 = bundles.llm["1.0.0"]
    node = _node(tmp_path, [v0.path], [bundles.llm["1.0.1"].path, bundles.llm["1.0.2"].path])
    (stored,) = (node.registry / "published" / "targets").rglob(f"*.{LLM}-1.0.1.bundle")
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 1  # tampered at the source: same length, one bit
    stored.write_bytes(bytes(data))

    async def main() -> list[Outcome]:
        await node.repo.serve(LLM)
        serving = _llm(node)
        await node.manager.check()  # the metadata is current first; then nothing may change
        before = state_hash(node.state)
        outcomes = []
        for target in (f"{LLM}@1.0.1", f"{LLM}@1.0.2"):
            (outcome,) = await node.manager.apply([target])
            outcomes.append(outcome)
            assert state_hash(node.state) == before, f"refused {target} changed the node"
            assert _llm(node) is serving
        assert (await _ids(serving.generate(PROMPT, GREEDY)))[0] == v0.golden_ids
        await node.repo.close()
        return outcomes

    tampered, lying = asyncio.run(main())
    assert tampered.outcome == "refused" and "sha256" in tampered.reason, tampered
    assert lying.outcome == "refused" and "golden prompt 0" in lying.reason, lying
    assert _update_kinds(node) == [("update.refused", "1.0.1"), ("update.refused", "1.0.2")]


def test_install_for_serving_returns_the_checked_llm_inactive_and_keeps_kinds_apart(
        tmp_path: Path, bundles: Bundles) -> None:
    """install_for_serving: the generative model it returns passed its golden check and is not
    active until the switch; a name is not taken over by a bundle of another kind."""
    repo = ModelRepository.for_state_dir(tmp_path / "state", InferenceSection(intra_op_threads=1))
    repo.install(bundles.llm["1.0.0"].path)
    installed, model = repo.install_for_serving(bundles.llm["1.0.1"].path)
    try:
        assert isinstance(model, GenaiLanguageModel) and model.card.version == "1.0.1"
        assert not installed.active and repo.store.active_version(LLM) == "1.0.0"
        assert model.card.created == int(installed.installed_at)
        assert tuple(model.greedy(PROMPT, 16)) == bundles.llm["1.0.1"].golden_ids
    finally:
        model.close()
    affine = affine_bundle_at(tmp_path, "1.0.0", name=LLM)
    other = ModelRepository.for_state_dir(tmp_path / "other", InferenceSection(intra_op_threads=1))
    other.install(affine)
    with pytest.raises(BundleError, match="a bundle of kind llm does not update it"):
        other.install_for_serving(bundles.llm["1.0.1"].path)
    before = state_hash(tmp_path / "state")
    with pytest.raises(BundleError, match="a bundle of kind tensor does not update it"):
        repo.install_for_serving(affine_bundle_at(tmp_path, "1.0.2", name=LLM))
    assert state_hash(tmp_path / "state") == before
    assert {m.version for m in repo.store.installed(LLM)} == {"1.0.0", "1.0.1"}


# ---------------------------------------------------------------- embeddings

def test_an_embedding_update_and_its_rollback(tmp_path: Path, bundles: Bundles) -> None:
    e0, e1 = bundles.embed["1.0.0"], bundles.embed["1.0.1"]
    node = _node(tmp_path, [e0.path], [e1.path])
    texts = list(DEFAULT_TEXTS)

    def golden(made: Made) -> np.ndarray:
        return np.array([g.vector for g in made.manifest.golden_embeddings])

    async def vectors() -> np.ndarray:
        return np.array((await node.repo.generative.embedding_model(EMBED).embed(texts)).vectors)

    async def main() -> list[str]:
        await node.repo.serve(EMBED)
        seen = [node.repo.generative.embedding_model(EMBED).card.version]
        assert np.allclose(await vectors(), golden(e0), atol=1e-4)
        (applied,) = await node.manager.apply([EMBED])  # the newest on the channel
        assert applied.outcome == "applied", applied
        seen.append(node.repo.generative.embedding_model(EMBED).card.version)
        assert np.allclose(await vectors(), golden(e1), atol=1e-4)
        rolled = await node.manager.rollback(EMBED, "1.0.0")
        assert rolled.outcome == "rolled-back", rolled
        seen.append(node.repo.generative.embedding_model(EMBED).card.version)
        assert np.allclose(await vectors(), golden(e0), atol=1e-4)
        await node.repo.close()
        return seen

    assert not np.allclose(golden(e0), golden(e1), atol=1e-3)
    assert asyncio.run(main()) == ["1.0.0", "1.0.1", "1.0.0"]


# ---------------------------------------------------------------- a real agent, two serving processes

TRIES = 400


def _ask(client: Any) -> tuple[str, str]:
    """(version, text) of the LLM's greedy answer to PROMPT over ModelStreamInfer."""
    from tritonclient.grpc import InferInput

    text = InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([PROMPT.encode()], dtype=object))
    params = InferInput("sampling_parameters", [1], "BYTES")
    params.set_data_from_numpy(np.array([json.dumps({"max_tokens": 16, "temperature": 0}).encode()],
                                        dtype=object))
    got: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        client.async_stream_infer(LLM, [text, params])
        result, error = got.get(timeout=60)
    finally:
        client.stop_stream()
    assert error is None, error
    return result.get_response().model_version, result.as_numpy("text_output")[0].decode()


def _each_worker(agent: Agent) -> dict[int, list[tuple[str, str]]]:
    """The LLM's answer from every serving process: fresh connections until both answered twice
    (the tensor model ``affine`` says which process holds the connection)."""
    from tritonclient.grpc import InferenceServerClient

    seen: dict[int, list[tuple[str, str]]] = {}
    for _ in range(TRIES):
        client = InferenceServerClient(agent.url)
        try:
            pid = int(client.get_model_config("affine").config.parameters["worker_pid"].string_value)
            seen.setdefault(pid, []).append(_ask(client))
        finally:
            client.close()
        if len(seen) >= 2 and all(len(v) >= 2 for v in seen.values()):
            return seen
    raise AssertionError(f"met only workers {sorted(seen)} in {TRIES} connections")


def test_update_and_rollback_of_an_llm_reach_every_serving_process(tmp_path: Path, bundles: Bundles) -> None:
    v0, v1 = bundles.llm["1.0.0"], bundles.llm["1.0.1"]
    registry = registry_with(tmp_path, [v1.path])
    state = node_state(tmp_path / "node" / "state", registry, v0.path, affine_bundle_at(tmp_path, "1.0.1"))
    config = tmp_path / "agent.toml"
    config.write_text(f"[server]\nworkers = 2\n[inference]\nintra_op_threads = 1\n"
                      f"[updates]\nsources = {json.dumps([str(registry / 'published')])}\n")
    agent = Agent(state, "--config", str(config))
    try:
        before = {a for answers in _each_worker(agent).values() for a in answers}
        assert len(before) == 1 and next(iter(before))[0] == "1.0.0", before  # every process, alike
        before_text = next(iter(before))[1]
        node = node_pb2_grpc.NodeStub(grpc.insecure_channel(agent.url))  # type: ignore[no-untyped-call]
        reply = node.ApplyUpdate(node_pb2.ApplyUpdateRequest(targets=[LLM]), timeout=120)
        assert [(r.outcome, r.version) for r in reply.results] == [("applied", "1.0.1")], reply
        after = {a for answers in _each_worker(agent).values() for a in answers}
        assert len(after) == 1 and next(iter(after))[0] == "1.0.1" and next(iter(after))[1] != before_text
        back = node.Rollback(node_pb2.RollbackRequest(name=LLM, version="1.0.0", reason="test"), timeout=120)
        assert back.result.outcome == "rolled-back", back
        again = {a for answers in _each_worker(agent).values() for a in answers}
        assert again == {("1.0.0", before_text)}
        events = node.GetEvents(node_pb2.GetEventsRequest(kind_prefix="update."), timeout=10).events
        assert [(e.kind, e.details["version"]) for e in events] == [("update.applied", "1.0.1"),
                                                                    ("update.rolled_back", "1.0.0")]
    finally:
        assert agent.stop() == 0, agent.log()


@pytest.mark.parametrize(("crash_at", "survivor"), [("loaded", "1.0.0"), ("journal:committing", "1.0.0"),
                                                    ("swapped", "1.0.1")])
def test_an_agent_killed_mid_update_of_an_llm_restarts_on_the_old_or_the_new_version(
        tmp_path: Path, bundles: Bundles, crash_at: str, survivor: str) -> None:
    from tritonclient.grpc import InferenceServerClient

    registry = registry_with(tmp_path, [bundles.llm["1.0.1"].path])
    state = node_state(tmp_path / "node" / "state", registry, bundles.llm["1.0.0"].path)
    config = tmp_path / "agent.toml"
    config.write_text(f"[updates]\nsources = {json.dumps([str(registry / 'published')])}\n")
    crashing = Agent(state, "--config", str(config), env={"APPLIANCE_UPDATES_CRASH_AT": crash_at})
    try:
        node = node_pb2_grpc.NodeStub(grpc.insecure_channel(crashing.url))  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError):
            node.ApplyUpdate(node_pb2.ApplyUpdateRequest(targets=[f"{LLM}@1.0.1"]), timeout=120)
        assert crashing.proc.wait(30) == -9
    finally:
        crashing.stop()
    agent = Agent(state, "--config", str(config))
    try:
        client = InferenceServerClient(agent.url)
        assert _ask(client)[0] == survivor
        client.close()
    finally:
        assert agent.stop() == 0, agent.log()
    assert not (state / "updates" / "journal.json").exists()
    versions = {m.version: m.active for m in ModelStore(state).installed(LLM)}
    assert versions == ({"1.0.0": True} if survivor == "1.0.0" else {"1.0.0": False, "1.0.1": True})
    assert not [p for p in (state / "models" / LLM).iterdir() if p.name.startswith(".")]  # no debris
