"""The sealed data partition's recovery key escrow: the site's key, and the escrow's format.

The initrd encrypts with ``openssl pkeyutl`` (RSA-OAEP, SHA-256 for the digest and MGF1); the
site decrypts with :func:`provisioning.image.recovery.decrypt_escrow`. A system test runs the very
openssl command of the initrd's script, so the two halves cannot drift apart. The boot that
enrols and escrows a real key is in tests/test_seal_system.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from provisioning.errors import ImageError
from provisioning.image.recovery import RECOVERY_KEY, decrypt_escrow, load_recovery_public_key
from provisioning.image.seal import recovery_script

KEY = "cbdefghi-jklnrtuv-vutrnlkj-ihgfedcb-cccccccc-bbbbbbbb-dddddddd-vvvvvvvv"
_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def _public(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def test_the_site_key_must_be_an_rsa_public_key_of_2048_bits_or_more(tmp_path: Path) -> None:
    site = rsa.generate_private_key(65537, 2048)
    good = tmp_path / "good.pub"
    good.write_bytes(_public(site))
    assert load_recovery_public_key(good) == _public(site)
    rsa_pkcs1 = tmp_path / "pkcs1.pub"  # the "BEGIN RSA PUBLIC KEY" form: same key, normalized
    rsa_pkcs1.write_bytes(site.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.PKCS1))
    assert load_recovery_public_key(rsa_pkcs1) == _public(site)
    cases = {
        "private.pem": (site.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()), "holds a private key"),
        "ec.pub": (_public(ec.generate_private_key(ec.SECP256R1())), "expected RSA"),
        "short.pub": (_public(rsa.generate_private_key(65537, 1024)), "RSA-1024; expected at least RSA-2048"),
        "junk.pub": (b"not a key\n", "not a PEM public key"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageError, match=message) as err:
            load_recovery_public_key(tmp_path / name)
        assert str(tmp_path / name) in str(err.value)
    with pytest.raises(ImageError, match=r"missing\.pub"):
        load_recovery_public_key(tmp_path / "missing.pub")


def test_the_site_decrypts_an_escrow_and_nothing_else() -> None:
    site = rsa.generate_private_key(65537, 2048)
    assert RECOVERY_KEY.fullmatch(KEY)
    assert decrypt_escrow(site, site.public_key().encrypt(KEY.encode(), _OAEP)) == KEY
    other = rsa.generate_private_key(65537, 2048)
    with pytest.raises(ImageError, match="does not decrypt with this key"):
        decrypt_escrow(site, other.public_key().encrypt(KEY.encode(), _OAEP))
    with pytest.raises(ImageError, match="does not decrypt"):
        decrypt_escrow(site, b"\0" * 256)
    with pytest.raises(ImageError, match="holds no recovery key"):
        decrypt_escrow(site, site.public_key().encrypt(b"hunter2", _OAEP))


def test_the_initrd_script_keeps_the_key_in_memory_and_undoes_a_failed_escrow() -> None:
    script = recovery_script("appliance")
    from provisioning.image.disk import data_uuid, esp_uuid
    assert f"data=/dev/disk/by-partuuid/{data_uuid('appliance')}" in script
    assert f"esp=/dev/disk/by-partuuid/{esp_uuid('appliance')}" in script
    assert "@" not in script  # every placeholder filled
    lines = script.splitlines()
    # the key is read into the shell, checked, and piped to openssl: never written to a file
    uses = [ln.strip() for ln in lines if "$key" in ln]
    assert uses == ['case "$key" in', "printf '%s' \"$key\" | openssl pkeyutl -encrypt -pubin -inkey "
                    "/etc/appliance/recovery.pub \\"], uses
    assert sum(ln.startswith("key=$(") for ln in lines) == 1
    enrol = lines.index(next(ln for ln in lines if "--recovery-key" in ln))
    escrow_steps = [i for i, ln in enumerate(lines) if "undo " in ln and i > enrol]
    assert len(escrow_steps) >= 5  # every step after the enrolment can undo it
    assert any("--wipe-slot=recovery" in ln for ln in lines)
    assert script.startswith("#!/bin/sh\n") and "set -u" in script


@pytest.mark.system  # openssl (package openssl, system set-up)
def test_the_initrd_scripts_openssl_command_gives_what_the_site_decrypts(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    site = rsa.generate_private_key(65537, 3072)
    (tmp_path / "recovery.pub").write_bytes(_public(site))
    script = recovery_script("appliance")
    command = script[script.index("openssl pkeyutl"):script.index("-out")].replace("\\\n", " ")
    argv = command.replace("/etc/appliance/recovery.pub", str(tmp_path / "recovery.pub")).split()
    subprocess.run([*argv, "-out", str(tmp_path / "escrow")], input=KEY.encode(), check=True)
    assert decrypt_escrow(site, (tmp_path / "escrow").read_bytes()) == KEY


def test_the_operator_decrypts_an_escrow_with_the_cli(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    site = rsa.generate_private_key(65537, 2048)
    key = tmp_path / "recovery.key"
    key.write_bytes(site.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(b"site secret")))
    (tmp_path / "pass").write_text("site secret\n")
    escrow = tmp_path / "recovery-key.enc"
    escrow.write_bytes(site.public_key().encrypt(KEY.encode(), _OAEP))
    done = cli("pki", "recovery-key", escrow, "--key", key, "--passphrase-file", tmp_path / "pass", "--json")
    assert done.code == 0, done.err
    assert json.loads(done.out) == {"escrow": str(escrow), "recovery_key": KEY}
    done = cli("pki", "recovery-key", escrow, "--key", key, "--passphrase-file", tmp_path / "pass")
    assert (done.code, done.out) == (0, KEY + "\n")
    wrong = cli("pki", "recovery-key", escrow, "--key", key)  # encrypted key, no passphrase
    assert wrong.code != 0 and "recovery private key" in wrong.err and str(key) in wrong.err
    missing = cli("pki", "recovery-key", tmp_path / "none.enc", "--key", key,
                  "--passphrase-file", tmp_path / "pass")
    assert missing.code != 0 and "none.enc" in missing.err
    for name, blob in (("huge.enc", bytes(8 << 20)), ("short.enc", bytes(100))):
        (tmp_path / name).write_bytes(blob)
        bad = cli("pki", "recovery-key", tmp_path / name, "--key", key,
                  "--passphrase-file", tmp_path / "pass")
        assert bad.code != 0 and name in bad.err and "exactly 256" in bad.err, bad.err
