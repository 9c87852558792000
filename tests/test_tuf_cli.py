"""``appliance-tuf-client``: the tuf-conformance client protocol, run as a real process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

from provisioning.registry import init_registry, publish, publish_bundle, rotate_key
from tests.conftest import ROOT
from tests.registry_helpers import serve, tree


def client(*args: str | Path, faketime: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "agent.updates.tuf_cli", *[str(a) for a in args]]
    if faketime:
        cmd = [shutil.which("faketime") or "faketime", "-f", faketime, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)


@pytest.fixture
def reg(tmp_path: Path, affine_bundle: Path) -> Path:
    directory = tmp_path / "registry"
    init_registry(directory)
    publish_bundle(directory, affine_bundle)
    return directory


def _init(tmp_path: Path, reg: Path) -> Path:
    md = tmp_path / "metadata"
    md.mkdir()
    proc = client("--metadata-dir", md, "init", reg / "published" / "metadata" / "1.root.json")
    assert proc.returncode == 0, proc.stderr
    assert (md / "root.json").read_bytes() == (reg / "published" / "metadata" / "1.root.json").read_bytes()
    return md


TARGET = "bundles/affine/affine-1.0.0.bundle"


def test_init_refresh_download_and_cache(tmp_path: Path, reg: Path, affine_bundle: Path) -> None:
    md = _init(tmp_path, reg)
    td = tmp_path / "targets"
    td.mkdir()
    with serve(reg) as (url, requests):
        proc = client("--metadata-dir", md, "--metadata-url", f"{url}/metadata", "refresh")
        assert proc.returncode == 0, proc.stderr
        assert sorted(p.name for p in md.iterdir()) == ["root.json", "snapshot.json", "targets.json",
                                                         "timestamp.json"]
        args = ["--metadata-dir", md, "--metadata-url", f"{url}/metadata", "--target-name", TARGET,
                "--target-base-url", f"{url}/targets/", "--target-dir", td, "download"]
        proc = client(*args)
        assert proc.returncode == 0, proc.stderr
        stored = td / quote(TARGET, "")
        assert stored.read_bytes() == affine_bundle.read_bytes()
        fetched = [r for r in requests if r.startswith("/targets/")]
        assert len(fetched) == 1
        proc = client(*args)  # already present with matching hashes: not fetched again
        assert proc.returncode == 0, proc.stderr
        assert [r for r in requests if r.startswith("/targets/")] == fetched
        assert "not fetched again" in proc.stderr


def test_download_stops_at_first_failure(tmp_path: Path, reg: Path) -> None:
    md = _init(tmp_path, reg)
    td = tmp_path / "targets"
    td.mkdir()
    with serve(reg) as (url, _):
        proc = client("--metadata-dir", md, "--metadata-url", f"{url}/metadata",
                      "--target-name", "no/such/target", "--target-name", TARGET,
                      "--target-base-url", f"{url}/targets", "--target-dir", td, "download")
    assert proc.returncode == 1
    assert "target 'no/such/target': not in the repository's signed metadata" in proc.stderr
    assert list(td.iterdir()) == []


def test_refresh_failures_exit_1_and_usage_errors_too(tmp_path: Path, reg: Path) -> None:
    md = _init(tmp_path, reg)
    ts = reg / "published" / "metadata" / "timestamp.json"
    ts.write_bytes(ts.read_bytes().replace(b'"version": 2', b'"version": 9'))
    with serve(reg) as (url, _):
        proc = client("--metadata-dir", md, "--metadata-url", f"{url}/metadata", "refresh")
    assert proc.returncode == 1 and "timestamp was signed by 0/1 keys" in proc.stderr
    assert client("--metadata-dir", md, "refresh").returncode == 1  # no --metadata-url
    assert client("--metadata-dir", md, "frobnicate").returncode == 1
    assert client("refresh").returncode == 1


def test_expired_timestamp_under_faketime(tmp_path: Path, reg: Path) -> None:
    md = _init(tmp_path, reg)
    with serve(reg) as (url, _):
        args = ("--metadata-dir", md, "--metadata-url", f"{url}/metadata", "refresh")
        ok = client(*args, faketime="+1d")
        assert ok.returncode == 0, ok.stderr
        before = tree(md)
        proc = client(*args, faketime="+30d")
    assert proc.returncode == 1
    assert "timestamp.json is expired; it expired at" in proc.stderr
    assert "reference time is" in proc.stderr
    assert tree(md) == before


def test_verified_root_is_kept_when_a_later_step_fails(tmp_path: Path, reg: Path) -> None:
    """The CLI persists step by step as the specification says: a rotated root that verified is
    kept even though the timestamp that follows is refused."""
    md = _init(tmp_path, reg)
    source = str(reg / "published" / "metadata")
    assert client("--metadata-dir", md, "--metadata-url", source, "refresh").returncode == 0
    rotate_key(reg, "root")
    publish(reg)
    ts = reg / "published" / "metadata" / "timestamp.json"
    ts.write_bytes(ts.read_bytes().replace(b'"version": 4', b'"version": 9'))
    proc = client("--metadata-dir", md, "--metadata-url", source, "refresh")
    assert proc.returncode == 1, proc.stderr
    assert json.loads((md / "root.json").read_bytes())["signed"]["version"] == 2
    assert json.loads((md / "timestamp.json").read_bytes())["signed"]["version"] == 2


def test_a_delegated_role_file_with_a_leading_dot_is_kept(tmp_path: Path, reg: Path) -> None:
    """python-tuf stores a role by its URL-quoted name: the role ``../delegatedrole`` becomes
    ``..%2Fdelegatedrole.json`` (tuf-conformance's test_unusual_role_name).  The node commits it
    with the rest of a refresh, inside the metadata directory, never outside it."""
    from agent.updates._session import updater_session
    from agent.updates.clock import system_now
    from agent.updates.fetchers import parse_source

    md = _init(tmp_path, reg)
    quoted = quote("../delegatedrole", "") + ".json"
    assert quoted.startswith(".")
    with updater_session(md, parse_source(str(reg / "published")), system_now()) as (updater, _):
        updater.refresh()
        (Path(updater._dir) / quoted).write_bytes(b"{}")  # as python-tuf persists a delegated role
    assert (md / quoted).read_bytes() == b"{}"
    assert sorted(p.name for p in md.iterdir()) == sorted([quoted, "root.json", "snapshot.json",
                                                           "targets.json", "timestamp.json"])
    assert not (md.parent / "delegatedrole.json").exists()
