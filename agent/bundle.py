"""The model bundle: one deterministic file with a manifest, an ONNX model and golden vectors.

Layout (an uncompressed ustar archive, members in this order, each owned by 0:0, mode 0644,
mtime 0, so the same inputs always give the same bytes)::

    manifest.json   canonical JSON (sorted keys, no spaces): see :class:`Manifest`
    model.onnx      the model
    golden.json     golden vectors: inputs, expected outputs (tolerances in the manifest)

The manifest lists the sha256 and length of the other two members.  Reading a bundle checks
the archive's shape, parses the manifest (errors name the file, the field and the value) and
checks every member against its hash and length while it streams, in one read of the file
that also takes the sha256 of the whole file (:class:`agent.fsutil.OnePassReader`): the hash
recorded for an install is that of the bytes checked and unpacked.
A bundle reaching a node has already passed TUF verification as a whole file; these checks
are the second, independent layer and the only one for ``appliance bundle verify``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import re
import tarfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from agent.dtypes import by_kserve
from agent.errors import BundleError, NotFoundError, VerificationError
from agent.fsutil import OnePassReader, copy_verified, read_tar_once

__all__ = [
    "FORMAT",
    "GOLDEN",
    "MANIFEST",
    "MODEL",
    "Accelerator",
    "Batching",
    "Bundle",
    "FileEntry",
    "GoldenCase",
    "Manifest",
    "TensorSpec",
    "Tolerance",
    "check_golden",
    "decode_golden",
    "encode_golden",
    "extract_bundle",
    "parse_version",
    "read_bundle",
    "read_manifest",
    "tar_entry",
    "valid_name",
    "write_bundle",
]

FORMAT = 1
MANIFEST = "manifest.json"
MODEL = "model.onnx"
GOLDEN = "golden.json"
MEMBERS = (MANIFEST, MODEL, GOLDEN)
MAX_MANIFEST = 1 << 20  # 1 MiB: a manifest is small; a larger one is an attack or a mistake
MAX_GOLDEN = 256 << 20
MAX_MODEL = 16 << 30
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_CUDA_RE = re.compile(r"^[0-9]{1,2}\.[0-9]{1,2}$")
_VERSION_RE = re.compile(r"^\d{1,9}(\.\d{1,9}){0,3}$")
_CHUNK = 1 << 20


def valid_name(text: str) -> bool:
    """Whether ``text`` is a possible bundle name (also safe as one path component)."""
    return bool(_NAME_RE.match(text))


def parse_version(text: str) -> tuple[int, ...]:
    """``"1.2.0"`` -> ``(1, 2, 0)``; versions compare as integer tuples.

    Raises:
        ValueError: not 1 to 4 dot-separated decimal numbers.
    """
    if not _VERSION_RE.match(text):
        raise ValueError(f"version {text!r} is not 1-4 dot-separated numbers such as 1.2.0")
    return tuple(int(part) for part in text.split("."))


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # KServe name
    shape: tuple[int, ...]  # -1 for a dynamic dimension


@dataclass(frozen=True)
class Batching:
    """Dynamic batching settings; ``max_batch_size`` 0 means the model is not batched."""

    max_batch_size: int = 0
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()


@dataclass(frozen=True)
class Accelerator:
    """What the model needs: providers in order of preference, and whether a GPU is a must."""

    providers: tuple[str, ...] = ("CUDAExecutionProvider", "CPUExecutionProvider")
    requires_gpu: bool = False
    min_cuda: str = ""
    tf32: bool = False
    """The outputs stay within the tolerance when CUDA runs FP32 matrix products in TF32
    (10-bit mantissa).  Off by default: the node then computes in full FP32, as the golden
    vectors were made."""


@dataclass(frozen=True)
class Tolerance:
    atol: float = 1e-5
    rtol: float = 1e-4


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    length: int


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    files: Mapping[str, FileEntry]
    batching: Batching = field(default_factory=Batching)
    accelerator: Accelerator = field(default_factory=Accelerator)
    tolerance: Tolerance = field(default_factory=Tolerance)
    description: str = ""
    format: int = FORMAT

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return parse_version(self.version)

    @property
    def data_files(self) -> frozenset[str]:
        """The members a model may read tensor data from (its hashed files other than the
        model and the golden vectors; this format has none, so every external reference is
        refused)."""
        return frozenset(self.files) - {MODEL, GOLDEN}

    def to_json(self) -> dict[str, Any]:
        """The manifest as plain JSON data (the exact form stored in the bundle)."""
        data = asdict(self)
        data["files"] = {k: asdict(v) for k, v in sorted(self.files.items())}
        if not self.accelerator.tf32:  # written only when set: bundles made before the key
            del data["accelerator"]["tf32"]  # keep their bytes, and older agents read the rest
        return data

    def canonical(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class GoldenCase:
    inputs: Mapping[str, np.ndarray[Any, Any]]
    outputs: Mapping[str, np.ndarray[Any, Any]]


# ---------------------------------------------------------------- manifest parsing

class _Fields:
    """Reads typed fields out of JSON data, raising BundleError naming file, field and value."""

    def __init__(self, origin: str) -> None:
        self.origin = origin

    def fail(self, where: str, problem: str) -> BundleError:
        return BundleError(f"{self.origin}: {where}: {problem}")

    def get(self, data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str,
            default: Any = ...) -> Any:
        if key not in data:
            if default is ...:
                raise self.fail(f"{where}{key}", "missing")
            return default
        value = data[key]
        if isinstance(value, bool) and kind in (int, float, (int, float)):
            raise self.fail(f"{where}{key}", f"expected a number, got {value!r}")
        if not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise self.fail(f"{where}{key}", f"expected {names}, got {value!r}")
        return value

    def only(self, data: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise self.fail(where or "manifest", f"unknown field(s) {', '.join(unknown)}")


# Largest fixed dimension a manifest may declare (int32's maximum: far beyond any real
# tensor, and safely inside the int64 the inference protocol carries shapes in).
MAX_DIM = 2**31 - 1


def _tensor(f: _Fields, data: Any, where: str) -> TensorSpec:
    if not isinstance(data, dict):
        raise f.fail(where, f"expected an object, got {data!r}")
    f.only(data, ("name", "datatype", "shape"), where)
    name = f.get(data, "name", str, where + ".")
    datatype = f.get(data, "datatype", str, where + ".")
    try:
        by_kserve(datatype)
    except KeyError as exc:
        raise f.fail(where + ".datatype", str(exc.args[0])) from None
    shape = f.get(data, "shape", list, where + ".")
    if not all(isinstance(d, int) and not isinstance(d, bool) and -1 <= d <= MAX_DIM for d in shape):
        shown = repr(shape) if len(repr(shape)) <= 200 else repr(shape)[:200] + "..."
        raise f.fail(where + ".shape", f"dimensions must be -1 (any) or 0..{MAX_DIM}, got {shown}")
    return TensorSpec(name, datatype, tuple(shape))


def _json(raw: bytes) -> Any:
    """``json.loads``, with every way it refuses input as ValueError: bad UTF-8, bad JSON,
    an integer of more than 4300 digits, and nesting deeper than the parser goes."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("arrays or objects nested too deeply") from None


