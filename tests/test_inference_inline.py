"""Where a direct request runs: small requests to a model that runs in microseconds on the
event loop, everything else on the model's thread pool (agent.inference.model.INLINE_MAX_NS)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.bundle import read_bundle
from agent.inference import model as model_mod
from agent.inference.model import INLINE_MAX_BYTES, RUN_WINDOW, LoadedModel
from agent.modelrefs import fixed_cost
from agent.ort import make_session
from provisioning.demo.models import affine_model
from testsupport.inference_support import make_bundle


class RecordingSession:
    """A real ONNX Runtime session that notes the thread of every run, with a clock of its own
    that each run moves on by ``cost_ns``: the inline decision reads this clock, so it does
    not depend on how busy the machine running the tests is."""

    FAST_NS = 1_000  # well under INLINE_MAX_NS, and never 0

    def __init__(self, session: Any) -> None:
        self.session = session
        self.threads: list[int] = []
        self.cost_ns = self.FAST_NS
        self.now_ns = 0

    def clock(self) -> int:
        return self.now_ns

    def get_providers(self) -> list[str]:
        return list(self.session.get_providers())

    def run(self, outputs: Sequence[str], feeds: dict[str, Any]) -> Any:
        self.threads.append(threading.get_ident())
        self.now_ns += self.cost_ns
        return self.session.run(outputs, feeds)


@pytest.fixture
def affine(tmp_path: Path) -> tuple[LoadedModel, RecordingSession]:
    path = affine_model(tmp_path / "a.onnx")
    bundle = read_bundle(make_bundle(tmp_path, path, "affine", "1", {"x": np.ones((1, 4), np.float32)}))
    session = RecordingSession(make_session(path.read_bytes()))
    assert fixed_cost(path.read_bytes())  # Mul and Add: its cost follows the request's shapes
    return LoadedModel(bundle.manifest, session, instances=2, max_queue=64, batching=False,
                       fixed_cost=True, clock=session.clock), session


def _run(model: LoadedModel, rows: int, times: int) -> list[np.ndarray]:
    async def go() -> list[np.ndarray]:
        out = []
        for i in range(times):
            x = np.full((rows, 4), i, np.float32)
            out.append((await model.infer({"x": x}, ["y"])).outputs["y"])
        return out

    return asyncio.run(go())


def test_a_tiny_model_runs_small_requests_on_the_loop_after_measuring(
        affine: tuple[LoadedModel, RecordingSession]) -> None:
    model, session = affine
    here = threading.get_ident()  # asyncio.run runs its loop on this thread
    outputs = _run(model, 1, 2 * RUN_WINDOW)
    assert here not in session.threads[:RUN_WINDOW]  # measured on the pool first
    assert session.threads[RUN_WINDOW:] == [here] * RUN_WINDOW
    assert model.inline
    for i, y in enumerate(outputs):  # same answers either way
        np.testing.assert_array_equal(y, np.full((1, 4), 2.0 * i + 1, np.float32))
    assert model.stats.execution_count == 2 * RUN_WINDOW
    assert model.stats.pending == 0


def test_a_large_request_goes_to_the_pool_even_on_an_inline_model(
        affine: tuple[LoadedModel, RecordingSession]) -> None:
    model, session = affine
    _run(model, 1, RUN_WINDOW)
    assert model.inline
    rows = INLINE_MAX_BYTES // 16 + 1  # 4 float32 per row
    (y,) = _run(model, rows, 1)
    assert session.threads[-1] != threading.get_ident()
    assert y.shape == (rows, 4)


def test_a_slow_model_stays_on_the_pool_and_one_that_slows_down_goes_back(
        affine: tuple[LoadedModel, RecordingSession], monkeypatch: pytest.MonkeyPatch) -> None:
    model, session = affine
    here = threading.get_ident()
    _run(model, 1, RUN_WINDOW)
    assert model.inline
    session.cost_ns = 2 * model_mod.INLINE_MAX_NS
    _run(model, 1, RUN_WINDOW)  # one window of slow runs, inline while it is measured
    assert not model.inline
    _run(model, 1, RUN_WINDOW)
    assert here not in session.threads[-RUN_WINDOW:]

    # a model never measured below the bound never runs inline
    monkeypatch.setattr(model_mod, "INLINE_MAX_NS", 0)
    fresh = LoadedModel(model.manifest, session, instances=2, max_queue=64, batching=False,
                        fixed_cost=True, clock=session.clock)
    session.cost_ns = RecordingSession.FAST_NS
    _run(fresh, 1, 3 * RUN_WINDOW)
    assert not fresh.inline
    assert here not in session.threads[-3 * RUN_WINDOW:]


def test_a_new_shape_runs_on_the_pool_until_it_is_measured(
        affine: tuple[LoadedModel, RecordingSession]) -> None:
    """A request cannot pick a shape nobody measured and hold the loop with it."""
    model, session = affine
    here = threading.get_ident()
    _run(model, 1, RUN_WINDOW)
    assert model.inline
    _run(model, 64, RUN_WINDOW - 1)  # another shape, small enough, not yet measured
    assert here not in session.threads[-(RUN_WINDOW - 1):]
    _run(model, 64, 2)  # its window completes: it is as fast, so it runs inline from now on
    assert session.threads[-1] == here
    _run(model, 1, 1)
    assert session.threads[-1] == here  # the first shape still does


def test_a_model_whose_work_a_request_can_choose_never_runs_inline(tmp_path: Path) -> None:
    """Tile takes its repeat counts from a tensor: a request would set the work. Such a model
    is measured as fast as any and still never holds the loop."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    r = helper.make_tensor_value_info("r", TensorProto.INT64, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Tile", ["x", "r"], ["y"])], "tile", [x, r], [y])
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    data = model.SerializeToString()
    assert not fixed_cost(data)
    path = tmp_path / "tile.onnx"
    path.write_bytes(data)
    feeds = {"x": np.ones((1, 4), np.float32), "r": np.array([1, 1], np.int64)}
    bundle = read_bundle(make_bundle(tmp_path, path, "tile", "1", feeds))
    session = RecordingSession(make_session(data))
    loaded = LoadedModel(bundle.manifest, session, instances=2, max_queue=64, batching=False,
                         fixed_cost=fixed_cost(data), clock=session.clock)

    async def go() -> None:
        for _ in range(3 * RUN_WINDOW):
            await loaded.infer(feeds, ["y"])

    asyncio.run(go())
    assert not loaded.inline
    assert threading.get_ident() not in session.threads
