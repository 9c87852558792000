"""Sealed mode (issue #17) from the fleet's side: a real agent process whose boot left the data
partition sealed (the initrd's marker and escrow, as provisioning.image.sealed_mode writes them),
over mTLS on loopback, asked by the fleet CLI.

The node's root helper is played here by a thread that follows its contract (take the request
file, answer in result.json); the helper itself runs against a real LUKS2 volume in
tests/test_unseal_helper.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from agent.proto import node_pb2, node_pb2_grpc
from provisioning.pki import init_pki, issue_client, issue_node
from tests.conftest import run_appliance
from testsupport.inference_support import Agent
from testsupport.secure_server import mtls_config

KEY = "-".join(["vvvvcccc", "bbbbdddd", "eeeeffff", "gggghhhh", "iiiijjjj", "kkkkllll", "nnnnrrrr",
                "ttttuuuu"])
PCR7 = "a1" * 32
PCR11 = "0b" * 32


@dataclass
class Helper:
    """The root helper's side of the contract: takes the key file, answers in result.json."""

    request: Path
    result: Path
    answer: Callable[[str], tuple[bool, str]] = lambda key: (True, "sealed to this TPM again; rebooting")
    keys: list[str] = field(default_factory=list)
    modes: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self._stop.is_set():
            if self.request.exists():
                self.modes.append(self.request.stat().st_mode & 0o777)
                key = self.request.read_text()
                self.request.unlink()
                self.keys.append(key)
                ok, message = self.answer(key)
                tmp = self.result.with_name(".result.tmp")
                tmp.write_text(json.dumps({"ok": ok, "message": message}))
                tmp.replace(self.result)
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()


@dataclass
class Site:
    work: Path
    pki: Path
    recovery: rsa.RSAPrivateKey
    agent: Agent
    helper: Helper
    inventory: Path

    def auth(self, role: str) -> list[str]:
        d = self.pki / "issued" / role
        return ["--ca", str(self.pki / "ca.crt"), "--cert", str(d / f"{role}.crt"),
                "--key", str(d / f"{role}.key")]

    def channel(self, role: str = "admin", port: int = 0) -> grpc.Channel:
        d = self.pki / "issued" / role
        creds = grpc.ssl_channel_credentials((self.pki / "ca.crt").read_bytes(),
                                             (d / f"{role}.key").read_bytes(),
                                             (d / f"{role}.crt").read_bytes())
        return grpc.secure_channel(f"localhost:{port or self.agent.port}", creds)

    def stub(self, role: str = "admin", port: int = 0) -> Any:
        return node_pb2_grpc.NodeStub(self.channel(role, port))  # type: ignore[no-untyped-call]


def _pem(key: rsa.RSAPrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _agent_config(work: Path, pki: Path, name: str, marker: Path) -> Path:
    config = mtls_config(work, pki, name)
    config.write_text(config.read_text() + f'\n[seal]\nmarker = "{marker}"\n'
                      f'escrow = "{marker.with_name("recovery-key.enc")}"\n'
                      f'request = "{work / "agent-run" / "key"}"\n'
                      f'result = "{work / "helper-run" / "result.json"}"\nunseal_timeout_s = 10\n')
    return config


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    work = tmp_path_factory.mktemp("sealed")
    pki = work / "pki"
    init_pki(pki, organization="Sealed Site")
    issue_node(pki, "node", dns=["localhost"], ips=["127.0.0.1"])
    for role in ("observer", "operator", "admin"):
        issue_client(pki, role, role)
    recovery = rsa.generate_private_key(65537, 3072)
    _pem(recovery, work / "recovery.key")
    # what the initrd leaves in /run/appliance when the TPM refused the key
    run = work / "run-appliance"
    run.mkdir()
    (run / "sealed.json").write_text(json.dumps({
        "reason": "measurements changed: the TPM refused the key (PCR 7 or the signed PCR 11 policy)",
        "device": "/dev/disk/by-partuuid/1234", "pcrs_sha256": {"7": PCR7.upper(), "11": PCR11}}))
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    (run / "recovery-key.enc").write_bytes(recovery.public_key().encrypt(KEY.encode(), oaep))
    (work / "agent-run").mkdir()
    (work / "helper-run").mkdir()
    helper = Helper(work / "agent-run" / "key", work / "helper-run" / "result.json")
    thread = threading.Thread(target=helper.run, daemon=True)
    thread.start()
    state = work / "state"
    agent = Agent(state, "--config", str(_agent_config(work, pki, "node", run / "sealed.json")))
    inventory = work / "nodes.toml"
    inventory.write_text(f'[[nodes]]\nname = "node"\naddress = "localhost"\nport = {agent.port}\n')
    try:
        yield Site(work, pki, recovery, agent, helper, inventory)
    finally:
        assert agent.stop() == 0, agent.log()
        helper.stop()
        thread.join(5)


def _unseal(site: Site, role: str, *extra: str) -> tuple[int, dict[str, Any], str]:
    proc = run_appliance("fleet", "unseal", "-i", site.inventory, "--recovery-key",
                         site.work / "recovery.key", *site.auth(role), "--json", *extra, timeout=120)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}, proc.stderr


