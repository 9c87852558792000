"""A real TPM end to end: a software TPM (swtpm) whose PCR 11 is extended with the measurements a
boot of a UKI makes (provisioning.image.measure.pcr11_events) is quoted with tpm2-tools, and the
quote verifies against the expected PCR 11 the build computes; another UKI's value is reported as
the first mismatch, PCR 11.  System tier: swtpm and tpm2-tools are system-tier packages."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioning import attest as a
from provisioning.image.measure import expected_pcr11, pcr11_events
from testsupport.pe import pe_image
from testsupport.swtpm import swtpm_server, tpm

pytestmark = pytest.mark.system


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[str]:
    with swtpm_server(tmp_path) as tcti:
        yield tcti


def test_a_quote_of_pcr11_extended_as_a_uki_boot_does_verifies_against_the_build_value(
        tmp_path: Path, swtpm: str) -> None:
    uki = pe_image([(".linux", os.urandom(3000)), (".osrel", b"ID=appliance\nIMAGE_VERSION=1\n"),
                    (".cmdline", b"roothash=00 ro"), (".initrd", os.urandom(5000)),
                    (".uname", b"6.12.0-1-amd64"), (".sbat", b"sbat,1,SBAT Version,sbat,1\n")])
    for ev in pcr11_events(uki):
        tpm(swtpm, "tpm2_pcrextend", f"11:sha256={ev.digest.hex()}")
    tpm(swtpm, "tpm2_createek", "-c", tmp_path / "ek.ctx", "-G", "rsa", "-u", tmp_path / "ek.pub")
    tpm(swtpm, "tpm2_createak", "-C", tmp_path / "ek.ctx", "-c", tmp_path / "ak.ctx", "-G", "ecc",
         "-g", "sha256", "-s", "ecdsa", "-u", tmp_path / "ak.pub")
    nonce = os.urandom(32)
    tpm(swtpm, "tpm2_quote", "-c", tmp_path / "ak.ctx", "-l", "sha256:0,1,2,3,4,5,6,7,11", "-g", "sha256",
         "-q", nonce.hex(), "-m", tmp_path / "quote.msg", "-s", tmp_path / "quote.sig",
         "-o", tmp_path / "quote.pcrs", "-F", "values")
    quote = {"ak_public": (tmp_path / "ak.pub").read_bytes(), "attest": (tmp_path / "quote.msg").read_bytes(),
             "signature": (tmp_path / "quote.sig").read_bytes(),
             "pcr_values": (tmp_path / "quote.pcrs").read_bytes(), "nonce": nonce}
    # a TPM without firmware: PCRs 0-7 were never extended
    firmware = {(a.ALG_SHA256, i): bytes(32) for i in range(8)}

    good = a.verify_quote(**quote, expected=firmware | {(a.ALG_SHA256, 11): expected_pcr11(uki)[-1].value})
    assert good.ok

    other = pe_image([(".linux", b"another kernel")])
    bad = a.verify_quote(**quote, expected=firmware | {(a.ALG_SHA256, 11): expected_pcr11(other)[-1].value})
    assert bad.mismatch is not None and bad.mismatch.index == 11
    assert bad.mismatch.seen == good.pcrs[(a.ALG_SHA256, 11)]
