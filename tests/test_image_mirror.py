"""Mirror lock and verification on a small real mirror (real .debs, a real gpg signature)."""

from __future__ import annotations

import gzip
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from agent.errors import NotFoundError, VerificationError
from provisioning.errors import ImageError, ToolError
from provisioning.image import mirror as mirror_mod
from provisioning.image.mirror import (
    LockedFile,
    _release_path,
    load_lock,
    sync_scanner,
    verify_mirror,
    wheel_requirements,
)
from testsupport.image_helpers import make_signed_mirror

PACKAGES = {"hello-appliance": "1.0-1", "libdemo1": "2:0.9-3"}


@pytest.fixture
def mirror(tmp_path: Path) -> tuple[Path, Path]:
    m = tmp_path / "mirror"
    keyring = make_signed_mirror(m, tmp_path / "work", PACKAGES)
    return m, keyring


def test_verify_passes_and_reports_every_file(mirror: tuple[Path, Path]) -> None:
    m, keyring = mirror
    seen: list[str] = []
    lock = verify_mirror(m, keyring=keyring, step=seen.append)
    assert lock.package_names == set(PACKAGES)
    assert sorted(seen) == sorted(f.path for f in lock.files())
    assert {d.version for d in lock.debs} == {"1.0-1", "2:0.9-3"}  # epoch from %3a in the name


def test_altered_deb_is_refused(mirror: tuple[Path, Path]) -> None:
    m, keyring = mirror
    deb = next((m / "debian/pool").glob("hello*.deb"))
    deb.write_bytes(deb.read_bytes()[:-1] + b"X")
    with pytest.raises(VerificationError, match=r"hello-appliance_1.0-1_amd64.deb: sha256 .* lock"):
        verify_mirror(m, keyring=keyring)


def test_lock_and_deb_changed_together_still_fail_debians_index(mirror: tuple[Path, Path]) -> None:
    m, keyring = mirror
    lock_path = m / "lock.json"
    deb = next((m / "debian/pool").glob("hello*.deb"))
    deb.write_bytes(deb.read_bytes() + b"\0")
    import hashlib
    import json

    data = json.loads(lock_path.read_text())
    for d in data["debs"]:
        if d["name"] == "hello-appliance":
            d["sha256"] = hashlib.sha256(deb.read_bytes()).hexdigest()
            d["size"] = deb.stat().st_size
    lock_path.write_text(json.dumps(data))
    with pytest.raises(VerificationError, match="Debian's index says"):
        verify_mirror(m, keyring=keyring)


def test_unsigned_or_wrongly_signed_inrelease_is_refused(mirror: tuple[Path, Path], tmp_path: Path) -> None:
    m, _ = mirror
    other = tmp_path / "empty-keyring.gpg"
    other.write_bytes(b"")
    with pytest.raises(VerificationError, match="no valid signature"):
        verify_mirror(m, keyring=other)


def test_tampered_packages_index_is_refused(mirror: tuple[Path, Path]) -> None:
    m, keyring = mirror
    index = next((m / "debian/indices").glob("*Packages.gz"))
    text = gzip.decompress(index.read_bytes()) + b"\nPackage: evil\nVersion: 1\nSHA256: 00\n"
    index.write_bytes(gzip.compress(text))
    import hashlib
    import json

    data = json.loads((m / "lock.json").read_text())
    for f in data["indices"]:
        if f["path"].endswith("Packages.gz"):
            f["sha256"], f["size"] = hashlib.sha256(index.read_bytes()).hexdigest(), index.stat().st_size
    (m / "lock.json").write_text(json.dumps(data))
    with pytest.raises(VerificationError, match="does not match the signed InRelease"):
        verify_mirror(m, keyring=keyring)


def test_unexpected_file_and_missing_file(mirror: tuple[Path, Path]) -> None:
    m, keyring = mirror
    (m / "wheels/extra-1.0-py3-none-any.whl").write_bytes(b"x")
    with pytest.raises(VerificationError, match=r"extra-1\.0-py3-none-any\.whl is not in the lock"):
        verify_mirror(m, keyring=keyring)
    (m / "wheels/extra-1.0-py3-none-any.whl").unlink()
    (m / "wheels/demo-1.0-py3-none-any.whl").unlink()
    with pytest.raises(VerificationError, match="in the lock but missing"):
        verify_mirror(m, keyring=keyring)


def test_no_lock_means_never_synced(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="run `appliance mirror sync"):
        load_lock(tmp_path)


def test_mirror_verify_cli_json(mirror: tuple[Path, Path], cli) -> None:  # type: ignore[no-untyped-def]
    m, _ = mirror
    r = cli("mirror", "verify", m)  # the real Debian keyring does not know the test key
    assert r.code == 3 and "no valid signature" in r.err