def test_a_sealed_node_says_why_with_the_pcrs_and_serves_no_model(site: Site) -> None:
    report = site.stub("observer").GetHealth(node_pb2.GetHealthRequest(), timeout=10)
    seal = report.data_seal
    assert seal.sealed and seal.reason.startswith("measurements changed")
    assert dict(seal.pcrs_sha256) == {"7": PCR7, "11": PCR11}
    assert seal.recovery_escrow == (site.work / "run-appliance" / "recovery-key.enc").read_bytes()
    rule = next(r for r in report.rules if r.rule == "data.sealed")
    assert node_pb2.Verdict.Name(rule.verdict) == "FAIL" and node_pb2.Verdict.Name(report.overall) == "FAIL"
    assert "data sealed: measurements changed" in rule.reason and f"PCR 7 {PCR7[:16]}" in rule.reason
    ask = node_pb2.GetEventsRequest(kind_prefix="data.")
    events = site.stub("observer").GetEvents(ask, timeout=10).events
    sealed = [e for e in events if e.kind == "data.sealed"]
    assert len(sealed) == 1 and sealed[0].severity == "error"
    assert sealed[0].details["pcr7_sha256"] == PCR7 and sealed[0].details["pcr11_sha256"] == PCR11
    # no model, no inference service at all: the state directory is a RAM copy of the image's
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    inference = service_pb2_grpc.GRPCInferenceServiceStub(site.channel("observer"))
    with pytest.raises(grpc.RpcError) as info:
        inference.ServerReady(service_pb2.ServerReadyRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "sealed mode" in site.agent.log()


def test_only_an_admin_may_send_the_key(site: Site) -> None:
    before = len(site.helper.keys)
    for role in ("observer", "operator"):
        code, doc, err = _unseal(site, role)
        assert code == 1, err
        reason = doc["nodes"][0]["reason"]
        assert "PERMISSION_DENIED" in reason or "permission" in reason.lower(), reason
    assert len(site.helper.keys) == before


def test_fleet_unseal_opens_the_escrow_the_node_sent_and_hands_the_key_to_the_helper(site: Site) -> None:
    before = len(site.helper.keys)
    code, doc, err = _unseal(site, "admin")
    assert code == 0, err
    node = doc["nodes"][0]
    assert node["ok"] and node["data"]["state"] == "unsealed", node
    assert node["data"]["message"] == "sealed to this TPM again; rebooting"
    assert node["data"]["pcrs_sha256"] == {"7": PCR7, "11": PCR11}
    assert site.helper.keys[before:] == [KEY] and site.helper.modes[-1] == 0o600
    events = site.stub().GetEvents(node_pb2.GetEventsRequest(kind_prefix="data.unsealed"), timeout=10).events
    assert events and events[-1].message == "sealed to this TPM again; rebooting"


def test_another_site_key_sends_nothing(site: Site) -> None:
    before = len(site.helper.keys)
    _pem(rsa.generate_private_key(65537, 3072), site.work / "other.key")
    proc = run_appliance("fleet", "unseal", "-i", site.inventory, "--recovery-key",
                         site.work / "other.key", *site.auth("admin"), timeout=120)
    assert proc.returncode == 1
    assert "still sealed" in proc.stdout + proc.stderr and "does not decrypt" in proc.stdout + proc.stderr
    assert len(site.helper.keys) == before


def test_a_refusal_by_the_helper_is_the_nodes_answer(site: Site) -> None:
    refusal = "the recovery key does not open the data partition; nothing changed"
    site.helper.answer = lambda key: (False, refusal)
    try:
        code, doc, _ = _unseal(site, "admin")
    finally:
        site.helper.answer = lambda key: (True, "sealed to this TPM again; rebooting")
    assert code == 1
    assert "unseal refused: the recovery key does not open the data partition" in doc["nodes"][0]["reason"]
    ask = node_pb2.GetEventsRequest(kind_prefix="data.unseal_refused")
    events = site.stub().GetEvents(ask, timeout=10).events
    assert events and "does not open" in events[-1].message


@pytest.mark.parametrize("key", ["", "cccccccc", KEY.upper(), KEY + "-cccccccc", KEY.replace("-", " "),
                                 "../../etc/shadow"])
def test_what_is_not_a_recovery_key_is_refused_and_not_handed_on(site: Site, key: str) -> None:
    before = len(site.helper.keys)
    with pytest.raises(grpc.RpcError) as info:
        site.stub().Unseal(node_pb2.UnsealRequest(recovery_key=key), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a recovery key" in str(info.value.details())
    assert len(site.helper.keys) == before and not site.helper.request.exists()


def test_a_node_whose_data_opened_is_left_alone(site: Site, tmp_path: Path) -> None:
    config = _agent_config(tmp_path, site.pki, "node", tmp_path / "no-such-marker.json")
    agent = Agent(tmp_path / "state", "--config", str(config))
    try:
        inventory = tmp_path / "nodes.toml"
        inventory.write_text(f'[[nodes]]\nname = "node"\naddress = "localhost"\nport = {agent.port}\n')
        proc = run_appliance("fleet", "unseal", "-i", inventory, "--recovery-key",
                             site.work / "recovery.key", *site.auth("admin"), "--json", timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["nodes"][0]["data"]["state"] == "open"
        proc = run_appliance("fleet", "escrow", "-i", inventory, "--out", tmp_path / "escrows",
                             *site.auth("observer"), "--json", timeout=120)
        assert proc.returncode == 1
        assert "no usable escrow: the node has none" in json.loads(proc.stdout)["nodes"][0]["reason"]
        stub = site.stub("admin", agent.port)
        report = stub.GetHealth(node_pb2.GetHealthRequest(), timeout=10)
        assert not report.HasField("data_seal") and all(r.rule != "data.sealed" for r in report.rules)
        with pytest.raises(grpc.RpcError) as info:
            stub.Unseal(node_pb2.UnsealRequest(recovery_key=KEY), timeout=10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "nothing to unseal" in str(info.value.details())
    finally:
        assert agent.stop() == 0, agent.log()


def test_the_fleet_collects_escrows_and_checks_the_site_key_opens_them(site: Site, tmp_path: Path) -> None:
    out = tmp_path / "escrows"
    proc = run_appliance("fleet", "escrow", "-i", site.inventory, "--out", out, "--recovery-key",
                         site.work / "recovery.key", *site.auth("observer"), "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    node = json.loads(proc.stdout)["nodes"][0]
    assert node["ok"] and node["data"]["opens_with_site_key"] is True, node
    saved = out / "node.recovery-key.enc"
    assert node["data"]["escrow"] == str(saved) and saved.stat().st_mode & 0o777 == 0o600
    assert saved.read_bytes() == (site.work / "run-appliance" / "recovery-key.enc").read_bytes()
    assert KEY not in proc.stdout + proc.stderr  # checked, never shown

    # a key that does not open it: the node fails and nothing is written
    _pem(rsa.generate_private_key(65537, 3072), tmp_path / "other.key")
    proc = run_appliance("fleet", "escrow", "-i", site.inventory, "--out", tmp_path / "other",
                         "--recovery-key", tmp_path / "other.key", *site.auth("observer"), "--json",
                         timeout=120)
    assert proc.returncode == 1
    node = json.loads(proc.stdout)["nodes"][0]
    assert not node["ok"] and "no usable escrow" in node["reason"] and "does not decrypt" in node["reason"]
    assert not list((tmp_path / "other").iterdir())


def test_a_node_name_that_cannot_be_a_file_name_is_refused(site: Site, tmp_path: Path) -> None:
    inventory = tmp_path / "nodes.toml"
    inventory.write_text(f'[[nodes]]\nname = "../node"\naddress = "localhost"\nport = {site.agent.port}\n')
    proc = run_appliance("fleet", "escrow", "-i", inventory, "--out", tmp_path / "out",
                         *site.auth("observer"), timeout=120)
    assert proc.returncode != 0 and "'../node' cannot name a file" in proc.stderr, proc.stderr
    assert not (tmp_path / "node.recovery-key.enc").exists() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- the agent's side, in-process

def test_the_initrds_marker_is_read_as_hostile_input(tmp_path: Path) -> None:
    from agent.sealed import read_seal_state

    marker, escrow = tmp_path / "sealed.json", tmp_path / "escrow"
    assert read_seal_state(marker, escrow) is None  # no marker: the data opened
    marker.write_bytes(b"\x00garbage")
    state = read_seal_state(marker, escrow)
    assert state is not None and state.reason.startswith("unknown") and state.pcrs_sha256 == {}
    marker.write_text(json.dumps({"reason": "x" * 100_000}))  # over the size read
    state = read_seal_state(marker, escrow)
    assert state is not None and state.reason.startswith("unknown")
    escrow.write_bytes(b"e" * 5000)  # no escrow is that long
    marker.write_text(json.dumps({"reason": "r" * 900, "device": 7, "pcrs_sha256": {
        "7": "AB" * 32, "11": "not hex", "x": "00", "123": "00", "0": 5, "4": "0" * 200}}))
    state = read_seal_state(marker, escrow)
    assert state is not None and len(state.reason) == 500 and state.device == ""
    assert state.pcrs_sha256 == {"7": "ab" * 32} and state.recovery_escrow == b""
    assert state.describe() == f"data sealed: {'r' * 500} (PCR 7 {'ab' * 8}…)"


def test_an_unanswered_or_stale_request_fails_and_leaves_no_key(tmp_path: Path) -> None:
    from agent.sealed import Unsealer, UnsealError

    request, result = tmp_path / "agent" / "unseal-key", tmp_path / "helper" / "result.json"
    request.parent.mkdir()
    result.parent.mkdir()
    result.write_text(json.dumps({"ok": True, "message": "an earlier request's answer"}))
    with pytest.raises(UnsealError, match="did not answer within 1 s"):
        Unsealer(request, result, timeout_s=1, poll_s=0.05).unseal(KEY)
    assert not request.exists() and not list(request.parent.iterdir())

    def garbled() -> None:
        while not request.exists():
            time.sleep(0.01)
        result.write_text("[1, 2]")

    thread = threading.Thread(target=garbled)
    thread.start()
    with pytest.raises(UnsealError, match="unreadable answer"):
        Unsealer(request, result, timeout_s=10, poll_s=0.05).unseal(KEY)
    thread.join()
    assert not list(request.parent.iterdir())  # the key is not left for a helper to act on later
