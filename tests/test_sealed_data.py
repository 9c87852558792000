"""The sealed data partition (issue #17): what the build puts in the initrd and on the disk.

The boots that make, unseal and refuse the volume are in tests/test_seal_system.py.
"""

from __future__ import annotations

import configparser
import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.osrelease import running_sealed_data
from agent.sealed import SEALED_ESCROW, SEALED_MARKER, UNSEAL_REQUEST, UNSEAL_RESULT
from provisioning.errors import ImageError
from provisioning.image.disk import Sealed, build_disk, data_uuid, layout, load_sealed
from provisioning.image.seal import (
    REPART_DATA_CONF,
    kernel_cmdline,
    recovery_script,
    repart_data_conf,
    sealed_crypttab,
    sealed_initrd_files,
)
from provisioning.image.sealed_mode import SEALED_MODE_UNIT, UNSEAL_PATH_UNIT, escrow_copy_pre, unseal_script
from provisioning.image.stage import DiskSizes, StageContext
from provisioning.tools import Completed

HASH_A = "99ebd7f2bf583470bcfb6c56e3d3a4af6ce43f259ee85f51f28b17eb136362c1"
HASH_B = "0123456789abcdef" * 4


def _ini(text: str) -> dict[str, dict[str, str]]:
    """A unit or repart.d file as sections of settings (the last of a repeated key wins, as in
    systemd; backslash-newline continues a line)."""
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text.replace("\\\n", " "))
    return {name: dict(parser[name]) for name in parser.sections()}


def test_sealing_needs_the_sites_two_keys_and_changes_the_cache_key(tmp_path: Path) -> None:
    key, recovery = tmp_path / "pcr.key", tmp_path / "recovery.pub"
    key.write_bytes(b"k")
    recovery.write_bytes(b"r")
    with pytest.raises(ImageError, match=r"PCR signing key \(\[tpm\] pcr_key\)"):
        StageContext(rootfs=tmp_path, out=tmp_path, work=tmp_path, source_date_epoch=0, version="1",
                     seal_data=True, recovery_key=recovery)
    with pytest.raises(ImageError, match=r"recovery public key \(\[tpm\] recovery_key\)"):
        StageContext(rootfs=tmp_path, out=tmp_path, work=tmp_path, source_date_epoch=0, version="1",
                     seal_data=True, pcr_key=key)
    plain = StageContext(rootfs=tmp_path, out=tmp_path, work=tmp_path, source_date_epoch=0, version="1",
                         pcr_key=key)
    sealed = StageContext(rootfs=tmp_path, out=tmp_path, work=tmp_path, source_date_epoch=0, version="1",
                          pcr_key=key, seal_data=True, recovery_key=recovery)
    before = sealed.cache_key()
    assert plain.cache_key() != before
    recovery.write_bytes(b"another site key")
    assert sealed.cache_key() != before


def test_a_sealed_image_mounts_var_from_the_volume_the_initrd_opened() -> None:
    plain = kernel_cmdline("appliance", HASH_A).split()
    sealed = kernel_cmdline("appliance", HASH_A, sealed_data=True).split()
    var = [a for a in sealed if ":/var:" in a]
    assert var == [a.replace(f"PARTUUID={data_uuid('appliance')}", "/dev/mapper/data")
                   for a in plain if ":/var:" in a]
    assert var[0].startswith("systemd.mount-extra=/dev/mapper/data:/var:ext4:")
    assert [a for a in sealed if ":/var:" not in a] == [a for a in plain if ":/var:" not in a]


def test_the_node_tells_a_sealed_image_from_its_command_line(tmp_path: Path) -> None:
    """What the agent reads to refuse an OS release that would switch between sealed and plain."""
    cmdline = tmp_path / "cmdline"
    for sealed in (False, True):
        cmdline.write_text(kernel_cmdline("appliance", HASH_A, sealed_data=sealed) + "\n")
        assert running_sealed_data(cmdline) is sealed
    assert running_sealed_data(tmp_path / "missing") is False


def test_repart_makes_the_sealed_partition_where_the_disk_left_room() -> None:
    assert repart_data_conf("appliance", "data", False) == REPART_DATA_CONF
    part = _ini(repart_data_conf("appliance", "data", True))["Partition"]
    assert part == {"Type": "linux-generic", "Label": "data", "UUID": data_uuid("appliance"),
                          "Format": "ext4", "Encrypt": "tpm2", "CopyFiles": "/var:/"}
    # another image name, another partition
    assert _ini(repart_data_conf("other", "data", True))["Partition"]["UUID"] == data_uuid("other")


