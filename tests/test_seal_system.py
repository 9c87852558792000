"""System tier: a real trixie root -> seal -> disk -> boot under qemu+OVMF -> verity root on the console.

Slow (minutes; much longer under TCG). The base root is built once by mmdebstrap from Debian's
archive and cached (set APPLIANCE_TEST_CACHE to keep it between runs).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from provisioning.image import boot as vm
from provisioning.image.disk import disk, load_sealed
from provisioning.image.measure import PHASES, expected_pcr11, pe_sections
from provisioning.image.pcrsign import (
    check_pcr_signature,
    key_fingerprint,
    load_pcr_key,
    new_pcr_key,
    public_pem,
)
from provisioning.image.recovery import ESCROW_PATH, decrypt_escrow
from provisioning.image.seal import seal
from provisioning.image.stage import DiskSizes, StageContext
from tests.conftest import run_appliance
from testsupport.appliance import free_port
from testsupport.image_helpers import uki_difference
from testsupport.scratch import scratch
from testsupport.seal_testroot import (
    CANARY,
    EPOCH,
    MARKER,
    MODEL_PATH,
    UNSEAL_KEY_ON_ESP,
    cache_dir,
    make_rootfs,
)

pytestmark = [pytest.mark.system, pytest.mark.timeout(3600)]
SIZES = DiskSizes(esp_mib=160, root_mib=512, data_mib=64)  # the ESP holds two ~50 MiB UKIs


def _needs(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing or os.geteuid() != 0:
        pytest.skip(f"needs root and {', '.join(missing) or 'the tools'}")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _recovery_key(folder: Path) -> None:
    """The site's recovery key pair: ``recovery.key`` (kept by the site) and ``recovery.pub``."""
    site = rsa.generate_private_key(65537, 3072)
    (folder / "recovery.key").write_bytes(site.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (folder / "recovery.pub").write_bytes(site.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


@pytest.fixture(scope="module")
def sealed_a(request: pytest.FixtureRequest) -> Iterator[StageContext]:
    _needs("mmdebstrap", "mksquashfs", "veritysetup", "sfdisk", "mkfs.vfat", "mcopy", "faketime", "unshare")
    with scratch(request, "seal") as base:
        root = make_rootfs(cache_dir(base / "cache"), base / "root-a", "A")
        # the site signs the UKI's PCR 11 policy: .pcrpkey is measured, so the booted PCR 11
        # below checks the signed UKI's prediction too; the node seals its data partition under it
        new_pcr_key(base / "pcr.key")
        _recovery_key(base)
        ctx = StageContext(rootfs=root, out=base / "out", work=base / "work", source_date_epoch=EPOCH,
                           version="1.0", sizes=SIZES, pcr_key=base / "pcr.key", seal_data=True,
                           recovery_key=base / "recovery.pub")
        seal(ctx)
        disk(ctx)
        yield ctx


def test_seal_and_disk_are_reproducible(sealed_a: StageContext) -> None:
    again = StageContext(rootfs=sealed_a.rootfs, out=sealed_a.out.with_name("out2"),
                         work=sealed_a.work.with_name("work2"), source_date_epoch=EPOCH,
                         version="1.0", sizes=SIZES, pcr_key=sealed_a.pcr_key, seal_data=True,
                         recovery_key=sealed_a.recovery_key)
    seal(again)
    disk(again)
    for name in ("root.squashfs", "root.verity", "root.roothash", "appliance-1.0.efi", "disk.raw",
                 "image-manifest.json"):
        first, second = sealed_a.out / name, again.out / name
        assert _sha(first) == _sha(second), \
            f"{name}\n{uki_difference(first, second)}" if name.endswith(".efi") else name


def test_verity_root_hash_checks_out_from_outside(sealed_a: StageContext) -> None:
    import subprocess
    s = load_sealed(sealed_a.out)
    subprocess.run(["veritysetup", "verify", str(s.root_image), str(s.verity_image), s.roothash], check=True)
    cmdline = subprocess.run(
        ["objcopy", "-O", "binary", "--only-section=.cmdline", str(s.uki), "/dev/stdout"],
        capture_output=True, check=True).stdout.decode()
    assert f"roothash={s.roothash}" in cmdline


def test_the_uki_carries_the_sites_signature_of_its_initrd_pcr_policy(sealed_a: StageContext) -> None:
    """ukify (the image's systemd 257) signed the policy; the record is what the check found."""
    assert sealed_a.pcr_key is not None
    public = public_pem(load_pcr_key(sealed_a.pcr_key))
    uki = sealed_a.out / "appliance-1.0.efi"
    record = json.loads((sealed_a.out / "seal.json").read_text())["pcr_signature"]
    assert record == check_pcr_signature(uki, public)
    assert record["phases"] == ["enter-initrd"]
    assert record["public_key_fingerprint"] == key_fingerprint(load_pcr_key(sealed_a.pcr_key).public_key())
    assert pe_sections(uki.read_bytes())[".pcrpkey"].rstrip(b"\0") == public


def _boot_cli(image: Path, state: Path, pattern: str, *extra: str) -> dict[str, object]:
    """``appliance boot IMAGE --wait-for PATTERN --json`` as a separate process; a machine stuck
    in OVMF (TCG, with a TPM) is power-cycled, as the hil suite's are."""
    accel = "auto" if os.environ.get("APPLIANCE_TEST_KVM", "0") == "1" else "tcg"
    # one forward to a free port: the default ones (18000-18002) may be taken on a shared host
    proc = run_appliance("boot", image, "--state", state, "--accel", accel, "--memory", "1024",
                         "--port", f"8001={free_port()}", "--wait-for", pattern, "--timeout", "1500",
                         "--reset-after", "120", "--json", *extra, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


_LUKS2_HEADER = 16 * 1024 * 1024  # header, JSON areas and keyslots: what a token or key changes


def _data_partition(overlay: Path, work: Path, limit: int | None = None) -> bytes:
    """The data partition's bytes (its first ``limit``) as the node left them on its disk, read
    from outside."""
    import subprocess
    raw = work / "after.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(overlay), str(raw)], check=True)
    try:
        table = json.loads(subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True, check=True,
                                          text=True).stdout)["partitiontable"]["partitions"]
        data = [p for p in table if p.get("name") == SIZES.data_label]
        assert len(data) == 1, table
        with raw.open("rb") as f:
            f.seek(data[0]["start"] * 512)
            return f.read(data[0]["size"] * 512 if limit is None else limit)
    finally:
        raw.unlink()


def test_the_node_seals_its_data_partition_and_unseals_it_with_the_signed_uki_only(
        sealed_a: StageContext, tmp_path: Path) -> None:
    """First boot: the initrd makes the data partition as LUKS2 sealed to the TPM (PCR 7 and the
    site-signed PCR 11 policy), with the image's /var in it; the next boot opens it again; a boot
    without the TPM, or with a UKI another key signed, leaves it sealed and untouched and runs in
    sealed mode; read from outside, it holds no plaintext; on a new TPM, the recovery key through
    the unseal helper enrols that TPM and the next boot opens the volume again."""
    _needs("qemu-system-x86_64", "qemu-img", "sfdisk", "swtpm", "mtype", "cryptsetup")
    image = sealed_a.out / "disk.raw"
    before = _sha(image)
    state = tmp_path / "vm"
    # the guest sees a 2 GiB disk: the data partition is made in all the room behind the roots
    result = _boot_cli(image, state, MARKER, "--disk-size", "2048", "--tpm")
    line = str(result["matched"])
    assert "/dev/mapper/root" in line and "var=/dev/mapper/data" in line and "slot=A" in line, line
    assert "boots=1 " in line and "canary=sealed-data_canary" in line, line  # the image's /var came along
    varsize = int(line.split("varsize=", 1)[1].split(maxsplit=1)[0])
    assert varsize > 512 * 1024 * 1024, line  # the image had 64 MiB of room; the disk ~800 MiB more
    assert "tpm=yes" in line, line
    assert "sb=0" in line, line  # plain OVMF: no Secure Boot
    # PCR 11 as the boot left it (stub: the UKI's sections; initrd and root: the phase words)
    # is the value the build records for the last phase: what the fleet's attestation expects
    booted = line.split("pcr11=", 1)[1].split(maxsplit=1)[0].lower()
    phases = {p.value.hex(): p.phase for p in expected_pcr11(sealed_a.out / "appliance-1.0.efi")}
    assert phases.get(booted) == ":".join(PHASES), \
        f"PCR 11 {booted} is the value after {phases.get(booted, 'no phase')}; expected {phases}"
    assert result["stopped"] in ("powered off", "terminated", "killed")
    assert _sha(image) == before  # the overlay took every write

    overlay = state / "overlay.qcow2"
    sealed = _data_partition(overlay, tmp_path)
    assert sealed.startswith(b"LUKS\xba\xbe\x00\x02"), sealed[:8]  # LUKS2
    header = sealed[:_LUKS2_HEADER]  # LUKS2 header and keyslots: the token is the TPM's, no passphrase
    assert b'"type":"systemd-tpm2"' in header and b'"tpm2-pcrs":[7]' in header, header[:4096]
    assert b'"tpm2_pubkey_pcrs":[11]' in header, header[:4096]
    assert sealed_a.pcr_key is not None  # the signed policy is the site's key's
    assert base64.b64encode(public_pem(load_pcr_key(sealed_a.pcr_key))) in header
    assert CANARY[:64].encode() not in sealed  # the canary's ext4 block is ciphertext
    model = (sealed_a.rootfs / MODEL_PATH).read_bytes()  # and so is a model's
    assert len(model) > 8192 and model[1024:1088] not in sealed and model[-64:] not in sealed
    # the recovery key: enrolled in the initrd, escrowed to the site's key on the ESP, and it opens
    # the volume; nothing else of it is on the disk
    assert _token_types(header) == ["systemd-tpm2", "systemd-recovery"], header[:4096]
    escrow = _escrow(overlay, tmp_path)
    recovery = decrypt_escrow(_site_key(sealed_a), escrow)
    assert _opens(header, recovery)
    assert not _opens(header, recovery[::-1])  # the check can fail

    again = _boot_cli(image, state, MARKER, "--tpm", "--keep-disk")  # a power cycle, same TPM
    line = str(again["matched"])
    assert "var=/dev/mapper/data" in line and "boots=2 " in line and "canary=sealed-data_canary" in line, line
    header = _data_partition(overlay, tmp_path, _LUKS2_HEADER)
    assert _token_types(header) == ["systemd-tpm2", "systemd-recovery"]  # enrolled once, not every boot
    assert _escrow(overlay, tmp_path) == escrow

    # the same disk without its TPM: the initrd cannot open the volume, asks nobody, formats nothing,
    # and boots on a RAM copy of the image's /var in sealed mode, saying why
    refused = _boot_cli(image, state, MARKER, "--keep-disk")
    line = str(refused["matched"])
    assert "sealed=yes" in line and "why=no_TPM" in line and "tpm=no" in line, line
    assert "var=/dev/mapper/data" in line and "boots=1 " in line and "canary=sealed-data_canary" in line, line
    assert _data_partition(overlay, tmp_path, _LUKS2_HEADER) == header

    # the same disk and TPM, its UKI swapped for one of the same root that another key signed
    other = StageContext(rootfs=sealed_a.rootfs, out=tmp_path / "other", work=tmp_path / "work-other",
                         source_date_epoch=EPOCH, version="1.0", sizes=SIZES, pcr_key=tmp_path / "other.key",
                         seal_data=True, recovery_key=sealed_a.recovery_key)
    new_pcr_key(tmp_path / "other.key")
    foreign = seal(other).uki
    swapped = _with_uki(state, foreign, tmp_path / "swapped")
    refused = _boot_cli(swapped.image, swapped.state, MARKER, "--keep-disk", "--tpm")
    line = str(refused["matched"])
    assert "sealed=yes" in line and "why=measurements_changed" in line and "tpm=yes" in line, line
    assert "boots=1 " in line, line  # the RAM copy, not the volume (which has seen two boots)
    assert _data_partition(swapped.overlay, tmp_path, _LUKS2_HEADER) == header

    # the same disk and UKI on a new TPM (a replaced board): sealed; the site's recovery key, handed
    # to the root's helper as the agent's Node/Unseal hands it, checks out against the volume; the
    # helper enrols the new TPM under the site's PCR policy key and reboots; the next boot opens the
    # volume with the TPM alone, with what the earlier boots wrote
    (tmp_path / "unseal-key").write_text(recovery)
    moved = _with_esp(state, tmp_path / "new-tpm", {UNSEAL_KEY_ON_ESP: tmp_path / "unseal-key"},
                      keep_tpm=False)
    first, second = _two_boots(dataclasses.replace(moved, memory_mib=1024, keep_disk=True,
                                                   tpm_socket=moved.state / "swtpm.sock"))
    assert "sealed=yes" in first and "why=measurements_changed" in first and "boots=1 " in first, first
    assert "sealed=no" in second, f"the boot after the unseal helper's reboot is still sealed: {second}"
    assert "var=/dev/mapper/data" in second and "boots=3 " in second, second
    assert "canary=sealed-data_canary" in second, second
    after = _data_partition(moved.overlay, tmp_path, _LUKS2_HEADER)
    # one TPM token, the new TPM's, on a key slot of its own; the old TPM's token and slot are gone
    assert sorted(_token_types(after)) == ["systemd-recovery", "systemd-tpm2"], after[:4096]
    assert b'"tpm2-pcrs":[7]' in after and b'"tpm2_pubkey_pcrs":[11]' in after
    assert base64.b64encode(public_pem(load_pcr_key(sealed_a.pcr_key))) in after  # still the site's key
    assert _tpm2_slots(after) != _tpm2_slots(header), (_tpm2_slots(after), _tpm2_slots(header))
    assert _opens(after, recovery)


class _Watched:
    """A machine started from ``plan`` whose console is watched while a test waits on it.

    A machine silent for two minutes after the kernel's reset or after the firmware starts the
    boot loader is stuck in OVMF (seen under TCG with a TPM, in CI too, on the reboot a test asks
    of the guest: qemu spins and nothing of the image runs, and a QMP reset does not clear it);
    it is power-cycled on the same disk, UEFI variables and TPM state, as the hil suite's nodes
    are, and its console goes on in the same file."""

    def __init__(self, plan: vm.BootPlan) -> None:
        self.plan = plan
        self.watch = vm.ConsoleWatch(vm.start(plan), stall=900.0, reset_after=120.0,
                                     power_cycle=lambda: vm.power_cycle(self.machine))

    @property
    def machine(self) -> vm.Machine:
        """The running qemu: the last power-on's."""
        return self.watch.machine

    def lines(self, pattern: str, count: int = 1, timeout: float = 1500) -> list[str]:
        """The first ``count`` whole console lines that match ``pattern``, once there are that many.

        Raises:
            AssertionError: qemu exited, or ``timeout`` seconds passed, first (with the console's end).
            vm.GuestHungError: the console was silent for the watch's bound.
        """
        regex = re.compile(r"[^\n]*(?:" + pattern + r")[^\n]*\n")
        deadline = time.monotonic() + timeout
        while True:
            console = self.plan.console.read_bytes().decode(errors="replace")
            found = regex.findall(console)
            if len(found) >= count:
                return [line.rstrip("\r\n") for line in found[:count]]
            assert self.machine.alive(), f"qemu exited; console:\n{console[-3000:]}"
            assert time.monotonic() < deadline, \
                f"not {count} x {pattern!r} within {timeout:.0f} s; console:\n{console[-3000:]}"
            self.watch.check()
            time.sleep(2)

    def stop(self) -> None:
        vm.stop(self.machine, grace=30)


def _two_boots(plan: vm.BootPlan) -> tuple[str, str]:
    """Start the machine of ``plan``; return the first two marker lines on its console (the boot,
    and the boot after its own reboot), then stop it."""
    node = _Watched(plan)
    try:
        first, second = node.lines(MARKER, count=2, timeout=1800)
        return first, second
    finally:
        node.stop()


def _site_key(ctx: StageContext) -> rsa.RSAPrivateKey:
    assert ctx.recovery_key is not None
    key = serialization.load_pem_private_key((ctx.recovery_key.parent / "recovery.key").read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def _escrow(overlay: Path, work: Path) -> bytes:
    """The recovery key escrow on the ESP of the machine's disk, read from outside with mtools."""
    import subprocess
    raw = work / "esp.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(overlay), str(raw)], check=True)
    try:
        return subprocess.run(["mtype", "-i", f"{raw}@@1M", f"::/{ESCROW_PATH}"], capture_output=True,
                              check=True, env=_MTOOLS_ENV | {"PATH": os.environ["PATH"]}).stdout
    finally:
        raw.unlink()


def _tokens(header: bytes) -> list[dict[str, object]]:
    """The tokens of a LUKS2 header, in token order (from its primary JSON area)."""
    tokens = json.loads(header[4096:16384].split(b"\0", 1)[0])["tokens"]
    return [tokens[k] for k in sorted(tokens, key=int)]


def _token_types(header: bytes) -> list[str]:
    """The token types of a LUKS2 header, in token order."""
    return [str(t["type"]) for t in _tokens(header)]


def _tpm2_slots(header: bytes) -> list[object]:
    """The key slots of a LUKS2 header's systemd-tpm2 tokens."""
    return [t["keyslots"] for t in _tokens(header) if t["type"] == "systemd-tpm2"]


def _opens(header: bytes, passphrase: str) -> bool:
    """Whether ``passphrase`` opens a keyslot of the LUKS2 ``header`` (cryptsetup, no device made)."""
    import subprocess
    import tempfile
    with tempfile.NamedTemporaryFile(dir="/var/tmp", suffix=".luks") as f:
        f.write(header + bytes(1024 * 1024))  # the header, and a little of the data segment
        f.flush()
        done = subprocess.run(["cryptsetup", "open", "--test-passphrase", "--type", "luks2", "--key-file=-",
                               f.name], input=passphrase.encode(), capture_output=True)
    return done.returncode == 0


def _with_uki(state: Path, uki: Path, work: Path) -> vm.BootPlan:
    """The disk of the machine in ``state`` with ``uki`` in place of its slot A UKI, in a new state
    folder that keeps the machine's UEFI variables and TPM: the same node, another UKI."""
    import subprocess
    raw = work / "probe.raw"
    work.mkdir()
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(state / "overlay.qcow2"), str(raw)], check=True)
    names = _uki_names(raw)
    raw.unlink()
    slot_a = [n for n in names if n.startswith("appliance-1.0")]
    assert len(slot_a) == 1, names
    return _with_esp(state, work, {f"EFI/Linux/{slot_a[0]}": uki})


def _with_esp(state: Path, work: Path, files: dict[str, Path], *, keep_tpm: bool = True) -> vm.BootPlan:
    """The disk of the machine in ``state`` with ``files`` (ESP path: local file) written to its
    ESP, in a new state folder that keeps the machine's UEFI variables and (``keep_tpm``) its TPM."""
    import subprocess
    work.mkdir(exist_ok=True)
    raw = work / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(state / "overlay.qcow2"), str(raw)], check=True)
    for dest, src in files.items():
        subprocess.run(["mcopy", "-o", "-i", f"{raw}@@1M", str(src), f"::/{dest}"], check=True,
                       env=_MTOOLS_ENV | {"PATH": os.environ["PATH"]})
    plan = vm.BootPlan(raw, work / "vm", False)
    plan.state.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(raw),
                    str(plan.overlay)], check=True)
    shutil.copyfile(state / "OVMF_VARS.fd", plan.vars)
    if keep_tpm:
        shutil.copytree(state / "tpm", plan.state / "tpm")
    return plan


