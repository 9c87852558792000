"""Where the node looks for its registry: configured sources, then removable media.

``[updates] sources`` lists site URLs and directories, tried in the order given.  After
them come registries found on mounted removable media: every path matching
``[updates] mount_glob`` that holds a published registry tree, or whose immediate
subdirectory does (an operator copies ``published/`` onto a stick under any name).  A tree
is recognised by its layout only (``metadata/1.root.json`` or ``metadata/root.json``,
``metadata/timestamp.json`` and ``targets/``); what it contains is trusted only once the
TUF client verified it against the node's root, like any other source.
"""

from __future__ import annotations

import glob
import logging
from pathlib import Path

from agent.config import UpdatesSection

__all__ = ["is_published_tree", "media_sources", "registry_sources"]

log = logging.getLogger(__name__)


def is_published_tree(path: Path) -> bool:
    """Whether ``path`` looks like a published registry tree (layout only, nothing verified)."""
    meta = path / "metadata"
    try:
        return ((meta / "1.root.json").is_file() or (meta / "root.json").is_file()) and \
            (meta / "timestamp.json").is_file() and (path / "targets").is_dir()
    except OSError:  # an unreadable mount point is not a registry
        return False


def media_sources(mount_glob: str) -> list[str]:
    """Published trees at, or one level below, each path matching ``mount_glob`` (sorted)."""
    if not mount_glob:
        return []
    found: list[str] = []
    for match in sorted(glob.glob(mount_glob)):  # noqa: PTH207 - an absolute pattern
        base = Path(match)
        if is_published_tree(base):
            found.append(str(base))
            continue
        try:
            children = sorted(p for p in base.iterdir() if p.is_dir())
        except OSError:
            continue
        found.extend(str(child) for child in children if is_published_tree(child))
    return found


def registry_sources(settings: UpdatesSection) -> list[str]:
    """Configured sources in order, then registries on removable media (no duplicates)."""
    out: list[str] = []
    for source in (*settings.sources, *media_sources(settings.mount_glob)):
        if source not in out:
            out.append(source)
    return out
