"""Error messages do not echo a 100k-character model name back (issue 19, finding 4c): the
status details would pass a client's metadata limit, and the client would refuse the reply
instead of showing NOT_FOUND.  A real agent on loopback, Triton's own client stubs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from agent.errors import echo
from provisioning.demo.models import affine_model
from testsupport.inference_support import Agent, install, make_bundle, raw_request, stub

HUGE = "m" * 100_000


def test_echo_cuts_long_text() -> None:
    assert echo("affine") == "'affine'"
    assert echo(HUGE) == repr("m" * 64) + "...(100000 chars)"


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    tmp = tmp_path_factory.mktemp("echo")
    bundle = make_bundle(tmp, affine_model(tmp / "affine.onnx"), "affine", "1.0.0",
                         {"x": np.ones((2, 4), np.float32)})
    state = tmp / "state"
    install(state, bundle)
    running = Agent(state)
    yield running
    running.stop()


def _details(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details() or ""


def test_unknown_model_with_a_huge_name_gets_a_short_not_found(agent: Agent) -> None:
    svc, pb = stub(agent.url)
    calls = {
        "ModelMetadata": lambda: svc.ModelMetadata(pb.ModelMetadataRequest(name=HUGE), timeout=10),
        "ModelConfig": lambda: svc.ModelConfig(pb.ModelConfigRequest(name=HUGE), timeout=10),
        "ModelStatistics": lambda: svc.ModelStatistics(pb.ModelStatisticsRequest(name=HUGE), timeout=10),
        "ModelInfer": lambda: svc.ModelInfer(raw_request(pb, HUGE, [("x", "FP32", [1, 4], bytes(16))]),
                                             timeout=10),
        "wrong version": lambda: svc.ModelMetadata(pb.ModelMetadataRequest(name="affine", version=HUGE),
                                                   timeout=10),
    }
    for what, call in calls.items():
        code, details = _details(call)
        assert code == grpc.StatusCode.NOT_FOUND, (what, code, details[:200])
        assert len(details) < 400 and "(100000 chars)" in details, (what, details[:500])


def test_unknown_input_name_is_cut_too(agent: Agent) -> None:
    svc, pb = stub(agent.url)
    code, details = _details(lambda: svc.ModelInfer(
        raw_request(pb, "affine", [(HUGE, "FP32", [1, 4], bytes(16))]), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details[:200])
    assert len(details) < 400 and "(100000 chars)" in details, details[:500]


def test_any_status_message_stays_within_a_clients_limit(agent: Agent) -> None:
    svc, pb = stub(agent.url)
    code, details = _details(lambda: svc.RepositoryModelLoad(
        pb.RepositoryModelLoadRequest(model_name=HUGE), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND, (code, details[:200])
    assert len(details) <= 2100, len(details)


