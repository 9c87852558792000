"""The node's TUF client against real registries: round trips and every attack of issue 2.

Each attack is refused with a precise error, and the node's state directory is compared
byte-for-byte before and after.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.exceptions import DownloadHTTPError

from agent.errors import ConfigError, NotFoundError, VerificationError
from agent.updates.client import RegistryClient
from agent.updates.clock import ClockPolicy
from agent.updates.fetchers import DirectoryFetcher
from provisioning.bundle import verify_bundle
from provisioning.registry import add_target, init_registry, publish, publish_bundle, rotate_key, trusted_root
from tests.registry_helpers import (
    Metadata,
    Root,
    forge_timestamp,
    metadata,
    serve,
    signers,
    tree,
    write_signed,
)


@pytest.fixture
def reg(tmp_path: Path, affine_bundle: Path) -> Path:
    """A registry with the affine bundle published (targets/snapshot/timestamp v2)."""
    directory = tmp_path / "registry"
    init_registry(directory)
    publish_bundle(directory, affine_bundle)
    return directory


def _node(tmp_path: Path, registry: Path, source: str | None = None, **kw: object) -> RegistryClient:
    state = tmp_path / "node"
    RegistryClient.initialize(state, trusted_root(registry))
    return RegistryClient(state, source or str(registry / "published"), **kw)  # type: ignore[arg-type]


def _refused(client: RegistryClient, *needles: str) -> VerificationError:
    before = tree(client.state_dir)
    with pytest.raises(VerificationError) as info:
        RegistryClient(client.state_dir, client.source_text, clock=client.clock._system_clock).refresh()
    assert tree(client.state_dir) == before, "a refused refresh changed the node's state"
    print(f"refused: {info.value}")  # the message, for -s runs
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    return info.value


# ---------------------------------------------------------------- round trips

def test_round_trip_over_http(tmp_path: Path, reg: Path, affine_bundle: Path) -> None:
    with serve(reg) as (url, requests):
        client = _node(tmp_path, reg, url)
        client.refresh()
        info = client.find_bundle("affine")
        assert (info.kind, info.name, info.version) == ("bundle", "affine", "1.0.0")
        assert info.sha256 == hashlib.sha256(affine_bundle.read_bytes()).hexdigest()
        got = client.download(info, tmp_path / "dl")
    assert got.read_bytes() == affine_bundle.read_bytes()
    verify_bundle(got)  # and the bundle's own checks, golden vectors included
    assert "/metadata/2.root.json" in requests  # looked for a newer root, got 404
    assert any(r.startswith("/targets/bundles/affine/" + info.sha256) for r in requests)
    names = sorted(p.name for p in client.metadata_dir.iterdir())
    assert names == ["root.json", "snapshot.json", "targets.json", "timestamp.json"]


def test_round_trip_from_a_copied_directory(tmp_path: Path, reg: Path, affine_bundle: Path) -> None:
    stick = tmp_path / "usb"
    shutil.copytree(reg / "published", stick / "site-registry")  # what an operator copies
    client = _node(tmp_path, reg, str(stick / "site-registry"))
    got = client.download(client.find_bundle("affine", "1.0.0"), tmp_path / "dl")
    assert got.read_bytes() == affine_bundle.read_bytes()
    assert client.trusted_versions() == {"root": 1, "timestamp": 2, "snapshot": 2, "targets": 2}


def test_newest_version_and_not_found(tmp_path: Path, reg: Path, affine_bundle: Path) -> None:
    import numpy as np

    from provisioning.bundle import create_bundle
    from provisioning.demo.models import affine_model, save_golden

    model = affine_model(tmp_path / "m.onnx")
    golden = save_golden(tmp_path / "g.npz", {"x": np.ones((1, 4), np.float32)})
    for v in ("1.10.0", "1.9.0"):
        publish_bundle(reg, create_bundle(model, name="affine", version=v, golden=[golden],
                                          out=tmp_path / f"a-{v}.bundle").path)
    add_target(reg, affine_bundle.parent / "golden.npz", kind="file")
    publish(reg)
    client = _node(tmp_path, reg)
    assert client.find_bundle("affine").version == "1.10.0"  # numeric, not string, order
    kinds = {t.path: t.kind for t in client.targets()}
    assert kinds["files/golden.npz"] == "file"
    versions = r"\(versions there: 1\.0\.0, 1\.10\.0, 1\.9\.0\)"
    with pytest.raises(NotFoundError, match=r"no bundle affine 2\.0 " + versions):
        client.find_bundle("affine", "2.0")
    with pytest.raises(NotFoundError, match="no target 'nope'"):
        client.download("nope", tmp_path / "dl")


def test_present_file_is_not_fetched_again(tmp_path: Path, reg: Path) -> None:
    with serve(reg) as (url, requests):
        client = _node(tmp_path, reg, url)
        first = client.download(client.find_bundle("affine"), tmp_path / "dl")
        inode = first.stat().st_ino
        count = len(requests)
        again = client.download(client.find_bundle("affine"), tmp_path / "dl")
    assert again == first and again.stat().st_ino == inode
    assert len(requests) == count


def test_root_rotation_done_right_is_accepted(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
                                             affine_bundle: Path) -> None:
    reg = tmp_path / "r2"
    init_registry(reg, root_threshold=2, root_keys=2)
    client = _node(tmp_path, reg)
    client.refresh()
    rotate_key(reg, "root")           # v2: all root keys replaced, signed by old and new
    rotate_key(reg, "timestamp")      # v3
    publish_bundle(reg, affine_bundle)
    client = RegistryClient(client.state_dir, client.source_text)
    client.refresh()
    assert client.trusted_versions()["root"] == 3
    assert [t.name for t in client.targets()] == ["affine"]


# ---------------------------------------------------------------- attacks on metadata

def _flip(path: Path, region: str) -> None:
    data = bytearray(path.read_bytes())
    marker = b'"expires": "' if region == "signed" else b'"sig": "'
    at = data.index(marker) + len(marker) + (1 if region == "signed" else 7)
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("region", ["signed", "signature"])
@pytest.mark.parametrize("role", ["root", "timestamp", "snapshot", "targets"])
def test_flipped_byte_in_each_metadata_file(tmp_path: Path, reg: Path, role: str, region: str) -> None:
    client = _node(tmp_path, reg)
    client.refresh()
    if role == "root":
        rotate_key(reg, "root")
        name = "2.root.json"
    else:
        publish(reg)
        name = {"timestamp": "timestamp.json", "snapshot": "3.snapshot.json",
                "targets": "3.targets.json"}[role]
    _flip(reg / "published" / "metadata" / name, region)
    _refused(client, name)


def test_metadata_over_its_size_cap(tmp_path: Path, reg: Path) -> None:
    client = _node(tmp_path, reg)
    ts = reg / "published" / "metadata" / "timestamp.json"
    ts.write_bytes(ts.read_bytes() + b" " * (20 * 1024))  # still valid JSON, 20 KiB > 16 KiB cap
    _refused(client, "timestamp.json", "exceeding the maximum allowed length of 16384")


def test_snapshot_longer_than_timestamp_declares(tmp_path: Path, reg: Path) -> None:
    client = _node(tmp_path, reg)
    sn = reg / "published" / "metadata" / "2.snapshot.json"
    sn.write_bytes(sn.read_bytes() + b"\n")
    _refused(client, "2.snapshot.json", "maximum allowed length")


@pytest.mark.parametrize("role", ["timestamp", "snapshot", "targets"])
def test_replayed_older_metadata_is_rollback(tmp_path: Path, reg: Path, role: str) -> None:
    meta = reg / "published" / "metadata"
    old_ts = (meta / "timestamp.json").read_bytes()
    publish(reg)  # v3 everywhere
    client = _node(tmp_path, reg)
    client.refresh()
    if role == "timestamp":
        (meta / "timestamp.json").write_bytes(old_ts)
        _refused(client, "timestamp.json", "BadVersionNumber", "must be >= 3")
    elif role == "snapshot":
        # a newer timestamp (real key) that points back at snapshot v2
        forge_timestamp(reg, snapshot_version=2)
        _refused(client, "timestamp.json", "BadVersionNumber", "snapshot version must be >= 3, got version 2")
    else:
        # newer snapshot and timestamp (real keys) that point back at targets v2
        sn = metadata(reg, "3.snapshot.json")
        sn.signed.version = 4
        sn.signed.meta["targets.json"] = metadata(reg, "3.snapshot.json").signed.meta["targets.json"]
        sn.signed.meta["targets.json"].version = 2
        sn.signed.meta["targets.json"].hashes = None
        sn.signed.meta["targets.json"].length = None
        write_signed(reg, sn, ["4.snapshot.json"], signers(reg, "snapshot"))
        forge_timestamp(reg, snapshot_version=4)
        _refused(client, "4.snapshot.json", "BadVersionNumber", "targets.json version 2")


def test_expired_timestamp_is_a_freeze(tmp_path: Path, reg: Path) -> None:
    now = [datetime.now(UTC)]
    client = _node(tmp_path, reg, clock=lambda: now[0])
    client.refresh()
    expires = metadata(reg, "timestamp.json").signed.expires
    now[0] = expires + timedelta(hours=1)
    err = _refused(client, "timestamp.json is expired",
                   f"it expired at {expires:%Y-%m-%dT%H:%M:%SZ}",
                   f"reference time is {now[0]:%Y-%m-%dT%H:%M:%SZ}")
    assert "system clock" in str(err)


def test_clock_set_back_does_not_revive_expired_metadata(tmp_path: Path, reg: Path) -> None:
    """The node's clock jumps back to 2020; a validly signed timestamp that expired in 2025
    would pass against that clock, but the floor of signed times (issued ~now) refuses it."""
    client = _node(tmp_path, reg, clock=lambda: datetime(2020, 1, 1, tzinfo=UTC))
    client.refresh()  # fine: the reference time is the floor, not 2020
    floor = ClockPolicy(client.state_dir).floor()
    assert floor is not None and floor.year >= 2026
    forge_timestamp(reg, expires=datetime(2025, 1, 1, tzinfo=UTC))
    _refused(client, "it expired at 2025-01-01T00:00:00Z",
             f"reference time is {floor:%Y-%m-%dT%H:%M:%SZ}", "system clock 2020-01-01T00:00:00Z")
    status = client.clock_status()
    assert status.source == "floor" and status.system_time == "2020-01-01T00:00:00Z"


def test_clock_override_is_explicit_logged_and_visible(tmp_path: Path, reg: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    client = _node(tmp_path, reg)
    policy = ClockPolicy(client.state_dir)
    later = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)  # timestamp lasts 7
    with pytest.raises(ConfigError, match="needs a reason"):
        policy.set_override(later)
    policy.set_override(later, "testing a clock a month ahead")
    status = client.clock_status().to_json()
    assert status["source"] == "override" and status["override"]["reason"] == "testing a clock a month ahead"
    _refused(client, "timestamp.json is expired", f"reference time is {later:%Y-%m-%dT%H:%M:%SZ}",
             "operator override")
    assert "operator override" in caplog.text
    policy.set_override(None)
    client.refresh()


def test_mix_and_match_snapshot_that_does_not_match_targets(tmp_path: Path, reg: Path) -> None:
    meta = reg / "published" / "metadata"
    old_targets = (meta / "2.targets.json").read_bytes()
    client = _node(tmp_path, reg)
    client.refresh()
    publish(reg)
    (meta / "3.targets.json").write_bytes(old_targets)  # an old, validly signed targets file
    _refused(client, "3.targets.json")


def test_signature_by_unknown_key(tmp_path: Path, reg: Path) -> None:
    client = _node(tmp_path, reg)
    client.refresh()
    stranger = CryptoSigner.generate_ed25519()
    forge_timestamp(reg, keys=[stranger])
    _refused(client, "timestamp.json", "timestamp was signed by 0/1 keys")


def test_one_signature_where_threshold_is_two(tmp_path: Path) -> None:
    reg = tmp_path / "r2"
    init_registry(reg, root_threshold=2, root_keys=2)
    client = _node(tmp_path, reg)
    client.refresh()
    root_keys = signers(reg, "root")
    new = Metadata[Root].from_bytes((reg / "published" / "metadata" / "root.json").read_bytes())
    new.signed.version = 2
    write_signed(reg, new, ["2.root.json"], root_keys[:1])
    _refused(client, "2.root.json", "root was signed by 1/2 keys")


def test_root_rotation_done_wrong_is_refused(tmp_path: Path) -> None:
    """A new root signed only by its own new keys, not by the old root's threshold."""
    reg = tmp_path / "r2"
    init_registry(reg, root_threshold=2, root_keys=2)
    client = _node(tmp_path, reg)
    client.refresh()
    new = Metadata[Root].from_bytes((reg / "published" / "metadata" / "root.json").read_bytes())
    fresh = [CryptoSigner.generate_ed25519() for _ in range(2)]
    for k in list(new.signed.roles["root"].keyids):
        new.signed.revoke_key(k, "root")
    for signer in fresh:
        new.signed.add_key(signer.public_key, "root")
    new.signed.version = 2
    write_signed(reg, new, ["2.root.json"], fresh)
    _refused(client, "2.root.json", "root was signed by 0/2 keys")


