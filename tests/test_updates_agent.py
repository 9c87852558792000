"""Updates through a real agent process on loopback, against real TUF registries (issue 5).

- check/apply/rollback/history through the CLI, with events and inventory;
- hot swap under load: tritonclient keeps inferring through an update and a rollback;
- refusals leave the state directory byte-for-byte unchanged (apart from the event log,
  see ``testsupport.updates_support.EXCLUDED_FROM_STATE_HASH``): a tampered bundle at the
  source, a registry that stops mid-body, golden vectors that fail on the node, an older
  version offered as new, a full disk while staging;
- USB: a registry copied to a directory under ``mount_glob`` is found and applied with no
  network source;
- an https:// source is verified through the site's CA alone, as the image's unit sets it.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from agent.proto import node_pb2, node_pb2_grpc
from provisioning.bundle import create_bundle
from provisioning.demo.models import matmul_chain_model, save_golden
from provisioning.image.plan import site_trust_env
from provisioning.pki import issue_node
from testsupport.http_support import site_pki
from testsupport.inference_support import Agent, free_port, with_wrong_golden
from testsupport.updates_support import (
    X,
    affine_bundle_at,
    expected,
    node_state,
    registry_with,
    state_hash,
)

# ---------------------------------------------------------------- helpers


class _Handler(http.server.SimpleHTTPRequestHandler):
    cut: threading.Event

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.cut.is_set() and self.path.startswith("/targets/"):
            path = Path(self.translate_path(self.path))
            data = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])  # the registry goes away mid-body
            self.wfile.flush()
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        super().do_GET()


@contextlib.contextmanager
def http_registry(published: Path,
                  tls: tuple[Path, Path] | None = None) -> Iterator[tuple[str, threading.Event]]:
    """Serve a published tree, over HTTPS with ``tls`` (certificate, key) for localhost;
    setting the event makes target downloads stop halfway."""
    cut = threading.Event()
    handler = type("H", (_Handler,), {"cut": cut})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: handler(*a, directory=str(published)))
    if tls is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(tls[0]), str(tls[1]))
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{'https://localhost' if tls else 'http://127.0.0.1'}:{server.server_address[1]}", cut
    finally:
        server.shutdown()
        server.server_close()


def _config(tmp: Path, sources: list[str], mount_glob: str = "", keep: int = 1) -> Path:
    path = tmp / "agent.toml"
    path.write_text("[updates]\n" + f"sources = {json.dumps(sources)}\n"
                    f"mount_glob = {json.dumps(mount_glob)}\nkeep_versions = {keep}\n")
    return path


def _node(agent: Agent) -> Any:
    return node_pb2_grpc.NodeStub(grpc.insecure_channel(agent.url))  # type: ignore[no-untyped-call]


def _infer(client: Any, batch: np.ndarray) -> tuple[str, np.ndarray]:
    from tritonclient.grpc import InferInput

    inp = InferInput("x", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch)
    result = client.infer("affine", [inp])
    return result.get_response().model_version, result.as_numpy("y")


def _events(agent: Agent, prefix: str = "update.") -> list[Any]:
    return list(_node(agent).GetEvents(node_pb2.GetEventsRequest(kind_prefix=prefix), timeout=10).events)


def _appliance(cli: Callable[..., Any], agent: Agent, *args: str) -> Any:
    out = cli("node", "update", *args, "--target", agent.url, "--json")
    return out.code, json.loads(out.out) if out.out.strip() else None


@pytest.fixture
def reg(tmp_path: Path) -> Path:
    """A registry with affine 1.0.1 (y = 2x + 1) and 1.0.2 (y = 3x + 1)."""
    return registry_with(tmp_path, [affine_bundle_at(tmp_path, "1.0.1"), affine_bundle_at(tmp_path, "1.0.2")])


@pytest.fixture
def state(tmp_path: Path, reg: Path) -> Path:
    return node_state(tmp_path / "node" / "state", reg, affine_bundle_at(tmp_path, "1.0.1"))


# ---------------------------------------------------------------- the happy path, through the CLI

def test_check_apply_rollback_history_through_the_cli(tmp_path: Path, reg: Path, state: Path,
                                                      cli: Callable[..., Any]) -> None:
    agent = Agent(state, "--config", str(_config(tmp_path, [str(reg / "published")])))
    try:
        code, check = _appliance(cli, agent, "check")
        assert code == 0 and check["source"] == str(reg / "published")
        assert [(p["name"], p["current_version"], p["version"]) for p in check["pending"]] == [
            ("affine", "1.0.1", "1.0.2")]
        code, dry = _appliance(cli, agent, "apply", "--dry-run")
        assert code == 0 and dry["results"][0]["outcome"] == "skipped"
        code, applied = _appliance(cli, agent, "apply")
        assert code == 0, applied
        (result,) = applied["results"]
        assert (result["outcome"], result["version"]) == ("applied", "1.0.2")
        from tritonclient.grpc import InferenceServerClient

        client = InferenceServerClient(agent.url)
        version, y = _infer(client, X)
        assert version == "1.0.2" and (y == expected("1.0.2")).all()
        code, again = _appliance(cli, agent, "check")
        assert again["pending"] == []

        code, rolled = _appliance(cli, agent, "rollback", "affine", "1.0.1", "--reason", "field report")
        assert code == 0 and rolled["result"]["outcome"] == "rolled-back", rolled
        assert _infer(client, X)[0] == "1.0.1"
        inv = _node(agent).GetInventory(node_pb2.GetInventoryRequest(), timeout=30)
        shown = {(b.version, b.active, b.rolled_back) for b in inv.bundles}
        assert shown == {("1.0.1", True, True), ("1.0.2", False, False)}
        code, refused = _appliance(cli, agent, "rollback", "affine", "0.9.0")
        assert code == 1 and refused["result"]["outcome"] == "refused"

        code, history = _appliance(cli, agent, "history")
        assert [h["outcome"] for h in history] == ["applied", "rolled-back", "refused"]
        kinds = [(e.kind, e.details["version"]) for e in _events(agent)]
        assert kinds == [("update.applied", "1.0.2"), ("update.rolled_back", "1.0.1"),
                         ("update.refused", "0.9.0")]
        applied_event = _events(agent, "update.applied")[0]
        assert applied_event.details["sha256"] == result["sha256"]
        assert applied_event.details["target"] == "bundles/affine/affine-1.0.2.bundle"
        client.close()
    finally:
        agent.stop()
    log = agent.log()
    assert f"target bundles/affine/affine-1.0.2.bundle, affine 1.0.2, sha256 {result['sha256']}" in log


# ---------------------------------------------------------------- hot swap under load

def test_hot_swap_under_load_fails_no_request(tmp_path: Path, reg: Path, state: Path) -> None:
    from tritonclient.grpc import InferenceServerClient

    agent = Agent(state, "--config", str(_config(tmp_path, [str(reg / "published")])))
    stop = threading.Event()
    seen: list[tuple[str, bool]] = []
    errors: list[BaseException] = []

    def load(seed: int) -> None:
        client = InferenceServerClient(agent.url)
        rng = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                x = rng.standard_normal((2, 4)).astype(np.float32)
                version, y = _infer(client, x)
                seen.append((version, bool(np.allclose(y, expected(version, x)))))
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=load, args=(n,)) for n in range(4)]
    try:
        for t in threads:
            t.start()
        node = _node(agent)
        while len(seen) < 50 and not errors:
            time.sleep(0.01)
        reply = node.ApplyUpdate(node_pb2.ApplyUpdateRequest(targets=["affine"]), timeout=60)
        assert reply.results[0].outcome == "applied", reply
        mark = len(seen)
        while len(seen) < mark + 50 and not errors:
            time.sleep(0.01)
        back = node.Rollback(node_pb2.RollbackRequest(name="affine", version="1.0.1"), timeout=60)
        assert back.result.outcome == "rolled-back", back
        mark = len(seen)
        while len(seen) < mark + 50 and not errors:
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        agent.stop()
    assert errors == []
    assert all(ok for _, ok in seen), [s for s in seen if not s[1]][:5]
    versions = [v for v, _ in seen]
    assert {"1.0.1", "1.0.2"} <= set(versions)
    assert versions[-1] == "1.0.1"
    print(f"{len(seen)} requests, 0 failed: {versions.count('1.0.1')} on 1.0.1, "
          f"{versions.count('1.0.2')} on 1.0.2")


# ---------------------------------------------------------------- refusals

def _refused(agent: Agent, state: Path, target: str, *needles: str) -> None:
    node = _node(agent)
    node.CheckUpdates(node_pb2.CheckUpdatesRequest(), timeout=30)  # metadata is current first
    before = state_hash(state)
    reply = node.ApplyUpdate(node_pb2.ApplyUpdateRequest(targets=[target]), timeout=60)
    (result,) = reply.results
    assert result.outcome == "refused", result
    for needle in needles:
        assert needle in result.reason, result.reason
    assert state_hash(state) == before, "a refused update changed the node"
    event = _events(agent, "update.refused")[-1]
    assert event.details["reason"] == result.reason and event.subject == "affine"
    print(f"refused {target}: {result.reason}")


def test_refusals_leave_the_node_unchanged(tmp_path: Path, reg: Path, state: Path) -> None:
    published = reg / "published"
    with http_registry(published) as (url, cut):
        agent = Agent(state, "--config", str(_config(tmp_path, [url])))
        try:
            # tampered bundle at the source (same length, one byte changed)
            (stored,) = (published / "targets" / "bundles" / "affine").glob("*.affine-1.0.2.bundle")
            original = stored.read_bytes()
            stored.write_bytes(original[:5000] + bytes([original[5000] ^ 1]) + original[5001:])
            _refused(agent, state, "affine@1.0.2", "sha256", "does not match the signed")
            stored.write_bytes(original)

            # the registry stops in the middle of the body
            cut.set()
            _refused(agent, state, "affine@1.0.2", "download failed")
            cut.clear()

            # golden vectors that fail on this node: real signature, wrong expected outputs
            bad = with_wrong_golden(affine_bundle_at(tmp_path, "1.0.3"), tmp_path / "affine-1.0.3.bundle")
            registry_with(tmp_path, [bad], reg)
            _refused(agent, state, "affine@1.0.3", "golden")

            # an older version offered as new (newest target, older version)
            node = _node(agent)
            ok = node.ApplyUpdate(node_pb2.ApplyUpdateRequest(targets=["affine@1.0.2"]), timeout=60)
            assert ok.results[0].outcome == "applied", ok
            registry_with(tmp_path, [affine_bundle_at(tmp_path, "1.0.0")], reg)
            pending = node.CheckUpdates(node_pb2.CheckUpdatesRequest(), timeout=30).pending
            assert [p.version for p in pending] == ["1.0.3"]  # never 1.0.0
            _refused(agent, state, "affine@1.0.0", "older than the running 1.0.2", "never goes backwards")
        finally:
            agent.stop()


def _chain_bundle(tmp: Path, version: str, seed: int) -> Path:
    model = matmul_chain_model(tmp / f"chain-{version}.onnx", width=512, depth=4, seed=seed)
    golden = save_golden(tmp / f"chain-{version}.npz", {"x": np.ones((1, 512), np.float32)})
    return create_bundle(model, name="affine", version=version, golden=[golden],
                         out=tmp / f"chain-{version}.bundle").path


def test_disk_full_during_staging_is_refused(tmp_path: Path) -> None:
    if shutil.which("mount") is None:
        pytest.skip("no mount(8) to make a small tmpfs")
    v1, v2 = _chain_bundle(tmp_path, "1.0.1", 0), _chain_bundle(tmp_path, "1.0.2", 1)
    reg = registry_with(tmp_path, [v1, v2])
    mnt = tmp_path / "small"
    mnt.mkdir()
    # room for the installed 4 MB version and the 4 MB download, not for unpacking it too
    size = v1.stat().st_size + v2.stat().st_size + (1 << 20)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mnt)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        state = node_state(mnt / "state", reg, v1)
        agent = Agent(state, "--config", str(_config(tmp_path, [str(reg / "published")])))
        try:
            _refused(agent, state, "affine@1.0.2", "No space left on device")
        finally:
            agent.stop()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# ---------------------------------------------------------------- USB

def test_usb_registry_is_found_by_layout_and_applied_offline(tmp_path: Path, reg: Path, state: Path,
                                                             cli: Callable[..., Any]) -> None:
    media = tmp_path / "media"
    (media / "usb0" / "stray").mkdir(parents=True)  # a stick with other things on it too
    shutil.copytree(reg / "published", media / "usb0" / "site-registry")
    dead = f"http://127.0.0.1:{free_port()}"  # the site server is unreachable: nothing listens
    agent = Agent(state, "--config", str(_config(tmp_path, [dead], mount_glob=str(media / "*"))))
    try:
        code, check = _appliance(cli, agent, "check")
        assert code == 0 and check["source"] == str(media / "usb0" / "site-registry")
        code, applied = _appliance(cli, agent, "apply")
        assert code == 0 and applied["results"][0]["outcome"] == "applied"
        from tritonclient.grpc import InferenceServerClient

        client = InferenceServerClient(agent.url)
        assert _infer(client, X)[0] == "1.0.2"
        client.close()
        assert _events(agent, "update.applied")[0].details["source"] == str(media / "usb0" / "site-registry")
    finally:
        agent.stop()
    assert f"registry source {dead}" in agent.log()  # it tried the site first, then the stick


# ---------------------------------------------------------------- an https:// source, the site's trust

def test_an_https_source_is_trusted_through_the_site_ca_alone(tmp_path: Path, reg: Path, state: Path,
                                                              cli: Callable[..., Any]) -> None:
    """The image's agent unit sets site_trust_env: an https:// registry whose certificate the
    site's CA issued is verified; one from another CA is refused, as is the site's one without
    that environment (the public store does not hold the site's CA)."""
    pki = site_pki(tmp_path / "pki", tmp_path / "other")
    ours = pki / "issued" / "node1"
    theirs = issue_node(tmp_path / "other", "elsewhere", dns=["localhost"], ips=["127.0.0.1"],
                        out=tmp_path / "elsewhere")
    trust = site_trust_env(pki / "ca.crt")
    for cert, key, env, served in (
            (ours / "node1.crt", ours / "node1.key", trust, True),
            (Path(theirs.cert_path), Path(theirs.key_path), trust, False),
            (ours / "node1.crt", ours / "node1.key", {}, False)):
        with http_registry(reg / "published", (cert, key)) as (url, _):
            agent = Agent(state, "--config", str(_config(tmp_path, [url])), env=env)
            try:
                code, check = _appliance(cli, agent, "check")
            finally:
                agent.stop()
        if served:
            assert code == 0, check
            assert [p["version"] for p in check["pending"]] == ["1.0.2"]
        else:
            assert code != 0 and "CERTIFICATE_VERIFY_FAILED" in json.dumps(check), check