def test_secure_boot_runs_the_signed_image_and_refuses_the_unsigned(
        sealed_a: StageContext, tmp_path: Path) -> None:
    _needs("qemu-system-x86_64", "qemu-img", "sbsign")
    if not vm.SNAKEOIL_KEY.exists():
        pytest.skip("Debian's ovmf snakeoil key is missing")
    base = tmp_path
    refused = _boot_cli(sealed_a.out / "disk.raw", base / "vm-unsigned", "Access Denied", "--secure-boot")
    assert "Access Denied" in str(refused["matched"])
    import subprocess
    key = base / "db.key"  # Debian ships the snakeoil key encrypted, passphrase "snakeoil"
    subprocess.run(["openssl", "pkey", "-in", str(vm.SNAKEOIL_KEY), "-passin", "pass:snakeoil",
                    "-out", str(key)], check=True)
    signed = StageContext(rootfs=sealed_a.rootfs, out=base / "out", work=base / "work",
                          source_date_epoch=EPOCH, version="1.0", sizes=SIZES,
                          secure_boot_key=key, secure_boot_cert=vm.SNAKEOIL_CERT)
    seal(signed)
    image = disk(signed)
    result = _boot_cli(image, base / "vm-signed", MARKER, "--secure-boot")
    line = str(result["matched"])
    assert "/dev/mapper/root" in line and "sb=1" in line, line


_MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1"}


def _uki_names(raw: Path) -> list[str]:
    """The UKI names on the ESP (the first partition, at 1 MiB) of a raw disk, read with mtools."""
    import subprocess
    listing = subprocess.run(["mdir", "-b", "-i", f"{raw}@@1M", "::/EFI/Linux"], capture_output=True,
                             text=True, check=True, env=_MTOOLS_ENV | {"PATH": os.environ["PATH"]})
    return sorted(Path(line.strip()).name for line in listing.stdout.splitlines() if line.strip())


def _esp_files(overlay: Path, work: Path) -> list[str]:
    """The UKI names on the ESP of a qcow2 overlay (read from outside with mtools)."""
    import subprocess
    raw = work / "after.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(overlay), str(raw)], check=True)
    try:
        return _uki_names(raw)
    finally:
        raw.unlink()


def test_a_slot_that_never_blesses_falls_back_to_the_other(
        sealed_a: StageContext, tmp_path: Path) -> None:
    """Slot B (newer, tried first) fails before boot-complete.target and reboots; its single try is
    used up, so systemd-boot boots slot A by itself, and A blesses itself. B's initrd made the
    data partition and sealed it; A, another UKI signed by the same site key (another PCR 11),
    opens it without enrolling anything again: the signed policy, not the UKI's hash, holds."""
    _needs("qemu-system-x86_64", "qemu-img", "mdir", "swtpm")
    from provisioning.image.disk import build_disk

    base = tmp_path
    root_b = make_rootfs(cache_dir(base / "cache"), base / "root-b", "B", broken=True)
    ctx_b = StageContext(rootfs=root_b, out=base / "out-b", work=base / "work-b", source_date_epoch=EPOCH,
                         version="2.0", sizes=SIZES, pcr_key=sealed_a.pcr_key, seal_data=True,
                         recovery_key=sealed_a.recovery_key)
    slot_b = seal(ctx_b)
    slot_a = load_sealed(sealed_a.out)
    image = build_disk(sealed_a.run, out=base / "ab", work=base / "work-ab", name="appliance",
                       sizes=SIZES, epoch=EPOCH, slot_a=slot_a, slot_b=slot_b,
                       boot_loader=sealed_a.out / "systemd-bootx64.efi", tries=1,
                       data_content=sealed_a.rootfs / "var")
    kvm = os.environ.get("APPLIANCE_TEST_KVM", "0") == "1" and vm.kvm_usable()
    # with a TPM: both slots keep /var on the data partition they seal to it
    node = _Watched(vm.BootPlan(image, base / "vm", kvm, 1024, 2, {8001: 0},
                                tpm_socket=base / "vm" / "swtpm.sock"))
    try:
        node.lines("broken slot: rebooting", timeout=1500 if not kvm else 300)
        line, = node.lines(f"{MARKER}.*slot=A", timeout=1500 if not kvm else 300)
        node.lines("Finished.*systemd-bless-boot", timeout=600)
    finally:
        node.stop()
    assert "/dev/mapper/root" in line
    slot_b = node.plan.console.read_text(errors="replace").split("broken slot: rebooting", 1)[0]
    # B made the volume, and opened it (systemd's status lines, with or without colour)
    assert re.search(r"Finished (\x1b\[[0-9;]*m)?systemd-repart\.service", slot_b), slot_b[-3000:]
    assert re.search(r"Finished (\x1b\[[0-9;]*m)?systemd-cryptsetup@data", slot_b), slot_b[-3000:]
    assert "var=/dev/mapper/data" in line and "sealed=no" in line, line  # A opens B's volume
    header = _data_partition(node.plan.overlay, base, _LUKS2_HEADER)
    assert _token_types(header) == ["systemd-tpm2", "systemd-recovery"], header[:4096]  # not enrolled again
    files = _esp_files(node.plan.overlay, base)
    assert "appliance-1.0.efi" in files, files       # A blessed: its counter is gone
    assert "appliance-2.0+0-1.efi" in files, files   # B's one try used up: marked bad


def test_a_qemu_that_cannot_start_leaves_no_tpm_emulator_behind(tmp_path: Path) -> None:
    """qemu fails at once (its forwarded port is taken): the swtpm started for it is stopped."""
    _needs("qemu-system-x86_64", "qemu-img", "swtpm")
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    state = tmp_path / "vm"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_appliance("boot", image, "--state", state, "--accel", "tcg", "--tpm",
                             "--port", f"8001={port}", "--detach", "--json", timeout=120)
    assert proc.returncode != 0
    assert "forwarding" in proc.stderr, proc.stderr[-2000:]
    def emulators() -> list[str]:  # swtpm processes of this state folder (it deletes its pid file)
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                argv = cmdline.read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[0].endswith(b"swtpm") and any(str(state).encode() in a for a in argv):
                found.append(cmdline.parent.name)
        return found
    for _ in range(50):
        if not emulators():
            break
        time.sleep(0.1)
    assert not emulators(), "swtpm still runs after qemu failed to start"
