"""The site's PCR 11 policy signature on a UKI: the digest systemd signs, the key, and every refusal.

The agreement with systemd itself (a signature systemd-measure made verifies here) is a system
test below: systemd-measure 252 on the build host needs a TPM (swtpm) to compute the policy.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from provisioning.errors import ImageError, ProfileError
from provisioning.image.measure import PHASES, expected_pcr11
from provisioning.image.pcrsign import (
    check_pcr_signature,
    key_fingerprint,
    load_pcr_key,
    new_pcr_key,
    policy_pcr_digest,
    public_pem,
)
from provisioning.image.profile import load_profile
from testsupport.pe import pe_image

# systemd-measure 252 `sign --phase=enter-initrd` (swtpm) for sections whose PCR 11 after
# enter-initrd is PCR_VALUE printed POLICY as "pol": recorded 2026-12-01 on the build host
PCR_VALUE = "20f500da04c1031b304a04aed21e9668ed673eec342ec5af53e65e7e15d8b445"
POLICY = "7051020586abe7e50d137db4eef199775e6692380dbd2ccbafc257d972af7637"

SECTIONS = [(".linux", b"\x7fkernel" * 300), (".osrel", b"ID=appliance\n"), (".cmdline", b"ro quiet\n")]


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _key(tmp_path: Path, name: str = "pcr.key") -> tuple[Path, rsa.RSAPrivateKey]:
    return tmp_path / name, new_pcr_key(tmp_path / name)


def _sign(key: rsa.RSAPrivateKey, value: bytes, *, pkfp: str | None = None) -> dict[str, object]:
    pol = policy_pcr_digest(value)
    return {"pcrs": [11], "pkfp": pkfp or key_fingerprint(key.public_key()), "pol": pol.hex(),
            "sig": base64.b64encode(key.sign(pol, padding.PKCS1v15(), hashes.SHA256())).decode()}


def _uki(pcrpkey: bytes, entries: list[dict[str, object]] | None = None, *,
         pcrsig: bytes | None = None) -> bytes:
    unsigned = pe_image([*SECTIONS, (".pcrpkey", pcrpkey)])
    if pcrsig is None:
        pcrsig = json.dumps({"sha256": entries or []}).encode()
    return pe_image([*SECTIONS, (".pcrpkey", pcrpkey), (".pcrsig", pcrsig)]) if pcrsig else unsigned


def _phase_value(uki: bytes, phase: str) -> bytes:
    return next(p.value for p in expected_pcr11(uki) if p.phase == phase)


def test_the_policy_digest_is_the_one_systemd_signs() -> None:
    assert policy_pcr_digest(bytes.fromhex(PCR_VALUE)).hex() == POLICY
    assert policy_pcr_digest(bytes.fromhex(PCR_VALUE), pcr=7).hex() != POLICY
    with pytest.raises(ImageError, match="32"):
        policy_pcr_digest(b"\0" * 20)


def test_a_uki_signed_for_the_initrd_phase_is_accepted_and_recorded(tmp_path: Path) -> None:
    _, key = _key(tmp_path)
    public = public_pem(key)
    unsigned = _uki(public, pcrsig=b"")
    # .pcrsig is not measured: the value signed is the one of the UKI with it
    uki = _uki(public, [_sign(key, _phase_value(unsigned, "enter-initrd"))])
    assert _phase_value(uki, "enter-initrd") == _phase_value(unsigned, "enter-initrd")
    record = check_pcr_signature(uki, public)
    assert record["public_key_fingerprint"] == key_fingerprint(key.public_key())
    assert record["phases"] == ["enter-initrd"]
    assert record["policies"]["enter-initrd"] == policy_pcr_digest(_phase_value(uki, "enter-initrd")).hex()


def test_every_way_a_signature_would_not_unlock_is_refused(tmp_path: Path) -> None:
    _, key = _key(tmp_path)
    _, other = _key(tmp_path, "other.key")
    public = public_pem(key)
    initrd = _phase_value(_uki(public, pcrsig=b""), "enter-initrd")
    cases = {
        "no .pcrsig section": _uki(public, pcrsig=b""),
        ".pcrpkey is another key": _uki(public_pem(other), [_sign(key, initrd)]),
        "is by key": _uki(public, [_sign(other, initrd)]),
        "does not verify": _uki(public, [_sign(other, initrd, pkfp=key_fingerprint(key.public_key()))]),
        "signs no policy for phase 'enter-initrd'": _uki(public, []),
        "a value no phase of this UKI reaches": _uki(public, [_sign(key, bytes(32))]),
        "not JSON": _uki(public, pcrsig=b"{sha256"),
        "signs banks ['sha1']": _uki(public, pcrsig=json.dumps({"sha1": []}).encode()),
        "signs PCRs [7, 11]": _uki(public, [_sign(key, initrd) | {"pcrs": [7, 11]}]),
    }
    for expected, uki in cases.items():
        with pytest.raises(ImageError, match=expected.replace("[", r"\[").replace("(", r"\(")):
            check_pcr_signature(uki, public)


def test_a_phase_past_the_initrd_is_refused_even_when_validly_signed(tmp_path: Path) -> None:
    """ukify's default signs all four phases: the key would then unseal in the booted system."""
    _, key = _key(tmp_path)
    public = public_pem(key)
    unsigned = _uki(public, pcrsig=b"")
    every = [_sign(key, p.value) for p in expected_pcr11(unsigned)]
    assert len(every) == len(PHASES)
    with pytest.raises(ImageError, match="phase 'enter-initrd:leave-initrd', which is not to be signed"):
        check_pcr_signature(_uki(public, every), public)


