"""What fuzzing the parsers found (bench/fuzz.py), each as the clean error it now is.

The inputs are those the fuzzer saved (bench/fuzz_corpus/TARGET/), or the smallest form
of them; each parser must refuse them with its own error, naming the field or the file.
"""

from __future__ import annotations

import base64
import io
import json
import tarfile
from pathlib import Path

import pytest
from cryptography import x509

from agent.bundle import _parse_manifest, decode_golden
from agent.config import load_config
from agent.errors import BundleError, ConfigError, VerificationError
from agent.modelrefs import check_model_files
from agent.osrelease import read_release
from agent.security import RevocationList, client_identity
from agent.settings import path_problem
from bench.fuzz_targets import CORPUS_DIR
from provisioning import pki
from provisioning.errors import ProfileError
from provisioning.fleet import load_inventory
from provisioning.image.profile import load_profile


def saved(target: str, name: str) -> bytes:
    return (CORPUS_DIR / target / name).read_bytes()


# ------------------------------------------------------------------ bundles


def test_manifest_nested_too_deeply_is_a_bundle_error() -> None:
    with pytest.raises(BundleError, match="not valid JSON: arrays or objects nested too deeply"):
        _parse_manifest(saved("bundle_manifest", "deep-nesting.json"), "b: manifest.json")


def test_manifest_integer_of_5000_digits_is_a_bundle_error() -> None:
    with pytest.raises(BundleError, match="not valid JSON: Exceeds the limit"):
        _parse_manifest(saved("bundle_manifest", "huge-integer.json"), "b: manifest.json")


def test_tolerance_beyond_a_float_names_the_field() -> None:
    with pytest.raises(BundleError, match=r"tolerance\.atol: expected a finite number, got 1000"):
        _parse_manifest(saved("bundle_manifest", "tolerance-beyond-float.json"), "b: manifest.json")
    doc = json.loads(saved("bundle_manifest", "tolerance-beyond-float.json"))
    doc["tolerance"] = {"rtol": float("nan")}
    with pytest.raises(BundleError, match=r"tolerance\.rtol: expected a finite number, got nan"):
        _parse_manifest(json.dumps(doc).encode(), "b: manifest.json")


def test_golden_case_whose_inputs_are_a_list_is_refused() -> None:
    with pytest.raises(BundleError, match="case 0: expected inputs and outputs, each an object"):
        decode_golden(saved("golden", "inputs-a-list.json"))


def test_golden_dimension_of_infinity_is_refused() -> None:
    with pytest.raises(BundleError, match="case 0 input x: cannot convert float infinity"):
        decode_golden(saved("golden", "infinite-dimension.json"))


def test_external_data_location_that_is_not_utf8_is_refused() -> None:
    """protobuf hands a proto2 string that is not UTF-8 back as bytes; the location comes out
    escaped, so it is never a member name, and is refused as outside the bundle."""
    model = saved("model_refs", "location-not-utf8.onnx")
    with pytest.raises(BundleError, match=r"keeps its data in 'we\\\\xe7ihts.bin', outside the bundle"):
        check_model_files(model, ("weights.bin",), "m.onnx")


def test_attribute_name_that_is_not_utf8_is_read_as_text() -> None:
    """A node attribute named in bytes that are not UTF-8 (protobuf hands it back as bytes)
    made describing where a tensor sits raise TypeError; this model keeps no data outside."""
    check_model_files(saved("model_refs", "attribute-name-not-utf8.onnx"), (), "m.onnx")


# ------------------------------------------------------------------ certificates and CRLs


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki") / "pki"
    pki.init_pki(directory, organization="Findings")
    return directory