def test_the_initrd_opens_it_with_the_tpm_alone_after_repart(tmp_path: Path) -> None:
    line = sealed_crypttab("appliance").split()
    assert line[:3] == ["data", f"PARTUUID={data_uuid('appliance')}", "-"]
    options = dict(o.partition("=")[::2] for o in line[3].split(","))
    assert options["tpm2-device"] == "auto"
    assert options["headless"] == "true"  # never a passphrase prompt on a node nobody watches
    assert {"x-initrd.attach", "noauto", "nofail"} <= set(options)
    # no key file, no PCRs here: the LUKS2 token holds the policy (PCR 7 and the signed PCR 11)
    assert not any(o.startswith(("tpm2-pcrs", "tpm2-signature", "password")) for o in options)

    sealed_initrd_files("appliance", "data", tmp_path, b"-----BEGIN PUBLIC KEY-----\nsite\n")
    units = tmp_path / "etc/systemd/system"
    assert (tmp_path / "etc/appliance/recovery.pub").read_bytes() == b"-----BEGIN PUBLIC KEY-----\nsite\n"
    script = tmp_path / "usr/lib/appliance/escrow-recovery-key"
    assert script.read_text() == recovery_script("appliance") and script.stat().st_mode & 0o777 == 0o755
    escrow = _ini((units / "appliance-recovery-key.service").read_text())
    assert escrow["Unit"]["After"] == escrow["Unit"]["Requisite"] == "systemd-cryptsetup@data.service"
    assert escrow["Unit"]["Before"] == "initrd.target"
    assert escrow["Service"]["ExecStart"] == "/usr/lib/appliance/escrow-recovery-key"
    assert (tmp_path / "etc/crypttab").read_text() == sealed_crypttab("appliance")
    assert (tmp_path / "usr/lib/repart.d/50-appliance-data.conf").read_text() == \
        repart_data_conf("appliance", "data", True)
    dropin = (units / "systemd-repart.service.d/50-appliance-sealed-data.conf").read_text()
    assert "\nExecStart=\n" in dropin  # the unit's own command is replaced, not run as well
    repart = _ini(dropin)
    assert "sysroot.mount" in repart["Unit"]["After"] and "sysroot.mount" in repart["Unit"]["Requires"]
    argv = repart["Service"]["ExecStart"].split()
    assert argv[0] == "systemd-repart" and "--dry-run=no" in argv
    assert {"--copy-source=/sysroot", "--tpm2-device=auto", "--tpm2-pcrs=7",
            "--tpm2-public-key=/.extra/tpm2-pcr-public-key.pem", "--tpm2-public-key-pcrs=11"} <= set(argv)
    opener = _ini((units / "systemd-cryptsetup@data.service.d/50-appliance-sealed-data.conf").read_text())
    assert opener["Unit"]["After"] == opener["Unit"]["Wants"] == "systemd-repart.service"
    assert opener["Unit"]["Before"] == "initrd.target"
    # repart stops when the initrd hands over: a Requires on it would close the volume then
    assert "Requires" not in opener["Unit"] and "BindsTo" not in opener["Unit"]
    wants = _ini((units / "initrd.target.d/50-appliance-sealed-data.conf").read_text())
    assert wants["Unit"]["Wants"].split() == ["systemd-cryptsetup@data.service",
                                              "appliance-recovery-key.service", SEALED_MODE_UNIT]


