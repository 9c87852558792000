"""Generative bundles: made from the tiny models, installed and served through the model
repository, and hostile ones refused with the store unchanged."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import random
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config import InferenceSection
from agent.errors import BundleError, NotFoundError, VerificationError
from agent.inference.repository import ModelRepository
from agent.inference.store import ModelStore
from agent.llm.bundle import MAX_CONTEXT, extract_bundle_hashed, read_gen_manifest, verify_bundle
from agent.llm.types import Sampling
from provisioning.demo.llm_models import write_decoder, write_encoder
from provisioning.genbundle import create_generative_bundle
from testsupport.inference_support import bytes_read

LIMITS: dict[str, Any] = {"context_length": 256, "max_tokens": 64, "kv_budget_tokens": 2048}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    return write_decoder(root / "llm"), write_encoder(root / "embed")


@pytest.fixture(scope="module")
def llm_bundle(folders: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "tiny-llm.bundle"
    create_generative_bundle(folders[0], out, kind="llm", name="tiny-llm", version="1.0.0", **LIMITS)
    return out


@pytest.fixture(scope="module")
def embed_bundle(folders: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "tiny-embed.bundle"
    create_generative_bundle(folders[1], out, kind="embedding", name="tiny-embed", version="1.0.0",
                             context_length=256, max_tokens=1, kv_budget_tokens=256)
    return out


def _repo(state: Path) -> ModelRepository:
    return ModelRepository.for_state_dir(state, InferenceSection(intra_op_threads=1))


def _store_files(state: Path) -> list[Path]:
    return sorted((state / "models").rglob("*")) if (state / "models").exists() else []


def test_bundle_is_deterministic_and_verifies(folders: tuple[Path, Path], llm_bundle: Path,
                                              tmp_path: Path) -> None:
    again = tmp_path / "again.bundle"
    manifest = create_generative_bundle(folders[0], again, kind="llm", name="tiny-llm", version="1.0.0",
                                        **LIMITS)
    assert again.read_bytes() == llm_bundle.read_bytes()
    assert verify_bundle(again) == manifest
    assert set(manifest.files) == {"genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json",
                                   "tokenizer_config.json"}
    assert manifest.graph == "model.onnx" and manifest.parameters > 100_000
    assert all(len(g.token_ids) == 16 for g in manifest.golden_prompts)


def test_llm_bundle_installs_and_serves(llm_bundle: Path, tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    installed = repo.install(llm_bundle)
    assert installed.kind == "llm" and installed.active

    async def main() -> str:
        await repo.serve("tiny-llm")
        model = repo.generative.language_model("tiny-llm")
        assert model.card.context_length == 256 and model.card.kind == "llm"
        chunks = [c async for c in model.generate("The appliance", Sampling(max_tokens=8, temperature=0))]
        assert chunks[-1].completion_tokens == 8
        assert [e.state for e in repo.index()] == ["READY"]
        await repo.unload("tiny-llm")
        return "ok"

    assert asyncio.run(main()) == "ok"
    with pytest.raises(NotFoundError):
        repo.generative.language_model("tiny-llm")


def test_embedding_bundle_installs_and_serves(embed_bundle: Path, tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    repo.install(embed_bundle)

    async def main() -> int:
        await repo.serve("tiny-embed")
        result = await repo.generative.embedding_model("tiny-embed").embed(["a signed model bundle"])
        return len(result.vectors[0])

    assert asyncio.run(main()) == 64


def test_changed_installed_file_is_not_served(llm_bundle: Path, tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    installed = repo.install(llm_bundle)
    with (installed.path / "model" / "model.onnx.data").open("r+b") as f:
        f.seek(100)
        f.write(b"\x7f")
    with pytest.raises(VerificationError, match=r"model\.onnx\.data: sha256"):
        asyncio.run(repo.serve("tiny-llm"))
    assert "sha256" in repo.index()[0].reason


# ---------------------------------------------------------------- hostile bundles

def _members(bundle: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(bundle) as tar:
        out = []
        for info in tar.getmembers():
            f = tar.extractfile(info)
            assert f is not None
            out.append((info.name, f.read()))
        return out


def _write(out: Path, members: list[tuple[str, bytes]], link: str | None = None) -> Path:
    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link is not None:
            info = tarfile.TarInfo(link)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/shadow"
            tar.addfile(info)
    return out


def _info(name: str, data: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info


def _edit(bundle: Path, out: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    members = _members(bundle)
    manifest = json.loads(members[0][1])
    edit(manifest)
    return _write(out, [("manifest.json", json.dumps(manifest).encode()), *members[1:]])


def _refused(bundle: Path, state: Path, error: type[Exception], match: str) -> None:
    before = _store_files(state)
    with pytest.raises(error, match=match):
        _repo(state).install(bundle)
    assert _store_files(state) == before


def test_tampered_member_is_refused(llm_bundle: Path, tmp_path: Path) -> None:
    members = _members(llm_bundle)
    members = [(n, d[:-1] + bytes([d[-1] ^ 1]) if n == "model/model.onnx.data" else d) for n, d in members]
    _refused(_write(tmp_path / "b", members), tmp_path / "state", VerificationError,
             r"model/model\.onnx\.data.*sha256")


@pytest.mark.parametrize("keep", [0.3, 0.9])
def test_a_truncated_bundle_is_refused(llm_bundle: Path, tmp_path: Path, keep: float) -> None:
    """Cut inside a member: the one-pass reader stops with an error naming the file, and
    nothing is installed."""
    data = llm_bundle.read_bytes()
    cut = tmp_path / "cut.bundle"
    cut.write_bytes(data[:int(len(data) * keep)])
    state = tmp_path / "state"
    with pytest.raises((BundleError, VerificationError), match=str(cut.name)):
        _repo(state).install(cut)
    assert _store_files(state) == []


def test_extra_member_is_refused(llm_bundle: Path, tmp_path: Path) -> None:
    bundle = _write(tmp_path / "b", [*_members(llm_bundle), ("model/zz-extra.so", b"\x7fELF")])
    _refused(bundle, tmp_path / "state", BundleError, "unexpected member 'model/zz-extra.so'")


def test_link_member_is_refused(llm_bundle: Path, tmp_path: Path) -> None:
    bundle = _write(tmp_path / "b", _members(llm_bundle), link="model/zz")
    _refused(bundle, tmp_path / "state", BundleError, "'model/zz' is not a regular file")


def test_sparse_member_is_refused(llm_bundle: Path, tmp_path: Path) -> None:
    """A sparse member's content is not the bytes stored at its offset: only plain files."""
    out = tmp_path / "b"
    with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in _members(llm_bundle):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if name == "model/tokenizer.json":
                info.type = tarfile.GNUTYPE_SPARSE
            tar.addfile(info, io.BytesIO(data))
    _refused(out, tmp_path / "state", BundleError, "'model/tokenizer.json' is not a regular file")


