"""System tier: sync a real mirror, build images/minimal.toml twice offline, check it from outside.

Nothing here trusts the build log: the checks read the root filesystem the build produced
(the venv's python run in the chroot, unit symlinks, the nftables ruleset loaded in a
throwaway network namespace, baked bundles re-verified against the baked trusted root).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioning.image.bake import verify_targets
from tests.conftest import run_appliance
from testsupport.image_helpers import make_registry
from testsupport.scratch import scratch

pytestmark = [pytest.mark.system, pytest.mark.timeout(3600)]
ROOT = Path(__file__).resolve().parent.parent


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(request: pytest.FixtureRequest) -> Iterator[dict[str, Path]]:
    with scratch(request, "image") as tmp:
        yield _build_twice(tmp)


def _build_twice(tmp: Path) -> dict[str, Path]:
    import numpy as np

    from provisioning.bundle import create_bundle
    from provisioning.demo.models import affine_model, save_golden

    model = affine_model(tmp / "affine.onnx")
    golden = save_golden(tmp / "g.npz", {"x": np.arange(8, dtype=np.float32).reshape(2, 4)})
    bundle = create_bundle(model, name="affine", version="1.0.0", golden=[golden],
                           out=tmp / "affine-1.0.0.bundle").path
    registry = make_registry(tmp / "registry", {"affine-1.0.0.bundle": bundle})
    profile = tmp / "images/minimal.toml"
    profile.parent.mkdir()
    profile.write_text((ROOT / "images/minimal.toml").read_text().replace(
        'registry = ""', f'registry = "{registry}"').replace(
        "targets = []", 'targets = ["affine-1.0.0.bundle"]'))
    mirror = tmp / "mirror"
    sync = run_appliance("mirror", "sync", profile, "--mirror", mirror, "--json", timeout=1800)
    assert sync.returncode == 0, sync.stderr
    outs = {}
    for n in ("a", "b"):
        r = run_appliance("build", profile, "--mirror", mirror, "--out", tmp / n, "--offline",
                          "--json", timeout=2400)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "network namespace with no interfaces" in r.stderr
        outs[n] = tmp / n
    return {"a": outs["a"], "b": outs["b"], "registry": registry, "mirror": mirror, "profile": profile}


def test_two_builds_are_identical(built: dict[str, Path]) -> None:
    seal = built["a"] / "stages/seal"
    ukis = sorted(p.name for p in seal.glob("*.efi"))
    assert any(name.startswith("minimal-") for name in ukis), ukis
    for rel in ("stages/rootfs/rootfs.tar", "stages/configure/manifest.json",
                "stages/configure/sbom.spdx.json", "stages/seal/root.squashfs",
                "stages/seal/root.verity", "stages/seal/root.roothash",
                *(f"stages/seal/{name}" for name in ukis), "stages/disk/disk.raw"):
        assert _sha(built["a"] / rel) == _sha(built["b"] / rel), rel


def test_the_rootfs_stage_builds_no_initrd_of_the_packages(built: dict[str, Path]) -> None:
    """The node boots the seal stage's initrd only. The one the packages make (dracut's kernel
    hook, then its trigger: half the rootfs stage's time) is never built, so no file of it and
    no /initrd.img link is in the stage's tarball, and mmdebstrap's log never shows dracut."""
    with tarfile.open(built["a"] / "stages/rootfs/rootfs.tar") as tar:
        initrds = [n for n in tar.getnames() if "initrd.img" in n]
    assert initrds == []
    log = (built["a"] / "build.log").read_text()
    assert "installing remaining packages" in log  # mmdebstrap's own lines are in the log
    assert "dracut: Generating" not in log


def test_verity_root_hash_matches_from_outside(built: dict[str, Path]) -> None:
    """veritysetup recomputes the hash tree over the squashfs; the root hash the UKI's command
    line carries must be the one it finds, and the disk's root-a partition must hold the root."""
    seal = built["a"] / "stages/seal"
    roothash = (seal / "root.roothash").read_text().strip()
    verify = subprocess.run(["veritysetup", "verify", str(seal / "root.squashfs"),
                             str(seal / "root.verity"), roothash], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    uki = next(p for p in seal.glob("minimal-*.efi"))
    cmdline = subprocess.run(["objcopy", "-O", "binary", "--only-section=.cmdline", str(uki),
                              "/dev/stdout"], capture_output=True, check=True).stdout.decode()
    assert f"roothash={roothash}" in cmdline
    manifest = json.loads((built["a"] / "stages/disk/image-manifest.json").read_text())
    assert manifest["roothash"] == roothash


def test_the_expected_pcr11_is_recorded_as_the_images_own_systemd_measure_computes_it(
        built: dict[str, Path]) -> None:
    """seal.json and image-manifest.json carry the UKI's expected PCR 11 (what attestation
    checks a node against); the image's own systemd-measure (257: it knows .uname and .sbat,
    the host's 252 does not), run in the root on the sections objcopy cuts out, agrees."""
    seal = built["a"] / "stages/seal"
    uki = next(p for p in seal.glob("minimal-*.efi"))
    manifest = json.loads((built["a"] / "stages/disk/image-manifest.json").read_text())
    recorded = json.loads((seal / "seal.json").read_text())["pcr11"]
    assert manifest["pcr11"] == recorded and len(recorded["sha256"]) == 4
    root = _root(built)
    work = root / "tmp" / "pcr11-check"
    work.mkdir()
    try:
        headers = subprocess.run(["objdump", "-h", str(uki)], capture_output=True, text=True,
                                 check=True).stdout
        present = set(re.findall(r"^\s*\d+\s+\.(\w+)\s", headers, re.MULTILINE))
        args = []
        for name in ("linux", "osrel", "cmdline", "initrd", "ucode", "splash", "dtb", "uname", "sbat",
                     "pcrpkey"):
            if name in present:
                subprocess.run(["objcopy", "-O", "binary", f"--only-section=.{name}", str(uki),
                                str(work / name)], check=True)
                args.append(f"--{name}=/tmp/pcr11-check/{name}")
        assert {"linux", "osrel", "cmdline", "initrd"} <= present, present
        done = subprocess.run(["chroot", str(root), "/usr/lib/systemd/systemd-measure", "calculate", *args,
                               "--bank=sha256", "--json=short"], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
    finally:
        shutil.rmtree(work)
    assert json.loads(done.stdout) == recorded


def test_rebuild_in_place_is_fully_cached(built: dict[str, Path]) -> None:
    r = run_appliance("build", built["profile"], "--mirror", built["mirror"], "--out", built["a"],
                      "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    assert all(s["cached"] for s in json.loads(r.stdout)["stages"])


def _root(built: dict[str, Path]) -> Path:
    return built["a"] / "stages/configure/root"


def test_agent_venv_imports_inside_the_image(built: dict[str, Path]) -> None:
    root = _root(built)
    code = "import agent.bundle, agent.config, agent.proto, grpc, onnxruntime, tuf; print('ok')"
    r = subprocess.run(["unshare", "--mount", "--pid", "--fork", f"--mount-proc={root}/proc",
                        "chroot", str(root), "/opt/appliance/venv/bin/python", "-c", code],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    assert not list((root / "opt/appliance/venv/bin").glob("pip*"))  # pip is not shipped


def test_units_enabled_and_no_apt_sources(built: dict[str, Path]) -> None:
    root = _root(built)
    for unit in ("appliance-agent", "nftables", "auditd", "apparmor", "systemd-networkd"):
        r = subprocess.run(["systemctl", f"--root={root}", "is-enabled", f"{unit}.service"],
                           capture_output=True, text=True, check=False)
        assert r.stdout.strip() == "enabled", (unit, r.stdout, r.stderr)
    assert not (root / "etc/apt/sources.list").exists()
    assert not list((root / "etc/apt").rglob("*.list")) and not list((root / "etc/apt").rglob("*.sources"))
    assert not (root / "etc/resolv.conf").exists()
    assert (root / "etc/machine-id").read_text() == ""
    shadow = dict(line.split(":", 1) for line in (root / "etc/shadow").read_text().splitlines())
    assert shadow["root"].startswith("!") and shadow["appliance"].startswith("!")


def test_setuid_programs_are_few_and_each_audited(built: dict[str, Path]) -> None:
    """audit_rules_privileged_commands on the built root: the account and mount helpers lost
    their bits, and every setuid/setgid program left has its rule."""
    from provisioning.image.plan import PRIVILEGED_RULES, STRIPPED_SETUID

    root = _root(built)
    found = sorted("/" + str(p.relative_to(root)) for p in root.rglob("*")
                   if not p.is_symlink() and p.is_file() and p.stat().st_mode & 0o6000)
    assert found and not {Path(f).name for f in found} & set(STRIPPED_SETUID), found
    rules = (root / PRIVILEGED_RULES.lstrip("/")).read_text().splitlines()
    assert [r.split(" -F path=", 1)[1].split(" ", 1)[0] for r in rules] == found


def test_the_audit_rules_the_boot_loads_are_the_images_own(built: dict[str, Path]) -> None:
    """The sealed root is read-only, so the boot's `augenrules --load` can only load
    /etc/audit/audit.rules as the build left it: that file must be what rules.d/ merges to
    (augenrules says "No change"), with the appliance's rules and the lock (-e 2) last."""
    root = _root(built)
    r = subprocess.run(["unshare", "--mount", "--fork", "sh", "-c",
                        f"mount -t tmpfs tmpfs {root}/tmp && chroot {root} sh -c "
                        "'mkdir /tmp/shim && printf \"#!/bin/sh\\n\" > /tmp/shim/auditctl && "
                        "chmod 0755 /tmp/shim/auditctl && PATH=/tmp/shim:$PATH augenrules --check'"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0 and "No change" in r.stdout, (r.stdout, r.stderr)
    rules = (root / "etc/audit/audit.rules").read_text().splitlines()
    assert rules[-1] == "-e 2", rules[-3:]
    assert any("-k privileged" in line for line in rules), rules
    assert any("-k identity" in line for line in rules), rules[:10]
    assert not (root / "etc/audit/audit.rules.prev").exists()


def test_firewall_ruleset_denies_by_default(built: dict[str, Path]) -> None:
    root = _root(built)
    r = subprocess.run(["unshare", "--net", "chroot", str(root), "sh", "-c",
                        "nft -f /etc/nftables.conf && nft -j list ruleset"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    chains = {c["chain"]["name"]: c["chain"] for c in json.loads(r.stdout)["nftables"] if "chain" in c}
    assert chains["input"]["policy"] == "drop" and chains["forward"]["policy"] == "drop"


def test_baked_bundles_verify_against_the_baked_trusted_root(built: dict[str, Path], tmp_path: Path) -> None:
    root = _root(built)
    trusted = root / "etc/appliance/registry/root.json"
    files = verify_targets(built["registry"], trusted, ("affine-1.0.0.bundle",), tmp_path / "meta",
                           tmp_path / "files")
    from agent.bundle import read_bundle

    bundle = read_bundle(files["affine-1.0.0.bundle"])
    installed = root / "var/lib/appliance/models/affine/1.0.0"
    assert (installed / "model.onnx").read_bytes() == bundle.read_model()
    assert (installed / "manifest.json").read_bytes() == bundle.manifest.canonical()
    assert (installed / "model.onnx").stat().st_uid == 800


def _wheel(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _ids_looked_up_in_a_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """spdx-tools 0.8 rebuilds the list of every SPDX id of the document for each relationship
    end it checks: quadratic, minutes on the ~15k files of an image. The same membership test,
    against a set of the same ids built once per document (validation does not change it)."""
    from spdx_tools.spdx.model import Document
    from spdx_tools.spdx.validation import spdx_id_validators

    known: dict[int, frozenset[str]] = {}

    def present(spdx_id: str, document: Document) -> bool:
        if id(document) not in known:
            known[id(document)] = frozenset(spdx_id_validators.get_list_of_all_spdx_ids(document))
        return spdx_id in known[id(document)]

    monkeypatch.setattr(spdx_id_validators, "is_spdx_id_present_in_document", present)


def test_sbom_validates_and_hashes_every_package_and_file(built: dict[str, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The acceptance line of the SBOM: spdx-tools finds nothing wrong, every package carries
    the sha256 the lock pinned, every regular file of the root its manifest sha256."""
    from spdx_tools.spdx.parser.parse_anything import parse_file
    from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

    from provisioning.image.mirror import load_lock

    configure = built["a"] / "stages/configure"
    path = configure / "sbom.spdx.json"
    _ids_looked_up_in_a_set(monkeypatch)
    messages = validate_full_spdx_document(parse_file(str(path)))
    assert messages == [], [m.validation_message for m in messages[:20]]
    doc = json.loads(path.read_text())
    lock = load_lock(built["mirror"])
    pinned = {(d.name, d.version): d.sha256 for d in lock.debs}
    pinned |= {(_wheel(w.name), w.version): w.sha256 for w in lock.wheels}
    debs = [p for p in doc["packages"] if p["SPDXID"].startswith("SPDXRef-deb-")]
    assert len(debs) > 100
    for p in doc["packages"]:
        if p.get("primaryPackagePurpose") == "OPERATING-SYSTEM":
            continue  # the image itself: its hashes are the seal's
        sums = {c["algorithm"]: c["checksumValue"] for c in p.get("checksums", [])}
        key = (_wheel(p["name"]) if "pypi" in p["SPDXID"] else p["name"], p["versionInfo"])
        assert sums.get("SHA256") == pinned[key], p["name"]
    for p in debs:
        assert p["downloadLocation"].startswith("http://deb.debian.org/debian/pool/"), p["name"]
        assert p["supplier"].startswith(("Organization: ", "Person: ")), p["name"]
    declared = [p for p in debs if p["licenseDeclared"] != "NOASSERTION"]
    assert len(declared) > len(debs) // 2  # most Debian packages ship DEP-5 copyright files
    by_id = {p["name"]: p["SPDXID"] for p in debs}
    assert ("SPDXRef-DOCUMENT", "DESCRIBES") in {(r["spdxElementId"], r["relationshipType"])
                                                 for r in doc["relationships"]}
    depends = {(r["spdxElementId"], r["relatedSpdxElement"]) for r in doc["relationships"]
               if r["relationshipType"] == "DEPENDS_ON"}
    assert (by_id["systemd"], by_id["libc6"]) in depends
    manifest = json.loads((configure / "manifest.json").read_text())
    files = {f["path"]: f["sha256"] for f in manifest["files"] if "sha256" in f}
    in_sbom = {f["fileName"][1:]: next(c["checksumValue"] for c in f["checksums"]
                                       if c["algorithm"] == "SHA256") for f in doc["files"]}
    assert in_sbom == files