def test_a_volume_that_stays_shut_leaves_the_node_booting_on_a_ram_var(tmp_path: Path) -> None:
    """Sealed mode's half in the initrd: after the attempt to open the volume, and only when it
    did not open, note why and boot on a RAM disk named as the volume's mapping."""
    sealed_initrd_files("appliance", "data", tmp_path, b"-----BEGIN PUBLIC KEY-----\nsite\n")
    unit = _ini((tmp_path / "etc/systemd/system" / SEALED_MODE_UNIT).read_text())
    assert {"systemd-cryptsetup@data.service", "sysroot.mount"} <= set(unit["Unit"]["After"].split())
    assert unit["Unit"]["Before"] == "initrd.target"
    assert unit["Unit"]["ConditionPathExists"] == "!/dev/mapper/data"  # an opened volume: nothing to do
    assert unit["Unit"]["DefaultDependencies"] == "no" and unit["Service"]["Type"] == "oneshot"
    script = tmp_path / "usr/lib/appliance/sealed-mode"
    assert script.stat().st_mode & 0o777 == 0o755
    text = script.read_text()
    assert unit["Service"]["ExecStart"] == "/usr/lib/appliance/sealed-mode"
    assert f"data=/dev/disk/by-partuuid/{data_uuid('appliance')}" in text
    assert f"marker={SEALED_MARKER}" in text and "/sys/class/tpm/tpm0/pcr-sha256/$i" in text
    assert 'dmsetup create data --table "0 $sectors linear /dev/ram0 0"' in text
    # the sealed volume is never a target of anything that writes
    for line in text.splitlines():
        if any(tool in line for tool in ("mkfs", "dmsetup", "cp -a", "mount -t ext4")):
            assert '"$data"' not in line and "by-partuuid" not in line, line
    assert "cryptsetup" not in text and "repart" not in text
    subprocess.run(["sh", "-n", str(script)], check=True)  # POSIX sh: the initrd's shell


def test_a_sealing_image_carries_the_unseal_helper_and_a_plain_one_does_not() -> None:
    from provisioning.image.plan import configure_plan
    from provisioning.image.profile import load_profile

    plain = load_profile(Path("images/minimal.toml"))
    sealing = dataclasses.replace(plain, tpm=dataclasses.replace(plain.tpm, seal_data=True))
    for profile, sealed in ((plain, False), (sealing, True)):
        plan = configure_plan(profile, pip_wheel="/usr/share/python-wheels")
        files = {f.path: f for f in plan.files}
        assert (UNSEAL_PATH_UNIT in plan.enable) is sealed
        assert ("/usr/lib/appliance/unseal-data" in files) is sealed
    helper = files["/usr/lib/appliance/unseal-data"]
    assert helper.mode == 0o755 and helper.content == unseal_script(plain.image.name)
    path_unit = _ini(files[f"/etc/systemd/system/{UNSEAL_PATH_UNIT}"].content)
    assert path_unit["Path"]["PathExists"] == str(UNSEAL_REQUEST)
    assert path_unit["Unit"]["ConditionPathExists"] == str(SEALED_MARKER)  # acts in sealed mode only
    # the agent gets the escrow off the ESP (root's only) as it starts, for the fleet to collect
    agent = files["/etc/systemd/system/appliance-agent.service"].content
    copy = [ln for ln in agent.splitlines() if "recovery-key.enc" in ln]
    assert copy == [escrow_copy_pre("appliance", "appliance")], copy
    assert copy[0].startswith("ExecStartPre=+") and str(SEALED_ESCROW) in copy[0]
    plain_agent = {f.path: f for f in configure_plan(plain, pip_wheel="/usr/share/python-wheels").files}
    assert "recovery-key.enc" not in plain_agent["/etc/systemd/system/appliance-agent.service"].content
    service = _ini(files["/etc/systemd/system/appliance-unseal.service"].content)
    assert service["Service"]["RuntimeDirectory"] == UNSEAL_RESULT.parent.name
    assert service["Unit"]["ConditionPathExists"] == str(SEALED_MARKER)


def _slot(tmp_path: Path, roothash: str, version: str, sealed: bool) -> Sealed:
    folder = tmp_path / f"seal-{version}"
    folder.mkdir(parents=True)
    files = []
    for name in ("root.squashfs", "root.verity", f"appliance-{version}.efi"):
        (folder / name).write_bytes(name.encode() * 1000)
        files.append(folder / name)
    return Sealed("appliance", version, roothash, files[0], files[1], files[2], sealed)


def test_slots_that_disagree_on_sealing_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    calls: list[object] = []

    def run(*args: object, **kw: object) -> Completed:
        calls.append(args)
        raise AssertionError("nothing may run")

    for a, b in ((True, False), (False, True)):
        with pytest.raises(ImageError, match="disagree on the data partition"):
            build_disk(run, out=tmp_path / f"o{a}", work=tmp_path / f"w{a}",
                       name="appliance", sizes=DiskSizes(esp_mib=40, root_mib=16, data_mib=16), epoch=0,
                       slot_a=_slot(tmp_path / f"a{a}", HASH_A, "1", a),
                       slot_b=_slot(tmp_path / f"a{a}", HASH_B, "2", b),
                       boot_loader=tmp_path / "loader.efi", tries=3, data_content=None)
    assert calls == []
    assert not any((tmp_path / f"o{a}").exists() for a in (True, False))


