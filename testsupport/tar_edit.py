"""Rewrite one JSON member of a tar archive (bundles, OS releases): the way tests forge them."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["edit_json_member"]


def edit_json_member(src: Path, dest: Path, name: str, edit: Callable[[Any], None]) -> Path:
    """Copy the archive ``src`` to ``dest`` (plain tar, the same members in the same order) with
    ``edit`` applied in place to the parsed JSON of member ``name``; return ``dest``."""
    with tarfile.open(src) as tar:
        parts = {}
        for member in tar.getmembers():
            f = tar.extractfile(member)
            assert f is not None, member.name
            parts[member.name] = f.read()
    doc = json.loads(parts[name])
    edit(doc)
    parts[name] = json.dumps(doc).encode()
    with tarfile.open(dest, "w") as tar:
        for member_name, data in parts.items():
            info = tarfile.TarInfo(member_name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return dest
