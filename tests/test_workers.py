"""Several serving processes on one port (``[server] workers = 2``), through real agents on loopback.

The kernel spreads new connections over the workers (SO_REUSEPORT), so each check below opens
fresh connections until it has met both workers, and asks every one of them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import pytest

from agent.proto import node_pb2, node_pb2_grpc
from testsupport.inference_support import Agent, free_port, notify_socket, stop_notified
from testsupport.updates_support import X, affine_bundle_at, expected, node_state, registry_with

TRIES = 400  # fresh connections before giving up on meeting both workers


def _config(tmp: Path, registry: Path, workers: int = 2) -> Path:
    path = tmp / "agent.toml"
    path.write_text(f"[server]\nworkers = {workers}\n"
                    f"[updates]\nsources = {json.dumps([str(registry / 'published')])}\n")
    return path


@pytest.fixture
def reg(tmp_path: Path) -> Path:
    return registry_with(tmp_path, [affine_bundle_at(tmp_path, "1.0.1"), affine_bundle_at(tmp_path, "1.0.2")])


@pytest.fixture
def state(tmp_path: Path, reg: Path) -> Path:
    return node_state(tmp_path / "node" / "state", reg, affine_bundle_at(tmp_path, "1.0.1"))


@pytest.fixture
def agent(tmp_path: Path, reg: Path, state: Path) -> Iterator[Agent]:
    a = Agent(state, "--config", str(_config(tmp_path, reg)), metrics_port=free_port())
    yield a
    a.stop()


def _client(agent: Agent) -> Any:
    from tritonclient.grpc import InferenceServerClient

    return InferenceServerClient(agent.url)


def _infer(client: Any) -> tuple[str, np.ndarray]:
    from tritonclient.grpc import InferInput

    inp = InferInput("x", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    result = client.infer("affine", [inp])
    return result.get_response().model_version, result.as_numpy("y")


def _workers(agent: Agent) -> set[int]:
    """Worker processes as the supervisor sees them (its children)."""
    return _agent_children(agent.proc.pid)


def _agent_children(pid: int) -> set[int]:
    out = set()
    for kid in psutil.Process(pid).children():
        try:
            if kid.status() != psutil.STATUS_ZOMBIE:  # one not yet reaped is gone already
                out.add(kid.pid)
        except psutil.Error:
            continue
    return out


def _each_worker(agent: Agent, ask: Callable[[Any], Any], want: int = 2) -> dict[int, list[Any]]:
    """``ask(client)`` over fresh connections until ``want`` workers answered; answers by pid."""
    seen: dict[int, list[Any]] = {}
    for _ in range(TRIES):
        client = _client(agent)
        try:
            pid = int(client.get_model_config("affine").config.parameters["worker_pid"].string_value)
            seen.setdefault(pid, []).append(ask(client))
        finally:
            client.close()
        if len(seen) >= want and all(len(v) >= 2 for v in seen.values()):
            return seen
    raise AssertionError(f"met only workers {sorted(seen)} in {TRIES} connections")


def _node(agent: Agent) -> Any:
    return node_pb2_grpc.NodeStub(grpc.insecure_channel(agent.url))  # type: ignore[no-untyped-call]


def _metric(agent: Agent, port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and 'model="affine"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in the metrics:\n{text}")


def test_both_workers_answer_and_statistics_are_totals(tmp_path: Path, reg: Path, state: Path) -> None:
    metrics_port = free_port()
    agent = Agent(state, "--config", str(_config(tmp_path, reg)), metrics_port=metrics_port)
    try:
        answers = _each_worker(agent, _infer)
        assert set(answers) == _workers(agent), "every answer came from one of the supervisor's workers"
        made = sum(len(v) for v in answers.values())
        for replies in answers.values():
            assert all(v == "1.0.1" and np.allclose(y, expected("1.0.1")) for v, y in replies)
        # every worker gives the same totals: its own counts plus the other's
        totals = _each_worker(agent, lambda c: c.get_inference_statistics("affine").model_stats[0])
        for stats in (s for replies in totals.values() for s in replies):
            assert stats.inference_stats.success.count == made
            assert stats.inference_count == made  # one inference per request (no batch dimension)
        assert _metric(agent, metrics_port, "nv_inference_request_success") == made
    finally:
        assert agent.stop() == 0


def test_a_killed_worker_is_restarted_and_service_continues(agent: Agent) -> None:
    before = _workers(agent)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        _, restarting, later = agent.log().partition(f"(pid {victim}) exited with -9; restarting it")
        if restarting and ") serving" in later:
            break
        time.sleep(0.1)
    after = _workers(agent)
    assert victim not in after and len(after) == 2, (before, after, agent.log())
    assert f"(pid {victim}) exited with -9; restarting it" in agent.log()
    answers = _each_worker(agent, _infer)  # no failure once restarted: both answer again
    assert set(answers) == after
    assert agent.proc.poll() is None


def test_update_unload_load_and_rollback_reach_every_worker(agent: Agent) -> None:
    node = _node(agent)
    reply = node.ApplyUpdate(node_pb2.ApplyUpdateRequest(targets=["affine@1.0.2"]), timeout=120)
    assert [r.outcome for r in reply.results] == ["applied"], reply
    for replies in _each_worker(agent, _infer).values():
        assert all(v == "1.0.2" and np.allclose(y, expected("1.0.2")) for v, y in replies)

    client = _client(agent)
    client.unload_model("affine")
    ready = {_client(agent).is_model_ready("affine") for _ in range(40)}
    assert ready == {False}, "a worker still serves the unloaded model"
    client.load_model("affine")
    client.close()
    for replies in _each_worker(agent, lambda c: c.is_model_ready("affine")).values():
        assert all(replies)

    back = node_pb2.RollbackRequest(name="affine", version="1.0.1", reason="test")
    result = node.Rollback(back, timeout=120)
    assert result.result.outcome == "rolled-back", result
    for replies in _each_worker(agent, _infer).values():
        assert all(v == "1.0.1" and np.allclose(y, expected("1.0.1")) for v, y in replies)
    # one event log: whichever worker answers lists the same numbered events
    lists = {tuple((e.seq, e.kind) for e in _node(agent).GetEvents(
        node_pb2.GetEventsRequest(kind_prefix="update."), timeout=10).events) for _ in range(20)}
    assert len(lists) == 1, lists
    (events,) = lists
    assert [k for _, k in events] == ["update.applied", "update.rolled_back"]


def test_ready_once_every_worker_serves_then_sigterm_drains_all(tmp_path: Path, reg: Path,
                                                                state: Path) -> None:
    with notify_socket(tmp_path / "notify.sock", 2_000_000) as (sock, env):
        log_path = tmp_path / "agent.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "serve", "--state-dir", str(state), "--port", "0",
                 "--metrics-port", "0", "--config", str(_config(tmp_path, reg))],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            first = sock.recv(256).decode()
            text = log_path.read_text()
            assert first == "READY=1", first
            assert "worker 0 (pid" in text and "worker 1 (pid" in text, text
            assert sock.recv(256).decode() == "WATCHDOG=1"
            workers = _agent_children(proc.pid)
            assert len(workers) == 2
            stop_notified(proc, sock)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log_path.read_text()
    assert "worker 0: agent: stopped" in text and "worker 1: agent: stopped" in text, text
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in workers)


@pytest.mark.parametrize(("crash_at", "survivor"), [("journal:committing", "1.0.1"), ("swapped", "1.0.2")])
def test_an_interrupted_update_is_recovered_once_and_every_worker_serves_its_outcome(
        tmp_path: Path, reg: Path, state: Path, crash_at: str, survivor: str) -> None:
    single = Agent(state, "--config", str(_config(tmp_path, reg, workers=1)),
                   env={"APPLIANCE_UPDATES_CRASH_AT": crash_at})
    try:
        with pytest.raises(grpc.RpcError):
            _node(single).ApplyUpdate(node_pb2.ApplyUpdateRequest(targets=["affine@1.0.2"]), timeout=60)
        assert single.proc.wait(30) == -9
    finally:
        single.stop()
    assert (state / "updates" / "journal.json").exists()
    agent = Agent(state, "--config", str(_config(tmp_path, reg)))
    try:
        for replies in _each_worker(agent, _infer).values():
            assert all(v == survivor and np.allclose(y, expected(survivor)) for v, y in replies)
        assert agent.log().count("update recovery: ") == 1, agent.log()  # one worker did it
    finally:
        assert agent.stop() == 0
    assert not (state / "updates" / "journal.json").exists()


# ---------------------------------------------------------------- the shared pieces, in-process


def _snap(version: str, success: int, sizes: dict[int, int], last: int) -> dict[str, Any]:
    def d(n: int) -> dict[str, int]:
        return {"count": n, "ns": 10 * n}

    keys = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
    return {"name": "m", "version": version, "last_inference": last, "inference_count": success,
            "execution_count": success, "pending": 1,
            "inference_stats": {k: d(success) for k in keys},
            "batch_stats": [{"batch_size": s, "compute_input": d(n), "compute_infer": d(n),
                             "compute_output": d(n)} for s, n in sorted(sizes.items())]}


def test_statistics_of_workers_add_up_per_version() -> None:
    from agent.inference.stats import add_snapshots

    a, b = _snap("1", 3, {1: 3}, last=5), _snap("1", 4, {1: 2, 4: 2}, last=9)
    other = _snap("2", 1, {1: 1}, last=1)
    total, second = add_snapshots([a, other, b])
    assert second == other
    assert total["inference_count"] == 7 and total["pending"] == 2 and total["last_inference"] == 9
    assert total["inference_stats"]["success"] == {"count": 7, "ns": 70}
    assert [(s["batch_size"], s["compute_infer"]["count"]) for s in total["batch_stats"]] == [(1, 5), (4, 2)]
    assert a["inference_count"] == 3 and len(a["batch_stats"]) == 1, "the inputs are left alone"


def test_a_shared_event_log_numbers_events_once_for_every_process(tmp_path: Path) -> None:
    from agent.events import EventLog

    # two logs on one file stand for two workers (each process has its own EventLog)
    first = EventLog.open(tmp_path, shared=True)
    second = EventLog.open(tmp_path, shared=True)
    first.record("update.applied", "info", "m", "one")
    second.record("update.applied", "info", "m", "two")
    first.record("update.rolled_back", "warning", "m", "three")
    for log in (first, second):
        assert [(e.seq, e.message) for e in log.recent()] == [(1, "one"), (2, "two"), (3, "three")]
        assert log.last_seq == 3
    lines = (tmp_path / "events" / "events.jsonl").read_text().splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [1, 2, 3]
