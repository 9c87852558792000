"""Protocol definitions of the agent's gRPC services.

The ``.proto`` files here are the source; the ``*_pb2*.py`` modules are generated from them,
never edited by hand.  A wheel carries them pre-built (``setup.py`` runs :func:`generate`);
in a source checkout they are (re)built on first import when a ``.proto`` is newer than its
module, so a fresh clone needs no extra step.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

__all__ = ["PROTO_DIR", "ensure_generated", "generate"]

PROTO_DIR = Path(__file__).resolve().parent
_ROOT = PROTO_DIR.parent.parent


def _outputs(proto: Path) -> list[Path]:
    stem = proto.stem
    return [PROTO_DIR / f"{stem}_pb2.py", PROTO_DIR / f"{stem}_pb2.pyi", PROTO_DIR / f"{stem}_pb2_grpc.py"]


def _stale() -> list[Path]:
    stale = []
    for proto in sorted(PROTO_DIR.glob("*.proto")):
        outs = _outputs(proto)
        mtime = proto.stat().st_mtime
        if not all(out.exists() and out.stat().st_mtime >= mtime for out in outs):
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
        for produced in sorted(out_dir.iterdir()):
            produced.replace(final / produced.name)


def ensure_generated() -> None:
    """Build the generated modules if any is missing or older than its .proto."""
    if _stale():
        generate()


if not getattr(sys, "frozen", False) and os.access(PROTO_DIR, os.W_OK):
    ensure_generated()
