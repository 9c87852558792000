"""Protocol definitions of the agent's gRPC services.

The ``.proto`` files here are the source; the ``*_pb2*.py`` modules are generated from them,
never edited by hand.  A wheel carries them pre-built (``setup.py`` runs :func:`generate`);
in a source checkout they are (re)built on first import when a ``.proto`` is newer than its
module, so a fresh clone needs no extra step.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

__all__ = ["PRIVATE_POOL_PROTOS", "PROTO_DIR", "ensure_generated", "generate"]

PROTO_DIR = Path(__file__).resolve().parent
_ROOT = PROTO_DIR.parent.parent


# Protos whose generated modules register into agent.proto._pool.POOL instead of protobuf's
# default pool: Triton's client registers the same `inference.*` names in the default pool,
# and a process (tests, benchmarks, operator tools) may hold both.
PRIVATE_POOL_PROTOS = ("grpc_service", "model_config")
_DEFAULT_POOL_CALL = "_descriptor_pool.Default().AddSerializedFile("
_PRIVATE_POOL_CALL = "__import__('agent.proto._pool', fromlist=['POOL']).POOL.AddSerializedFile("


def _use_private_pool(module: Path) -> None:
    text = module.read_text()
    if _DEFAULT_POOL_CALL not in text:
        raise RuntimeError(f"{module}: generated code has an unexpected shape (no default-pool call)")
    module.write_text(text.replace(_DEFAULT_POOL_CALL, _PRIVATE_POOL_CALL))


def _outputs(proto: Path) -> list[Path]:
    stem = proto.stem
    return [PROTO_DIR / f"{stem}_pb2.py", PROTO_DIR / f"{stem}_pb2.pyi", PROTO_DIR / f"{stem}_pb2_grpc.py"]


_GENCODE_RE = re.compile(r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+),")


def _runtime() -> tuple[int, ...]:
    from google.protobuf import __version__ as protobuf_version

    return tuple(int(p) for p in re.findall(r"\d+", protobuf_version)[:3])


def _gencode_too_new(module: Path) -> bool:
    """Whether ``module`` was generated for a newer protobuf than this runtime (it won't load)."""
    match = _GENCODE_RE.search(module.read_text())
    return bool(match) and tuple(int(g) for g in match.groups()) > _runtime()


def _stale() -> list[Path]:
    """Protos whose modules are missing, older than the .proto, or built for a newer protobuf."""
    stale = []
    for proto in sorted(PROTO_DIR.glob("*.proto")):
        outs = _outputs(proto)
        mtime = proto.stat().st_mtime
        if not all(out.exists() and out.stat().st_mtime >= mtime for out in outs) \
                or _gencode_too_new(outs[0]):
            stale.append(proto)
    return stale


def generate(target_root: Path | None = None) -> None:
    """Compile every .proto here into Python modules under ``target_root`` (default: in place).

    Raises:
        RuntimeError: grpcio-tools is missing or protoc reports an error.
    """
    try:
        from grpc_tools import protoc
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "generated gRPC modules are missing and grpcio-tools is not installed; "
            "install the package from a wheel or `pip install grpcio-tools`"
        ) from exc
    import grpc_tools

    dest_root = target_root or _ROOT
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    protos = [str(p.relative_to(_ROOT)) for p in sorted(PROTO_DIR.glob("*.proto"))]
    if not protos:
        return
    with tempfile.TemporaryDirectory(dir=PROTO_DIR) as tmp:
        argv = [
            "grpc_tools.protoc",
            f"-I{_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *protos,
        ]
        if protoc.main(argv) != 0:
            raise RuntimeError(f"protoc failed on {', '.join(protos)}")
        out_dir = Path(tmp) / "agent" / "proto"
        final = dest_root / "agent" / "proto"
        final.mkdir(parents=True, exist_ok=True)
        for name in PRIVATE_POOL_PROTOS:
            if (out_dir / f"{name}_pb2.py").exists():
                _use_private_pool(out_dir / f"{name}_pb2.py")
        for produced in sorted(out_dir.iterdir()):
            produced.replace(final / produced.name)



def ensure_generated() -> None:
    """Build the generated modules if any is missing, older than its .proto, or too new.

    Where grpcio-tools is absent (a node, installed from a wheel) modules that exist are
    used as they are: an installed wheel's file times say nothing.
    """
    stale = _stale()
    if not stale:
        return
    try:
        import grpc_tools  # noqa: F401
    except ImportError:
        if all(_outputs(p)[0].exists() and not _gencode_too_new(_outputs(p)[0]) for p in stale):
            return
        raise
    generate()


if not getattr(sys, "frozen", False) and os.access(PROTO_DIR, os.W_OK):
    ensure_generated()
