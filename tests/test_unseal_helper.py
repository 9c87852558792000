"""The root helper behind Node/Unseal (provisioning.image.sealed_mode), run as the image runs it,
against a real LUKS2 volume on a loop device with a systemd-tpm2 token as systemd writes it.

There is no TPM on this machine, so ``systemd-cryptenroll`` is a stand-in here (the boot of a
sealed image under qemu with swtpm runs the real one). It records its arguments and the key file
it was given, and changes the volume as systemd 257's does, with cryptsetup: a new key slot and a
systemd-tpm2 token for it, ``--wipe-slot`` by type or number. It is as strict as the real one
where that broke the first version of the helper: systemd skips the enrolment ("This PCR set is
already enrolled, executing no operation", exit 0, and spares the slot it found from the wipe)
when a systemd-tpm2 token of the same policy hash is in the header. The hash covers the PCR values
and the policy key, not the TPM: here, a hash of the PCR set and the key. Everything else is
real: the request read as hostile input, the key checked against the volume by cryptsetup, the
site's PCR policy key read back from the volume's token, the tokens retired and put back.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from provisioning.image.sealed_mode import unseal_script

pytestmark = pytest.mark.system

KEY = "-".join(["cbdefghi", "jklnrtuv", "vutrnlkj", "ihgfedcb", "ccccbbbb", "dddeeeff", "gghhiijj",
                "kkllnnrr"])


TPM_SECRET = "the old TPM's sealed secret"  # the passphrase of the old TPM's key slot (0)
RETIRED = "appliance-retired-tpm2"


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


def _policy_hash(pcrs: str, pem: bytes) -> str:
    """The stand-in's policy hash: the PCR set and the policy key, nothing of the TPM (systemd's
    covers the PCR values and the key the same way)."""
    return hashlib.sha256(b"pcrs=" + pcrs.encode() + b";" + pem).hexdigest()


def _tpm2_token(slot: int, pem: bytes) -> dict[str, object]:
    """A systemd-tpm2 token with the fields systemd-cryptenroll writes (the host's cryptsetup
    token plugin checks them)."""
    return {"type": "systemd-tpm2", "keyslots": [str(slot)],
            "tpm2-blob": base64.b64encode(os.urandom(64)).decode(), "tpm2-pcrs": [7],
            "tpm2-pcr-bank": "sha256", "tpm2-primary-alg": "ecc",
            "tpm2-policy-hash": _policy_hash("7", pem), "tpm2-pin": False,
            "tpm2_pubkey": base64.b64encode(pem).decode(), "tpm2_pubkey_pcrs": [11]}


def _import(device: str | Path, token: dict[str, object], work: Path) -> None:
    (work / "token.json").write_text(json.dumps(token))
    _run("cryptsetup", "token", "import", "--json-file", str(work / "token.json"), str(device))
    (work / "token.json").unlink()


def _metadata(device: str | Path) -> dict[str, Any]:
    """The volume's LUKS2 JSON metadata (keyslots, tokens, ...)."""
    return json.loads(_run("cryptsetup", "luksDump", "--dump-json-metadata", str(device)).stdout)  # type: ignore[no-any-return]