def test_the_key_must_be_an_unencrypted_rsa_2048_pem(tmp_path: Path) -> None:
    path, key = _key(tmp_path)
    assert load_pcr_key(path).private_numbers() == key.private_numbers()
    bad = {
        "no.key": (None, "cannot read it"),
        "text.key": (b"not a key\n", "not a PEM private key"),
        "ec.key": (_pem(ec.generate_private_key(ec.SECP256R1())),
                   "an EC secp256r1 key; an RSA key of 2048 bits"),
        "big.key": (_pem(rsa.generate_private_key(public_exponent=65537, key_size=3072)), "RSA of 3072 bits"),
        "locked.key": (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(b"pw")), "is encrypted"),
    }
    for name, (content, expected) in bad.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(ImageError, match=expected) as err:
            load_pcr_key(tmp_path / name)
        assert str(tmp_path / name) in str(err.value)


def test_the_profile_names_the_key_and_refuses_a_wrong_one(tmp_path: Path) -> None:
    _key(tmp_path)
    profile = tmp_path / "p.toml"
    profile.write_text('[tpm]\npcr_key = "pcr.key"\n')
    assert load_profile(profile).pcr_key == tmp_path / "pcr.key"
    assert load_profile(tmp_path / "p.toml").to_json()["tpm"] == {"pcr_key": "pcr.key", "seal_data": False,
                                                                   "recovery_key": ""}
    (tmp_path / "recovery.pub").write_bytes(rsa.generate_private_key(65537, 2048).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    profile.write_text('[tpm]\npcr_key = "pcr.key"\nseal_data = true\nrecovery_key = "recovery.pub"\n')
    assert load_profile(profile).tpm.seal_data is True
    assert load_profile(profile).recovery_key == tmp_path / "recovery.pub"
    for text, expected in (('seal_data = true\nrecovery_key = "recovery.pub"\n',
                            r"seal_data = true needs \[tpm\] pcr_key"),
                           ('seal_data = true\npcr_key = "pcr.key"\n',
                            r"seal_data = true needs \[tpm\] recovery_key"),
                           ('recovery_key = "pcr.key"\n', r"recovery_key = 'pcr.key': .*private key")):
        profile.write_text("[tpm]\n" + text)
        with pytest.raises(ProfileError, match=r"p.toml: \[tpm\] " + expected):
            load_profile(profile)
    (tmp_path / "ec.key").write_bytes(_pem(ec.generate_private_key(ec.SECP256R1())))
    for name, expected in (("ec.key", r"p.toml: \[tpm\] pcr_key = 'ec.key': PCR signing key .*ec.key"),
                           ("../../etc/none.key", "pcr_key = '../../etc/none.key'")):
        profile.write_text(f'[tpm]\npcr_key = "{name}"\n')
        with pytest.raises(ProfileError, match=expected):
            load_profile(profile)


@pytest.mark.system  # systemd-measure 252 computes the policy with a TPM: swtpm
def test_a_signature_systemd_measure_made_verifies(tmp_path: Path) -> None:
    from testsupport.swtpm import swtpm_server
    measure = next((p for p in ("/usr/lib/systemd/systemd-measure", "/lib/systemd/systemd-measure")
                    if Path(p).exists()), None)
    if measure is None or shutil.which("swtpm") is None:
        pytest.skip("needs systemd-measure and swtpm")
    path, key = _key(tmp_path)
    (tmp_path / "pcr.pub").write_bytes(public_pem(key))
    args = [f"--{name[1:]}={tmp_path / name[1:]}" for name, _ in SECTIONS]  # --linux=..., --osrel=...
    for name, content in SECTIONS:
        (tmp_path / name[1:]).write_bytes(content)
    (tmp_path / "tpm").mkdir()
    with swtpm_server(tmp_path / "tpm") as tcti:
        signed = subprocess.run(
            [measure, "sign", *args, f"--pcrpkey={tmp_path / 'pcr.pub'}", "--bank=sha256",
             f"--private-key={path}", f"--public-key={tmp_path / 'pcr.pub'}", "--phase=enter-initrd",
             f"--tpm2-device={tcti}"], capture_output=True, text=True, check=True).stdout
    uki = _uki(public_pem(key), pcrsig=signed.encode())
    assert check_pcr_signature(uki, public_pem(key))["phases"] == ["enter-initrd"]
    changed = pe_image([(n, c + b" " if n == ".cmdline" else c) for n, c in SECTIONS]
                       + [(".pcrpkey", public_pem(key)), (".pcrsig", signed.encode())])
    with pytest.raises(ImageError, match="a value no phase of this UKI reaches"):
        check_pcr_signature(changed, public_pem(key))
