"""``appliance registry``: the commands, their --json output, and bad input on each of them.

Bad input must give a clear message naming the file and the problem, a non-zero exit, and
leave the registry exactly as it was.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from provisioning.registry import init_registry, publish_bundle
from tests.conftest import run_appliance
from tests.registry_helpers import metadata, tree

Cli = Any


@pytest.fixture
def reg(tmp_path: Path) -> Path:
    directory = tmp_path / "registry"
    init_registry(directory)
    return directory


def test_init_layout_and_json(tmp_path: Path, cli: Cli) -> None:
    res = cli("registry", "init", tmp_path / "r", "--root-threshold", "2", "--root-keys", "3", "--json")
    assert res.code == 0, res.err
    st = json.loads(res.out)
    assert st["roles"]["root"]["threshold"] == 2 and len(st["roles"]["root"]["keys"]) == 3
    assert all(r["signatures"] == "ok" and r["version"] == 1 for r in st["roles"].values())
    meta = tmp_path / "r" / "published" / "metadata"
    assert sorted(p.name for p in meta.iterdir()) == [
        "1.root.json", "1.snapshot.json", "1.targets.json", "root.json", "snapshot.json",
        "targets.json", "timestamp.json"]
    keys = list((tmp_path / "r" / "keys").glob("*.pem"))
    assert len(keys) == 6 and all(k.stat().st_mode & 0o077 == 0 for k in keys)
    assert not list((tmp_path / "r" / "published").rglob("*.pem"))  # keys never published
    assert b"ENCRYPTED" not in keys[0].read_bytes()
    assert not st["warnings"] or "root threshold is 1" not in " ".join(st["warnings"])


def test_lab_default_warns_about_threshold_one(reg: Path, cli: Cli) -> None:
    res = cli("registry", "status", reg)
    assert res.code == 0, res.err
    assert "root threshold is 1" in res.out and "timestamp" in res.out


def test_add_publish_status_cycle(reg: Path, affine_bundle: Path, tmp_path: Path, cli: Cli) -> None:
    res = cli("registry", "add", reg, affine_bundle, "--json")
    assert res.code == 0, res.err
    added = json.loads(res.out)
    assert added["path"] == "bundles/affine/affine-1.0.0.bundle"
    assert added["custom"] == {"kind": "bundle", "name": "affine", "version": "1.0.0"}
    assert json.loads(cli("registry", "status", reg, "--json").out)["pending"] == [added["path"]]
    res = cli("registry", "publish", reg, "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["versions"] == {"targets": 2, "snapshot": 2, "timestamp": 2}
    tg = metadata(reg, "2.targets.json").signed
    assert tg.targets[added["path"]].custom == added["custom"]
    again = json.loads(cli("registry", "add", reg, affine_bundle, "--json").out)
    assert again["state"] == "unchanged"
    st = json.loads(cli("registry", "status", reg, "--json").out)
    assert st["pending"] == [] and [t["path"] for t in st["targets"]] == [added["path"]]
    other = tmp_path / "agent.tar.zst"
    other.write_bytes(b"agent release")
    res = cli("registry", "add", reg, other, "--kind", "agent", "--name", "agent", "--version", "0.2.0")
    assert res.code == 0 and "agent/agent/agent-0.2.0.tar.zst" in res.out


def test_publish_renews_expiry_and_rotate_key(reg: Path, cli: Cli) -> None:
    before = metadata(reg, "timestamp.json").signed
    res = cli("registry", "rotate-key", reg, "targets", "--json")
    assert res.code == 0, res.err
    out = json.loads(res.out)
    assert out["root_version"] == 2 and len(out["new"]) == 1
    assert (reg / "keys" / "retired" / f"{out['retired'][0]}.pem").exists()
    root = metadata(reg, "2.root.json").signed
    assert root.roles["targets"].keyids == out["new"]
    assert metadata(reg, "timestamp.json").signed.version == before.version + 1
    st = json.loads(cli("registry", "status", reg, "--json").out)
    assert st["roles"]["targets"]["signatures"] == "ok"
    assert [k["keyid"] for k in st["roles"]["targets"]["keys"]] == out["new"]


def test_encrypted_keys_and_passphrase_sources(tmp_path: Path, affine_bundle: Path) -> None:
    reg = tmp_path / "r"
    pw = tmp_path / "pw"
    pw.write_text("correct horse\n")
    proc = run_appliance("registry", "init", reg, "--passphrase-file", pw)
    assert proc.returncode == 0, proc.stderr
    assert all(b"ENCRYPTED PRIVATE KEY" in k.read_bytes() for k in (reg / "keys").glob("*.pem"))
    assert run_appliance("registry", "add", reg, affine_bundle).returncode == 0  # no key needed
    snapshot = tree(reg)

    proc = run_appliance("registry", "publish", reg)  # no passphrase at all
    assert proc.returncode == 1 and "keys are encrypted" in proc.stderr and "--passphrase-file" in proc.stderr
    proc = run_appliance("registry", "publish", reg, env={"APPLIANCE_REGISTRY_PASSPHRASE": "wrong"})
    assert proc.returncode == 1 and "wrong passphrase" in proc.stderr and ".pem" in proc.stderr
    assert tree(reg) == snapshot

    proc = run_appliance("registry", "publish", reg, env={"APPLIANCE_REGISTRY_PASSPHRASE": "correct horse"})
    assert proc.returncode == 0, proc.stderr
    proc = run_appliance("registry", "rotate-key", reg, "root", "--passphrase-file", pw)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- bad input

def _unchanged(reg: Path, cli: Cli, *args: str | Path, code: int, needles: tuple[str, ...]) -> None:
    before = tree(reg)
    res = cli(*args)
    assert res.code == code, (res.code, res.err)
    for needle in needles:
        assert needle in res.err, res.err
    assert res.err.startswith("appliance: error: ") and "Traceback" not in res.err
    assert tree(reg) == before


def test_init_refuses_non_empty_dir_and_bad_thresholds(reg: Path, tmp_path: Path, cli: Cli) -> None:
    _unchanged(reg, cli, "registry", "init", reg, code=1, needles=(str(reg), "not an empty directory"))
    res = cli("registry", "init", tmp_path / "new", "--root-threshold", "3", "--root-keys", "2")
    assert res.code == 1 and "threshold 3 with 2 root keys" in res.err
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_add_bad_input(reg: Path, tmp_path: Path, affine_bundle: Path, cli: Cli) -> None:
    missing = tmp_path / "nope.bundle"
    _unchanged(reg, cli, "registry", "add", reg, missing, code=4, needles=(str(missing), "no such file"))
    junk = tmp_path / "junk.bundle"
    junk.write_bytes(b"this is not a tar archive" * 40)
    _unchanged(reg, cli, "registry", "add", reg, junk, code=1, needles=(str(junk),))
    _unchanged(reg, cli, "registry", "add", reg, affine_bundle, "--version", "9.9", code=1,
               needles=("--version '9.9' differs from the bundle manifest's '1.0.0'",))
    other = tmp_path / "x.bin"
    other.write_bytes(b"x")
    _unchanged(reg, cli, "registry", "add", reg, other, "--kind", "os", code=1,
               needles=("kind os needs --name and --version",))
    _unchanged(reg, cli, "registry", "add", tmp_path, other, code=4,
               needles=(str(tmp_path / "registry.toml"), "not a registry"))


def test_replacing_a_released_version_is_refused(reg: Path, tmp_path: Path, cli: Cli) -> None:
    first = tmp_path / "a" / "tool.bin"
    first.parent.mkdir()
    first.write_bytes(b"one")
    assert cli("registry", "add", reg, first, "--kind", "agent", "--name", "tool", "--version", "1").code == 0
    assert cli("registry", "publish", reg).code == 0
    first.write_bytes(b"two")
    _unchanged(reg, cli, "registry", "add", reg, first, "--kind", "agent", "--name", "tool", "--version", "1",
               code=1, needles=("agent/tool/tool-1.bin: already in the registry", "new version"))


@pytest.mark.parametrize("command", ["add", "publish", "rotate-key", "status"])
def test_malformed_registry_toml(reg: Path, affine_bundle: Path, cli: Cli, command: str) -> None:
    config = reg / "registry.toml"
    extra = {"add": [affine_bundle], "rotate-key": ["timestamp"]}.get(command, [])
    config.write_text(config.read_text().replace("expiry_days = 7", "expiry_days = \"seven\""))
    _unchanged(reg, cli, "registry", command, reg, *extra, code=6,
               needles=(str(config), "[roles.timestamp] expiry_days = 'seven': expected int"))
    config.write_text("format = [")
    _unchanged(reg, cli, "registry", command, reg, *extra, code=6, needles=(str(config), "not valid TOML"))


def test_malformed_pending_and_metadata_json(reg: Path, affine_bundle: Path, cli: Cli) -> None:
    (reg / "pending.json").write_text("{not json")
    _unchanged(reg, cli, "registry", "publish", reg, code=6, needles=("pending.json", "not valid JSON"))
    (reg / "pending.json").unlink()
    ts = reg / "published" / "metadata" / "timestamp.json"
    ts.write_text('{"signed": ')
    for args in (("status", reg), ("publish", reg), ("add", reg, affine_bundle)):
        _unchanged(reg, cli, "registry", *args, code=1, needles=(str(ts), "not valid TUF metadata"))


def test_publish_missing_key_and_passphrase_file(reg: Path, tmp_path: Path, cli: Cli) -> None:
    _unchanged(reg, cli, "registry", "publish", reg, "--passphrase-file", tmp_path / "pw", code=4,
               needles=(str(tmp_path / "pw"), "no such passphrase file"))
    snapshot_key = metadata(reg, "root.json").signed.roles["snapshot"].keyids[0]
    gone = reg / "keys" / f"{snapshot_key}.pem"
    gone.rename(tmp_path / gone.name)  # e.g. kept on another machine
    _unchanged(reg, cli, "registry", "publish", reg, code=1, needles=(str(gone), "private key missing"))


def test_rotate_key_bad_input(reg: Path, cli: Cli) -> None:
    _unchanged(reg, cli, "registry", "rotate-key", reg, "timestamp", "--key", "zz", code=1,
               needles=("key 'zz' matches 0 of its keys",))


def test_serve_bad_input(reg: Path, tmp_path: Path, cli: Cli) -> None:
    _unchanged(reg, cli, "registry", "serve", tmp_path, "--port", "0", code=4, needles=("not a registry",))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        _unchanged(reg, cli, "registry", "serve", reg, "--port", str(port), code=1,
                   needles=(f"cannot serve on 127.0.0.1:{port}",))


def test_served_tree_is_read_only(reg: Path, affine_bundle: Path) -> None:
    import urllib.error
    import urllib.request

    from tests.registry_helpers import serve

    publish_bundle(reg, affine_bundle)
    with serve(reg) as (url, _):
        assert urllib.request.urlopen(url + "/metadata/timestamp.json").status == 200
        for method, path in (("PUT", "/metadata/timestamp.json"), ("GET", "/metadata/"),
                             ("GET", "/../keys/"), ("DELETE", "/metadata/root.json")):
            req = urllib.request.Request(url + path, method=method, data=b"x" if method == "PUT" else None)
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(req)
            assert info.value.code in (404, 501)