def _parse_manifest(raw: bytes, origin: str) -> Manifest:
    f = _Fields(origin)
    try:
        data = _json(raw)
    except ValueError as exc:
        raise BundleError(f"{origin}: manifest.json is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{origin}: manifest.json must hold an object")
    f.only(data, ("format", "name", "version", "inputs", "outputs", "files", "batching",
                  "accelerator", "tolerance", "description"), "")
    fmt = f.get(data, "format", int, "")
    if fmt != FORMAT:
        raise f.fail("format", f"unsupported bundle format {fmt} (this agent reads {FORMAT})")
    name = f.get(data, "name", str, "")
    if not _NAME_RE.match(name):
        raise f.fail("name", f"{name!r} is not a lowercase name of 1-64 characters [a-z0-9._-]")
    version = f.get(data, "version", str, "")
    try:
        parse_version(version)
    except ValueError as exc:
        raise f.fail("version", str(exc)) from None
    inputs = tuple(_tensor(f, t, f"inputs[{i}]") for i, t in enumerate(f.get(data, "inputs", list, "")))
    outputs = tuple(_tensor(f, t, f"outputs[{i}]") for i, t in enumerate(f.get(data, "outputs", list, "")))
    if not inputs or not outputs:
        raise f.fail("inputs/outputs", "a model needs at least one input and one output")
    for kind, specs in (("inputs", inputs), ("outputs", outputs)):
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise f.fail(kind, f"duplicate tensor names in {names}")
    files = _parse_files(f, f.get(data, "files", dict, ""))
    batching = _parse_batching(f, f.get(data, "batching", dict, "", {}), inputs + outputs)
    a = f.get(data, "accelerator", dict, "", {})
    f.only(a, ("providers", "requires_gpu", "min_cuda", "tf32"), "accelerator")
    providers = f.get(a, "providers", list, "accelerator.", list(Accelerator.providers))
    if not providers or not all(isinstance(p, str) and p.endswith("ExecutionProvider")
                                for p in providers):
        raise f.fail("accelerator.providers",
                     f"a list of ONNX Runtime provider names (...ExecutionProvider), got {providers!r}")
    min_cuda = f.get(a, "min_cuda", str, "accelerator.", "")
    if min_cuda and not _CUDA_RE.match(min_cuda):
        raise f.fail("accelerator.min_cuda", f"a CUDA version such as 12.4, got {min_cuda!r}")
    accelerator = Accelerator(
        tuple(providers),
        f.get(a, "requires_gpu", bool, "accelerator.", False),
        min_cuda,
        f.get(a, "tf32", bool, "accelerator.", False),
    )
    t = f.get(data, "tolerance", dict, "", {})
    f.only(t, ("atol", "rtol"), "tolerance")
    tolerance = Tolerance(_finite(f, t, "atol", 1e-5), _finite(f, t, "rtol", 1e-4))
    description = f.get(data, "description", str, "", "")
    return Manifest(name, version, inputs, outputs, files, batching, accelerator, tolerance,
                    description, fmt)