def test_seal_json_says_whether_the_data_is_sealed(tmp_path: Path) -> None:
    slot = _slot(tmp_path, HASH_A, "1", True)
    folder = slot.uki.parent
    (folder / "seal.json").write_text(json.dumps(slot.to_json()))
    assert load_sealed(folder).sealed_data is True
    older = {k: v for k, v in slot.to_json().items() if k != "sealed_data"}
    (folder / "seal.json").write_text(json.dumps(older))
    assert load_sealed(folder).sealed_data is False  # a seal output from before sealing existed
    (folder / "seal.json").write_text(json.dumps(older | {"sealed_data": "yes"}))
    with pytest.raises(ImageError, match=r"seal.json: sealed_data = 'yes'"):
        load_sealed(folder)


@pytest.mark.system  # sfdisk, mkfs.vfat, mtools, mkfs.ext4 (system set-up)
def test_a_sealed_disk_leaves_the_data_partitions_room_empty_and_unlisted(tmp_path: Path) -> None:
    missing = [t for t in ("sfdisk", "mkfs.vfat", "mcopy", "mkfs.ext4", "faketime", "debugfs")
               if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    from provisioning.tools import run

    sizes = DiskSizes(esp_mib=40, root_mib=16, data_mib=16)
    (tmp_path / "loader.efi").write_bytes(b"MZ" * 100)
    var = tmp_path / "var"
    (var / "lib").mkdir(parents=True)
    (var / "lib/canary").write_text("plain canary 0123456789\n" * 100)
    images = {}
    for sealed in (False, True):
        images[sealed] = build_disk(
            run, out=tmp_path / f"out-{sealed}", work=tmp_path / f"work-{sealed}", name="appliance",
            sizes=sizes, epoch=0, slot_a=_slot(tmp_path / f"s-{sealed}", HASH_A, "1", sealed), slot_b=None,
            boot_loader=tmp_path / "loader.efi", tries=3, data_content=var)
    plain, sealed_image = images[False], images[True]
    assert plain.stat().st_size == sealed_image.stat().st_size  # the same room for the node to use

    def table(image: Path) -> list[str]:
        doc = json.loads(subprocess.run(["sfdisk", "--json", str(image)], capture_output=True,
                                        check=True).stdout)
        return [p["name"] for p in doc["partitiontable"]["partitions"]]

    expected = [p.label for p in layout("appliance", sizes, HASH_A, None)]
    assert table(plain) == expected
    assert table(sealed_image) == expected[:-1]  # no entry: repart adds it, encrypted, at first boot
    data = layout("appliance", sizes, HASH_A, None)[-1]
    with plain.open("rb") as f:
        f.seek(data.offset)
        assert b"plain canary 0123456789" in f.read(data.size)  # the check below can fail
    with sealed_image.open("rb") as f:
        f.seek(data.offset)
        assert f.read(data.size) == bytes(data.size)  # nothing of /var in the image's bytes


def test_a_sealing_root_without_openssl_is_refused_before_any_step(tmp_path: Path) -> None:
    from provisioning.image.seal import REQUIRED_IN_ROOTFS, seal

    root = tmp_path / "root"
    for rel in REQUIRED_IN_ROOTFS:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("")
    for name in ("pcr.key", "recovery.pub"):
        (tmp_path / name).write_text("")

    def run(*args: object, **kw: object) -> Completed:
        raise AssertionError("nothing may run")

    ctx = StageContext(rootfs=root, out=tmp_path / "out", work=tmp_path / "work", source_date_epoch=0,
                       version="1", pcr_key=tmp_path / "pcr.key", seal_data=True,
                       recovery_key=tmp_path / "recovery.pub", run=run)
    with pytest.raises(ImageError, match=r"needs these packages in the image: cryptsetup-bin, openssl, "
                       r"systemd-cryptsetup"):
        seal(ctx)
    assert not (tmp_path / "out").exists()