@pytest.mark.parametrize(("name", "why"), [
    ("invalid-version.pem", "105 is not a valid CRL version"),
    ("malformed-issuer.pem", "error parsing asn1 value"),
    ("issuer-bitstring-attribute.pem", "oid must be X500_UNIQUE_IDENTIFIER for BitString type"),
])
def test_malformed_crl_is_a_config_error(site: Path, tmp_path: Path, name: str, why: str) -> None:
    ca = x509.load_pem_x509_certificate((site / "ca.crt").read_bytes())
    crl = tmp_path / "crl.pem"
    crl.write_bytes(saved("crl", name))
    with pytest.raises(ConfigError, match=f"crl: not a PEM revocation list .*{why}"):
        RevocationList(crl, ca)


def test_certificate_whose_key_cannot_be_read_is_a_config_error(site: Path, tmp_path: Path) -> None:
    from agent.config import AgentConfig, TlsSection
    from agent.security import _check_material

    issued = pki.issue_node(site, "n1")
    cert = tmp_path / "node.crt"
    cert.write_bytes(saved("certificate", "invalid-public-key.pem"))
    config = AgentConfig(tls=TlsSection(cert=cert, key=Path(issued.key_path), ca=site / "ca.crt"))
    with pytest.raises(ConfigError, match=r"\[tls\] cert: not a PEM certificate \(Invalid key\)"):
        _check_material(config)


def test_node_certificate_with_a_key_of_an_unknown_type(site: Path, tmp_path: Path) -> None:
    """cryptography raises UnsupportedAlgorithm (no ValueError) when the key is first read."""
    from agent.config import AgentConfig, TlsSection
    from agent.security import _check_material

    issued = pki.issue_node(site, "n2")
    cert = tmp_path / "node.crt"
    cert.write_bytes(saved("certificate", "unknown-key-type.pem"))
    config = AgentConfig(tls=TlsSection(cert=cert, key=Path(issued.key_path), ca=site / "ca.crt"))
    with pytest.raises(ConfigError, match=r"cert: not a PEM certificate \(Unknown key type: "):
        _check_material(config)


def test_client_certificate_with_a_duplicate_extension_is_refused_not_raised() -> None:
    """DuplicateExtension (no ValueError) comes when the extensions are first read."""
    assert client_identity(saved("certificate", "duplicate-extension.pem")).problem == \
        "client certificate cannot be parsed"


def test_client_certificate_of_an_unknown_version_is_refused_not_raised(site: Path) -> None:
    """cryptography raises InvalidVersion, which is no ValueError, for a version other than
    v1/v3; the access interceptor turns it into an identity it refuses (UNAUTHENTICATED)."""
    from cryptography.hazmat.primitives.serialization import Encoding

    issued = pki.issue_client(site, "ops", "operator")
    cert = x509.load_pem_x509_certificate(Path(issued.cert_path).read_bytes())
    der = cert.public_bytes(Encoding.DER)
    v3 = b"\xa0\x03\x02\x01\x02"  # tbsCertificate's [0] EXPLICIT INTEGER 2 (v3)
    assert der.count(v3) == 1
    bad = der.replace(v3, b"\xa0\x03\x02\x01\x07")
    pem = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(bad) + b"-----END CERTIFICATE-----\n"
    with pytest.raises(x509.InvalidVersion):
        x509.load_pem_x509_certificate(pem)
    assert client_identity(pem).problem == "client certificate cannot be parsed"
    assert client_identity(Path(issued.cert_path).read_bytes()).role == "operator"


# ------------------------------------------------------------------ configuration files


def test_agent_toml_nested_too_deeply_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(saved("agent_toml", "deep-nesting.toml"))
    with pytest.raises(ConfigError, match="not valid TOML: arrays or tables nested too deeply"):
        load_config(path)


def test_agent_toml_path_with_nul_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(saved("agent_toml", "nul-in-state-dir.toml"))
    with pytest.raises(ConfigError, match=r"\[server\] state_dir = .*: a path cannot hold a NUL"):
        load_config(path)


