"""The PCR 11 value of a UKI (provisioning.image.measure), checked against systemd-measure."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from provisioning.errors import ImageError
from provisioning.image.measure import PHASES, expected_pcr11, pcr11_record, pe_sections
from provisioning.tools import run
from testsupport.pe import pe_image

SMALL = {".linux": b"kernel", ".osrel": b"ID=x\n", ".cmdline": b"ro\n", ".initrd": b"initrd"}
# `systemd-measure calculate --linux=l --osrel=o --cmdline=c --initrd=i --bank=sha256` (systemd 252,
# Debian 12) on files holding SMALL's contents printed these, one per phase.
SMALL_PCR11 = (
    "92fcd935d77b437c6d7e438840659a09f4af8796102a071d4a4fd22c2e13a2c8",
    "61f05fcc3943a1ffe2cf12e867e289622346ba9bf7bcd7908afc05e51b0fa04f",
    "7a216d6a76129049265cd20db4db4e66aff6914754d292ea15249730eb020483",
    "5ad6cfe462c9f10955c4e13ec3f5d1171972af1bdda042caf764a0ec776a20b5",
)
SYSTEMD_MEASURE = Path("/usr/lib/systemd/systemd-measure")


def test_pcr11_of_each_phase_is_what_systemd_measure_printed() -> None:
    phases = expected_pcr11(pe_image(list(SMALL.items())))
    assert [p.phase for p in phases] == [":".join(PHASES[:i]) for i in range(1, 5)]
    assert [p.value.hex() for p in phases] == list(SMALL_PCR11)


def test_the_record_is_systemd_measures_json_shape_per_bank(tmp_path: Path) -> None:
    (tmp_path / "uki.efi").write_bytes(pe_image(list(SMALL.items())))
    record = pcr11_record(tmp_path / "uki.efi", banks=("sha256", "sha384"))
    assert list(record) == ["sha256", "sha384"]
    assert record["sha256"] == [{"phase": ":".join(PHASES[:i]), "pcr": 11, "hash": value}
                                for i, value in enumerate(SMALL_PCR11, start=1)]
    assert [e["hash"] for e in record["sha384"]] == [
        p.value.hex() for p in expected_pcr11(tmp_path / "uki.efi", "sha384")]
    assert len(str(record["sha384"][0]["hash"])) == 96


def test_file_order_and_unmeasured_sections_do_not_matter() -> None:
    shuffled = [(".text", b"\x90" * 100), (".initrd", SMALL[".initrd"]), (".pcrsig", b"{}"),
                (".cmdline", SMALL[".cmdline"]), (".sdmagic", b"#### LoaderInfo"),
                (".linux", SMALL[".linux"]),
                (".osrel", SMALL[".osrel"]), (".reloc", b"\0" * 12)]
    assert expected_pcr11(pe_image(shuffled))[-1].value.hex() == SMALL_PCR11[-1]


def test_uname_and_sbat_are_measured_after_dtb_and_before_pcrpkey() -> None:
    def ready(extra: dict[str, bytes]) -> bytes:
        return expected_pcr11(pe_image(list((SMALL | extra).items())))[-1].value

    def by_hand(order: list[str], sections: dict[str, bytes]) -> bytes:
        pcr = bytes(32)
        measured = [d for name in order for d in (name.encode() + b"\0", sections[name])]
        for data in measured + [w.encode() for w in PHASES]:
            pcr = hashlib.sha256(pcr + hashlib.sha256(data).digest()).digest()
        return pcr

    extra = {".uname": b"6.12.0-1-amd64", ".sbat": b"sbat,1\n", ".pcrpkey": b"KEY", ".dtb": b"DTB"}
    order = [".linux", ".osrel", ".cmdline", ".initrd", ".dtb", ".uname", ".sbat", ".pcrpkey"]
    assert ready(extra) == by_hand(order, SMALL | extra)
    assert ready(extra) != ready(extra | {".uname": b"6.12.0-2-amd64"})


def test_a_section_is_measured_as_loaded_virtual_size_bytes() -> None:
    # raw data padded to 0x200 in the file: only VirtualSize bytes count ...
    padded = pe_sections(pe_image(list(SMALL.items())))
    assert padded[".linux"] == b"kernel"
    # ... and a section whose file data is shorter than VirtualSize is zero-filled, as in memory
    short = pe_sections(pe_image([(".linux", b"kernel")], raw_sizes={".linux": 0}))
    assert short[".linux"] == bytes(6)


@pytest.mark.parametrize(("image", "error"), [
    (b"", "no MZ header"),
    (b"MZ" + bytes(0x3E), "does not point at a PE signature"),
    (pe_image(list(SMALL.items()))[:0x200], r"section '\.linux' \(512 bytes at 0x200\) runs past the end"),
    (pe_image(list(SMALL.items()))[:0x150], "section table of 4 entries at 0x148 runs past the end"),
    (pe_image([(".linux", b"a"), (".linux", b"b")]), r"section '\.linux' appears twice"),
    (pe_image([(".osrel", b"ID=x\n")]), r"no \.linux section"),
    (pe_image([*SMALL.items(), (".profile", b"ID=a")]), r"has \.profile: multi-profile"),
])
def test_what_is_not_a_measurable_uki_is_refused(image: bytes, error: str) -> None:
    with pytest.raises(ImageError, match=error):
        expected_pcr11(image)


def test_the_bank_is_checked_and_the_path_named(tmp_path: Path) -> None:
    uki = tmp_path / "a.efi"
    uki.write_bytes(b"not a PE")
    with pytest.raises(ImageError, match=re.escape(f"{uki}: no MZ header")):
        expected_pcr11(uki)
    with pytest.raises(ImageError, match="PCR bank 'md5'"):
        expected_pcr11(uki, bank="md5")


@pytest.mark.system  # systemd-measure comes with systemd >= 252, not with the fast tier's set-up
@pytest.mark.skipif(not SYSTEMD_MEASURE.exists(), reason="no systemd-measure on this host")
@pytest.mark.parametrize("bank", ["sha256", "sha384"])
def test_pcr11_matches_systemd_measure_on_random_sections(tmp_path: Path, bank: str) -> None:
    # the sections systemd 252's systemd-measure knows; later versions know more
    options = {".linux": "linux", ".osrel": "osrel", ".cmdline": "cmdline", ".initrd": "initrd",
               ".splash": "splash", ".dtb": "dtb", ".pcrpkey": "pcrpkey"}
    args = []
    sections = []
    for name, option in options.items():
        content = os.urandom(1 + os.urandom(1)[0] * 37)
        (tmp_path / option).write_bytes(content)
        args.append(f"--{option}={tmp_path / option}")
        sections.append((name, content))
    done = run([SYSTEMD_MEASURE, "calculate", *args, f"--bank={bank}"])
    printed = re.findall(rf"^11:{bank}=([0-9a-f]+)$", done.text, re.MULTILINE)
    ours = expected_pcr11(pe_image(sections[::-1]), bank=bank)
    assert printed == [p.value.hex() for p in ours]


@pytest.mark.system  # systemd-measure comes with systemd >= 252, not with the fast tier's set-up
@pytest.mark.skipif(not SYSTEMD_MEASURE.exists(), reason="no systemd-measure on this host")
def test_the_recorded_pcr11_is_systemd_measures_json(tmp_path: Path) -> None:
    """What the build records (seal.json, image-manifest.json) is, key for key, what
    ``systemd-measure calculate --json=short`` prints for the same sections."""
    options = {".linux": "linux", ".osrel": "osrel", ".cmdline": "cmdline", ".initrd": "initrd"}
    args, sections = [], []
    for name, option in options.items():
        content = os.urandom(64 + os.urandom(1)[0])
        (tmp_path / option).write_bytes(content)
        args.append(f"--{option}={tmp_path / option}")
        sections.append((name, content))
    done = run([SYSTEMD_MEASURE, "calculate", *args, "--bank=sha256", "--bank=sha384", "--json=short"])
    assert pcr11_record(pe_image(sections), banks=("sha256", "sha384")) == json.loads(done.text)
