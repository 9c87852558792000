"""The generative bundle: one deterministic file holding a model folder (an LLM for
onnxruntime-genai, or a text encoder) with a manifest that hashes every member.

Layout (uncompressed ustar, every entry 0:0, mode 0644, mtime 0, so the same folder always
gives the same bytes)::

    manifest.json        canonical JSON: see :class:`GenManifest`
    model/NAME ...       the folder's files, flat, in sorted order, each hashed in the manifest

Weights are gigabytes, so nothing is read whole: reading checks each member's size and
sha256 while it streams, and :func:`extract_bundle` writes the members into a directory in
the same single pass (a member that fails leaves the caller to delete the directory): the
file is read once through :class:`agent.fsutil.OnePassReader`, which takes the whole file's
sha256 and each member's on threads of their own from the very buffers that are written.
Hostile input: only plain relative names of one component, only regular files, exactly
the members the manifest lists, sizes and counts capped, and the manifest's limits (context,
max_tokens, KV budget, golden prompts) bounded.  A bundle reaching a node already passed TUF
verification as a whole file; these checks are the second layer.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from agent.bundle import FileEntry, parse_version, tar_entry, valid_name
from agent.errors import BundleError, NotFoundError, VerificationError
from agent.fsutil import OnePassReader, file_sha256, read_tar_once
from agent.modelrefs import safe_member_name

__all__ = ["GEN_FORMAT", "GenManifest", "GoldenEmbedding", "GoldenPrompt", "LlmLimits", "Walked",
           "extract_bundle", "extract_bundle_hashed", "is_generative_bundle", "read_gen_manifest",
           "verify_bundle", "verify_bundle_hashed", "write_bundle"]

GEN_FORMAT = 1
MANIFEST = "manifest.json"
PREFIX = "model/"
MAX_MANIFEST = 1 << 20
MAX_MEMBERS = 64
MAX_MEMBER = 64 << 30
MAX_CONTEXT = 1 << 20
MAX_BUDGET = 1 << 26
MAX_GOLDEN = 16
MAX_GOLDEN_TOKENS = 512
_CHUNK = 1 << 20

Kind = Literal["llm", "embedding"]


@dataclass(frozen=True)
class LlmLimits:
    context_length: int
    max_tokens: int
    kv_budget_tokens: int


@dataclass(frozen=True)
class GoldenPrompt:
    """A prompt decoded greedily for ``len(token_ids)`` tokens must give exactly these."""

    prompt: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class GoldenEmbedding:
    text: str
    vector: tuple[float, ...]


@dataclass(frozen=True)
class GenManifest:
    kind: Kind
    name: str
    version: str
    files: Mapping[str, FileEntry]  # folder file name -> hash and length
    graph: str  # the ONNX graph (for an LLM: the genai_config's decoder filename)
    limits: LlmLimits
    parameters: int = 0
    quantisation: str = ""
    golden_prompts: tuple[GoldenPrompt, ...] = ()
    golden_embeddings: tuple[GoldenEmbedding, ...] = ()
    atol: float = 1e-4  # embeddings: golden vectors within this
    description: str = ""
    format: int = GEN_FORMAT

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format, "kind": self.kind, "name": self.name, "version": self.version,
            "description": self.description, "graph": self.graph,
            "files": {k: {"sha256": v.sha256, "length": v.length} for k, v in sorted(self.files.items())},
            "limits": {"context_length": self.limits.context_length, "max_tokens": self.limits.max_tokens,
                       "kv_budget_tokens": self.limits.kv_budget_tokens},
            "parameters": self.parameters, "quantisation": self.quantisation,
            "golden": ([{"prompt": g.prompt, "token_ids": list(g.token_ids)} for g in self.golden_prompts]
                       if self.kind == "llm" else
                       [{"text": g.text, "vector": list(g.vector)} for g in self.golden_embeddings]),
            "atol": self.atol,
        }

    def canonical(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()

    @property
    def members(self) -> list[str]:
        return sorted(self.files)


# ---------------------------------------------------------------- parsing

class _Reader:
    """Typed fields out of JSON, each error naming the origin, the field and the value."""

    def __init__(self, origin: str) -> None:
        self.origin = origin

    def fail(self, where: str, problem: str) -> BundleError:
        return BundleError(f"{self.origin}: {where}: {problem}")

    def obj(self, value: Any, where: str, keys: set[str]) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected an object, got {type(value).__name__}")
        unknown = sorted(set(value) - keys)
        if unknown:
            raise self.fail(where, f"unknown field(s) {', '.join(repr(k[:40]) for k in unknown[:8])}")
        return value

    def integer(self, data: Mapping[str, Any], key: str, where: str, lo: int, hi: int) -> int:
        value = data.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise self.fail(f"{where}{key}", f"expected an integer in {lo}..{hi}, got {str(value)[:40]}")
        return value

    def text(self, data: Mapping[str, Any], key: str, where: str, limit: int,
             default: str | None = None) -> str:
        value = data.get(key, default)
        if not isinstance(value, str) or len(value) > limit:
            raise self.fail(f"{where}{key}", f"expected a string of at most {limit} characters")
        return value


_TOP = {"format", "kind", "name", "version", "description", "graph", "files", "limits", "parameters",
        "quantisation", "golden", "atol"}


def _files(r: _Reader, raw: Any) -> dict[str, FileEntry]:
    if not isinstance(raw, dict) or not 0 < len(raw) <= MAX_MEMBERS:
        raise r.fail("files", f"expected an object of 1..{MAX_MEMBERS} files")
    files = {}
    for name, entry in raw.items():
        if not safe_member_name(name) or "/" in name:
            raise r.fail("files", f"{name[:80]!r} is not a plain file name (one component, no '..', "
                         "no leading dot)")
        e = r.obj(entry, f"files.{name}", {"sha256", "length"})
        digest = r.text(e, "sha256", f"files.{name}.", 64)
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise r.fail(f"files.{name}.sha256", f"not a sha256 hex digest: {digest!r}")
        files[name] = FileEntry(digest, r.integer(e, "length", f"files.{name}.", 0, MAX_MEMBER))
    return files


def _limits(r: _Reader, raw: Any) -> LlmLimits:
    d = r.obj(raw, "limits", {"context_length", "max_tokens", "kv_budget_tokens"})
    context = r.integer(d, "context_length", "limits.", 1, MAX_CONTEXT)
    max_tokens = r.integer(d, "max_tokens", "limits.", 1, context)
    budget = r.integer(d, "kv_budget_tokens", "limits.", context, MAX_BUDGET)
    return LlmLimits(context, max_tokens, budget)


def _golden(r: _Reader, raw: Any, kind: Kind) -> tuple[tuple[GoldenPrompt, ...], tuple[GoldenEmbedding, ...]]:
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_GOLDEN:
        raise r.fail("golden", f"expected a list of 1..{MAX_GOLDEN} cases")
    prompts, vectors = [], []
    for i, case in enumerate(raw):
        where = f"golden[{i}]"
        if kind == "llm":
            c = r.obj(case, where, {"prompt", "token_ids"})
            ids = c.get("token_ids")
            if not isinstance(ids, list) or not 0 < len(ids) <= MAX_GOLDEN_TOKENS or not all(
                    isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 1 << 31 for t in ids):
                raise r.fail(f"{where}.token_ids", f"expected 1..{MAX_GOLDEN_TOKENS} token ids")
            prompts.append(GoldenPrompt(r.text(c, "prompt", f"{where}.", 16384), tuple(ids)))
        else:
            c = r.obj(case, where, {"text", "vector"})
            vec = c.get("vector")
            if not isinstance(vec, list) or not 0 < len(vec) <= 65536 or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in vec):
                raise r.fail(f"{where}.vector", "expected a list of numbers")
            text = r.text(c, "text", f"{where}.", 16384)
            vectors.append(GoldenEmbedding(text, tuple(float(x) for x in vec)))
    return tuple(prompts), tuple(vectors)


def parse_gen_manifest(raw: bytes, origin: str) -> GenManifest:
    """Parse and bound a generative manifest.

    Raises:
        BundleError: naming ``origin``, the field and the value.
    """
    r = _Reader(origin)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BundleError(f"{origin}: not valid JSON: {str(exc)[:80]}") from None
    d = r.obj(data, "manifest", _TOP)
    if d.get("format") != GEN_FORMAT:
        raise r.fail("format", f"unsupported generative bundle format {str(d.get('format'))[:20]} "
                     f"(this agent reads {GEN_FORMAT})")
    kind = d.get("kind")
    if kind not in ("llm", "embedding"):
        raise r.fail("kind", f"expected 'llm' or 'embedding', got {str(kind)[:20]!r}")
    name = r.text(d, "name", "", 64)
    if not valid_name(name):
        raise r.fail("name", f"{name!r} is not a lowercase name of 1-64 characters [a-z0-9._-]")
    version = r.text(d, "version", "", 64)
    try:
        parse_version(version)
    except ValueError as exc:
        raise r.fail("version", str(exc)) from None
    files = _files(r, d.get("files"))
    graph = r.text(d, "graph", "", 255)
    if graph not in files:
        raise r.fail("graph", f"{graph[:80]!r} is not one of the files")
    atol = d.get("atol", 1e-4)
    if not isinstance(atol, (int, float)) or isinstance(atol, bool) or not 0 <= atol <= 1:
        raise r.fail("atol", f"expected a number in 0..1, got {str(atol)[:20]}")
    prompts, vectors = _golden(r, d.get("golden"), kind)
    return GenManifest(kind, name, version, files, graph, _limits(r, d.get("limits")),
                       r.integer(d, "parameters", "", 0, 1 << 50), r.text(d, "quantisation", "", 32, ""),
                       prompts, vectors, float(atol), r.text(d, "description", "", 1024, ""))


# ---------------------------------------------------------------- writing

def folder_files(folder: Path) -> dict[str, FileEntry]:
    """Hash every file of a flat model folder (streaming).

    Raises:
        BundleError: a subdirectory, link or special file, a name that is not plain, too many files.
    """
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_symlink() or not path.is_file():
            raise BundleError(f"{path}: only regular files go into a model bundle (no links, "
                              "no subdirectories)")
        if not safe_member_name(path.name):
            raise BundleError(f"{path}: {path.name!r} is not a plain file name")
        files[path.name] = FileEntry(file_sha256(path, _CHUNK), path.stat().st_size)
    if not 0 < len(files) <= MAX_MEMBERS:
        raise BundleError(f"{folder}: a model folder holds 1..{MAX_MEMBERS} files, found {len(files)}")
    return files


def write_bundle(out: IO[bytes], manifest: GenManifest, folder: Path) -> None:
    """Write the bundle of ``folder`` to ``out`` (members streamed, re-checked against
    ``manifest`` as they are copied).

    Raises:
        VerificationError: a file changed since it was hashed.
    """
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        raw = manifest.canonical()
        tar.addfile(tar_entry(MANIFEST, len(raw)), io.BytesIO(raw))
        for name in manifest.members:
            entry = manifest.files[name]
            with (folder / name).open("rb") as src:
                tar.addfile(tar_entry(PREFIX + name, entry.length), _Hashing(src, entry, str(folder / name)))


class _Hashing:
    """A file read by tarfile while it is hashed; raises at its end on a mismatch."""

    def __init__(self, src: IO[bytes], entry: FileEntry, where: str) -> None:
        self._src, self._entry, self._where = src, entry, where
        self._digest = hashlib.sha256()
        self._seen = 0

    def read(self, n: int = -1) -> bytes:
        chunk = self._src.read(n)
        self._digest.update(chunk)
        self._seen += len(chunk)
        if self._seen == self._entry.length and self._digest.hexdigest() != self._entry.sha256:
            raise VerificationError(f"{self._where}: changed while the bundle was written")
        return chunk


# ---------------------------------------------------------------- reading

def _members(tar: tarfile.TarFile, origin: str) -> Iterator[tarfile.TarInfo]:
    while True:
        info = tar.next()
        if info is None:
            return
        # Plain files only: a sparse member's bytes are not the stored bytes at its offset.
        if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or info.sparse is not None:
            raise BundleError(f"{origin}: member {info.name[:80]!r} is not a regular file "
                              "(links, directories, devices and sparse files are refused)")
        yield info


def _open_manifest(tar: tarfile.TarFile, members: Iterator[tarfile.TarInfo], origin: str) -> GenManifest:
    first = next(members, None)
    if first is None or first.name != MANIFEST:
        raise BundleError(f"{origin}: not a generative bundle: the first member must be {MANIFEST}")
    if first.size > MAX_MANIFEST:
        raise BundleError(f"{origin}: {MANIFEST} is {first.size} bytes (limit {MAX_MANIFEST})")
    src = tar.extractfile(first)
    assert src is not None
    return parse_gen_manifest(src.read(), f"{origin}: {MANIFEST}")


@dataclass(frozen=True)
class Walked:
    """A bundle file checked in one pass: its manifest, and the sha256 and length of the file."""

    manifest: GenManifest
    sha256: str
    length: int


def _walk(path: Path, dest: Path | None) -> Walked:
    """Check a bundle file member by member in one pass (:func:`~agent.fsutil.read_tar_once`),
    writing the members into ``dest`` when given and hashing the whole file on the way."""
    return Walked(*read_tar_once(
        path, lambda tar, reader: _walk_members(tar, reader, path, dest), "generative bundle"))


def _walk_members(tar: tarfile.TarFile, reader: OnePassReader, path: Path, dest: Path | None) -> GenManifest:
    origin = str(path)
    members = _members(tar, origin)
    manifest = _open_manifest(tar, members, origin)
    expected = iter(manifest.members)
    for info in members:
        want = next(expected, None)
        if want is None or info.name != PREFIX + want:
            raise BundleError(f"{origin}: unexpected member {info.name[:80]!r} (expected "
                              f"{(PREFIX + want) if want else 'the end of the archive'})")
        entry = manifest.files[want]
        if info.size != entry.length:
            raise VerificationError(f"{path.name}:{info.name}: {info.size} bytes, the manifest "
                                    f"declares {entry.length}")
        reader.seek(info.offset_data)  # a plain member's bytes, straight from the file's buffers
        _copy(reader, dest / want if dest is not None else None, entry, f"{path.name}:{info.name}")
    missing = next(expected, None)
    if missing is not None:
        raise BundleError(f"{origin}: member {PREFIX}{missing} listed in the manifest is missing")
    return manifest


def _copy(reader: OnePassReader, out: Path | None, entry: FileEntry, where: str) -> None:
    if out is None:
        reader.copy_part(entry.length, None, entry.sha256, where=where, against="the manifest")
        return
    with out.open("xb") as handle:  # x: a name listed twice cannot overwrite a checked file
        reader.copy_part(entry.length, handle, entry.sha256, where=where, against="the manifest")


def is_generative_bundle(path: Path) -> bool:
    """Whether ``path`` looks like a generative bundle (its manifest has a ``kind``)."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            first = tar.next()
            if first is None or first.name != MANIFEST or not first.isreg() or first.size > MAX_MANIFEST:
                return False
            src = tar.extractfile(first)
            data = json.loads(src.read()) if src is not None else None
    except (OSError, tarfile.TarError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("kind") in ("llm", "embedding")


def read_gen_manifest(path: Path) -> GenManifest:
    """Only the manifest of a bundle file (for inspect); members are not checked.

    Raises:
        NotFoundError, BundleError.
    """
    if not path.is_file():
        raise NotFoundError(f"{path}: no such bundle file")
    try:
        with tarfile.open(path, mode="r:") as tar:
            return _open_manifest(tar, _members(tar, str(path)), str(path))
    except tarfile.TarError as exc:
        raise BundleError(f"{path}: not a generative bundle (unreadable archive: {exc})") from None


def verify_bundle(path: Path) -> GenManifest:
    """Check a bundle file: structure, manifest, every member's length and sha256 (streaming).

    Raises:
        NotFoundError, BundleError, VerificationError.
    """
    return _walk(path, None).manifest


def verify_bundle_hashed(path: Path) -> Walked:
    """:func:`verify_bundle`, also returning the sha256 and length of the file taken from the
    same single read.

    Raises:
        NotFoundError, BundleError, VerificationError.
    """
    return _walk(path, None)


def extract_bundle(path: Path, dest: Path) -> GenManifest:
    """Check a bundle file and write its members into the existing, empty directory ``dest``
    in one streaming pass.  On an error ``dest`` holds part of the members: the caller
    deletes it.

    Raises:
        NotFoundError, BundleError, VerificationError.
    """
    return _walk(path, dest).manifest


def extract_bundle_hashed(path: Path, dest: Path) -> Walked:
    """:func:`extract_bundle`, also returning the sha256 and length of the file taken from
    the same single read (what an install records as the bundle's hash).

    Raises:
        NotFoundError, BundleError, VerificationError.
    """
    return _walk(path, dest)
