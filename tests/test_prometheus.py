"""`appliance fleet sd` and the Grafana dashboards: every metric a dashboard asks for is one a
real agent exports (scraped on loopback; GPU metrics from the fake NVML)."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, start_http_server

from agent.config import HealthSection
from agent.health.metrics import NodeCollector
from agent.health.sampler import Sampler
from provisioning.demo.models import affine_model
from tests.conftest import run_appliance
from tests.fakes.nvml import FakeGpu, FakeNvml
from testsupport.inference_support import Agent, free_port, install, make_bundle, raw_request, stub

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((ROOT / "provisioning" / "dashboards").glob("*.json"))
METRIC = re.compile(r"\b(nv_inference_[a-z_]+|DCGM_FI_[A-Z_]+|appliance_node_[a-z_]+)\b")


def _names(text: str) -> set[str]:
    """Sample names of a Prometheus text exposition."""
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines()
            if line and not line.startswith("#")}


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """What a real agent serving one model exports after an inference, plus the GPU metrics
    its collector exports for two fake GPUs."""
    tmp = tmp_path_factory.mktemp("metrics")
    state = tmp / "state"
    x = np.ones((1, 4), np.float32)
    install(state, make_bundle(tmp, affine_model(tmp / "a.onnx"), "affine", "1.0.0", {"x": x}))
    port = free_port()
    agent = Agent(state, metrics_port=port)
    try:
        stb, pb = stub(agent.url)
        stb.ModelInfer(raw_request(pb, "affine", [("x", "FP32", [1, 4], x.tobytes())]), timeout=30)
        names = _names(_scrape(port))
    finally:
        assert agent.stop() == 0

    fake = FakeNvml([FakeGpu(uuid="GPU-0"), FakeGpu(uuid="GPU-1", bus_id="00000000:3B:00.0")])
    sampler = Sampler(HealthSection(interval_s=3600), tmp / "gpu-state", nvml=fake)
    sampler.sample_once()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(lambda: sampler.latest))
    httpd, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        names |= _names(_scrape(httpd.server_port))
    finally:
        httpd.shutdown()
        thread.join(10)
    return names


def _expressions(path: Path) -> list[str]:
    dashboard = json.loads(path.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def test_dashboards_exist_for_inference_and_gpus() -> None:
    used = {m for path in DASHBOARDS for e in _expressions(path) for m in METRIC.findall(e)}
    assert {p.name for p in DASHBOARDS} >= {"inference.json", "gpu.json"}
    assert any(m.startswith("nv_inference_") for m in used) and any(m.startswith("DCGM_FI_") for m in used)


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=lambda p: p.name)
def test_every_metric_in_a_dashboard_is_exported(exported: set[str], dashboard: Path) -> None:
    data = json.loads(dashboard.read_text())
    assert data["uid"] and data["title"] and data["panels"]
    used = {m for e in _expressions(dashboard) for m in METRIC.findall(e)}
    assert used, f"{dashboard.name}: no expression names an appliance metric"
    assert not used - exported, f"{dashboard.name} uses metrics no agent exports: {sorted(used - exported)}"


def test_fleet_sd_writes_targets_and_prints_the_tls_job(tmp_path: Path) -> None:
    inventory = tmp_path / "hosts.ini"
    inventory.write_text("[appliances]\nnode-a ansible_host=10.0.0.5\nnode-b ansible_host=fd00::7\n"
                         "[edge]\nnode-a\n")
    out = tmp_path / "sd" / "appliance.json"
    out.parent.mkdir()
    proc = run_appliance("fleet", "sd", "-i", inventory, "--out", out, "--ca", tmp_path / "ca.crt",
                         "--cert", tmp_path / "prom.crt", "--key", tmp_path / "prom.key")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text()) == [
        {"targets": ["10.0.0.5:8002"], "labels": {"node": "node-a", "group": "appliances,edge"}},
        {"targets": ["[fd00::7]:8002"], "labels": {"node": "node-b", "group": "appliances"}},
    ]
    for line in (f"ca_file: {tmp_path / 'ca.crt'}", f"cert_file: {tmp_path / 'prom.crt'}",
                 f"key_file: {tmp_path / 'prom.key'}", "server_name", "scheme: https",
                 f"- files: [{out}]"):
        assert line in proc.stdout, proc.stdout

    tls_named = tmp_path / "nodes.toml"
    tls_named.write_text('[[nodes]]\nname = "n1"\naddress = "192.0.2.1"\nport = 8001\n'
                         'tls_name = "appliance.site"\n')
    proc = run_appliance("fleet", "sd", "-i", tls_named, "--metrics-port", "9402", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["targets"] == [{"targets": ["192.0.2.1:9402"], "labels": {"node": "n1", "group": ""}}]
    assert "      server_name: appliance.site\n" in result["scrape_config"]