# ---------------------------------------------------------------- attacks on targets

@pytest.mark.parametrize("over_http", [False, True])
def test_target_longer_than_declared_stops_at_declared_length(tmp_path: Path, reg: Path,
                                                              over_http: bool) -> None:
    stored = next((reg / "published" / "targets" / "bundles" / "affine").iterdir())
    declared = stored.stat().st_size
    with stored.open("ab") as fh:
        fh.write(os.urandom(1 << 20) * 8)  # 8 MiB more than declared
    dest = tmp_path / "dl"
    dest.mkdir()
    with serve(reg) as (url, _):
        client = _node(tmp_path, reg, url if over_http else None)
        with pytest.raises(VerificationError,
                           match=f"longer than the {declared} bytes its metadata declares"):
            client.download(client.find_bundle("affine"), dest)
    assert list(dest.iterdir()) == []  # no partial file, no temporary left behind


def test_flipped_byte_in_target_is_refused(tmp_path: Path, reg: Path) -> None:
    stored = next((reg / "published" / "targets" / "bundles" / "affine").iterdir())
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.write_bytes(bytes(data))
    client = _node(tmp_path, reg)
    with pytest.raises(VerificationError, match=r"sha256 \w+ does not match the signed"):
        client.download(client.find_bundle("affine"), tmp_path / "dl")
    assert not (tmp_path / "dl" / "affine-1.0.0.bundle").exists()


