"""The root helper behind Node/Unseal (provisioning.image.sealed_mode), run as the image runs it,
against a real LUKS2 volume on a loop device with a systemd-tpm2 token as systemd writes it.

There is no TPM on this machine: the helper's last step, ``systemd-cryptenroll`` with the TPM,
is a stand-in here that records its arguments and the key file it was given (the boot of a sealed
image under qemu with swtpm runs the real one). Everything before it is real: the request read as
hostile input, the key checked against the volume by cryptsetup, the site's PCR policy key read
back from the volume's token.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from provisioning.image.sealed_mode import unseal_script

pytestmark = pytest.mark.system

KEY = "-".join(["cbdefghi", "jklnrtuv", "vutrnlkj", "ihgfedcb", "ccccbbbb", "dddeeeff", "gghhiijj",
                "kkllnnrr"])


@dataclass
class Volume:
    device: str
    work: Path
    request: Path
    result: Path
    pcr_pem: bytes
    header: Path  # the LUKS2 header as the volume held it before the test


def _run(*argv: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, input=stdin, capture_output=True, check=True)


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Volume]:
    for tool in ("cryptsetup", "losetup"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (the system tier's set-up installs it)")
    backing = tmp_path / "data.img"
    with backing.open("wb") as f:
        f.truncate(32 << 20)
    (tmp_path / "key").write_text(KEY)
    _run("cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--pbkdf", "pbkdf2",
         "--pbkdf-force-iterations", "1000", "--key-file", str(tmp_path / "key"), str(backing))
    pem = rsa.generate_private_key(65537, 2048).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    # the fields systemd-cryptenroll writes (the host's cryptsetup token plugin checks them)
    token = {"type": "systemd-tpm2", "keyslots": ["0"],
             "tpm2-blob": base64.b64encode(os.urandom(64)).decode(), "tpm2-pcrs": [7],
             "tpm2-pcr-bank": "sha256", "tpm2-primary-alg": "ecc",
             "tpm2-policy-hash": os.urandom(32).hex(), "tpm2-pin": False,
             "tpm2_pubkey": base64.b64encode(pem).decode(), "tpm2_pubkey_pcrs": [11]}
    (tmp_path / "token.json").write_text(json.dumps(token))
    _run("cryptsetup", "token", "import", "--json-file", str(tmp_path / "token.json"), str(backing))
    (tmp_path / "key").unlink()
    device = _run("losetup", "--find", "--show", str(backing)).stdout.decode().strip()
    try:
        header = tmp_path / "header.img"
        _run("cryptsetup", "luksHeaderBackup", device, "--header-backup-file", str(header))
        (tmp_path / "agent").mkdir()
        (tmp_path / "answers").mkdir()
        yield Volume(device, tmp_path, tmp_path / "agent" / "unseal-key",
                     tmp_path / "answers" / "result.json", pem, header)
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)


def _helper(v: Volume, *, tpm: str | None = None, enrol: str = "exit 0") -> tuple[dict[str, object], Path]:
    """Run the helper once; returns its answer and the folder of stand-ins (their records)."""
    bin_dir = v.work / "bin"
    bin_dir.mkdir(exist_ok=True)
    records = v.work / "records"
    records.mkdir(exist_ok=True)
    (bin_dir / "systemd-cryptenroll").write_text(
        "#!/bin/sh\nfor a in \"$@\"; do echo \"$a\"; done > " + str(records / "enrol.argv") + "\n"
        "for a in \"$@\"; do case \"$a\" in --unlock-key-file=*) cat \"${a#*=}\" > "
        + str(records / "enrol.key") + ";; --tpm2-public-key=*) cat \"${a#*=}\" > "
        + str(records / "enrol.pem") + ";; esac; done\n" + enrol + "\n")
    (bin_dir / "systemctl").write_text("#!/bin/sh\necho \"$@\" > " + str(records / "systemctl") + "\n")
    (bin_dir / "sleep").write_text("#!/bin/sh\nexit 0\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    script = v.work / "unseal-data"
    script.write_text(unseal_script("appliance", device=v.device, request=str(v.request),
                                    result=str(v.result), tpm=tpm or str(v.work / "no-tpm")))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = subprocess.run(["sh", str(script)], env=env, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode()
    answer = json.loads(v.result.read_text())
    assert not v.request.exists() and not v.request.is_symlink()  # the key is gone from RAM too
    assert not list(v.result.parent.glob(".unseal.*"))  # and from the helper's scratch folder
    return answer, records


def _unchanged(v: Volume) -> None:
    now = v.work / "header-now.img"
    now.unlink(missing_ok=True)
    _run("cryptsetup", "luksHeaderBackup", v.device, "--header-backup-file", str(now))
    assert now.read_bytes() == v.header.read_bytes()


def test_the_right_key_enrols_the_tpm_again_with_the_volumes_own_pcr_policy_key(volume: Volume) -> None:
    volume.request.write_text(KEY)
    tpm = volume.work / "tpmrm0"
    tpm.touch()
    answer, records = _helper(volume, tpm=str(tpm))
    assert answer == {"ok": True,
                      "message": "the data partition is sealed to this node's TPM again; rebooting"}
    argv = (records / "enrol.argv").read_text().split("\n")
    assert argv[-2] == volume.device
    assert {"--tpm2-device=auto", "--tpm2-pcrs=7", "--tpm2-public-key-pcrs=11",
            "--wipe-slot=tpm2"} <= set(argv)
    assert (records / "enrol.key").read_text() == KEY  # no newline: the key file is the passphrase
    assert (records / "enrol.pem").read_bytes() == volume.pcr_pem  # the token's key, not the UKI's
    assert (records / "systemctl").read_text().split() == ["--no-block", "reboot"]


def test_a_wrong_key_changes_nothing(volume: Volume) -> None:
    volume.request.write_text(KEY.replace("c", "b", 1))
    tpm = volume.work / "tpmrm0"
    tpm.touch()
    answer, records = _helper(volume, tpm=str(tpm))
    assert answer == {"ok": False,
                      "message": "the recovery key does not open the data partition; nothing changed"}
    assert not (records / "enrol.argv").exists() and not (records / "systemctl").exists()
    _unchanged(volume)


def test_without_a_tpm_the_key_is_checked_and_the_node_says_so(volume: Volume) -> None:
    volume.request.write_text(KEY)
    answer, records = _helper(volume)
    assert answer["ok"] is False and "no TPM on this node" in str(answer["message"])
    assert not (records / "enrol.argv").exists()
    _unchanged(volume)


def test_a_failed_enrolment_reports_and_does_not_reboot(volume: Volume) -> None:
    volume.request.write_text(KEY)
    tpm = volume.work / "tpmrm0"
    tpm.touch()
    answer, records = _helper(volume, tpm=str(tpm), enrol="exit 1")
    assert answer == {"ok": False,
                      "message": "systemd-cryptenroll could not enrol this node's TPM; nothing changed"}
    assert not (records / "systemctl").exists()


@pytest.mark.parametrize("request_kind", ["symlink", "binary", "shape", "newline-inside", "too-long"])
def test_hostile_requests_are_refused_before_the_volume_is_touched(volume: Volume, request_kind: str) -> None:
    secret = volume.work / "secret"
    secret.write_text(KEY)  # a file of root's the agent must not get used as the key
    if request_kind == "symlink":
        volume.request.symlink_to(secret)
    elif request_kind == "binary":
        volume.request.write_bytes(b"\x00" * 200)
    elif request_kind == "shape":
        volume.request.write_text("not a key; rm -rf /")
    elif request_kind == "newline-inside":
        volume.request.write_text(KEY[:35] + "\n" + KEY[36:])
    else:
        volume.request.write_text(KEY + "-cccccccc")
    tpm = volume.work / "tpmrm0"
    tpm.touch()
    answer, records = _helper(volume, tpm=str(tpm))
    assert answer["ok"] is False, answer
    message = str(answer["message"])
    assert "not a plain file" in message or "not a recovery key" in message, message
    assert not (records / "enrol.argv").exists()
    assert secret.read_text() == KEY
    _unchanged(volume)
