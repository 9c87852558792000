"""OS releases and the node's slot installer, on files standing in for partitions.

The slot partitions are regular files (by-partlabel links point at them, /sys entries give
their sizes); the partition UUIDs are set by the real sfdisk on a real GPT image file.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from agent.errors import UpdateError, VerificationError
from agent.osrelease import read_release, registry_version, root_uuids
from agent.osupdate import ATTEMPT, attempt_outcome, install_release, os_dir, set_partition_uuid
from provisioning.errors import ImageError
from provisioning.image.measure import pcr11_record
from provisioning.image.osrelease import make_os_release
from testsupport.pe import pe_image
from testsupport.tar_edit import edit_json_member

OLD, NEW = "1" * 64, "ab" * 32
UKI = pe_image([(".linux", b"kernel" * 40), (".osrel", b"ID=debian\n"),
                (".cmdline", b"roothash=" + NEW.encode()), (".initrd", b"initrd" * 30)])


def _fake_build(tmp: Path) -> Path:
    seal = tmp / "build/stages/seal"
    seal.mkdir(parents=True)
    (seal / "root.squashfs").write_bytes(b"squashfs" * 1000)
    (seal / "root.verity").write_bytes(b"verity" * 100)
    (seal / "appliance-20260102.000000.efi").write_bytes(UKI)
    (seal / "systemd-bootx64.efi").write_bytes(b"MZ-boot")
    doc = {"name": "appliance", "version": "20260102.000000", "roothash": NEW,
           "root_image": "root.squashfs", "verity_image": "root.verity",
           "uki": "appliance-20260102.000000.efi"}
    (seal / "seal.json").write_text(json.dumps(doc))
    return tmp / "build"


def _machine(tmp: Path, slot_size: int = 1 << 16) -> dict[str, Any]:
    """Partition files, by-partlabel links, /sys entries, a GPT image, an ESP dir, a cmdline."""
    labels = ["esp", "root-a", "root-a-verity", "root-b", "root-b-verity", "data"]
    disk = tmp / "disk.img"
    disk.write_bytes(b"\0" * (16 << 20))
    script = "label: gpt\n" + "".join(f"size=1MiB, name={lab}\n" for lab in labels)
    subprocess.run(["sfdisk", "--quiet", str(disk)], input=script, text=True, check=True)
    by_label, sys_class = tmp / "by-partlabel", tmp / "sys/class/block"
    by_label.mkdir()
    sys_class.mkdir(parents=True)
    for number, lab in enumerate(labels, 1):
        part = tmp / "dev" / f"vdx{number}"
        part.parent.mkdir(exist_ok=True)
        part.write_bytes(b"\0" * slot_size)
        (by_label / lab).symlink_to(part)
        real = tmp / "sys/devices/vdx" / part.name
        real.mkdir(parents=True)
        (real / "size").write_text(f"{slot_size // 512}\n")
        (real / "partition").write_text(f"{number}\n")
        (sys_class / part.name).symlink_to(real)
    (tmp / "cmdline").write_text(f"roothash={OLD} root=/dev/mapper/root ro\n")
    dm = tmp / "sys/block/dm-0"
    (dm / "dm").mkdir(parents=True)
    (dm / "dm/name").write_text("root\n")
    (dm / "slaves/vdx2").mkdir(parents=True)
    (dm / "slaves/vdx2/uevent").write_text("PARTNAME=root-a\n")
    (tmp / "esp/EFI/Linux").mkdir(parents=True)
    running = "appliance-20260101.000000+2-1.efi"  # booted on trial, as systemd-boot records it
    (tmp / "esp/EFI/Linux" / "appliance-20260101.000000+1-2.efi").write_bytes(b"MZ-running")
    loader_entry = tmp / "LoaderEntrySelected"
    loader_entry.write_bytes(b"\x06\x00\x00\x00" + (running + "\x00").encode("utf-16-le"))

    def set_uuid(dev: Path, number: int, part_uuid: str) -> None:  # on the image file
        assert dev == Path("/dev/vdx")
        set_partition_uuid(disk, number, part_uuid)

    return {"by_partlabel": by_label, "sys_class_block": sys_class, "sys_block": tmp / "sys/block",
            "cmdline": tmp / "cmdline", "esp": tmp / "esp", "loader_entry": loader_entry,
            "set_uuid": set_uuid, "disk": disk}


def test_os_release_round_trip(tmp_path: Path) -> None:
    path = make_os_release(_fake_build(tmp_path), tmp_path / "os.release")
    again = make_os_release(tmp_path / "build", tmp_path / "os2.release")
    assert path.read_bytes() == again.read_bytes()  # deterministic
    release = read_release(path)
    assert (release.name, release.version, release.roothash) == ("appliance", "20260102.000000", NEW)
    assert registry_version(release.version) == "20260102.0"
    with tarfile.open(path) as tar:
        meta = tar.extractfile("release.json")
        assert meta is not None
        doc = json.load(meta)
    assert doc["pcr11"] == pcr11_record(UKI) and len(doc["pcr11"]["sha256"]) == 4  # for attestation


def test_a_uki_whose_pcr11_cannot_be_computed_gives_no_release(tmp_path: Path) -> None:
    build = _fake_build(tmp_path)
    uki = build / "stages/seal/appliance-20260102.000000.efi"
    uki.write_bytes(b"MZ-not-a-pe" * 20)
    with pytest.raises(ImageError, match=re.escape(str(uki))):
        make_os_release(build, tmp_path / "os.release")
    assert not (tmp_path / "os.release").exists() and not (tmp_path / "os.release.part").exists()


def test_os_release_with_a_changed_member_is_refused(tmp_path: Path) -> None:
    path = make_os_release(_fake_build(tmp_path), tmp_path / "os.release")
    data = bytearray(path.read_bytes())
    at = data.find(b"squashfssquashfs")
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match=r"root.squashfs: size 8000 sha256 .* but release.json says"):
        read_release(path)


@pytest.mark.system  # sfdisk makes the GPT image (package fdisk, system set-up)
def test_install_writes_the_inactive_slot_uuids_and_a_uki_on_trial(tmp_path: Path) -> None:
    release = make_os_release(_fake_build(tmp_path), tmp_path / "os.release")
    m = _machine(tmp_path)
    state = tmp_path / "state"
    attempt = install_release(release, state, tries=3, **{k: v for k, v in m.items() if k != "disk"})
    assert attempt["slot"] == "B" and attempt["from_slot"] == "A"
    assert attempt["from_roothash"] == OLD and attempt["roothash"] == NEW
    with tarfile.open(release) as tar:
        for member, label in (("root.squashfs", "root-b"), ("root.verity", "root-b-verity")):
            want = tar.extractfile(member).read()  # type: ignore[union-attr]
            got = (m["by_partlabel"] / label).resolve().read_bytes()
            assert got[:len(want)] == want
    for label in ("root-a", "root-a-verity"):  # the running slot is untouched
        assert set((m["by_partlabel"] / label).resolve().read_bytes()) == {0}
    verify = subprocess.run(["sfdisk", "--verify", str(m["disk"])], capture_output=True, text=True,
                            check=False)
    assert verify.returncode == 0 and "corrupt" not in (verify.stdout + verify.stderr).lower(), verify
    parts = json.loads(subprocess.run(["sfdisk", "--json", str(m["disk"])], capture_output=True,
                                      check=True).stdout)["partitiontable"]["partitions"]
    uuids = {p["name"]: p["uuid"].lower() for p in parts}
    assert (uuids["root-b"], uuids["root-b-verity"]) == root_uuids(NEW)
    assert uuids["root-a"] != root_uuids(NEW)[0]
    uki = m["esp"] / "EFI/Linux/appliance-20260102.000000+3-0.efi"
    assert uki.read_bytes() == UKI
    assert not list((m["esp"] / "EFI/Linux").glob("*.part"))
    assert json.loads((os_dir(state) / ATTEMPT).read_text()) == attempt


@pytest.mark.system  # sfdisk makes the GPT image (package fdisk, system set-up)
def test_install_refuses_the_running_root_and_a_release_too_big(tmp_path: Path) -> None:
    release = make_os_release(_fake_build(tmp_path), tmp_path / "os.release")
    m = _machine(tmp_path, slot_size=4096)
    kw = {k: v for k, v in m.items() if k != "disk"}
    with pytest.raises(UpdateError, match="do not fit"):
        install_release(release, tmp_path / "state", **kw)
    (tmp_path / "cmdline").write_text(f"roothash={NEW}\n")
    with pytest.raises(UpdateError, match="is the running root"):
        install_release(release, tmp_path / "state", **kw)
    assert [p.name for p in (m["esp"] / "EFI/Linux").iterdir()] == ["appliance-20260101.000000+1-2.efi"]


@pytest.mark.system  # sfdisk makes the GPT image (package fdisk, system set-up)
def test_install_refuses_a_release_that_would_switch_between_sealed_and_plain_data(tmp_path: Path) -> None:
    build = _fake_build(tmp_path)
    plain = make_os_release(build, tmp_path / "plain.release")
    seal_json = build / "stages/seal/seal.json"
    seal_json.write_text(json.dumps(json.loads(seal_json.read_text()) | {"sealed_data": True}))
    sealed = make_os_release(build, tmp_path / "sealed.release")
    assert (read_release(plain).sealed_data, read_release(sealed).sealed_data) == (False, True)
    m = _machine(tmp_path)
    kw = {k: v for k, v in m.items() if k != "disk"}
    parts = {p: p.read_bytes() for p in (tmp_path / "dev").iterdir()}
    with pytest.raises(UpdateError, match="its data partition is sealed to the TPM, this node's is plain"):
        install_release(sealed, tmp_path / "state", **kw)
    (tmp_path / "cmdline").write_text(
        f"roothash={OLD} systemd.mount-extra=/dev/mapper/data:/var:ext4:defaults ro\n")
    with pytest.raises(UpdateError, match="its data partition is plain, this node's is sealed to the TPM"):
        install_release(plain, tmp_path / "state", **kw)
    # nothing written: the slots, the ESP, the state
    assert {p: p.read_bytes() for p in (tmp_path / "dev").iterdir()} == parts
    assert [p.name for p in (m["esp"] / "EFI/Linux").iterdir()] == ["appliance-20260101.000000+1-2.efi"]
    assert not (tmp_path / "state").exists()
    assert install_release(sealed, tmp_path / "state", **kw)["slot"] == "B"  # sealed onto sealed


def test_a_release_with_a_malformed_sealed_data_is_refused(tmp_path: Path) -> None:
    build = _fake_build(tmp_path)
    seal_json = build / "stages/seal/seal.json"
    seal_json.write_text(json.dumps(json.loads(seal_json.read_text()) | {"sealed_data": True}))
    release = make_os_release(build, tmp_path / "os.release")
    bad = edit_json_member(release, tmp_path / "bad.release", "release.json",
                           lambda doc: doc.update(sealed_data="yes"))
    with pytest.raises(VerificationError, match=r"release\.json sealed_data = 'yes'"):
        read_release(bad)


@pytest.mark.system  # sfdisk makes the GPT image (package fdisk, system set-up)
def test_install_drops_entries_whose_slot_it_overwrites_and_keeps_the_running_one(tmp_path: Path) -> None:
    """Only two roots exist after the install: the running one and the new one. An entry for any
    other root (an older release in the slot being overwritten, one already marked bad) would
    be a fallback into a root that no longer exists."""
    release = make_os_release(_fake_build(tmp_path), tmp_path / "os.release")
    m = _machine(tmp_path)
    esp = m["esp"] / "EFI/Linux"
    for stale in ("appliance-20251201.1.efi", "appliance-20251215.1+0-3.efi"):
        (esp / stale).write_bytes(b"MZ-stale")
    attempt = install_release(release, tmp_path / "state", **{k: v for k, v in m.items() if k != "disk"})
    assert sorted(p.name for p in esp.iterdir()) == ["appliance-20260101.000000+1-2.efi",
                                                     "appliance-20260102.000000+3-0.efi"]
    assert attempt["removed_entries"] == ["appliance-20251201.1.efi", "appliance-20251215.1+0-3.efi"]
    # booted without systemd-boot's variable: nothing is removed (it cannot tell which is running)
    (tmp_path / "again").mkdir()
    m2 = _machine(tmp_path / "again")
    (m2["esp"] / "EFI/Linux" / "appliance-20251201.1.efi").write_bytes(b"MZ-stale")
    m2["loader_entry"].unlink()
    again = install_release(release, tmp_path / "state2", **{k: v for k, v in m2.items() if k != "disk"})
    assert again["removed_entries"] == []
    assert (m2["esp"] / "EFI/Linux" / "appliance-20251201.1.efi").is_file()


@pytest.mark.parametrize(("running", "outcome"), [(NEW, "applied"), (OLD, "failed")])
def test_attempt_outcome_after_the_reboot(tmp_path: Path, running: str, outcome: str) -> None:
    d = os_dir(tmp_path)
    d.mkdir()
    (d / ATTEMPT).write_text(json.dumps({"roothash": NEW, "from_roothash": OLD, "version": "2"}))
    found = attempt_outcome(tmp_path, running)
    assert found is not None and found[0] == outcome
    assert not (d / ATTEMPT).exists()
    assert attempt_outcome(tmp_path, running) is None


def test_attempt_outcome_ignores_an_unrelated_root(tmp_path: Path) -> None:
    d = os_dir(tmp_path)
    d.mkdir()
    (d / ATTEMPT).write_text(json.dumps({"roothash": NEW, "from_roothash": OLD}))
    assert attempt_outcome(tmp_path, "cd" * 32) is None
    assert (d / ATTEMPT).exists()


def test_sha_helper_consistency(tmp_path: Path) -> None:
    release = make_os_release(_fake_build(tmp_path), tmp_path / "os.release")
    doc = read_release(release).files
    assert doc["uki.efi"]["sha256"] == hashlib.sha256(UKI).hexdigest()
    shutil.rmtree(tmp_path / "build")
    with pytest.raises(Exception, match="no sealed root"):
        make_os_release(tmp_path / "build", tmp_path / "x.release")


def _registry_with_release(tmp: Path, release: Path) -> tuple[Path, str]:
    from provisioning.registry import add_target, init_registry, publish

    reg = tmp / "registry"
    init_registry(reg)
    added = add_target(reg, release, kind="os", name="appliance", version="20260102.0")
    publish(reg)
    return reg, str(added.get("path") or added.get("target"))


def _stage(state: Path, release: Path, target: str, source: Path, data: bytes | None = None) -> None:
    staged = os_dir(state) / "staged" / release.name
    staged.parent.mkdir(parents=True)
    staged.write_bytes(data if data is not None else release.read_bytes())
    (os_dir(state) / "pending.json").write_text(json.dumps(
        {"target": target, "source": str(source), "file": str(staged)}))


@pytest.mark.system  # sfdisk makes the GPT image (package fdisk, system set-up)
def test_install_pending_verifies_the_staged_release_through_its_own_tuf(tmp_path: Path) -> None:
    from agent.osupdate import install_pending

    release = make_os_release(_fake_build(tmp_path), tmp_path / "os.release")
    reg, target = _registry_with_release(tmp_path, release)
    m = _machine(tmp_path)
    state = tmp_path / "state"
    _stage(state, release, target, reg / "published")
    attempt = install_pending(state, tmp_path / "trust", reg / "published/metadata/root.json",
                              **{k: v for k, v in m.items() if k != "disk"})
    assert attempt["slot"] == "B"
    assert (m["esp"] / "EFI/Linux/appliance-20260102.000000+3-0.efi").is_file()
    assert not (os_dir(state) / "pending.json").exists()
    assert not list((os_dir(state) / "staged").iterdir())


@pytest.mark.system  # sfdisk makes the GPT image (package fdisk, system set-up)
def test_install_pending_refuses_a_staged_file_the_registry_did_not_sign(tmp_path: Path) -> None:
    from agent.osupdate import install_pending

    release = make_os_release(_fake_build(tmp_path), tmp_path / "os.release")
    reg, target = _registry_with_release(tmp_path, release)
    m = _machine(tmp_path)
    state = tmp_path / "state"
    forged = bytearray(release.read_bytes())
    forged[-1] ^= 1
    _stage(state, release, target, reg / "published", bytes(forged))
    with pytest.raises(VerificationError, match="the signed target"):
        install_pending(state, tmp_path / "trust", reg / "published/metadata/root.json",
                        **{k: v for k, v in m.items() if k != "disk"})
    assert [p.name for p in (m["esp"] / "EFI/Linux").iterdir()] == ["appliance-20260101.000000+1-2.efi"]
    assert set((m["by_partlabel"] / "root-b").resolve().read_bytes()) == {0}
    assert not (os_dir(state) / "pending.json").exists()
    assert not (os_dir(state) / ATTEMPT).exists()