def _finite(f: _Fields, t: Mapping[str, Any], key: str, default: float) -> float:
    """A tolerance as a finite float (JSON allows integers no float holds, and NaN)."""
    value = f.get(t, key, (int, float), "tolerance.", default)
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise f.fail(f"tolerance.{key}", f"expected a finite number, got {str(value)[:40]}")
    return number


def _parse_files(f: _Fields, files_raw: dict[str, Any]) -> dict[str, FileEntry]:
    if set(files_raw) != {MODEL, GOLDEN}:
        raise f.fail("files", f"must list exactly {MODEL} and {GOLDEN}, got {sorted(files_raw)}")
    files: dict[str, FileEntry] = {}
    for member, entry in sorted(files_raw.items()):
        where = f"files.{member}."
        if not isinstance(entry, dict):
            raise f.fail(where[:-1], f"expected an object, got {entry!r}")
        f.only(entry, ("sha256", "length"), where[:-1])
        digest = f.get(entry, "sha256", str, where)
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise f.fail(where + "sha256", f"not a sha256 hex digest: {digest!r}")
        length = f.get(entry, "length", int, where)
        if length < 0:
            raise f.fail(where + "length", f"negative length {length}")
        files[member] = FileEntry(digest, length)
    return files


def _parse_batching(f: _Fields, b: dict[str, Any], tensors: tuple[TensorSpec, ...]) -> Batching:
    f.only(b, ("max_batch_size", "max_queue_delay_us", "preferred_batch_sizes"), "batching")
    batching = Batching(
        f.get(b, "max_batch_size", int, "batching.", 0),
        f.get(b, "max_queue_delay_us", int, "batching.", 0),
        tuple(f.get(b, "preferred_batch_sizes", list, "batching.", [])),
    )
    if batching.max_batch_size < 0 or batching.max_queue_delay_us < 0:
        raise f.fail("batching", "sizes and delays must not be negative")
    if any(not isinstance(p, int) or not 0 < p <= batching.max_batch_size
           for p in batching.preferred_batch_sizes):
        raise f.fail("batching.preferred_batch_sizes",
                     f"each must be in 1..max_batch_size, got {list(batching.preferred_batch_sizes)}")
    if batching.max_batch_size and any(not s.shape or s.shape[0] != -1 for s in tensors):
        raise f.fail("batching.max_batch_size",
                     "batching needs a dynamic first dimension on every tensor")
    return batching


