"""Fast tier of the seal/disk/boot/flash stages: layout, identifiers, argv, flash safety."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from agent.errors import NotFoundError, VerificationError
from agent.osrelease import root_uuids, uki_file_name
from provisioning.errors import ImageError, ToolError
from provisioning.image import boot as vm
from provisioning.image import flash as flash_mod
from provisioning.image.disk import (
    MANIFEST_NAME,
    TYPE,
    derived_uuid,
    disk_mib,
    layout,
    sfdisk_script,
    verity_mib,
    write_manifest,
)
from provisioning.image.flash import check_image, flash, inspect_target, refuse_in_use
from provisioning.image.seal import kernel_cmdline, squashfs_argv, verity_params
from provisioning.image.stage import DiskSizes, StageContext
from provisioning.tools import Completed

HASH_A = "99ebd7f2bf583470bcfb6c56e3d3a4af6ce43f259ee85f51f28b17eb136362c1"
HASH_B = "0123456789abcdef" * 4


# --- identifiers -------------------------------------------------------------------------

def test_root_uuids_are_systemds_halves_of_the_root_hash() -> None:
    root, verity = root_uuids(HASH_A)
    assert root == "99ebd7f2-bf58-3470-bcfb-6c56e3d3a4af"
    assert verity == "6ce43f25-9ee8-5f51-f28b-17eb136362c1"


@pytest.mark.parametrize("bad", ["xyz", "abcd", ""])
def test_malformed_root_hash_is_refused(bad: str) -> None:
    with pytest.raises(VerificationError, match="root hash"):
        root_uuids(bad)


def test_derived_uuids_are_stable_and_distinct() -> None:
    assert derived_uuid("appliance", "esp") == derived_uuid("appliance", "esp")
    assert derived_uuid("appliance", "esp") != derived_uuid("appliance", "data")
    assert derived_uuid("appliance", "esp") != derived_uuid("other", "esp")
    assert uuid.UUID(derived_uuid("a", "b")).version == 4


def test_verity_params_follow_the_data() -> None:
    assert verity_params("a" * 64) == verity_params("a" * 64)
    assert verity_params("a" * 64) != verity_params("b" * 64)


# --- layout ------------------------------------------------------------------------------

def test_layout_order_alignment_and_types() -> None:
    sizes = DiskSizes(esp_mib=64, root_mib=512, data_mib=64)
    parts = layout("appliance", sizes, HASH_A, None)
    assert [p.label for p in parts] == ["esp", "root-a", "root-a-verity", "root-b", "root-b-verity", "data"]
    assert parts[0].start_mib == 1
    for before, after in itertools.pairwise(parts):
        assert after.start_mib == before.start_mib + before.size_mib  # contiguous, MiB aligned
    assert (parts[1].uuid, parts[2].uuid) == root_uuids(HASH_A)
    assert [p.type for p in parts[:3]] == [TYPE["esp"], TYPE["root"], TYPE["root-verity"]]
    assert parts[-1].label == "data"  # last, so it can grow
    assert len({p.uuid for p in parts}) == len(parts)
    assert disk_mib(parts) == 1 + 64 + 2 * (512 + verity_mib(512)) + 64 + 1


def test_slot_b_gets_its_own_root_hash_uuids_and_a_copy_is_refused() -> None:
    sizes = DiskSizes(esp_mib=64, root_mib=512, data_mib=64)
    parts = {p.label: p for p in layout("appliance", sizes, HASH_A, HASH_B)}
    assert (parts["root-b"].uuid, parts["root-b-verity"].uuid) == root_uuids(HASH_B)
    with pytest.raises(ImageError, match="same root hash"):
        layout("appliance", sizes, HASH_A, HASH_A)


def test_esp_and_data_uuids_do_not_change_with_the_version() -> None:
    sizes = DiskSizes(esp_mib=64, root_mib=512, data_mib=64)
    one = {p.label: p.uuid for p in layout("appliance", sizes, HASH_A, None)}
    two = {p.label: p.uuid for p in layout("appliance", sizes, HASH_B, None)}
    assert one["esp"] == two["esp"] and one["data"] == two["data"]
    assert one["root-a"] != two["root-a"]


@pytest.mark.parametrize(("root_mib", "expected"), [(16, 1), (512, 5), (2048, 17)])
def test_verity_partition_holds_the_hash_tree(root_mib: int, expected: int) -> None:
    # 4 KiB blocks, 128 sha256 digests per hash block, plus the superblock
    assert verity_mib(root_mib) == expected


@pytest.mark.system  # sfdisk (package fdisk, system set-up)
def test_sfdisk_writes_the_computed_table(tmp_path: Path) -> None:
    if shutil.which("sfdisk") is None:
        pytest.skip("needs sfdisk (Debian package fdisk)")
    sizes = DiskSizes(esp_mib=40, root_mib=16, data_mib=16)
    parts = layout("appliance", sizes, HASH_A, None)
    image = tmp_path / "disk.raw"
    with image.open("wb") as f:
        f.truncate(disk_mib(parts) * 1024 * 1024)
    subprocess.run(["sfdisk", "--no-reread", "--no-tell-kernel", "--quiet", str(image)],
                   input=sfdisk_script("11111111-2222-4333-8444-555555555555", parts).encode(), check=True)
    table = json.loads(subprocess.run(["sfdisk", "--json", str(image)], capture_output=True,
                                      check=True).stdout)["partitiontable"]
    assert table["id"] == "11111111-2222-4333-8444-555555555555".upper()
    got = [(p["name"], p["uuid"].lower(), p["start"] * 512, p["size"] * 512) for p in table["partitions"]]
    assert got == [(p.label, p.uuid, p.offset, p.size) for p in parts]


def test_disk_sizes_and_context_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="esp_mib = 8"):
        DiskSizes(esp_mib=8)
    with pytest.raises(ImageError, match="version"):
        StageContext(rootfs=tmp_path, out=tmp_path, work=tmp_path, source_date_epoch=0, version="1+2")
    with pytest.raises(ImageError, match="key and a certificate"):
        StageContext(rootfs=tmp_path, out=tmp_path, work=tmp_path, source_date_epoch=0, version="1",
                     secure_boot_key=tmp_path / "k")
    a = StageContext(rootfs=tmp_path, out=tmp_path, work=tmp_path, source_date_epoch=1, version="1")
    b = StageContext(rootfs=tmp_path / "x", out=tmp_path, work=tmp_path, source_date_epoch=1, version="1")
    c = StageContext(rootfs=tmp_path, out=tmp_path, work=tmp_path, source_date_epoch=2, version="1")
    assert a.cache_key() == b.cache_key() != c.cache_key()


def test_uki_names_carry_the_try_counter() -> None:
    assert uki_file_name("appliance", "1.2", 3) == "appliance-1.2+3-0.efi"
    assert uki_file_name("appliance", "1.2", None) == "appliance-1.2.efi"


def test_cmdline_and_squashfs_argv() -> None:
    line = kernel_cmdline("appliance", HASH_A).split()
    assert f"roothash={HASH_A}" in line and "root=/dev/mapper/root" in line and "ro" in line
    assert any(a.startswith("systemd.mount-extra=PARTUUID=") and ":/var:ext4:" in a for a in line)
    argv = squashfs_argv(Path("/r"), Path("/o"), 1700000000, ["efi d 755 0 0"], keep_xattrs=False)
    for flag, value in (("-mkfs-time", "1700000000"), ("-all-time", "1700000000"), ("-p", "efi d 755 0 0")):
        assert argv[argv.index(flag) + 1] == value
    assert "-no-xattrs" in argv
    assert argv.index("-p") < argv.index("-e")  # -e swallows every argument after it
    assert "-xattrs" in squashfs_argv(Path("/r"), Path("/o"), 0, [], keep_xattrs=True)


# --- qemu argv ---------------------------------------------------------------------------

def _plan(tmp_path: Path, kvm: bool, tpm: bool = False) -> vm.BootPlan:
    return vm.BootPlan(tmp_path / "disk.raw", tmp_path / "vm", kvm, 1024, 2, {8001: 18001, 8002: 18002},
                       tpm_socket=tmp_path / "vm/swtpm.sock" if tpm else None)


def test_qemu_argv_with_kvm(tmp_path: Path) -> None:
    argv = vm.qemu_argv(_plan(tmp_path, kvm=True))
    assert argv[0] == "qemu-system-x86_64"
    assert argv[argv.index("-machine") + 1] == "q35,accel=kvm" and argv[argv.index("-cpu") + 1] == "host"
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert f"if=pflash,format=raw,unit=0,readonly=on,file={vm.OVMF_CODE}" in drives
    assert f"if=pflash,format=raw,unit=1,file={tmp_path}/vm/OVMF_VARS.fd" in drives
    # the image itself is never opened: only its overlay
    overlay = f"if=virtio,format=qcow2,file={tmp_path}/vm/overlay.qcow2"
    assert [d for d in drives if "virtio" in d] == [overlay]
    netdev = argv[argv.index("-netdev") + 1]
    assert "hostfwd=tcp:127.0.0.1:18001-:8001" in netdev and "hostfwd=tcp:127.0.0.1:18002-:8002" in netdev
    assert "0.0.0.0" not in netdev and "hostfwd=tcp::" not in netdev
    assert f"file,id=console,path={tmp_path}/vm/console.log" in argv
    assert "-daemonize" in argv and argv[argv.index("-pidfile") + 1] == f"{tmp_path}/vm/qemu.pid"
    assert "-tpmdev" not in argv


def test_qemu_argv_without_kvm_and_with_tpm(tmp_path: Path) -> None:
    argv = vm.qemu_argv(_plan(tmp_path, kvm=False, tpm=True))
    assert argv[argv.index("-machine") + 1] == "q35" and argv[argv.index("-cpu") + 1] == "max"
    # every vCPU on one host thread: multi-threaded TCG let the guest run stale patched code
    assert argv[argv.index("-accel") + 1] == "tcg,thread=single"
    assert "accel=kvm" not in " ".join(argv) and "host" not in argv
    assert argv[argv.index("-tpmdev") + 1] == "emulator,id=tpm0,chardev=tpmchr"
    assert f"socket,id=tpmchr,path={tmp_path}/vm/swtpm.sock" in argv


def test_kvm_probe_follows_the_device(tmp_path: Path) -> None:
    assert vm.kvm_usable(tmp_path / "no-such-kvm") is False
    assert vm.kvm_usable(Path("/dev/null")) is True


# --- flash -------------------------------------------------------------------------------

@pytest.fixture
def built(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    image = out / "disk.raw"
    image.write_bytes(os.urandom(3 * 1024 * 1024 + 512))
    write_manifest(out, name="appliance", version="1", epoch=0, roothash=HASH_A,
                   artifacts={"disk.raw": "disk"})
    return image


def test_flash_to_a_file_writes_and_verifies(built: Path, tmp_path: Path) -> None:
    target = tmp_path / "target.img"
    result = flash(built, target, confirm=True)
    assert target.read_bytes() == built.read_bytes()
    doc = json.loads((built.parent / MANIFEST_NAME).read_text())
    assert result.sha256 == doc["artifacts"]["disk.raw"]["sha256"]


def test_flash_needs_yes(built: Path, tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"--yes"):
        flash(built, tmp_path / "target.img", confirm=False)
    assert not (tmp_path / "target.img").exists()


def test_flash_refuses_an_image_that_differs_from_its_manifest(built: Path, tmp_path: Path) -> None:
    with built.open("r+b") as f:
        f.seek(1000)
        f.write(b"X")
    with pytest.raises(VerificationError, match=r"artifacts\.disk\.raw\.sha256"):
        flash(built, tmp_path / "target.img", confirm=True)
    assert not (tmp_path / "target.img").exists()


def test_flash_refuses_missing_or_foreign_manifest(built: Path, tmp_path: Path) -> None:
    manifest = built.parent / MANIFEST_NAME
    doc = json.loads(manifest.read_text())
    doc["artifacts"]["disk.raw"]["kind"] = "uki"
    manifest.write_text(json.dumps(doc))
    with pytest.raises(VerificationError, match=r"no disk entry named 'disk\.raw'"):
        check_image(built)
    manifest.unlink()
    with pytest.raises(NotFoundError, match=MANIFEST_NAME):
        check_image(built)


def test_flash_detects_a_read_back_mismatch(built: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    real = flash_mod._write_chunk

    def flaky(fd: int, offset: int, data: bytes) -> None:  # the device drops one byte
        if offset == flash_mod.CHUNK // 2 or offset == 0:
            data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
        real(fd, offset, data)

    monkeypatch.setattr(flash_mod, "_write_chunk", flaky)
    with pytest.raises(VerificationError, match="read-back"):
        flash(built, tmp_path / "target.img", confirm=True)


def test_mounted_device_is_refused_from_mountinfo(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("22 1 7:42 / /mnt/usb\\040stick rw,relatime shared:1 - ext4 /dev/loop42 rw\n")
    target = flash_mod.Target(Path("/dev/loop42"), True, 1 << 30, frozenset({"7:42", "259:3"}))
    with pytest.raises(ImageError, match=r"mounted .on /mnt/usb stick"):
        refuse_in_use(target, mountinfo, tmp_path / "swaps-none")
    other = flash_mod.Target(Path("/dev/loop43"), True, 1 << 30, frozenset({"7:43"}))
    (tmp_path / "swaps").write_text("Filename Type Size Used Priority\n")
    refuse_in_use(other, mountinfo, tmp_path / "swaps")  # not refused


def test_the_system_disk_is_refused() -> None:
    root_dev = os.stat("/").st_dev
    major, minor = os.major(root_dev), os.minor(root_dev)
    uevent = Path(f"/sys/dev/block/{major}:{minor}/uevent")
    names = [ln.split("=", 1)[1] for ln in uevent.read_text().splitlines() if ln.startswith("DEVNAME=")] \
        if uevent.exists() else []
    node = Path("/dev") / names[0] if names else Path("/nonexistent")
    if not node.exists():
        pytest.skip("the root file system is not on a block device here")
    with pytest.raises(ImageError, match=r"mounted|held by"):
        refuse_in_use(inspect_target(node))


def _loop(backing: Path) -> str:
    return subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True,
                          text=True, check=True).stdout.strip()


@pytest.mark.system  # mkfs.ext4 and loop devices (system set-up)
def test_flash_refuses_a_mounted_loop_device_and_writes_a_free_one(built: Path, tmp_path: Path) -> None:
    backing = tmp_path / "loop.img"
    with backing.open("wb") as f:
        f.truncate(16 * 1024 * 1024)
    try:
        dev = _loop(backing)
    except (subprocess.CalledProcessError, FileNotFoundError):
        pytest.skip("cannot create loop devices here")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        subprocess.run(["mkfs.ext4", "-q", dev], check=True)
        subprocess.run(["mount", dev, str(mnt)], check=True)
        try:
            with pytest.raises(ImageError, match="is mounted"):
                flash(built, Path(dev), confirm=True)
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        from provisioning.image.flash import _open_target

        holder = os.open(dev, os.O_RDONLY | os.O_EXCL)  # another program holds it exclusively
        try:
            with pytest.raises(ImageError, match="is busy"):
                _open_target(Path(dev), True, wait=0.5)
        finally:
            os.close(holder)
        result = flash(built, Path(dev), confirm=True)
        assert result.bytes == built.stat().st_size
        with open(dev, "rb") as f:
            assert f.read(result.bytes) == built.read_bytes()
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_flash_cli_json(built: Path, tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "t.img"
    res = cli("flash", built, target, "--json")
    assert res.code == 1 and "--yes" in res.err and not target.exists()
    res = cli("flash", built, target, "--yes", "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["verified"] is True


def test_boot_cli_refuses_a_missing_image(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    res = cli("boot", tmp_path / "nope.raw", "--state", tmp_path / "vm")
    assert res.code == 4 and "nope.raw" in res.err


@pytest.mark.system  # sbsign and systemd-boot-efi (system set-up)
def test_signing_uses_sbsign_with_the_configured_key(tmp_path: Path) -> None:
    """A throwaway key signs an EFI binary; sbverify accepts it with that certificate only."""
    from provisioning.image.seal import sign

    stub = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")
    if not stub.exists() or shutil.which("sbsign") is None:
        pytest.skip("needs systemd-boot-efi and sbsigntool")
    key, cert = tmp_path / "db.key", tmp_path / "db.crt"
    subprocess.run(["openssl", "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=test db", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    ctx = StageContext(rootfs=tmp_path, out=tmp_path, work=tmp_path, source_date_epoch=0, version="1",
                       secure_boot_key=key, secure_boot_cert=cert)
    signed = tmp_path / "signed.efi"
    sign(ctx.run, ctx, stub, signed)
    subprocess.run(["sbverify", "--cert", str(cert), str(signed)], check=True, capture_output=True)
    unsigned = subprocess.run(["sbverify", "--cert", str(cert), str(stub)], capture_output=True)
    assert unsigned.returncode != 0


def test_qemu_argv_for_secure_boot(tmp_path: Path) -> None:
    plan = vm.BootPlan(tmp_path / "disk.raw", tmp_path / "vm", False, firmware=vm.OVMF_CODE_SECBOOT,
                       vars_template=vm.OVMF_VARS_SNAKEOIL, secure_boot=True)
    argv = vm.qemu_argv(plan)
    assert argv[argv.index("-machine") + 1] == "q35,smm=on"
    assert argv[argv.index("-accel") + 1] == "tcg,thread=single"
    assert "driver=cfi.pflash01,property=secure,value=on" in argv
    assert f"if=pflash,format=raw,unit=0,readonly=on,file={vm.OVMF_CODE_SECBOOT}" in argv


def test_esp_too_small_for_the_ukis_is_a_clear_error(tmp_path: Path) -> None:
    from provisioning.image.disk import Sealed, build_disk

    big = tmp_path / "uki.efi"
    with big.open("wb") as f:
        f.truncate(50 * 1024 * 1024)
    slot = Sealed("appliance", "1", HASH_A, big, big, big)
    (tmp_path / "loader.efi").write_bytes(b"MZ")
    with pytest.raises(ImageError, match=r"ESP \(40 MiB\) cannot hold 50 MiB"):
        build_disk(lambda *a, **k: None, out=tmp_path / "o", work=tmp_path / "w", name="appliance",
                   sizes=DiskSizes(esp_mib=40, root_mib=16, data_mib=16), epoch=0, slot_a=slot, slot_b=None,
                   boot_loader=tmp_path / "loader.efi", tries=3, data_content=None)


def test_boot_stop_without_a_machine_is_not_found(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    res = cli("boot", "--stop", tmp_path)
    assert res.code == 4 and "machine.json" in res.err


def test_root_cmdline_joins_but_cannot_override(tmp_path: Path) -> None:
    from provisioning.image.seal import root_cmdline

    assert root_cmdline(tmp_path) == ()
    (tmp_path / "etc/kernel").mkdir(parents=True)
    (tmp_path / "etc/kernel/cmdline").write_text("apparmor=1 security=apparmor root=/dev/sda1 rw rodata=on "
                                                 "systemd.verity=0 init=/bin/sh\n")
    assert root_cmdline(tmp_path) == ("apparmor=1", "security=apparmor", "rodata=on")


def test_the_pipeline_gives_each_stage_its_context(tmp_path: Path) -> None:
    from provisioning.image.pipeline import BuildContext, stage_context
    from provisioning.image.profile import load_profile

    profile = load_profile(Path(__file__).resolve().parent.parent / "images/minimal.toml")
    build = BuildContext(profile=profile, mirror=tmp_path / "mirror", lock=None,  # type: ignore[arg-type]
                         out=tmp_path, source_date_epoch=1767225600, packages=())
    ctx = stage_context(build, "disk")
    assert ctx.rootfs == tmp_path / "stages/configure/root" and ctx.out == tmp_path / "stages/disk"
    assert ctx.sealed == tmp_path / "stages/seal" and ctx.name == profile.image.name
    assert ctx.version == (profile.image.version or "20260101.000000")
    d = profile.disk
    assert ctx.sizes == DiskSizes(d.esp_mib, d.root_mib, d.data_mib, d.data_label)


# --- the seal stage's order: the initrd beside the squashfs -------------------------------

class _Tools:
    """Stands in for the seal stage's tools (StageContext.run): mksquashfs, veritysetup, dracut
    and ukify write what they would; each may be told to fail. ukify always fails, which ends
    the stage before it reads a UKI (a PE file these stand-ins do not make)."""

    def __init__(self, fail: str = "") -> None:
        self.fail = fail
        self.dracut_started = threading.Event()
        self.dracut_done = threading.Event()
        self.dracut_seen_by_mksquashfs = False

    def __call__(self, argv: list[str | Path], env: dict[str, str] | None = None,
                 **_: object) -> Completed:
        args = [str(a) for a in argv]
        tool = args[args.index("seal-chroot") + 3] if "seal-chroot" in args else args[0]
        if tool == "mksquashfs":
            # a real mksquashfs takes seconds: the initrd should be on its way before it ends
            self.dracut_seen_by_mksquashfs = self.dracut_started.wait(10)
            if self.fail == tool:
                raise ToolError(tool, 1, "Write failed because No space left on device")
            Path(args[2]).write_bytes(b"squashfs")
        elif tool == "veritysetup":
            return Completed(tuple(args), 0, b"Root hash:      " + b"ab" * 32 + b"\n", b"")
        elif tool == "dracut":
            self.dracut_started.set()
            time.sleep(0.3)
            self.dracut_done.set()
            if self.fail == tool:
                raise ToolError(tool, 1, "dracut-install: ERROR: installing 'squashfs'")
            (Path(args[args.index("seal-chroot") + 2]) / "initrd.img").write_bytes(b"initrd")
        elif tool == "ukify":
            raise ToolError(tool, 1, "stopped by the test")
        return Completed(tuple(args), 0, b"", b"")


def _seal_root(tmp_path: Path) -> Path:
    from provisioning.image.seal import REQUIRED_IN_ROOTFS

    root = tmp_path / "root"
    for rel in REQUIRED_IN_ROOTFS:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    (root / "boot").mkdir()
    (root / "boot/vmlinuz-6.12.0-1-amd64").write_bytes(b"kernel")
    (root / "usr/lib/modules/6.12.0-1-amd64").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc/os-release").write_text('ID=debian\nVERSION_ID="13"\n')
    return root


@pytest.mark.parametrize("fail", ["", "mksquashfs", "dracut"])
def test_the_initrd_is_built_beside_the_squashfs_and_a_failure_waits_for_both(
        tmp_path: Path, fail: str) -> None:
    from provisioning.image.seal import seal

    tools = _Tools(fail)
    ctx = StageContext(rootfs=_seal_root(tmp_path), out=tmp_path / "out", work=tmp_path / "work",
                       source_date_epoch=0, version="1", run=tools)
    with pytest.raises(ToolError) as failed:
        seal(ctx)
    assert failed.value.tool == (fail or "ukify")
    assert tools.dracut_seen_by_mksquashfs  # dracut ran while mksquashfs did
    assert tools.dracut_done.is_set()  # the stage ended after both tools, never before
    # the root hash is written once both are done, so a failed stage leaves none
    assert (ctx.out / "root.roothash").exists() == (fail == "")