def test_wheel_requirements_choose_the_onnxruntime_flavour(tmp_path: Path) -> None:
    import zipfile

    wheel = tmp_path / "sovereign_appliance-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("sovereign_appliance-0.1.0.dist-info/METADATA",
                    "Name: sovereign-appliance\nRequires-Dist: grpcio>=1.66\n"
                    "Requires-Dist: onnxruntime-gpu<1.24,>=1.23\n"
                    "Requires-Dist: onnxruntime-genai-cuda==0.11.2\n"
                    "Requires-Dist: onnx>=1.16; extra == \"operator\"\n\n")
    assert wheel_requirements(wheel, "onnxruntime") == [
        "grpcio>=1.66", "onnxruntime<1.24,>=1.23", "onnxruntime-genai==0.11.2"]
    assert wheel_requirements(wheel, "onnxruntime-gpu")[1:] == [
        "onnxruntime-gpu<1.24,>=1.23", "onnxruntime-genai-cuda==0.11.2"]


def test_wheel_requirements_follow_the_gpu_sets_pins(tmp_path: Path) -> None:
    import zipfile

    from provisioning.errors import ProfileError
    from provisioning.image.gpu_manifest import load_manifest
    from provisioning.image.gpu_manifest import wheel_requirements as gpu_wheel_requirements

    shipped = Path(__file__).resolve().parents[1] / "firmware-manifests/nvidia-550-trixie.toml"
    m = load_manifest(shipped)
    wheel = tmp_path / "sovereign_appliance-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("sovereign_appliance-0.1.0.dist-info/METADATA",
                    "Name: sovereign-appliance\nRequires-Dist: grpcio>=1.66\n"
                    "Requires-Dist: onnxruntime-gpu<1.24,>=1.23\n"
                    "Requires-Dist: onnxruntime-genai-cuda>=0.11.2,<0.12\n\n")
    reqs = wheel_requirements(wheel, "onnxruntime-gpu", m) + gpu_wheel_requirements(m)
    genai = [r for r in reqs if r.startswith("onnxruntime-genai")]
    assert genai == ["onnxruntime-genai-cuda==0.11.2"]  # the manifest's pin, and only it
    assert [r for r in reqs if r.startswith("onnxruntime-gpu")] == ["onnxruntime-gpu==1.23.2"]
    assert "grpcio>=1.66" in reqs
    text = shipped.read_text().replace('version = "0.11.2"', 'version = "0.12.0"').replace(
        "onnxruntime_genai_cuda-0.11.2-", "onnxruntime_genai_cuda-0.12.0-")
    (tmp_path / "set.toml").write_text(text)
    other = load_manifest(tmp_path / "set.toml")
    with pytest.raises(ProfileError, match=r"set.toml: \[\[wheels\]\] onnxruntime-genai-cuda "
                       r"version = '0.12.0': the agent \(sovereign_appliance-0.1.0-py3-none-any.whl\) "
                       r"requires onnxruntime-genai-cuda>=0.11.2,<0.12"):
        wheel_requirements(wheel, "onnxruntime-gpu", other)


def _with_scanner(m: Path, keyring: Path, name: str = "libdemo1") -> Path:
    """Move one signed .deb of the fixture into the scanner section of the lock."""
    lock = load_lock(m)
    deb = next(d for d in lock.debs if d.name == name)
    dest = m / "scanner/pool" / Path(deb.path).name
    dest.parent.mkdir(parents=True)
    (m / deb.path).rename(dest)
    scanner = (replace(deb, path=f"scanner/pool/{dest.name}"),)
    new = replace(lock, debs=tuple(d for d in lock.debs if d.name != name), scanner=scanner)
    (m / "lock.json").write_bytes(new.canonical())
    verify_mirror(m, keyring=keyring)
    return dest


def test_scanner_debs_are_locked_and_checked_back_to_the_signed_index(mirror: tuple[Path, Path]) -> None:
    m, keyring = mirror
    dest = _with_scanner(m, keyring)
    lock = load_lock(m)
    assert [d.name for d in lock.scanner_debs] == ["libdemo1"]
    assert "scanner" in json.loads((m / "lock.json").read_text())
    dest.write_bytes(dest.read_bytes() + b"x")
    with pytest.raises(VerificationError, match=r"scanner/pool/libdemo1_.*does not match the lock"):
        verify_mirror(m, keyring=keyring)


def test_scanner_deb_outside_any_signed_index_is_refused(mirror: tuple[Path, Path]) -> None:
    m, keyring = mirror
    _with_scanner(m, keyring)
    lock = load_lock(m)
    forged = replace(lock.scanner[0], version="9.9-9")
    (m / "lock.json").write_bytes(replace(lock, scanner=(forged,)).canonical())
    with pytest.raises(VerificationError, match=r"libdemo1 9\.9-9 is in no signed Packages index"):
        verify_mirror(m, keyring=keyring)


def test_image_debs_answer_only_to_the_image_indices(mirror: tuple[Path, Path]) -> None:
    """An index locked in the scanner section (testing) cannot vouch for the image's pool."""
    m, keyring = mirror
    lock = load_lock(m)
    moved = replace(lock, indices=(), scanner=lock.indices)
    (m / "lock.json").write_bytes(moved.canonical())
    with pytest.raises(VerificationError, match=r"debian/pool/.* is in no signed Packages index"):
        verify_mirror(m, keyring=keyring)