# ---------------------------------------------------------------- golden vectors

def _encode_array(array: np.ndarray[Any, Any], datatype: str) -> dict[str, Any]:
    shape = list(array.shape)
    if datatype == "BYTES":
        items = [x if isinstance(x, bytes) else str(x).encode() for x in array.reshape(-1).tolist()]
        return {"datatype": datatype, "shape": shape,
                "data": [base64.b64encode(x).decode() for x in items]}
    dt = by_kserve(datatype).numpy.newbyteorder("<")
    raw = np.ascontiguousarray(array, dtype=dt).tobytes()
    return {"datatype": datatype, "shape": shape, "data": base64.b64encode(raw).decode()}


def _decode_array(data: Any, where: str) -> np.ndarray[Any, Any]:
    if not isinstance(data, dict) or set(data) != {"datatype", "shape", "data"}:
        raise BundleError(f"golden.json: {where}: expected datatype, shape and data")
    try:
        dtype = by_kserve(data["datatype"])
        shape = tuple(int(d) for d in data["shape"])
        if data["datatype"] == "BYTES":
            items = [base64.b64decode(x, validate=True) for x in data["data"]]
            array = np.empty(len(items), dtype=object)
            array[:] = items
            return array.reshape(shape)
        raw = base64.b64decode(data["data"], validate=True)
        return np.frombuffer(raw, dtype=dtype.numpy.newbyteorder("<")).astype(dtype.numpy).reshape(shape)
    except (KeyError, ValueError, TypeError, OverflowError) as exc:  # Overflow: a dimension of 1e999
        raise BundleError(f"golden.json: {where}: {exc}") from None


def encode_golden(cases: Sequence[GoldenCase], manifest_specs: Mapping[str, str]) -> bytes:
    """Golden cases as canonical JSON; ``manifest_specs`` maps tensor name to KServe datatype."""
    doc = [
        {
            "inputs": {n: _encode_array(a, manifest_specs[n]) for n, a in sorted(c.inputs.items())},
            "outputs": {n: _encode_array(a, manifest_specs[n]) for n, a in sorted(c.outputs.items())},
        }
        for c in cases
    ]
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def decode_golden(raw: bytes) -> list[GoldenCase]:
    """Parse golden.json. Raises BundleError naming the case and tensor that is malformed."""
    try:
        doc = _json(raw)
    except ValueError as exc:
        raise BundleError(f"golden.json is not valid JSON: {exc}") from None
    if not isinstance(doc, list) or not doc:
        raise BundleError("golden.json must hold a non-empty list of cases")
    cases = []
    for i, case in enumerate(doc):
        if not isinstance(case, dict) or set(case) != {"inputs", "outputs"} \
                or not all(isinstance(case[k], dict) for k in case):
            raise BundleError(f"golden.json: case {i}: expected inputs and outputs, each an object")
        cases.append(GoldenCase(
            {n: _decode_array(a, f"case {i} input {n}") for n, a in case["inputs"].items()},
            {n: _decode_array(a, f"case {i} output {n}") for n, a in case["outputs"].items()},
        ))
    return cases


Runner = Callable[[Mapping[str, np.ndarray[Any, Any]]], Mapping[str, np.ndarray[Any, Any]]]