def _tokens(device: str | Path) -> dict[str, tuple[str, list[str]]]:
    """token id: (type, key slots)."""
    return {i: (t["type"], t["keyslots"]) for i, t in _metadata(device)["tokens"].items()}


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Volume]:
    """A data partition as the node's initrd left it: key slot 0 the old TPM's (its systemd-tpm2
    token, the site's PCR policy key), key slot 1 the recovery key (its systemd-recovery token)."""
    for tool in ("cryptsetup", "losetup"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (the system tier's set-up installs it)")
    backing = tmp_path / "data.img"
    with backing.open("wb") as f:
        f.truncate(32 << 20)
    fast = ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")
    (tmp_path / "secret").write_text(TPM_SECRET)
    (tmp_path / "key").write_text(KEY)
    _run("cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", *fast, "--key-slot", "0",
         "--key-file", str(tmp_path / "secret"), str(backing))
    _run("cryptsetup", "luksAddKey", "--batch-mode", *fast, "--key-file", str(tmp_path / "secret"),
         "--new-key-slot", "1", str(backing), str(tmp_path / "key"))
    pem = rsa.generate_private_key(65537, 2048).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    _import(backing, _tpm2_token(0, pem), tmp_path)
    _import(backing, {"type": "systemd-recovery", "keyslots": ["1"]}, tmp_path)
    (tmp_path / "key").unlink()
    (tmp_path / "secret").unlink()
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


# systemd-cryptenroll, played with cryptsetup (see the module's docstring); argv[1] is the folder
# of records. A file "fail" there makes the enrolment fail before it changes anything.
_CRYPTENROLL = r"""
import base64, hashlib, json, os, subprocess, sys
records, argv = sys.argv[1], sys.argv[2:]
with open(os.path.join(records, "calls"), "a") as f:
    f.write(json.dumps(argv) + "\n")
device, opts = argv[-1], dict(a.split("=", 1) for a in argv[:-1])
key = opts["--unlock-key-file"]
with open(key, "rb") as src, open(os.path.join(records, "enrol.key"), "wb") as dst:
    dst.write(src.read())
def run(*args):
    return subprocess.run(args, capture_output=True, check=True).stdout
def tokens():
    meta = json.loads(run("cryptsetup", "luksDump", "--dump-json-metadata", device))
    return meta["tokens"], set(meta["keyslots"])
if subprocess.run(["cryptsetup", "open", "--test-passphrase", "--key-file", key, device]).returncode:
    sys.exit("Failed to unlock the volume with the key file.")
kept = set()
if "--tpm2-device" in opts:
    if os.path.exists(os.path.join(records, "fail")):
        sys.exit("Failed to seal to TPM2: the TPM went away")
    pem = open(opts["--tpm2-public-key"], "rb").read()
    open(os.path.join(records, "enrol.pem"), "wb").write(pem)
    policy = hashlib.sha256(b"pcrs=" + opts["--tpm2-pcrs"].encode() + b";" + pem).hexdigest()
    found, slots = tokens()
    same = [t for t in found.values() if t["type"] == "systemd-tpm2" and t.get("tpm2-policy-hash") == policy]
    if same:
        print("This PCR set is already enrolled, executing no operation.", file=sys.stderr)
        kept = set(same[0]["keyslots"])
    else:
        secret = os.path.join(records, "new-secret")
        open(secret, "w").write(base64.b64encode(os.urandom(32)).decode())
        run("cryptsetup", "luksAddKey", "--batch-mode", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations",
            "1000", "--key-file", key, device, secret)
        slot = (tokens()[1] - slots).pop()
        token = {"type": "systemd-tpm2", "keyslots": [slot],
                 "tpm2-blob": base64.b64encode(os.urandom(64)).decode(),
                 "tpm2-pcrs": [7], "tpm2-pcr-bank": "sha256", "tpm2-primary-alg": "ecc",
                 "tpm2-policy-hash": policy, "tpm2-pin": False,
                 "tpm2_pubkey": base64.b64encode(pem).decode(), "tpm2_pubkey_pcrs": [11]}
        open(os.path.join(records, "token.json"), "w").write(json.dumps(token))
        run("cryptsetup", "token", "import", "--json-file", os.path.join(records, "token.json"), device)
        kept = {slot}
        print(f"New TPM2 token enrolled as key slot {slot}.", file=sys.stderr)
if "--wipe-slot" in opts:
    found, slots = tokens()
    wipe = set()
    for spec in opts["--wipe-slot"].split(","):
        if spec == "tpm2":
            wipe |= {s for t in found.values() if t["type"] == "systemd-tpm2" for s in t["keyslots"]}
        elif spec.isdigit() and spec in slots:
            wipe.add(spec)
        else:
            sys.exit(f"Unknown slot to wipe: {spec}")
    for slot in sorted(wipe - kept):
        run("cryptsetup", "luksKillSlot", "--batch-mode", device, slot)
        for i, t in found.items():
            if set(t["keyslots"]) <= wipe - kept:
                subprocess.run(["cryptsetup", "token", "remove", "--token-id", i, device],
                               capture_output=True)
"""


def _helper(v: Volume, *, tpm: str | None = None, fail: bool = False) -> tuple[dict[str, object], Path]:
    """Run the helper once; returns its answer and the folder of stand-ins (their records)."""
    bin_dir = v.work / "bin"
    bin_dir.mkdir(exist_ok=True)
    records = v.work / "records"
    records.mkdir(exist_ok=True)
    if fail:
        (records / "fail").touch()
    (bin_dir / "cryptenroll.py").write_text(_CRYPTENROLL)
    (bin_dir / "systemd-cryptenroll").write_text(
        f"#!/bin/sh\nexec {sys.executable} {bin_dir / 'cryptenroll.py'} {records} \"$@\"\n")
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


def _calls(records: Path) -> list[list[str]]:
    path = records / "calls"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _opens(device: str, passphrase: str) -> bool:
    return subprocess.run(["cryptsetup", "open", "--test-passphrase", "--key-file=-", device],
                          input=passphrase.encode(), capture_output=True).returncode == 0


def _unchanged(v: Volume) -> None:
    now = v.work / "header-now.img"
    now.unlink(missing_ok=True)
    _run("cryptsetup", "luksHeaderBackup", v.device, "--header-backup-file", str(now))
    assert now.read_bytes() == v.header.read_bytes()


def test_the_stand_in_skips_an_enrolment_whose_policy_is_in_the_header_as_systemd_does(
        volume: Volume) -> None:
    """Why the helper retires the old token first: the one-call enrol-and-wipe changes nothing."""
    (volume.work / "key").write_text(KEY)
    (volume.work / "pcr.pem").write_bytes(volume.pcr_pem)
    bin_dir = volume.work / "bin"
    bin_dir.mkdir()
    (bin_dir / "cryptenroll.py").write_text(_CRYPTENROLL)
    records = volume.work / "records"
    records.mkdir()
    done = subprocess.run([sys.executable, str(bin_dir / "cryptenroll.py"), str(records),
                           f"--unlock-key-file={volume.work / 'key'}", "--tpm2-device=auto", "--tpm2-pcrs=7",
                           f"--tpm2-public-key={volume.work / 'pcr.pem'}", "--tpm2-public-key-pcrs=11",
                           "--wipe-slot=tpm2", volume.device], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "This PCR set is already enrolled, executing no operation." in done.stderr
    _unchanged(volume)


def test_the_right_key_enrols_the_tpm_again_with_the_volumes_own_pcr_policy_key(volume: Volume) -> None:
    volume.request.write_text(KEY)
    tpm = volume.work / "tpmrm0"
    tpm.touch()
    answer, records = _helper(volume, tpm=str(tpm))
    assert answer == {"ok": True,
                      "message": "the data partition is sealed to this node's TPM again; rebooting"}
    enrol, wipe = _calls(records)
    assert enrol[-1] == volume.device
    assert {"--tpm2-device=auto", "--tpm2-pcrs=7", "--tpm2-public-key-pcrs=11"} <= set(enrol)
    assert not [a for a in enrol if a.startswith("--wipe-slot")]  # enrolled on its own
    assert (records / "enrol.key").read_text() == KEY  # no newline: the key file is the passphrase
    assert (records / "enrol.pem").read_bytes() == volume.pcr_pem  # the token's key, not the UKI's
    assert "--wipe-slot=0" in wipe  # then the old TPM's slot, by number
    # one TPM token, on a new slot; the old TPM's slot is gone; the recovery key still opens
    tokens = sorted(_tokens(volume.device).values())
    assert [t for t, _ in tokens] == ["systemd-recovery", "systemd-tpm2"], tokens
    assert dict(tokens)["systemd-recovery"] == ["1"]
    assert dict(tokens)["systemd-tpm2"] not in (["0"], ["1"]), tokens
    assert "0" not in _metadata(volume.device)["keyslots"]
    assert not _opens(volume.device, TPM_SECRET)
    assert _opens(volume.device, KEY)
    assert (records / "systemctl").read_text().split() == ["--no-block", "reboot"]


def test_a_run_cut_short_after_retiring_the_token_is_finished_by_the_next(volume: Volume) -> None:
    """Power lost after the old token was retired and before the enrolment: the retired copy still
    names the site's key, and the next request finishes the job."""
    token = {**_tpm2_token(0, volume.pcr_pem), "type": RETIRED}
    _run("cryptsetup", "token", "remove", "--token-id", "0", volume.device)
    _import(volume.device, token, volume.work)
    volume.request.write_text(KEY)
    tpm = volume.work / "tpmrm0"
    tpm.touch()
    answer, records = _helper(volume, tpm=str(tpm))
    assert answer["ok"] is True, answer
    assert (records / "enrol.pem").read_bytes() == volume.pcr_pem
    assert sorted(t for t, _ in _tokens(volume.device).values()) == ["systemd-recovery", "systemd-tpm2"]
    assert "0" not in _metadata(volume.device)["keyslots"]


def test_a_wrong_key_changes_nothing(volume: Volume) -> None:
    volume.request.write_text(KEY.replace("c", "b", 1))
    tpm = volume.work / "tpmrm0"
    tpm.touch()
    answer, records = _helper(volume, tpm=str(tpm))
    assert answer == {"ok": False,
                      "message": "the recovery key does not open the data partition; nothing changed"}
    assert not _calls(records) and not (records / "systemctl").exists()
    _unchanged(volume)


def test_without_a_tpm_the_key_is_checked_and_the_node_says_so(volume: Volume) -> None:
    volume.request.write_text(KEY)
    answer, records = _helper(volume)
    assert answer["ok"] is False and "no TPM on this node" in str(answer["message"])
    assert not _calls(records)
    _unchanged(volume)


def test_a_failed_enrolment_puts_the_old_token_back_and_does_not_reboot(volume: Volume) -> None:
    before = _metadata(volume.device)
    volume.request.write_text(KEY)
    tpm = volume.work / "tpmrm0"
    tpm.touch()
    answer, records = _helper(volume, tpm=str(tpm), fail=True)
    assert answer == {"ok": False,
                      "message": "systemd-cryptenroll could not enrol this node's TPM; nothing changed"}
    assert not (records / "systemctl").exists()
    after = _metadata(volume.device)
    assert after["tokens"] == before["tokens"]  # the same token under the same id
    assert after["keyslots"].keys() == before["keyslots"].keys()
    assert _opens(volume.device, TPM_SECRET) and _opens(volume.device, KEY)


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
