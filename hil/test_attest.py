"""Remote attestation of the image the node booted (issue #17): the node enrols over its admin
API (the `attestation` fixture: `appliance fleet enrol-attest`), then `appliance fleet attest`
judges a fresh quote against the image's manifest, and against a manifest whose PCR 11 is
another UKI's.  test_os_update.py attests the node again once it runs the new release.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from hil.conftest import Attestation
from testsupport.appliance import Appliance


def test_the_node_enrols_and_attests_the_image_it_booted(appliance: Appliance, attestation: Attestation,
                                                         tmp_path: Path) -> None:
    manifest = appliance.manifest
    if appliance.image is None or manifest is None:
        pytest.skip("needs --qemu: the image's manifest says what the node booted")
    enrolled = attestation.enrolled["data"]
    assert enrolled["key"] == "made" and enrolled["certificate"] == "installed", enrolled

    status, verdict = attestation.attest(appliance.image.parent / "image-manifest.json")
    print(f"\nhil: attestation of the booted image: {json.dumps(verdict)}")
    assert status == 0 and verdict["ok"] and verdict["data"]["attested"], verdict
    assert verdict["data"]["root_hash"] == manifest["roothash"], verdict

    # the same root hash, another UKI's PCR 11 (as a rebuilt kernel or command line would give)
    other = dict(manifest)
    other["pcr11"] = {bank: [dict(p, hash=hashlib.new(bank, b"another UKI" + p["phase"].encode()).hexdigest())
                             for p in phases] for bank, phases in manifest["pcr11"].items()}
    (tmp_path / "other-manifest.json").write_text(json.dumps(other))
    status, refused = attestation.attest(tmp_path / "other-manifest.json")
    assert status == 1 and not refused["ok"] and refused["data"]["mismatch"]["pcr"] == 11, refused
    ready = other["pcr11"]["sha256"][-1]
    assert ready["phase"].endswith(":ready"), ready
    assert refused["data"]["mismatch"]["expected"] == ready["hash"], refused
