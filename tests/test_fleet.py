"""`appliance fleet` against real agents' gRPC surfaces on loopback (mTLS), some never answering;
rollouts that wait for attestation against Node servicers on loopback that quote like a TPM."""

from __future__ import annotations

import contextlib
import datetime
import json
import socket
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from agent.proto import node_pb2, node_pb2_grpc
from provisioning.fleet import Node, load_inventory, plan_rollout
from provisioning.pki import init_pki, issue_client, issue_node
from tests.conftest import CliResult
from testsupport import attest_support
from testsupport.pe import pe_image
from testsupport.secure_server import mtls_config, spawn

DEADLINE = "2"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A PKI, one agent process listening on 9 ports, and one silent listener (accepts, never speaks)."""
    work = tmp_path_factory.mktemp("fleet")
    pki = work / "pki"
    init_pki(pki, organization="Fleet Site")
    issue_node(pki, "node", dns=["localhost"], ips=["127.0.0.1"])
    for role in ("observer", "operator"):
        issue_client(pki, role, role)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # the kernel completes connections; nothing ever answers
    with spawn(mtls_config(work, pki), ports=9) as (ports, _pid):
        yield {"work": work, "pki": pki, "ports": ports, "silent": silent.getsockname()[1]}
    silent.close()


def _auth(site: dict[str, Any], role: str) -> list[str]:
    d = site["pki"] / "issued" / role
    return ["--ca", str(site["pki"] / "ca.crt"), "--cert", str(d / f"{role}.crt"),
            "--key", str(d / f"{role}.key")]


def _toml(site: dict[str, Any], path: Path) -> Path:
    lines = []
    for i, port in enumerate(site["ports"]):
        lines.append(f'[[nodes]]\nname = "n{i}"\naddress = "localhost"\nport = {port}\n'
                     f'groups = ["{"canary" if i == 0 else "rest"}"]\n')
    # The silent node comes fifth: in the second batch of a rollout in batches of 3.
    lines.insert(4, f'[[nodes]]\nname = "dead"\naddress = "127.0.0.1"\nport = {site["silent"]}\n'
                    'tls_name = "localhost"\ngroups = ["rest"]\n')
    path.write_text("\n".join(lines))
    return path


def _json(result: CliResult) -> Any:
    return json.loads(result.out)


def test_status_reports_every_node_and_each_silent_one(cli: Callable[..., CliResult], site: dict[str, Any],
                                                        tmp_path: Path) -> None:
    inv = _toml(site, tmp_path / "nodes.toml")
    result = cli("fleet", "status", "-i", inv, "--deadline", DEADLINE, "--json", *_auth(site, "observer"))
    assert result.code == 1  # not every node answered
    data = _json(result)
    by_name = {n["name"]: n for n in data["nodes"]}
    assert data["summary"] == {"total": 10, "ok": 9, "failed": 1}
    assert by_name["dead"]["reason"] == f"no answer within {DEADLINE} s"
    assert all(by_name[f"n{i}"]["ok"] and by_name[f"n{i}"]["data"]["overall"] == "VERDICT_UNSPECIFIED"
               for i in range(9))
    table = cli("fleet", "status", "-i", inv, "--deadline", DEADLINE, *_auth(site, "observer"))
    assert "DOWN" in table.out and "no answer within" in table.out
    assert "9 of 10 nodes answered" in table.err


def test_refused_port_is_reported_as_unreachable(cli: Callable[..., CliResult], site: dict[str, Any],
                                                 tmp_path: Path) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    inv = tmp_path / "one.toml"
    inv.write_text(f'[[nodes]]\nname = "gone"\naddress = "127.0.0.1"\nport = {port}\n')
    data = _json(cli("fleet", "health", "-i", inv, "--json", *_auth(site, "observer")))
    assert data["nodes"][0]["reason"].startswith("unreachable:")


def test_ansible_inventories_and_limits(cli: Callable[..., CliResult], site: dict[str, Any],
                                        tmp_path: Path) -> None:
    ports = site["ports"]
    ini = tmp_path / "hosts.ini"
    ini.write_text("[edge]\n" + "".join(f"e{i} ansible_host=localhost appliance_port={p}\n"
                                         for i, p in enumerate(ports[:3]))
                   + "[core]\n" + f"c0 ansible_host=localhost appliance_port={ports[3]}\n"
                   + "[plant:children]\nedge\ncore\n")
    yaml = tmp_path / "hosts.yml"
    yaml.write_text("all:\n  children:\n    edge:\n      hosts:\n"
                    + "".join(f"        y{i}:\n          ansible_host: localhost\n"
                              f"          appliance_port: {p}\n" for i, p in enumerate(ports[4:6])))
    assert [n.name for n in load_inventory(ini, "edge")] == ["e0", "e1", "e2"]
    assert sorted(n.name for n in load_inventory(ini, "plant")) == ["c0", "e0", "e1", "e2"]
    assert load_inventory(ini, "c0")[0] == Node("c0", "localhost", ports[3], ("core", "plant"))
    assert [n.name for n in load_inventory(yaml)] == ["y0", "y1"]
    data = _json(cli("fleet", "inventory", "-i", ini, "--limit", "plant", "--json", *_auth(site, "observer")))
    assert data["summary"] == {"total": 4, "ok": 4, "failed": 0}
    assert all(n["data"]["node_id"] == "test" for n in data["nodes"])
    assert _json(cli("fleet", "status", "-i", yaml, "--json", *_auth(site, "observer")))["summary"]["ok"] == 2


def test_inventory_errors_are_clear(cli: Callable[..., CliResult], site: dict[str, Any],
                                    tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[nodes]]\nname = "x"\nport = 70000\n')
    result = cli("fleet", "status", "-i", bad, *_auth(site, "observer"))
    assert result.code == 6 and "nodes[0] port = 70000: not a TCP port" in result.err
    inv = _toml(site, tmp_path / "nodes.toml")
    nomatch = cli("fleet", "status", "-i", inv, "--limit", "nosuch", *_auth(site, "observer"))
    assert nomatch.code == 6 and "no nodes match 'nosuch'" in nomatch.err
    plain = cli("fleet", "status", "-i", inv)
    assert plain.code == 6 and "uses mTLS" in plain.err
    half = cli("fleet", "status", "-i", inv, "--ca", site["pki"] / "ca.crt")
    assert half.code == 6 and "missing --cert, --key" in half.err


def test_update_needs_operator(cli: Callable[..., CliResult], site: dict[str, Any], tmp_path: Path) -> None:
    inv = _toml(site, tmp_path / "nodes.toml")
    denied = _json(cli("fleet", "update", "-i", inv, "--limit", "canary", "--target", "m@2", "--json",
                       *_auth(site, "observer")))
    assert denied["nodes"][0]["reason"].startswith("PERMISSION_DENIED: role observer may not call")
    ok = _json(cli("fleet", "update", "-i", inv, "--limit", "canary", "--target", "m@2", "--json",
                   *_auth(site, "operator")))
    assert ok["nodes"][0]["ok"] and ok["nodes"][0]["data"]["results"][0]["outcome"] == "applied"


def test_rollout_plan() -> None:
    nodes = [Node(f"n{i}", "localhost") for i in range(10)]
    plan = plan_rollout(nodes, canary=1, batch_percent=34, max_failure_percent=10)
    assert [len(w.nodes) for w in plan.waves] == [1, 4, 4, 1]
    assert [w.name for w in plan.waves] == ["canary", "batch 1", "batch 2", "batch 3"]
    assert plan.max_failures == 1
    assert [len(w.nodes) for w in plan_rollout(nodes, canary=2, batch=5).waves] == [2, 5, 3]


def test_rollout_dry_run_then_halt_on_failure(cli: Callable[..., CliResult], site: dict[str, Any],
                                              tmp_path: Path) -> None:
    inv = _toml(site, tmp_path / "nodes.toml")
    auth = _auth(site, "operator")
    dry = cli("fleet", "rollout", "-i", inv, "--target", "m@2", "--batch", "3", "--dry-run", *auth)
    assert dry.code == 0 and "canary" in dry.out and "batch 3" in dry.out and "in 4 waves" in dry.out
    assert "no attestation" in dry.out and "needs --expect FILE" in dry.err
    # The canary and batch 1 are fine; the dead node is in batch 2, so the rollout halts there.
    done = cli("fleet", "rollout", "-i", inv, "--target", "m@2", "--batch", "3", "--deadline", DEADLINE,
               "--no-attest", "--json", *auth)
    data = _json(done)
    assert done.code == 1 and data["halted"]
    assert [w["name"] for w in data["waves"]] == ["canary", "batch 1", "batch 2"]
    assert data["waves"][-1]["failed"] == 1 and [w["name"] for w in data["not_started"]] == ["batch 3"]
    dead = next(r for r in data["waves"][-1]["results"] if r["name"] == "dead")
    assert dead["reason"] == f"no answer within {DEADLINE} s"
    # With a failure budget of 10 % (one node of ten) the same rollout goes to the end.
    tolerant = _json(cli("fleet", "rollout", "-i", inv, "--target", "m@2", "--batch", "3",
                         "--max-failure-percent", "10", "--deadline", DEADLINE, "--no-attest", "--json",
                         *auth))
    assert not tolerant["halted"] and len(tolerant["waves"]) == 4
    # A node refusing the update in the canary wave halts everything after it.
    refused = _json(cli("fleet", "rollout", "-i", inv, "--target", "refuse-me", "--batch", "3",
                        "--no-attest", "--json", *auth))
    assert refused["halted"] and [w["name"] for w in refused["waves"]] == ["canary"]
    assert "signature does not verify" in refused["waves"][0]["results"][0]["reason"]
    assert [w["name"] for w in refused["not_started"]] == ["batch 1", "batch 2", "batch 3"]


def test_node_cli_speaks_mtls_with_the_fleet_flags_and_variables(
        cli: Callable[..., CliResult], site: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    target = f"localhost:{site['ports'][0]}"
    ok = cli("node", "inventory", "--target", target, "--json", *_auth(site, "observer"))
    assert ok.code == 0, ok.err
    assert isinstance(_json(ok), dict)
    plain = cli("node", "inventory", "--target", target, "--timeout", "3")
    assert plain.code != 0 and target in plain.err and "UNAVAILABLE" in plain.err
    partial = cli("node", "inventory", "--target", target, "--ca", str(site["pki"] / "ca.crt"))
    assert partial.code != 0 and "missing --cert, --key" in partial.err
    by_ip = cli("node", "events", "--target", f"127.0.0.1:{site['ports'][0]}", "--tls-name", "localhost",
                "--json", *_auth(site, "observer"))
    assert by_ip.code == 0, by_ip.err
    d = site["pki"] / "issued" / "observer"
    monkeypatch.setenv("APPLIANCE_FLEET_CA", str(site["pki"] / "ca.crt"))
    monkeypatch.setenv("APPLIANCE_FLEET_CERT", str(d / "observer.crt"))
    monkeypatch.setenv("APPLIANCE_FLEET_KEY", str(d / "observer.key"))
    from_env = cli("node", "health", "--target", target, "--json")
    assert from_env.code == 0, from_env.err


# ------------------------------------------------------------------ rollouts gated on attestation

UKI_OLD = pe_image([(".linux", b"kernel 1"), (".cmdline", b"roothash=" + b"1" * 64)])
UKI_NEW = pe_image([(".linux", b"kernel 2"), (".cmdline", b"roothash=" + b"2" * 64)])
ROOT_OLD, ROOT_NEW = "1" * 64, "2" * 64
FAST = ("--attest-interval", "0.05", "--deadline", DEADLINE, "--insecure")


class _Rebooting(node_pb2_grpc.NodeServicer):
    """A node that applies any update, then answers Node/Attest by ``script``, one step a call
    and the last one for good: "old" (still the old image), "new" (booted the new one), "liar"
    (booted the old UKI, names the new root hash) or "down" (UNAVAILABLE, as while it reboots)."""

    def __init__(self, name: str, script: Sequence[str], ca: attest_support.CA) -> None:
        self.script = list(script)
        self.ak = ec.generate_private_key(ec.SECP256R1())
        self.certificate = attest_support.ak_certificate(self.ak, name, issuer=ca,
                                                         now=datetime.datetime.now(datetime.UTC))
        self.updates = 0
        self.attests = 0

    def ApplyUpdate(self, request: Any, context: Any) -> Any:
        self.updates += 1
        return node_pb2.ApplyUpdateResponse(
            results=[node_pb2.UpdateResult(target=t, name=t, outcome="applied") for t in request.targets])

    def Attest(self, request: Any, context: Any) -> Any:
        step = self.script[min(self.attests, len(self.script) - 1)]
        self.attests += 1
        if step == "down":
            context.abort(grpc.StatusCode.UNAVAILABLE, "rebooting")
        uki, root = {"old": (UKI_OLD, ROOT_OLD), "new": (UKI_NEW, ROOT_NEW),
                     "liar": (UKI_OLD, ROOT_NEW)}[step]
        a = attest_support.answer(request.nonce, uki, root, ak=self.ak, certificate=self.certificate,
                                  image_version="2.0" if root == ROOT_NEW else "1.0")
        return node_pb2.AttestResponse(attest=a.attest, signature=a.signature, pcr_values=a.pcr_values,
                                       ak_public=a.ak_public, ak_certificate=a.ak_certificate,
                                       root_hash=a.root_hash, image_version=a.image_version,
                                       event_log=a.event_log)


Start = Callable[[dict[str, list[str]]], tuple[Path, dict[str, _Rebooting]]]


@pytest.fixture
def attesting(tmp_path: Path) -> Iterator[Start]:
    """Start one node per name with its Attest script; returns the inventory (in that order),
    plus an image-manifest.json of the new image, the site CA and CRLs (empty, stale, another
    CA's) under ``tmp_path``, and site-crl.pem revoking the AK certificates of nodes named revoked*."""
    ca = attest_support.site_ca(datetime.datetime.now(datetime.UTC))
    (tmp_path / "site-ca.crt").write_bytes(ca[1].public_bytes(Encoding.PEM))
    now = datetime.datetime.now(datetime.UTC)
    (tmp_path / "site-crl-empty.pem").write_bytes(attest_support.crl(ca, [], now=now))
    (tmp_path / "site-crl-stale.pem").write_bytes(attest_support.crl(ca, [], now=now, days=-1))
    other = attest_support.site_ca(now, "another CA")
    (tmp_path / "other-crl.pem").write_bytes(attest_support.crl(other, [], now=now))
    (tmp_path / "image-manifest.json").write_text(json.dumps(attest_support.manifest(ROOT_NEW, UKI_NEW)))
    with contextlib.ExitStack() as stack:
        def start(scripts: dict[str, list[str]]) -> tuple[Path, dict[str, _Rebooting]]:
            nodes, lines = {}, []
            for name, script in scripts.items():
                server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
                nodes[name] = _Rebooting(name, script, ca)
                node_pb2_grpc.add_NodeServicer_to_server(nodes[name], server)  # type: ignore[no-untyped-call]
                port = server.add_insecure_port("127.0.0.1:0")
                server.start()
                stack.callback(server.stop, None)
                lines.append(f'[[nodes]]\nname = "{name}"\naddress = "127.0.0.1"\nport = {port}\n')
            inventory = tmp_path / "nodes.toml"
            inventory.write_text("\n".join(lines))
            serials = [x509.load_der_x509_certificate(n.certificate).serial_number
                       for name, n in nodes.items() if name.startswith("revoked")]
            (tmp_path / "site-crl.pem").write_bytes(attest_support.crl(ca, serials, now=now))
            return inventory, nodes

        yield start


def _gate(tmp_path: Path) -> list[str | Path]:
    return ["--expect", tmp_path / "image-manifest.json", "--site-ca", tmp_path / "site-ca.crt"]


def test_rollout_counts_a_node_once_it_attests_the_new_image(
        cli: Callable[..., CliResult], attesting: Start, tmp_path: Path) -> None:
    inv, nodes = attesting({"c0": ["new"], "b0": ["down", "old", "down", "new"], "b1": ["new"]})
    done = cli("fleet", "rollout", "-i", inv, "--target", "os/2", "--batch", "2", "--attest-timeout", "30",
               *FAST, *_gate(tmp_path), "--json")
    data = _json(done)
    assert done.code == 0 and not data["halted"], done.out
    assert data["plan"]["attest"]["root_hashes"] == [ROOT_NEW]
    results = {r["name"]: r for w in data["waves"] for r in w["results"]}
    assert all(r["ok"] for r in results.values())
    # Silence (the reboot) and an answer of the old image did not count; the fourth ask did.
    assert results["b0"]["data"]["attestation"] == {"attested": True, "reason": "", "root_hash": ROOT_NEW,
                                                    "image_version": "2.0", "attempts": 4,
                                                    "secure_boot": True}
    assert results["c0"]["data"]["attestation"]["attempts"] == 1
    assert results["c0"]["data"]["results"][0]["outcome"] == "applied"
    assert [n.attests for n in nodes.values()] == [1, 4, 1]


def test_rollout_halts_when_an_updated_node_does_not_attest(
        cli: Callable[..., CliResult], attesting: Start, tmp_path: Path) -> None:
    inv, nodes = attesting({"c0": ["new"], "stuck": ["down", "old"], "liar": ["liar"], "later": ["new"]})
    done = cli("fleet", "rollout", "-i", inv, "--target", "os/2", "--batch", "2", "--attest-timeout", "0.5",
               *FAST, *_gate(tmp_path), "--json")
    data = _json(done)
    assert done.code == 1 and data["halted"]
    assert [w["name"] for w in data["waves"]] == ["canary", "batch 1"]
    assert [w["name"] for w in data["not_started"]] == ["batch 2"] and nodes["later"].updates == 0
    results = {r["name"]: r for r in data["waves"][1]["results"]}
    stuck, liar = results["stuck"], results["liar"]
    assert not stuck["ok"]
    assert stuck["reason"] == f"updated, not attested within 0.5 s: runs root hash {ROOT_OLD}, which no " \
                              "expected image has"
    assert stuck["data"]["attestation"]["root_hash"] == ROOT_OLD
    assert stuck["data"]["attestation"]["attempts"] > 2
    assert liar["reason"].startswith("updated, not attested within 0.5 s: PCR 11 is ")
    assert liar["data"]["attestation"]["mismatch"]["pcr"] == 11
    text = cli("fleet", "rollout", "-i", inv, "--target", "os/2", "--canary", "0", "--batch", "4",
               "--attest-timeout", "0.2", *FAST, *_gate(tmp_path))
    assert text.code == 1 and "stuck: updated, not attested within 0.2 s" in text.out
    assert "attests one of 1 expected image(s), within 0.2 s" in text.out


def test_rollout_needs_expect_or_no_attest(cli: Callable[..., CliResult], attesting: Start,
                                           tmp_path: Path) -> None:
    inv, nodes = attesting({"n0": ["new"]})
    neither = cli("fleet", "rollout", "-i", inv, "--target", "os/2", "--insecure")
    assert neither.code == 6 and "--expect" in neither.err and "--no-attest" in neither.err
    both = cli("fleet", "rollout", "-i", inv, "--target", "os/2", "--insecure", "--no-attest",
               *_gate(tmp_path))
    assert both.code == 6 and "not both" in both.err
    no_ca = cli("fleet", "rollout", "-i", inv, "--insecure", "--expect", tmp_path / "image-manifest.json")
    assert no_ca.code == 6 and "give --ca (or --site-ca)" in no_ca.err
    assert nodes["n0"].updates == 0
    dry = _json(cli("fleet", "rollout", "-i", inv, "--insecure", "--dry-run", *_gate(tmp_path), "--json"))
    assert dry["plan"]["attest"] == {"root_hashes": [ROOT_NEW], "timeout": 600.0, "interval": 5.0,
                                     "crl": False, "secure_boot": True}
    plain = _json(cli("fleet", "rollout", "-i", inv, "--insecure", "--dry-run", "--no-attest", "--json"))
    assert plain["plan"]["attest"] is None and nodes["n0"].updates == 0


def test_a_revoked_attestation_key_does_not_attest(cli: Callable[..., CliResult], attesting: Start,
                                                   tmp_path: Path) -> None:
    """With the site CRL, `fleet attest` and the rollout's gate fail a node whose AK certificate
    it revokes, though its quote is good; a CRL that is stale or not the site CA's is refused
    before any node is asked."""
    inv, nodes = attesting({"good": ["new"], "revoked": ["new"]})
    ask = ("--deadline", DEADLINE, "--insecure")  # FAST without the rollout's flag
    done = cli("fleet", "attest", "-i", inv, *ask, *_gate(tmp_path), "--crl", tmp_path / "site-crl.pem",
               "--json")
    assert done.code == 1, done.err
    results = {r["name"]: r for r in _json(done)["nodes"]}
    assert results["good"]["ok"]
    assert "was revoked by the site CRL" in results["revoked"]["reason"]
    without = cli("fleet", "attest", "-i", inv, *ask, *_gate(tmp_path), "--json")  # no CRL: both pass
    assert without.code == 0 and all(r["ok"] for r in _json(without)["nodes"])
    rollout = _json(cli("fleet", "rollout", "-i", inv, "--target", "os/2", "--canary", "0", "--batch", "2",
                        *FAST, *_gate(tmp_path), "--crl", tmp_path / "site-crl.pem",
                        "--attest-timeout", "0.3", "--json"))
    reasons = {r["name"]: r["reason"] for w in rollout["waves"] for r in w["results"]}
    assert reasons["good"] == "" and "was revoked by the site CRL" in reasons["revoked"]
    asked = sum(n.attests for n in nodes.values())
    for crl, message in (("site-crl-stale.pem", "stale since"),
                         ("other-crl.pem", "not signed by the site CA"),
                         ("image-manifest.json", "not a PEM certificate revocation list")):
        refused = cli("fleet", "attest", "-i", inv, *ask, *_gate(tmp_path), "--crl", tmp_path / crl)
        assert refused.code == 6 and f"--crl {tmp_path / crl}: {message}" in refused.err, refused.err
    assert sum(n.attests for n in nodes.values()) == asked
    empty = cli("fleet", "attest", "-i", inv, *ask, *_gate(tmp_path),
                "--crl", tmp_path / "site-crl-empty.pem")
    assert empty.code == 0, empty.err