# ---------------------------------------------------------------- set-up and fetcher

def test_initialize_refuses_what_is_not_a_self_signed_root(tmp_path: Path, reg: Path) -> None:
    ts = (reg / "published" / "metadata" / "timestamp.json").read_bytes()
    with pytest.raises(VerificationError, match="expected a root role"):
        RegistryClient.initialize(tmp_path / "n", ts)
    with pytest.raises(VerificationError, match="not TUF root metadata"):
        RegistryClient.initialize(tmp_path / "n", b"{}")
    root = bytearray(trusted_root(reg))
    root[root.index(b'"sig": "') + 10] ^= 0x01
    with pytest.raises(VerificationError, match="does not verify"):
        RegistryClient.initialize(tmp_path / "n", bytes(root))
    assert not (tmp_path / "n").exists() or not any((tmp_path / "n").rglob("root.json"))
    with pytest.raises(NotFoundError, match="no trusted root"):
        RegistryClient(tmp_path / "n", str(reg / "published")).refresh()


def test_directory_fetcher_answers_like_http(tmp_path: Path, reg: Path) -> None:
    fetcher = DirectoryFetcher(reg / "published")
    base = fetcher.url_for(reg / "published" / "metadata")
    assert b"".join(fetcher.fetch(base + "1.root.json")).startswith(b"{")
    for url in (base + "2.root.json", base, fetcher.url_for(reg / "keys") + "x.pem"):
        with pytest.raises(DownloadHTTPError) as info:
            fetcher.fetch(url)
        assert info.value.status_code == 404
    os.mkfifo(reg / "published" / "metadata" / "fifo.json")  # must not block
    with pytest.raises(DownloadHTTPError, match="not a regular file"):
        fetcher.fetch(base + "fifo.json")
