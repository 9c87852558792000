"""appliance.v1.Node over a real grpc.aio server on loopback, the node CLI against it, and
the metrics scraped over HTTP; hardware comes from the fake NVML."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import platform
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from agent.config import AgentConfig, HealthSection
from agent.context import AgentContext
from agent.cpu import cpu_flags, missing_features
from agent.events import EventLog
from agent.health.metrics import NodeCollector
from agent.health.sampler import Sampler
from agent.health.service import attach, close
from agent.proto import node_pb2, node_pb2_grpc
from tests.conftest import run_appliance
from tests.fakes.nvml import FakeGpu, FakeNvml


@dataclass
class Node:
    port: int
    target: str
    ctx: AgentContext
    sampler: Sampler
    fake: FakeNvml
    state: Path
    stub: Any
    health: Any


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    state = tmp_path / "state"
    _seed_state(state)
    cfg = AgentConfig()
    cfg = dataclasses.replace(
        cfg, server=dataclasses.replace(cfg.server, state_dir=state), health=HealthSection(interval_s=3600)
    )  # tests sample explicitly
    fake = FakeNvml([FakeGpu(uuid="GPU-0"), FakeGpu(uuid="GPU-1", bus_id="00000000:3B:00.0")])
    ctx = AgentContext(config=cfg)
    events = EventLog.open(state)
    sampler = Sampler(cfg.health, state, nvml=fake, events=events)
    sampler.XID_WAIT_MS = 50
    ctx.events, ctx.sampler = events, sampler
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def serve() -> tuple[Any, int]:
        server = grpc.aio.server()
        ctx.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(ctx.health, server)
        names = await attach(server, ctx)
        assert names == ["appliance.v1.Node"]
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(serve(), loop).result(60)
    target = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(target)
    yield Node(
        port,
        target,
        ctx,
        sampler,
        fake,
        state,
        node_pb2_grpc.NodeStub(channel),
        health_pb2_grpc.HealthStub(channel),
    )
    channel.close()
    asyncio.run_coroutine_threadsafe(close(ctx), loop).result(30)
    asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)
    loop.close()


def _seed_state(state: Path) -> None:
    """An installed bundle (the model store's layout) and the registry's trusted root."""
    vdir = state / "models" / "affine" / "1.0.0"
    vdir.mkdir(parents=True)
    (vdir / "manifest.json").write_text("{}")
    (vdir / "install.json").write_text(
        json.dumps({"sha256": "ab" * 32, "length": 10, "verified": True, "installed_at": 1_700_000_000})
    )
    (state / "models" / "affine" / "2.0.0").mkdir()  # interrupted install: no record, not listed
    (state / "models" / "affine" / "active").write_text("1.0.0\n")
    root = state / "tuf" / "metadata" / "root.json"
    root.parent.mkdir(parents=True)
    root.write_text(json.dumps({"signed": {"_type": "root", "version": 3}, "signatures": []}))


def _check(n: Node, service: str) -> int:
    return int(n.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)


def _eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.02)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# ---------------------------------------------------------------------- RPCs


def test_get_health_reflects_the_latest_sample(node: Node) -> None:
    report = node.stub.GetHealth(node_pb2.GetHealthRequest(), timeout=5)
    assert report.overall == node_pb2.PASS and report.nvml_available
    assert [g.uuid for g in report.gpus] == ["GPU-0", "GPU-1"]
    assert report.cuda_driver_version == "12.4" and report.host.memory_total_bytes > 0
    assert {d.role for d in report.host.disks} == {"root", "data"}
    node.fake.throttle(1, True)
    node.sampler.sample_once()
    report = node.stub.GetHealth(node_pb2.GetHealthRequest(), timeout=5)
    assert report.overall == node_pb2.WARN
    thermal = [r for r in report.rules if r.rule == "gpu.thermal" and r.subject == "gpu1"]
    assert thermal[0].verdict == node_pb2.WARN and "hw_thermal_slowdown" in thermal[0].reason
    assert list(report.gpus[1].throttle_reasons) == ["hw_thermal_slowdown"]


def test_grpc_health_follows_the_verdict(node: Node) -> None:
    assert _check(node, "") == SERVING and _check(node, "appliance.v1.Node") == SERVING
    node.fake.lose(0)
    node.sampler.sample_once()
    _eventually(lambda: _check(node, "") == NOT_SERVING)
    assert _check(node, "appliance.v1.Node") == SERVING  # a failed node still says why
    assert not node.sampler.serving_ok()
    node.fake.gpus[0].lost = False
    node.sampler.sample_once()
    _eventually(lambda: _check(node, "") == SERVING)


def test_watch_health_on_change_and_at_an_interval(node: Node) -> None:
    stream = node.stub.WatchHealth(node_pb2.WatchHealthRequest(interval_ms=0), timeout=20)
    first = next(stream)
    assert first.overall == node_pb2.PASS
    node.sampler.sample_once()  # same verdicts: nothing is sent
    node.fake.add_ecc(0, uncorrected=1)
    node.sampler.sample_once()
    second = next(stream)
    assert second.overall == node_pb2.FAIL and second.gpus[0].ecc_uncorrected_volatile == 1
    stream.cancel()
    ticking = node.stub.WatchHealth(node_pb2.WatchHealthRequest(interval_ms=100), timeout=20)
    reports = [next(ticking) for _ in range(3)]
    ticking.cancel()
    assert all(r.overall == node_pb2.FAIL for r in reports)


def test_inventory(node: Node) -> None:
    inv = node.stub.GetInventory(node_pb2.GetInventoryRequest(), timeout=30)
    assert inv.node_id == (node.state / "node-id").read_text().strip()
    assert node.stub.GetInventory(node_pb2.GetInventoryRequest(), timeout=30).node_id == inv.node_id
    assert inv.hostname and inv.kernel and inv.agent_version == "0.1.0"
    assert [(b.name, b.version, b.active, b.sha256) for b in inv.bundles] == [
        ("affine", "1.0.0", True, "ab" * 32)
    ]
    assert inv.registry_root_version == 3
    assert [(g.index, g.uuid, g.driver_version, g.cuda_driver_version) for g in inv.gpus] == [
        (0, "GPU-0", "550.163.01", "12.4"),
        (1, "GPU-1", "550.163.01", "12.4"),
    ]
    assert "CPUExecutionProvider" in inv.execution_providers
    assert inv.image_version == "" or inv.image_version  # from image.json / os-release when present
    # no image.json here: the default level, checked against this machine's own /proc/cpuinfo
    assert inv.cpu_level_required == "x86-64-v2"
    if platform.machine() == "x86_64":
        assert tuple(inv.cpu_missing_features) == missing_features("x86-64-v2", cpu_flags())


def test_attest_on_a_node_without_an_attestation_key_says_so(node: Node) -> None:
    """Not enrolled (the default config has no AK certificate): FAILED_PRECONDITION that says
    so; a nonce a verifier could not trust is refused before the TPM is asked."""
    with pytest.raises(grpc.RpcError) as err:
        node.stub.Attest(node_pb2.AttestRequest(nonce=bytes(32)), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "ak_certificate is not set" in str(err.value.details())
    with pytest.raises(grpc.RpcError) as err:
        node.stub.Attest(node_pb2.AttestRequest(nonce=b"short"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nonce: 5 bytes; expected 16..64" in str(err.value.details())


def test_inventory_prefers_the_inference_component(node: Node) -> None:
    class Repo:
        def installed(self) -> list[dict[str, Any]]:
            return [
                {
                    "name": "resnet",
                    "version": "2.1",
                    "sha256": "cd" * 32,
                    "active": True,
                    "installed_at": 5.0,
                    "loaded": True,
                }
            ]

    node.ctx.inference = Repo()
    inv = node.stub.GetInventory(node_pb2.GetInventoryRequest(), timeout=30)
    assert [(b.name, b.version, b.installed_at.seconds) for b in inv.bundles] == [("resnet", "2.1", 5)]


def test_events_and_filters(node: Node) -> None:
    node.sampler.note_xid(1, 79)
    node.fake.throttle(0, True)
    node.sampler.sample_once()
    events = node.stub.GetEvents(node_pb2.GetEventsRequest(), timeout=5).events
    kinds = [e.kind for e in events]
    assert "gpu.xid" in kinds and "gpu.throttle.start" in kinds
    xid = next(e for e in events if e.kind == "gpu.xid")
    assert (xid.subject, xid.severity, xid.details["xid"], xid.details["uuid"]) == (
        "gpu1",
        "error",
        "79",
        "GPU-1",
    )
    assert xid.time.seconds > 0
    gpu_only = node.stub.GetEvents(node_pb2.GetEventsRequest(kind_prefix="gpu."), timeout=5).events
    assert gpu_only and all(e.kind.startswith("gpu.") for e in gpu_only)
    after = node.stub.GetEvents(node_pb2.GetEventsRequest(after_seq=xid.seq, limit=1), timeout=5).events
    assert len(after) == 1 and after[0].seq > xid.seq


def test_update_rpcs_are_unimplemented_until_the_updates_component(node: Node) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        node.stub.CheckUpdates(node_pb2.CheckUpdatesRequest(), timeout=5)
    assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "updates component" in exc.value.details()


# ---------------------------------------------------------------------- CLI


def test_cli_health_table_json_and_check(node: Node, cli: Callable[..., Any]) -> None:
    out = cli("node", "health", "--target", node.target)
    assert out.code == 0 and "health: PASS" in out.out and "GPU-0" not in out.out
    assert "NVIDIA H100 80GB HBM3" in out.out and "gpu.thermal" in out.out
    node.fake.gpus[0].power_mw = 800_000
    node.sampler.sample_once()
    out = cli("node", "health", "--target", node.target, "--json", "--check")
    assert out.code == 1  # WARN
    data = json.loads(out.out)
    assert data["overall"] == "WARN" and data["gpus"][0]["power_w"] == 800.0
    assert any(r["rule"] == "gpu.power" and r["verdict"] == "WARN" for r in data["rules"])


def test_cli_inventory_and_events(node: Node, cli: Callable[..., Any]) -> None:
    out = cli("node", "inventory", "--target", node.target, "--json")
    assert out.code == 0 and json.loads(out.out)["registry_root_version"] == "3"
    out = cli("node", "inventory", "--target", node.target)
    assert "affine" in out.out and "registry root        3" in out.out
    assert "cpu level            x86-64-v2" in out.out
    node.sampler.note_xid(0, 48)
    out = cli("node", "events", "--target", node.target, "--kind", "gpu.")
    assert out.code == 0 and "gpu.xid" in out.out and "XID 48 on gpu0 (critical)" in out.out
    out = cli("node", "events", "--target", node.target, "--json", "--kind", "gpu.xid")
    assert [e["details"]["xid"] for e in json.loads(out.out)] == ["48"]


def test_cli_watch_as_a_process(node: Node) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "provisioning.cli",
            "node",
            "health",
            "--watch",
            "--json",
            "--interval",
            "0.1",
            "--target",
            node.target,
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    try:
        assert proc.stdout is not None
        lines = [json.loads(proc.stdout.readline()) for _ in range(2)]
    finally:
        proc.terminate()
        proc.wait(10)
    assert all(line["overall"] == "PASS" for line in lines)


def test_cli_unreachable_node_is_a_clear_error() -> None:
    result = run_appliance("node", "health", "--target", "127.0.0.1:1", "--timeout", "2")
    assert result.returncode == 1
    assert "127.0.0.1:1: UNAVAILABLE" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------- metrics


def test_metrics_scraped_over_http(node: Node) -> None:
    node.fake.gpus[1].temperature_c = 77
    node.fake.gpus[1].memory_used = 3 << 30
    node.fake.gpus[1].pcie_replay = 9
    node.fake.add_ecc(1, corrected=4)
    node.sampler.note_xid(1, 31)
    node.fake.lose(0)
    node.sampler.sample_once()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(lambda: node.sampler.latest))
    httpd, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{httpd.server_port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    finally:
        httpd.shutdown()
        thread.join(10)
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, s.labels.get("gpu", ""), s.labels.get("rule", ""), s.labels.get("subject", ""))
            samples[key] = (s.value, s.labels)
    value, labels = samples[("DCGM_FI_DEV_GPU_TEMP", "1", "", "")]
    assert value == 77 and labels["UUID"] == "GPU-1" and labels["device"] == "nvidia1"
    assert labels["pci_bus_id"] == "00000000:3B:00.0" and labels["modelName"] == "NVIDIA H100 80GB HBM3"
    assert samples[("DCGM_FI_DEV_FB_USED", "1", "", "")][0] == 3 * 1024  # MiB, as DCGM
    assert samples[("DCGM_FI_DEV_XID_ERRORS", "1", "", "")][0] == 31
    assert samples[("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "1", "", "")][0] == 9
    assert samples[("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "1", "", "")][0] == 4
    assert samples[("DCGM_FI_DEV_POWER_USAGE", "1", "", "")][0] == 72.0
    for name in (
        "DCGM_FI_DEV_GPU_UTIL",
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
        "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
        "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
    ):
        assert (name, "1", "", "") in samples
    assert ("DCGM_FI_DEV_GPU_TEMP", "0", "", "") not in samples  # a lost GPU reports nothing
    assert samples[("appliance_node_gpu_lost", "0", "", "")][0] == 1
    assert samples[("appliance_node_health_status", "", "", "")][0] == 3  # FAIL
    assert samples[("appliance_node_health_rule_status", "", "gpu.lost", "gpu0")][0] == 3
    assert (
        samples[("appliance_node_memory_total_bytes", "", "", "")][0]
        == node.sampler.latest.sample.host.memory_total_bytes
    )  # type: ignore[union-attr]
    assert ("appliance_node_network_receive_bytes_total", "", "", "") in samples
