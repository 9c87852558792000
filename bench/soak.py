#!/usr/bin/env python3
"""Soak: a real agent under mTLS, mixed load for a set time, two updates and a rollback.

    PYTHONPATH=. python bench/soak.py [--minutes 30] [--concurrency 64] [--json]

Everything runs on 127.0.0.1 in a temporary directory: a site PKI (CA, a node certificate
for 127.0.0.1, observer/operator/admin client certificates), a TUF registry holding an
affine model in three versions (version 1.0.N computes ``y = x * (N + 1) + 1``, so every
answer tells which version computed it), a node state trusting that registry with 1.0.1
installed, and ``appliance agent serve`` as its own process.

``--concurrency`` closed-loop callers share the load: most send ModelInfer, one in sixteen
holds a WatchHealth stream open for a few seconds and reopens it, one in sixteen alternates
GetInventory and GetEvents.  At 30 % and 50 % of the run an operator applies 1.0.2 and then
1.0.3; at 70 % an admin rolls back to 1.0.2.  The agent's RSS and open file descriptors are
sampled every ``--sample-s`` seconds (fds: the fewest in five reads over half a second, as
files held for a moment by in-flight calls are not leaks; the most is reported beside it).

Criteria (the exit status is 1 when any fails):

- no failed request: every call ends OK, and every inference answer is the function of the
  version that reports having computed it; a call started after an update returned is
  answered by the new version (in-flight calls may finish on the old one);
- every update and the rollback report success, and GetEvents lists ``update.applied`` per
  update and ``update.rolled_back`` for the rollback, in that order;
- a final inference is answered by the expected version;
- after the warm-up (20 % of the run, at most 5 minutes) RSS and open fds grow by less than
  ``--max-growth-pct`` (max over the first sample after the warm-up; for fds, the count held
  over three consecutive samples, as one transient fd is already +5 % of ~20).  The raw
  max/first of both is reported too;
- the agent is still running at the end and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.config import InferenceSection  # noqa: E402
from agent.inference.repository import ModelRepository  # noqa: E402
from agent.proto import grpc_service_pb2, grpc_service_pb2_grpc, node_pb2, node_pb2_grpc  # noqa: E402
from agent.updates.client import RegistryClient  # noqa: E402
from provisioning.bundle import create_bundle  # noqa: E402
from provisioning.demo.models import affine_model, save_golden  # noqa: E402
from provisioning.pki import init_pki, issue_client, issue_node  # noqa: E402
from provisioning.registry import add_target, init_registry, publish, trusted_root  # noqa: E402

MODEL = "affine"
FIRST, SECOND, THIRD = "1.0.1", "1.0.2", "1.0.3"
ROLES = ("observer", "operator", "admin")
X = np.arange(8, dtype=np.float32).reshape(2, 4)
CALL_TIMEOUT_S = 60.0
UPDATE_TIMEOUT_S = 600.0
EXAMPLES_KEPT = 5
MiB = 1 << 20
FD_READS = 5
RETAINED_WINDOW = 3  # samples


def scale_of(version: str) -> float:
    """Version 1.0.N computes ``x * (N + 1) + 1``: each version a different function."""
    return float(int(version.rsplit(".", 1)[-1]) + 1)


def expected_y(version: str) -> np.ndarray:
    return (X * np.float32(scale_of(version)) + np.float32(1.0)).astype(np.float32)


# ------------------------------------------------------------------ the site


@dataclass(frozen=True)
class Site:
    pki: Path
    registry: Path
    state: Path
    config: Path
    log: Path


def _bundle(work: Path, version: str) -> Path:
    model = affine_model(work / f"{MODEL}-{version}.onnx", scale=scale_of(version))
    golden = save_golden(work / f"{MODEL}-{version}.npz", {"x": X})
    return create_bundle(model, name=MODEL, version=version, golden=[golden],
                         out=work / f"{MODEL}-{version}.bundle").path


def build_site(tmp: Path) -> Site:
    """PKI, registry with three versions, node state with the first installed, agent.toml."""
    pki = tmp / "pki"
    init_pki(pki, organization="Soak Site")
    issue_node(pki, "node1", dns=["localhost"], ips=["127.0.0.1"])
    for role in ROLES:
        issue_client(pki, role, role)
    work = tmp / "bundles"
    work.mkdir()
    bundles = [_bundle(work, v) for v in (FIRST, SECOND, THIRD)]
    registry = tmp / "registry"
    init_registry(registry)
    for b in bundles:
        add_target(registry, b, kind="bundle")
    publish(registry)
    state = tmp / "node" / "state"
    state.mkdir(parents=True)
    RegistryClient.initialize(state, trusted_root(registry))
    ModelRepository.for_state_dir(state, InferenceSection()).install(bundles[0], activate=True)
    node = pki / "issued" / "node1"
    config = tmp / "agent.toml"
    config.write_text(
        '[server]\nlisten = "127.0.0.1"\nport = 0\n'
        f'[tls]\ncert = "{node / "node1.crt"}"\nkey = "{node / "node1.key"}"\n'
        f'ca = "{pki / "ca.crt"}"\ncrl = "{pki / "crl.pem"}"\n'
        f'[updates]\nsources = ["{registry / "published"}"]\nmount_glob = ""\n')
    return Site(pki=pki, registry=registry, state=state, config=config, log=tmp / "agent.log")


# ------------------------------------------------------------------ the agent process


class AgentProcess:
    """``appliance agent serve`` from this checkout's environment, in its own session (a
    Ctrl-C at the terminal reaches only the bench, which then stops the agent by PID)."""

    MARKER = "agent: serving on 127.0.0.1:"

    def __init__(self, site: Site) -> None:
        exe = Path(sys.executable).parent / "appliance"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "provisioning.cli"]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.log_path = site.log
        self._log = site.log.open("wb")
        self.proc = subprocess.Popen(
            [*cmd, "agent", "serve", "--config", str(site.config), "--state-dir", str(site.state),
             "--port", "0", "--metrics-port", "0"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env,
            cwd=site.state.parent, start_new_session=True)
        self.pid = self.proc.pid
        self.port = self._wait_ready()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_ready(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            if self.MARKER in text:
                return int(text.split(self.MARKER, 1)[1].split()[0])
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{text[-4000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"agent did not become ready in {timeout:.0f} s:\n{self.log()[-4000:]}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM by PID, SIGKILL after ``timeout``; the exit status."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


# ------------------------------------------------------------------ what is recorded


@dataclass
class Kind:
    requests: int = 0
    failures: int = 0
    examples: list[str] = field(default_factory=list)
    latency_s: array[float] = field(default_factory=lambda: array("d"))

    def ok(self, seconds: float) -> None:
        self.requests += 1
        self.latency_s.append(seconds)

    def fail(self, what: str) -> None:
        self.requests += 1
        self.failures += 1
        if len(self.examples) < EXAMPLES_KEPT:
            self.examples.append(what)

    def summary(self) -> dict[str, Any]:
        lat = np.frombuffer(self.latency_s, dtype=np.float64) if len(self.latency_s) else None

        def pct(q: float) -> float | None:
            return None if lat is None else round(float(np.percentile(lat, q)) * 1e3, 2)

        return {"requests": self.requests, "failures": self.failures, "examples": self.examples,
                "p50_ms": pct(50), "p99_ms": pct(99), "max_ms": pct(100)}


def describe(err: grpc.aio.AioRpcError) -> str:
    return f"{err.code().name}: {err.details()}"


@dataclass(frozen=True)
class Switch:
    """An update or rollback call to ``version`` that ran from ``begin`` to ``end`` (monotonic)."""

    version: str
    begin: float
    end: float = math.inf


@dataclass
class Serving:
    """Which versions may answer a call: the one serving when it started, and the target of
    any switch that was under way before it ended (the swap may land while it is in flight)."""

    first: str = FIRST
    switches: list[Switch] = field(default_factory=list)

    @property
    def current(self) -> str:
        done = [s for s in self.switches if s.end < math.inf]
        return done[-1].version if done else self.first

    def allowed(self, t0: float, t1: float) -> set[str]:
        done_by_t0 = [s.version for s in self.switches if s.end <= t0]
        ok = {done_by_t0[-1] if done_by_t0 else self.first}
        ok |= {s.version for s in self.switches if s.begin < t1 and s.end > t0}
        return ok


@dataclass
class Run:
    deadline: float
    stop: asyncio.Event
    serving: Serving = field(default_factory=Serving)
    kinds: dict[str, Kind] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    watch_reports: int = 0
    # t, rss, fds (fewest in a burst), threads, fds (most in the burst)
    samples: list[tuple[float, int, int, int, int]] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)
    start: float = field(default_factory=time.monotonic)

    def kind(self, name: str) -> Kind:
        return self.kinds.setdefault(name, Kind())

    def running(self) -> bool:
        return not self.stop.is_set() and time.monotonic() < self.deadline


# ------------------------------------------------------------------ callers


def _channel(port: int, pki: Path, role: str, index: int) -> grpc.aio.Channel:
    d = pki / "issued" / role
    creds = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.crt").read_bytes(),
                                         private_key=(d / f"{role}.key").read_bytes(),
                                         certificate_chain=(d / f"{role}.crt").read_bytes())
    # a distinct argument per index gives each channel its own connection
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=[("soak.channel", index)])


def infer_request() -> Any:
    req = grpc_service_pb2.ModelInferRequest(model_name=MODEL)
    req.inputs.add(name="x", datatype="FP32", shape=list(X.shape))
    req.raw_input_contents.append(X.tobytes())
    return req


def check_answer(reply: Any) -> str | None:
    """Why an inference reply is wrong, or None."""
    version = reply.model_version
    try:
        scale_of(version)
        y = np.frombuffer(reply.raw_output_contents[0], dtype=np.float32).reshape(X.shape)
    except (ValueError, IndexError) as exc:
        return f"unreadable reply (version {version!r}): {exc}"
    if not np.array_equal(y, expected_y(version)):
        return f"version {version} answered {y.ravel().tolist()}, not its function"
    return None


async def infer_worker(run: Run, stub: Any) -> None:
    kind, req = run.kind("infer"), infer_request()
    while run.running():
        t0 = time.monotonic()
        try:
            reply = await stub.ModelInfer(req, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            kind.fail(describe(err))
            continue
        t1 = time.monotonic()
        took = t1 - t0
        problem = check_answer(reply)
        allowed = run.serving.allowed(t0, t1)
        if problem is None and reply.model_version not in allowed:
            problem = (f"answered by {reply.model_version}; a call started at {t0 - run.start:.3f} s "
                       f"and ended at {t1 - run.start:.3f} s may be answered by {sorted(allowed)}")
        if problem:
            kind.fail(problem)
        else:
            kind.ok(took)
            run.versions[reply.model_version] = run.versions.get(reply.model_version, 0) + 1


async def watch_worker(run: Run, node: Any, rng: random.Random) -> None:
    """Hold a WatchHealth stream open for 3-15 s (one report a second), then reopen it."""
    kind = run.kind("watch")
    while run.running():
        hold_until = time.monotonic() + rng.uniform(3, 15)
        t0 = time.monotonic()
        first: float | None = None
        call = node.WatchHealth(node_pb2.WatchHealthRequest(interval_ms=1000), timeout=CALL_TIMEOUT_S)
        try:
            async for _ in call:
                run.watch_reports += 1
                if first is None:
                    first = time.monotonic() - t0
                if time.monotonic() >= hold_until or not run.running():
                    break
        except grpc.aio.AioRpcError as err:
            kind.fail(describe(err))
            continue
        finally:
            call.cancel()
        if first is None:
            kind.fail("stream ended without a report")
        else:
            kind.ok(first)  # latency: time to the first report


async def info_worker(run: Run, node: Any, index: int) -> None:
    calls: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
        ("inventory", lambda: node.GetInventory(node_pb2.GetInventoryRequest(), timeout=CALL_TIMEOUT_S)),
        ("events", lambda: node.GetEvents(node_pb2.GetEventsRequest(limit=50), timeout=CALL_TIMEOUT_S)),
    ]
    n = index
    while run.running():
        name, call = calls[n % len(calls)]
        n += 1
        t0 = time.monotonic()
        try:
            await call()
        except grpc.aio.AioRpcError as err:
            run.kind(name).fail(describe(err))
            continue
        run.kind(name).ok(time.monotonic() - t0)


async def sleep_until(run: Run, when: float) -> bool:
    """Sleep until monotonic ``when``; False if the run stopped first."""
    while time.monotonic() < when:
        if run.stop.is_set():
            return False
        await asyncio.sleep(min(1.0, when - time.monotonic()))
    return True


@dataclass(frozen=True)
class Step:
    op: str  # "apply" or "rollback"
    version: str
    at: float  # fraction of the run


def plan(updates: int, rollback: bool) -> list[Step]:
    """Updates to 1.0.2 then 1.0.3 and a rollback to 1.0.2, spread over 30-70 % of the run."""
    steps = [Step("apply", v, 0.0) for v in (SECOND, THIRD)[:updates]]
    if rollback and updates == 2:
        steps.append(Step("rollback", SECOND, 0.0))
    n = len(steps)
    return [Step(s.op, s.version, 0.3 if n == 1 else 0.3 + 0.4 * i / (n - 1)) for i, s in enumerate(steps)]


async def update_driver(run: Run, operator: Any, admin: Any, steps: list[Step], duration: float) -> None:
    for step in steps:
        if not await sleep_until(run, run.start + step.at * duration):
            return
        kind = run.kind(step.op)
        t0 = time.monotonic()
        run.serving.switches.append(Switch(step.version, t0))
        try:
            if step.op == "apply":
                reply = await operator.ApplyUpdate(node_pb2.ApplyUpdateRequest(
                    targets=[f"{MODEL}@{step.version}"]), timeout=UPDATE_TIMEOUT_S)
                result, want = reply.results[0], "applied"
            else:
                reply = await admin.Rollback(node_pb2.RollbackRequest(
                    name=MODEL, version=step.version, reason="soak"), timeout=UPDATE_TIMEOUT_S)
                result, want = reply.result, "rolled-back"
        except grpc.aio.AioRpcError as err:
            kind.fail(describe(err))
            run.serving.switches[-1] = Switch(step.version, t0, time.monotonic())  # may have landed
            run.updates.append({"op": step.op, "version": step.version, "error": describe(err)})
            continue
        took = time.monotonic() - t0
        if result.outcome == want:
            run.serving.switches[-1] = Switch(step.version, t0, t0 + took)
        else:
            run.serving.switches.pop()  # refused: the version serving before must go on answering
        run.updates.append({"op": step.op, "version": result.version, "outcome": result.outcome,
                            "reason": result.reason, "at_s": round(t0 - run.start, 1),
                            "took_s": round(took, 3)})
        if result.outcome != want or result.version != step.version:
            kind.fail(f"{step.op} {step.version}: {result.outcome} {result.version} {result.reason}")
            continue
        kind.ok(took)


async def sampler(run: Run, pid: int, every: float) -> None:
    """RSS, threads and open fds of the agent.  Files that in-flight calls hold for a moment
    (the event log GetEvents reads, a staging file) come and go between two reads; a leak
    stays.  So fds is the fewest seen in a burst of reads over half a second, and the most
    is kept beside it."""
    proc = psutil.Process(pid)
    while True:
        t = time.monotonic() - run.start
        fds = []
        for _ in range(FD_READS):
            fds.append(proc.num_fds())
            await asyncio.sleep(0.1)
        with proc.oneshot():
            run.samples.append((round(t, 1), proc.memory_info().rss, min(fds), proc.num_threads(), max(fds)))
        if not run.running():
            return
        await asyncio.sleep(min(every, max(0.0, run.deadline - time.monotonic()) + 0.01))


async def progress(run: Run, every: float) -> None:
    while await sleep_until(run, time.monotonic() + every) and run.running():
        rss, fds = (run.samples[-1][1], run.samples[-1][2]) if run.samples else (0, 0)
        reqs = sum(k.requests for k in run.kinds.values())
        fails = sum(k.failures for k in run.kinds.values())
        print(f"soak: {time.monotonic() - run.start:7.0f} s  requests {reqs}  failures {fails}  "
              f"serving {run.serving.current}  rss {rss / MiB:.1f} MiB  fds {fds}",
              file=sys.stderr, flush=True)


# ------------------------------------------------------------------ final checks


def expected_events(steps: list[Step]) -> list[tuple[str, str]]:
    return [("update.applied" if s.op == "apply" else "update.rolled_back", s.version) for s in steps]


def in_order(found: list[tuple[str, str]], wanted: list[tuple[str, str]]) -> bool:
    it: Iterator[tuple[str, str]] = iter(found)
    return all(any(f == w for f in it) for w in wanted)


async def final_checks(node: Any, infer: Any, steps: list[Step]) -> dict[str, Any]:
    reply = await node.GetEvents(node_pb2.GetEventsRequest(kind_prefix="update.", limit=1000),
                                 timeout=CALL_TIMEOUT_S)
    found = [(e.kind, e.details.get("version", "")) for e in reply.events]
    want = steps[-1].version if steps else FIRST
    answer = await infer.ModelInfer(infer_request(), timeout=CALL_TIMEOUT_S)
    problem = check_answer(answer)
    if problem is None and answer.model_version != want:
        problem = f"answered by {answer.model_version}, expected {want}"
    return {"events": [list(e) for e in found], "events_expected": [list(e) for e in expected_events(steps)],
            "final_version": answer.model_version, "final_problem": problem}


def growth(samples: list[tuple[float, int, int, int, int]], column: int, warmup: float,
           window: int = 1) -> dict[str, Any]:
    """First, max and growth of one column after the warm-up.  With ``window`` > 1 each value
    is the fewest over that many consecutive samples: what stayed, not what came and went."""
    after = [s[column] for s in samples if s[0] >= warmup]
    after = [min(after[i:i + window]) for i in range(max(0, len(after) - window + 1))]
    every = [s[column] for s in samples]
    out: dict[str, Any] = {"samples": len(every), "samples_after_warmup": len(after),
                           "min": min(every, default=None), "max": max(every, default=None)}
    if window > 1:
        out["window"] = window
    if len(after) >= 2:
        out |= {"first_after_warmup": after[0], "max_after_warmup": max(after),
                "last": after[-1], "growth_pct": round((max(after) / after[0] - 1) * 100, 2)}
    return out


# ------------------------------------------------------------------ the run


@dataclass(frozen=True)
class Options:
    minutes: float
    concurrency: int
    updates: int
    rollback: bool
    sample_s: float
    max_growth_pct: float
    seed: int


async def drive(site: Site, agent: AgentProcess, opts: Options) -> tuple[Run, dict[str, Any], list[Step]]:
    duration = opts.minutes * 60
    run = Run(deadline=time.monotonic() + duration, stop=asyncio.Event())
    steps = plan(opts.updates, opts.rollback)
    rng = random.Random(opts.seed)
    n_watch = n_info = max(1, opts.concurrency // 16)
    n_infer = max(1, opts.concurrency - n_watch - n_info)
    n_channels = max(1, math.ceil(n_infer / 16))
    observers = [_channel(agent.port, site.pki, "observer", i) for i in range(n_channels)]
    operator = _channel(agent.port, site.pki, "operator", 1000)
    admin = _channel(agent.port, site.pki, "admin", 1001)
    infers = [grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch) for ch in observers]  # type: ignore[no-untyped-call]
    nodes = [node_pb2_grpc.NodeStub(ch) for ch in observers]  # type: ignore[no-untyped-call]
    try:
        # every connection is open before the warm-up ends: the operator's and the admin's
        # would otherwise appear at the first update as one more open fd each
        await asyncio.wait_for(asyncio.gather(*(ch.channel_ready() for ch in [*observers, operator, admin])),
                               CALL_TIMEOUT_S)
        tasks = [asyncio.create_task(infer_worker(run, infers[i % len(infers)])) for i in range(n_infer)]
        tasks += [asyncio.create_task(watch_worker(run, nodes[i % len(nodes)], random.Random(rng.random())))
                  for i in range(n_watch)]
        tasks += [asyncio.create_task(info_worker(run, nodes[i % len(nodes)], i)) for i in range(n_info)]
        tasks.append(asyncio.create_task(update_driver(
            run, node_pb2_grpc.NodeStub(operator), node_pb2_grpc.NodeStub(admin),  # type: ignore[no-untyped-call]
            steps, duration)))
        tasks.append(asyncio.create_task(sampler(run, agent.pid, opts.sample_s)))
        tasks.append(asyncio.create_task(progress(run, 60.0)))
        try:
            # callers stop by themselves at the deadline; a watch may hold a second longer
            done, pending = await asyncio.wait(tasks, timeout=duration + CALL_TIMEOUT_S + 30)
        finally:
            run.stop.set()
        for t in pending:
            t.cancel()
        for t in done:
            if t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        if pending:
            run.kind("bench").fail(f"{len(pending)} callers still running {CALL_TIMEOUT_S + 30:.0f} s "
                                   "after the deadline")
        final = await final_checks(nodes[0], infers[0], steps)
    finally:
        for ch in [*observers, operator, admin]:
            await ch.close()
    return run, final, steps


def evaluate(run: Run, final: dict[str, Any], steps: list[Step], opts: Options, alive: bool,
             exit_status: int) -> dict[str, Any]:
    duration = opts.minutes * 60
    warmup = min(0.2 * duration, 300.0)
    rss = growth(run.samples, 1, warmup)
    fds = growth(run.samples, 2, warmup)
    # An agent with ~20 fds open has one more for a few seconds now and then (a file an
    # in-flight call reads): +5 % by the raw max.  A leaked fd stays: judge the count that
    # held over RETAINED_WINDOW consecutive samples.
    fds_retained = growth(run.samples, 2, warmup, RETAINED_WINDOW)
    threads = growth(run.samples, 3, warmup)
    fds_most = growth(run.samples, 4, warmup)
    failures = sum(k.failures for k in run.kinds.values())
    applied = [u for u in run.updates if "error" not in u]

    def flat(g: dict[str, Any]) -> tuple[bool, str]:
        if "growth_pct" not in g:
            return False, f"only {g['samples_after_warmup']} samples after the warm-up"
        return g["growth_pct"] < opts.max_growth_pct, (
            f"{g['first_after_warmup']} -> max {g['max_after_warmup']} ({g['growth_pct']:+.2f} %)")

    criteria = {
        "no_failed_requests": (failures == 0, f"{failures} failed"),
        "updates_succeeded": (len(applied) == len(steps) and all(
            u.get("outcome") in ("applied", "rolled-back") for u in applied),
            "; ".join(f"{u['op']} {u['version']}: {u.get('outcome', u.get('error'))}" for u in run.updates)),
        "update_events_in_order": (in_order([(e[0], e[1]) for e in final["events"]],
                                            expected_events(steps)), f"found {final['events']}"),
        "final_version_answers": (final["final_problem"] is None,
                                  final["final_problem"] or f"{final['final_version']} answers correctly"),
        "rss_flat": flat(rss),
        "fds_flat": flat(fds_retained),
        "agent_alive_and_clean_exit": (alive and exit_status == 0,
                                       f"alive at end: {alive}, exit status {exit_status}"),
    }
    return {
        "minutes": opts.minutes, "concurrency": opts.concurrency, "warmup_s": warmup,
        "sample_s": opts.sample_s, "max_growth_pct": opts.max_growth_pct,
        "kinds": {name: k.summary() for name, k in sorted(run.kinds.items())},
        "requests": sum(k.requests for k in run.kinds.values()), "failures": failures,
        "answers_by_version": dict(sorted(run.versions.items())), "watch_reports": run.watch_reports,
        "rss_bytes": rss, "fds": fds, "fds_retained": fds_retained,
        "fds_most_in_burst": fds_most, "threads": threads,
        "samples": [list(s) for s in run.samples],
        "updates": run.updates, **final,
        "criteria": {k: {"ok": ok, "detail": d} for k, (ok, d) in criteria.items()},
        "ok": all(ok for ok, _ in criteria.values()),
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"soak: {result['minutes']} min at concurrency {result['concurrency']}; warm-up "
          f"{result['warmup_s']:.0f} s; {result['requests']} requests, {result['failures']} failed")
    print(f"{'kind':<10} {'requests':>9} {'failures':>9} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}")
    for name, k in result["kinds"].items():
        cells = [f"{k[c]:9.2f}" if k[c] is not None else f"{'-':>9}" for c in ("p50_ms", "p99_ms", "max_ms")]
        print(f"{name:<10} {k['requests']:9d} {k['failures']:9d} {' '.join(cells)}")
        for example in k["examples"]:
            print(f"{'':<10} e.g. {example}")
    for label, key, unit in (("RSS MiB", "rss_bytes", MiB), ("fds", "fds", 1),
                             ("fds held", "fds_retained", 1), ("fds most", "fds_most_in_burst", 1),
                             ("threads", "threads", 1)):
        g = result[key]
        if "growth_pct" in g:
            print(f"{label:<8} first after warm-up {g['first_after_warmup'] / unit:.1f}, max "
                  f"{g['max_after_warmup'] / unit:.1f}, last {g['last'] / unit:.1f} "
                  f"({g['growth_pct']:+.2f} %; {g['samples_after_warmup']} samples)")
    print(f"answers by version: {result['answers_by_version']}")
    print(f"update events: {result['events']}")
    if "agent_log" in result:
        a = result["agent_log"]
        print(f"agent log: {a['lines']} lines, {a['tracebacks']} tracebacks, "
              f"{a['update_lines']} update lines")
    for name, c in result["criteria"].items():
        print(f"{'PASS' if c['ok'] else 'FAIL'} {name}: {c['detail']}")


def parse_args(argv: list[str] | None) -> tuple[Options, bool, Path | None]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="length of the run (default 30)")
    ap.add_argument("--concurrency", type=int, default=64, help="closed-loop callers (default 64)")
    ap.add_argument("--updates", type=int, choices=(0, 1, 2), default=2, help="updates applied (default 2)")
    ap.add_argument("--no-rollback", dest="rollback", action="store_false", help="skip the rollback")
    ap.add_argument("--sample-s", type=float, default=10.0, help="RSS/fd sampling period (default 10)")
    ap.add_argument("--max-growth-pct", type=float, default=5.0, help="allowed growth after warm-up")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the result as JSON only")
    ap.add_argument("--out", type=Path, help="also write the JSON result here")
    args = ap.parse_args(argv)
    if args.concurrency < 3:
        ap.error("--concurrency must be at least 3 (inference, watch, info)")
    opts = Options(minutes=args.minutes, concurrency=args.concurrency, updates=args.updates,
                   rollback=args.rollback, sample_s=args.sample_s,
                   max_growth_pct=args.max_growth_pct, seed=args.seed)
    return opts, args.json, args.out


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so that the agent is stopped either way."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    opts, as_json, out = parse_args(argv)
    with sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="soak-") as tmp_name:
        site = build_site(Path(tmp_name))
        agent = AgentProcess(site)
        try:
            print(f"soak: agent pid {agent.pid} on 127.0.0.1:{agent.port} (mTLS); "
                  f"{opts.minutes} min at concurrency {opts.concurrency}", file=sys.stderr, flush=True)
            run, final, steps = asyncio.run(drive(site, agent, opts))
            alive = agent.alive()
        finally:
            exit_status = agent.stop()
        result = evaluate(run, final, steps, opts, alive, exit_status)
        log = agent.log()
        result["agent_log"] = {"lines": log.count("\n"), "tracebacks": log.count("Traceback"),
                               "update_lines": sum(1 for line in log.splitlines() if "update." in line)}
        if not result["ok"]:
            result["agent_log_tail"] = log[-4000:]
    text = json.dumps(result, indent=1)
    if out is not None:
        out.write_text(text + "\n")
    if as_json:
        print(text)
    else:
        print_table(result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