def check_golden(manifest: Manifest, cases: Sequence[GoldenCase], run: Runner) -> None:
    """Run every golden case through ``run`` and compare with the expected outputs.

    Floats compare within the manifest's tolerances (NaN equals NaN); everything else exactly.

    Raises:
        BundleError: an output is missing, has the wrong shape, or differs beyond tolerance.
    """
    tol = manifest.tolerance
    for i, case in enumerate(cases):
        got = run(case.inputs)
        for name, want in case.outputs.items():
            where = f"{manifest.name} {manifest.version}: golden case {i}, output {name!r}"
            if name not in got:
                raise BundleError(f"{where}: the model produced no such output")
            have = np.asarray(got[name])
            if have.shape != want.shape:
                raise BundleError(f"{where}: shape {list(have.shape)}, expected {list(want.shape)}")
            if want.dtype.kind in "fc":
                ok = np.allclose(have.astype(np.float64), want.astype(np.float64),
                                 atol=tol.atol, rtol=tol.rtol, equal_nan=True)
                if not ok:
                    diff = float(np.nanmax(np.abs(have.astype(np.float64) - want.astype(np.float64))))
                    raise BundleError(f"{where}: differs by up to {diff:.3g} "
                                      f"(atol {tol.atol:g}, rtol {tol.rtol:g})")
            elif want.dtype == object:
                if [bytes(x) for x in have.reshape(-1)] != [bytes(x) for x in want.reshape(-1)]:
                    raise BundleError(f"{where}: BYTES values differ")
            elif not np.array_equal(have, want):
                raise BundleError(f"{where}: values differ")


# ---------------------------------------------------------------- reading and writing

def tar_entry(name: str, size: int) -> tarfile.TarInfo:
    """A regular-file tar header that is the same on every machine (0:0, 0644, mtime 0)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def write_bundle(out: IO[bytes], manifest: Manifest, model: bytes, golden: bytes) -> None:
    """Write a bundle to ``out``; the manifest's file entries must match ``model``/``golden``."""
    for member, data in ((MODEL, model), (GOLDEN, golden)):
        entry = manifest.files[member]
        if entry.length != len(data) or entry.sha256 != hashlib.sha256(data).hexdigest():
            raise BundleError(f"internal: manifest entry for {member} does not match its data")
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in ((MANIFEST, manifest.canonical()), (MODEL, model), (GOLDEN, golden)):
            tar.addfile(tar_entry(member, len(data)), io.BytesIO(data))


@dataclass(frozen=True)
class Bundle:
    """A bundle file whose structure, manifest and member hashes have been checked."""

    path: Path
    manifest: Manifest
    sha256: str  # of the whole file: the TUF target hash
    length: int

    def read_model(self) -> bytes:
        return _read_member(self.path, MODEL, self.manifest.files[MODEL])

    def golden_cases(self) -> list[GoldenCase]:
        return decode_golden(_read_member(self.path, GOLDEN, self.manifest.files[GOLDEN]))

    def extract(self, dest: Path) -> None:
        """Write manifest.json, model.onnx and golden.json into ``dest``, reading the file once
        more (every member re-checked).

        Raises:
            BundleError, VerificationError: the file no longer holds this bundle; ``dest`` may
                hold part of it (the caller discards it).
        """
        again = extract_bundle(self.path, dest)
        if (again.sha256, again.length) != (self.sha256, self.length):
            raise VerificationError(f"{self.path}: changed since it was checked (sha256 {self.sha256} "
                                    f"then {again.sha256})")


def _copy_checked(src: IO[bytes], out: IO[bytes] | None, entry: FileEntry, where: str) -> None:
    copy_verified(src, out, entry.length, entry.sha256, where=where, against="the manifest", block=_CHUNK)


def _read_member(path: Path, member: str, entry: FileEntry) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(path, mode="r:") as tar:
        src = tar.extractfile(member)
        if src is None:
            raise BundleError(f"{path}: {member} is missing")
        _copy_checked(src, buf, entry, f"{path.name}:{member}")
    return buf.getvalue()