def test_a_header_with_a_negative_size_is_refused(llm_bundle: Path, tmp_path: Path) -> None:
    """A GNU long-name header whose size field (base-256) is negative: tarfile asks for a
    negative read, which is refused as a malformed bundle, not as an internal error."""
    out = tmp_path / "b"
    members = _members(llm_bundle)
    with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, content in [members[0], ("model/" + "x" * 120, b"abc")]:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    data = bytearray(out.read_bytes())
    header = 512 + (len(members[0][1]) + 511) // 512 * 512  # the long-name header, after the manifest
    assert data[header + 156:header + 157] == tarfile.GNUTYPE_LONGNAME
    data[header + 124:header + 136] = (-(1 << 20)).to_bytes(12, "big", signed=True)
    data[header + 148:header + 156] = b" " * 8
    data[header + 148:header + 156] = b"%06o\0 " % sum(data[header:header + 512])
    out.write_bytes(bytes(data))
    _refused(out, tmp_path / "state", BundleError, "not a generative bundle.*bounded")


def test_a_pax_header_declaring_gigabytes_is_refused_unread(llm_bundle: Path, tmp_path: Path) -> None:
    """tarfile reads a pax header's records whole: one declaring 1 GiB (8 MiB of it present)
    is refused before any of it is read into memory."""
    members = _members(llm_bundle)
    out = tmp_path / "b"
    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(_info("manifest.json", members[0][1]),
                    io.BytesIO(members[0][1]))
    data = bytearray(out.read_bytes()[:512 + (len(members[0][1]) + 511) // 512 * 512])  # no end blocks
    header = bytearray(_info("././@PaxHeader", b"").tobuf(tarfile.USTAR_FORMAT))
    header[156:157] = tarfile.XHDTYPE
    header[124:136] = b"%011o\0" % (1 << 30)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    out.write_bytes(bytes(data + header) + b"1 x\n" * (2 << 20))
    _refused(out, tmp_path / "state", BundleError, r"a read of 1073741824 bytes: reads here are bounded")


def test_path_outside_the_folder_is_refused(llm_bundle: Path, tmp_path: Path) -> None:
    def edit(m: dict[str, Any]) -> None:
        m["files"]["../../etc/cron.d/x"] = m["files"].pop("tokenizer.json")

    _refused(_edit(llm_bundle, tmp_path / "b", edit), tmp_path / "state", BundleError,
             r"files: '\.\./\.\./etc/cron\.d/x' is not a plain file name")


def test_oversized_limits_are_refused(llm_bundle: Path, tmp_path: Path) -> None:
    def edit(m: dict[str, Any]) -> None:
        m["limits"]["context_length"] = MAX_CONTEXT + 1

    _refused(_edit(llm_bundle, tmp_path / "b", edit), tmp_path / "state", BundleError,
             r"limits\.context_length: expected an integer in 1\.\.")

    def member(m: dict[str, Any]) -> None:
        m["files"]["model.onnx.data"]["length"] = 1 << 40

    _refused(_edit(llm_bundle, tmp_path / "c", member), tmp_path / "state", BundleError,
             r"files\.model\.onnx\.data\.length: expected an integer")


def test_golden_token_mismatch_is_refused(llm_bundle: Path, tmp_path: Path) -> None:
    def edit(m: dict[str, Any]) -> None:
        ids = m["golden"][0]["token_ids"]
        ids[3] = (ids[3] + 1) % 300

    _refused(_edit(llm_bundle, tmp_path / "b", edit), tmp_path / "state", BundleError,
             "golden prompt 0: greedy decoding gave token .* at position 3")


def test_external_data_outside_the_bundle_is_refused(folders: tuple[Path, Path], llm_bundle: Path,
                                                     tmp_path: Path) -> None:
    import hashlib

    import onnx

    model = onnx.load(str(folders[0] / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../../../etc/appliance/tls/node.key"
    graph = model.SerializeToString()
    members = _members(llm_bundle)
    manifest = json.loads(members[0][1])
    manifest["files"]["model.onnx"] = {"sha256": hashlib.sha256(graph).hexdigest(), "length": len(graph)}
    members = [("manifest.json", json.dumps(manifest).encode()),
               *[(n, graph if n == "model/model.onnx" else d) for n, d in members[1:]]]
    _refused(_write(tmp_path / "b", members), tmp_path / "state", BundleError, "outside the bundle")


def test_create_refuses_a_folder_with_a_link(folders: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(folders[0], folder)
    (folder / "extra").symlink_to("/etc/hostname")
    with pytest.raises(BundleError, match="only regular files"):
        create_generative_bundle(folder, tmp_path / "out", kind="llm", name="x", version="1", **LIMITS)
    assert not (tmp_path / "out").exists()


def test_cli_creates_inspects_and_verifies(folders: tuple[Path, Path], tmp_path: Path,
                                           cli: Callable[..., Any]) -> None:
    out = tmp_path / "cli.bundle"
    made = cli("bundle", "create-llm", folders[0], "--name", "tiny-llm", "--version", "1.0.0",
               "--max-tokens", "32", "--prompt", "The quick brown fox", "--out", out, "--json")
    assert made.code == 0, made.err
    manifest = json.loads(made.out)["manifest"]
    assert manifest["limits"] == {"context_length": 256, "kv_budget_tokens": 1024, "max_tokens": 32}
    assert [g["prompt"] for g in manifest["golden"]] == ["The quick brown fox"]
    checked = cli("bundle", "verify", out)
    assert checked.code == 0 and "golden check reproduces" in checked.out
    file = {"sha256": hashlib.sha256(out.read_bytes()).hexdigest(), "length": out.stat().st_size}
    for command in ("inspect", "verify"):  # the file's hash from the read that checked the members
        shown = cli("bundle", command, out, "--json")
        assert shown.code == 0, shown.err
        assert {k: json.loads(shown.out)[k] for k in file} == file
    wrong = cli("bundle", "create-embedding", folders[0], "--name", "x", "--version", "1", "--out",
                tmp_path / "x.bundle")
    assert wrong.code != 0 and "genai_config.json" in wrong.err


def test_signed_llm_bundle_installs_from_the_registry(llm_bundle: Path, tmp_path: Path) -> None:
    from agent.inference.install import install_from_registry
    from agent.updates.client import RegistryClient
    from provisioning.registry import init_registry, publish_bundle, trusted_root

    registry, state = tmp_path / "registry", tmp_path / "state"
    init_registry(registry)
    publish_bundle(registry, llm_bundle)
    RegistryClient.initialize(state, trusted_root(registry))
    repo = _repo(state)
    installed = install_from_registry(repo, state, (str(registry / "published"),), "tiny-llm", None)
    assert (installed.kind, installed.version) == ("llm", "1.0.0")
    asyncio.run(repo.serve("tiny-llm"))
    assert [c.name for c in repo.generative.cards()] == ["tiny-llm"]


def test_bundle_changed_after_signing_is_refused(llm_bundle: Path, tmp_path: Path) -> None:
    from agent.inference.install import install_from_registry
    from agent.updates.client import RegistryClient
    from provisioning.registry import init_registry, publish_bundle, trusted_root

    registry, state = tmp_path / "registry", tmp_path / "state"
    init_registry(registry)
    publish_bundle(registry, llm_bundle)
    for target in (p for p in (registry / "published" / "targets").rglob("*") if p.is_file()):
        data = bytearray(target.read_bytes())
        data[-2048] ^= 1
        target.write_bytes(bytes(data))
    RegistryClient.initialize(state, trusted_root(registry))
    before = _store_files(state)
    with pytest.raises(VerificationError):
        install_from_registry(_repo(state), state, (str(registry / "published"),), "tiny-llm", None)
    assert _store_files(state) == before


def test_an_install_reads_the_bundle_once(llm_bundle: Path, tmp_path: Path) -> None:
    """Hashing and unpacking share one read of the file (weights are gigabytes); only the
    manifest, the archive's first member, is read before it."""
    store = ModelStore(tmp_path)
    size = llm_bundle.stat().st_size
    assert size > 500_000  # the manifest's few KiB must not matter below
    before = bytes_read()
    if before is None:
        pytest.skip("no read accounting in /proc/self/io here")
    installed = store.install_generative(llm_bundle, lambda manifest, folder, at: None)
    read = (bytes_read() or 0) - before
    assert size <= read < 1.2 * size, f"{read} bytes read for a {size}-byte bundle"
    assert installed.sha256 == hashlib.sha256(llm_bundle.read_bytes()).hexdigest()
    assert installed.length == size


def test_a_manifest_changed_between_reads_is_refused(folders: tuple[Path, Path], llm_bundle: Path,
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same name and version, other limits: the bundle file is replaced after its manifest was
    first read (to find the final place) and before the pass that installs it."""
    other = tmp_path / "other.bundle"
    create_generative_bundle(folders[0], other, kind="llm", name="tiny-llm", version="1.0.0",
                             **(LIMITS | {"kv_budget_tokens": 4096}))
    target = tmp_path / "offered.bundle"
    shutil.copyfile(llm_bundle, target)
    real = read_gen_manifest

    def then_replaced(path: Path) -> Any:
        manifest = real(path)
        os.replace(other, target)  # a fault injected into the real read: the file changes
        return manifest

    monkeypatch.setattr("agent.inference.store.read_gen_manifest", then_replaced)
    state = tmp_path / "state"
    with pytest.raises(VerificationError, match="the manifest changed while it was read"):
        _repo(state).install(target)
    assert _store_files(state) == []


# ---------------------------------------------------------------- a bundle bigger than the read buffers

@pytest.fixture(scope="module")
def big_bundle(folders: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny decoder with a 20 MiB weight file: the one-pass reader's 4 MiB buffers wrap
    around its ring of 4, and members start and end inside buffers."""
    root = tmp_path_factory.mktemp("big")
    folder = shutil.copytree(folders[0], root / "llm")
    (folder / "extra-weights.bin").write_bytes(random.Random(15).randbytes(20 << 20))
    out = root / "big.bundle"
    create_generative_bundle(folder, out, kind="llm", name="big-llm", version="1.0.0", **LIMITS)
    return out


def _layout(bundle: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(bundle) as tar:
        return {info.name: info for info in tar.getmembers()}


def _changed(bundle: Path, out: Path, offset: int, value: int | None = None) -> Path:
    data = bytearray(bundle.read_bytes())
    data[offset] = data[offset] ^ 1 if value is None else value
    out.write_bytes(bytes(data))
    return out


def test_a_big_bundle_unpacks_to_its_bytes_with_the_file_hash(big_bundle: Path, tmp_path: Path) -> None:
    data = big_bundle.read_bytes()
    walked = extract_bundle_hashed(big_bundle, tmp_path)
    assert (walked.sha256, walked.length) == (hashlib.sha256(data).hexdigest(), len(data))
    for name, info in _layout(big_bundle).items():
        if name.startswith("model/"):
            written = (tmp_path / name.removeprefix("model/")).read_bytes()
            assert written == data[info.offset_data:info.offset_data + info.size]


@pytest.mark.parametrize("where", ["first", "at 4 MiB", "after the ring wrapped", "last"])
def test_a_byte_changed_in_a_big_member_is_refused(big_bundle: Path, tmp_path: Path, where: str) -> None:
    info = _layout(big_bundle)["model/extra-weights.bin"]
    start, end = info.offset_data, info.offset_data + info.size
    offset = {"first": start, "at 4 MiB": 4 << 20, "after the ring wrapped": (16 << 20) + 4097,
              "last": end - 1}[where]
    assert start <= offset < end
    _refused(_changed(big_bundle, tmp_path / "b", offset), tmp_path / "state", VerificationError,
             r"b:model/extra-weights\.bin: sha256 [0-9a-f]{64} does not match the manifest's")


def test_a_byte_changed_in_the_padding_changes_the_file_hash(big_bundle: Path, tmp_path: Path) -> None:
    """Padding is in no member: only the whole file's sha256 (the TUF target) covers it, so the
    one pass must hash the bytes it skips."""
    info = next(i for n, i in _layout(big_bundle).items() if n.startswith("model/") and i.size % 512)
    changed = _changed(big_bundle, tmp_path / "b", info.offset_data + info.size, 1)
    (tmp_path / "x").mkdir()
    walked = extract_bundle_hashed(changed, tmp_path / "x")
    assert walked.sha256 == hashlib.sha256(changed.read_bytes()).hexdigest()
    assert walked.sha256 != hashlib.sha256(big_bundle.read_bytes()).hexdigest()


def test_a_byte_changed_in_the_manifest_is_refused(big_bundle: Path, tmp_path: Path) -> None:
    """One hex digit of a member's hash in the manifest (same length, same layout)."""
    data = big_bundle.read_bytes()
    want = read_gen_manifest(big_bundle).files["extra-weights.bin"].sha256
    offset = data.index(want.encode()) + 10
    value = ord("0") if data[offset] != ord("0") else ord("1")
    _refused(_changed(big_bundle, tmp_path / "b", offset, value), tmp_path / "state", VerificationError,
             rf"b:model/extra-weights\.bin: sha256 {want} does not match the manifest's")


@pytest.mark.parametrize("cut", [4 << 20, 16 << 20, (16 << 20) + 1])
def test_a_big_bundle_cut_inside_a_member_is_refused(big_bundle: Path, tmp_path: Path, cut: int) -> None:
    cut_file = tmp_path / "cut.bundle"
    cut_file.write_bytes(big_bundle.read_bytes()[:cut])
    start = _layout(big_bundle)["model/extra-weights.bin"].offset_data
    _refused(cut_file, tmp_path / "state", VerificationError,
             rf"cut\.bundle:model/extra-weights\.bin: {cut - start} bytes, the manifest declares")


def test_a_big_bundle_cut_in_its_end_blocks_has_the_hash_of_what_is_left(big_bundle: Path,
                                                                        tmp_path: Path) -> None:
    """Every member is whole, so the members pass; the file's sha256 and length are those of
    the cut file, which the signed target then refuses."""
    data = big_bundle.read_bytes()
    cut_file = tmp_path / "cut.bundle"
    cut_file.write_bytes(data[:-1])
    walked = extract_bundle_hashed(cut_file, tmp_path)
    assert (walked.sha256, walked.length) == (hashlib.sha256(data[:-1]).hexdigest(), len(data) - 1)