@pytest.mark.parametrize(("name", "key", "why"), [
    ("nul-in-pki-dir.toml", r"\[pki\] dir", "a path cannot hold a NUL character"),
    ("overlong-gpu-manifest.toml", r"\[gpu\] manifest", "not a usable path"),
    # 255 characters: a file name the kernel takes, until '.toml' is added to look it up
    ("gpu-manifest-name-too-long-with-toml.toml", r"\[gpu\] manifest", "not a usable path"),
])
def test_profile_path_that_cannot_name_a_file_names_the_key(tmp_path: Path, name: str, key: str,
                                                            why: str) -> None:
    path = tmp_path / "p.toml"
    path.write_bytes(saved("image_profile", name))
    with pytest.raises(ProfileError, match=f"{key} = .*: {why}"):
        load_profile(path)


def test_path_problem() -> None:
    assert path_problem("/etc/appliance/tls/node.crt") is None
    assert path_problem("a" * 255) is None
    assert path_problem("a" * 256) is not None
    assert path_problem("a/" * 600) is not None
    assert path_problem("a\0") is not None


def test_toml_inventory_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_bytes(saved("inventory_toml", "not-utf8.toml"))
    with pytest.raises(ConfigError, match=r"fleet\.toml: not valid TOML: 'utf-8' codec"):
        load_inventory(path)


@pytest.mark.parametrize(("entry", "why"), [
    ('tls_name = 5', "tls_name = 5: expected a host name"),
    ('address = ["a"]', r"address = \['a'\]: expected a host name or IP address"),
    ('port = true', "port = True: not a TCP port"),
])
def test_toml_inventory_fields_of_the_wrong_type(tmp_path: Path, entry: str, why: str) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(f'[[nodes]]\nname = "n1"\n{entry}\n')
    with pytest.raises(ConfigError, match=f"nodes\\[0\\] {why}"):
        load_inventory(path)


@pytest.mark.parametrize("line", ["h[a:z][a:z][a:z][a:z]", "node[0:99999999999999999999]",
                                  "n[000:999][a:c] appliance_port=8001\nm[0:99999]"])
def test_ansible_host_ranges_that_expand_to_a_huge_fleet_are_refused(tmp_path: Path, line: str) -> None:
    """ansible expands every host of a range, ranges in one name multiplying: the fuzzer's
    66-byte inventory (saved) kept it busy past libFuzzer's 20 s timeout."""
    path = tmp_path / "hosts"
    path.write_text(f"[edge]\n{line}\n")
    with pytest.raises(ConfigError, match=r"hosts:\d: host ranges expand to more than 10000 hosts"):
        load_inventory(path)
    for name in ("many-host-ranges.ini", "27648-hosts.ini"):  # 27648 hosts: 15 s in ansible
        path.write_bytes(saved("inventory_ansible", name))
        with pytest.raises(ConfigError, match="host ranges expand to more than 10000 hosts"):
            load_inventory(path)


def test_ansible_host_range_mixing_a_number_and_a_letter(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_bytes(saved("inventory_ansible", "number-to-letter-range.ini"))
    with pytest.raises(ConfigError):
        load_inventory(path)


def test_ansible_host_range_of_a_real_fleet_is_read(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text("[edge]\nn[01:50:2] appliance_port=9001\n[core]\nc[a:c]\n")
    nodes = load_inventory(path)
    assert [n.name for n in nodes][:3] == ["n01", "n03", "n05"]
    assert len(nodes) == 25 + 3


# ------------------------------------------------------------------ OS releases


def test_os_release_without_version_is_a_verification_error(tmp_path: Path) -> None:
    path = tmp_path / "release.tar"
    path.write_bytes(saved("os_release", "no-version.tar"))
    with pytest.raises(VerificationError, match="not a readable OS release: KeyError: 'version'"):
        read_release(path)


def test_os_release_json_that_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "release.tar"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:") as tar:
        for name, data in (("release.json", b"[1]"), ("root.squashfs", b""), ("root.verity", b""),
                           ("uki.efi", b"")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    with pytest.raises(VerificationError, match=r"release\.json holds list, expected an object"):
        read_release(path)