def read_bundle(path: Path) -> Bundle:
    """Open and check a bundle file: its shape, its manifest, each member against the manifest
    and the sha256 of the whole file, all from one read of it.

    Raises:
        NotFoundError: the file does not exist.
        BundleError: not a bundle, or a malformed manifest.
        VerificationError: a member's length or sha256 differs from the manifest.
    """
    return _walk(Path(path), None)


def extract_bundle(path: Path, dest: Path) -> Bundle:
    """:func:`read_bundle`, writing manifest.json, model.onnx and golden.json into ``dest``
    (created if missing) in the same read: the file's sha256, the manifest and the members
    written all come from the same bytes.

    Raises:
        As :func:`read_bundle`; ``dest`` may then hold part of the members (the caller
        discards it).
    """
    dest.mkdir(parents=True, exist_ok=True)
    bundle = _walk(Path(path), dest)
    (dest / MANIFEST).write_bytes(bundle.manifest.canonical())
    return bundle


def read_manifest(path: Path) -> Manifest:
    """Only the manifest of a bundle file (the archive's first member), to know where it goes;
    the members are not checked.

    Raises:
        NotFoundError, BundleError.
    """
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{path}: no such bundle file")
    try:
        with tarfile.open(path, mode="r:") as tar:
            first = tar.next()
            if first is None or first.name != MANIFEST or first.type not in (tarfile.REGTYPE,
                                                                              tarfile.AREGTYPE):
                raise BundleError(f"{path}: not a model bundle: the first member must be {MANIFEST}")
            return _read_manifest(tar, first, path)
    except tarfile.TarError as exc:
        raise BundleError(f"{path}: not a model bundle (unreadable archive: {exc})") from None


def _walk(path: Path, dest: Path | None) -> Bundle:
    """One read of a bundle file (:func:`~agent.fsutil.read_tar_once`): members are checked,
    hashed (and written into ``dest``) as they come, and the whole file is hashed on the way."""
    manifest, sha256, length = read_tar_once(
        path, lambda tar, reader: _walk_members(tar, reader, path, dest), "model bundle")
    return Bundle(path, manifest, sha256, length)


def _walk_members(tar: tarfile.TarFile, reader: OnePassReader, path: Path, dest: Path | None) -> Manifest:
    seen: list[str] = []
    manifest: Manifest | None = None
    for info in iter(tar.next, None):
        seen.append(info.name)
        if tuple(seen) != MEMBERS[:len(seen)]:
            break
        # Plain files only: a sparse member's bytes are not the stored bytes at its offset.
        if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or info.sparse is not None:
            raise BundleError(f"{path}: member {info.name} is not a regular file")
        if manifest is None:
            manifest = _read_manifest(tar, info, path)
            continue
        entry = manifest.files[info.name]
        if info.size != entry.length:
            raise VerificationError(f"{path.name}:{info.name}: {info.size} bytes, manifest "
                                    f"declares {entry.length}")
        reader.seek(info.offset_data)  # the member's bytes, straight from the reader's buffers
        where = f"{path.name}:{info.name}"
        if dest is None:
            reader.copy_part(entry.length, None, entry.sha256, where=where, against="the manifest")
            continue
        with (dest / info.name).open("wb") as out:
            reader.copy_part(entry.length, out, entry.sha256, where=where, against="the manifest")
    if tuple(seen) != MEMBERS or manifest is None:
        raise BundleError(f"{path}: not a model bundle: members {[n[:80] for n in seen]}, "
                          f"expected {list(MEMBERS)}")
    return manifest


def _read_manifest(tar: tarfile.TarFile, info: tarfile.TarInfo, path: Path) -> Manifest:
    if info.size > MAX_MANIFEST:
        raise BundleError(f"{path}: manifest.json is {info.size} bytes (limit {MAX_MANIFEST})")
    src = tar.extractfile(info)
    assert src is not None
    manifest = _parse_manifest(src.read(), f"{path}: manifest.json")
    # before any member is read: a declared size over the limit is refused without hashing it
    if manifest.files[GOLDEN].length > MAX_GOLDEN or manifest.files[MODEL].length > MAX_MODEL:
        raise BundleError(f"{path}: golden vectors or model over the size limit")
    return manifest