def test_stray_file_in_the_scanner_pool_is_refused(mirror: tuple[Path, Path]) -> None:
    m, keyring = mirror
    _with_scanner(m, keyring)
    (m / "scanner/pool/extra_1.0_all.deb").write_bytes(b"!<arch>\n")
    with pytest.raises(VerificationError, match=r"scanner/pool/extra_1\.0_all\.deb is not in the lock"):
        verify_mirror(m, keyring=keyring)


def test_a_lock_without_scanner_reads_as_before(mirror: tuple[Path, Path]) -> None:
    m, _ = mirror
    lock = load_lock(m)
    assert lock.scanner == () and "scanner" not in lock.to_json()


@pytest.mark.parametrize(("name", "release", "inner"), [
    ("deb.debian.org_debian_dists_forky_main_binary-amd64_Packages",
     "deb.debian.org_debian_dists_forky_InRelease", "main/binary-amd64/Packages"),
    ("deb.debian.org_debian_dists_trixie_non-free-firmware_binary-amd64_Packages",
     "deb.debian.org_debian_dists_trixie_InRelease", "non-free-firmware/binary-amd64/Packages"),
])
def test_release_path_of_any_suite(name: str, release: str, inner: str) -> None:
    assert _release_path(name) == (release, inner)


def test_release_path_of_a_foreign_name_is_an_error() -> None:
    with pytest.raises(ImageError, match="no _dists_SUITE_"):
        _release_path("example_Packages")


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_scanner_refresh_ends_finished_or_undone(mirror: tuple[Path, Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """sync_scanner with its download faked (the real one needs Debian's archive): a failed
    download or verification puts the old scanner files and lock back; a killed refresh is
    undone by the next; a good one replaces both."""
    m, keyring = mirror
    _with_scanner(m, keyring)
    before_tree, before_lock = _tree(m / "scanner"), (m / "lock.json").read_bytes()
    locked = load_lock(m).scanner

    def failing(mirror_dir: Path, _archive: str, _step: object) -> tuple[LockedFile, ...]:
        (mirror_dir / "scanner/pool").mkdir(parents=True)
        (mirror_dir / "scanner/pool/half_1.0_all.deb").write_bytes(b"!<arch>\n")
        raise ToolError("mmdebstrap", 1, "network unreachable")

    def unverifiable(mirror_dir: Path, _archive: str, _step: object) -> tuple[LockedFile, ...]:
        (mirror_dir / "scanner/pool").mkdir(parents=True)
        (mirror_dir / "scanner/pool/bad_1.0_all.deb").write_bytes(b"!<arch>\n")
        return (replace(locked[0], path="scanner/pool/bad_1.0_all.deb"),)

    def good(mirror_dir: Path, _archive: str, _step: object) -> tuple[LockedFile, ...]:
        previous = mirror_dir / "scanner.previous"
        shutil.copytree(previous, mirror_dir / "scanner")  # the same signed .deb, downloaded again
        return locked

    for fake, error in ((failing, ToolError), (unverifiable, VerificationError)):
        monkeypatch.setattr(mirror_mod, "_scanner_files", fake)
        with pytest.raises(error):
            sync_scanner(m, keyring=keyring)
        assert _tree(m / "scanner") == before_tree and (m / "lock.json").read_bytes() == before_lock
        assert not (m / "scanner.previous").exists()
        verify_mirror(m, keyring=keyring)
    # killed midway: the old directory aside, a partial new one in place
    (m / "scanner").rename(m / "scanner.previous")
    (m / "scanner/pool").mkdir(parents=True)
    (m / "scanner/pool/half_1.0_all.deb").write_bytes(b"!<arch>\n")
    monkeypatch.setattr(mirror_mod, "_scanner_files", good)
    lock = sync_scanner(m, keyring=keyring)
    assert lock.scanner == locked and _tree(m / "scanner") == before_tree
    assert not (m / "scanner.previous").exists()


def test_wanted_entries_are_package_entries_of_the_named_stanzas_only() -> None:
    """The fast path a build's mirror check and SBOM take through Debian's big indices gives,
    for the names asked, exactly what the full parse gives, continuation lines included."""
    from provisioning.image._debian import package_entries, wanted_entries

    stanzas = []
    for i in range(40):
        stanzas.append(f"Package: pkg{i}\nVersion: 1.{i}\nArchitecture: amd64\n"
                       f"Description: number {i}\n Package: decoy{i}\n .\n more text\n"
                       f"Filename: pool/main/p/pkg{i}_1.{i}_amd64.deb\nSize: {100 + i}\n"
                       f"SHA256: {i:064x}\n")
    stanzas.append("Package: unsigned\nVersion: 1\n")  # no SHA256: never an entry
    text = "\n".join(stanzas) + "\n\n\n" + "Package:   spaced  \nVersion: 2\nSHA256: " + "f" * 64 + "\n"
    names = {"pkg3", "pkg17", "pkg39", "decoy5", "unsigned", "spaced", "absent"}
    everything = [e for e in package_entries(text.splitlines(keepends=True)) if e.name in names]
    assert [e.name for e in everything] == ["pkg3", "pkg17", "pkg39", "spaced"]
    assert list(wanted_entries(text, names)) == everything
    assert list(wanted_entries(text, set())) == []
