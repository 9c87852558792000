"""AppArmor profiles for programs the image does not have, left out of it.

Debian's ``apparmor`` package (4.x, trixie on) ships about a hundred profiles for desktop
programs (browsers, chat clients, container tools) so that they may create user namespaces
when the kernel restricts them.  An appliance has none of those programs, yet
``apparmor.service`` compiles every profile in /etc/apparmor.d before ``sysinit.target`` on
the first boot, and again after every update whose kernel has other AppArmor features (the
cache is keyed by them): 18-22 s on the critical chain of a TCG boot, where the boot-times
report put it.

A profile file goes only when nothing it could confine is in the image: every profile it
declares attaches to a path, and no file, directory or link of the root matches any of them
(AppArmor's globs, alternations and variables matched over the root's own tree, a variable
as anything at all; /bin, /sbin and /lib as the /usr they link to).  Profiles entered by
name only (``lsb_release``, ``unprivileged_userns``), those of a program the image has
(``unix-chkpwd``) and the directories (abstractions, tunables, local, ...) stay.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

__all__ = ["PROFILE_DIR", "absent_program_profiles", "glob_regex", "image_paths", "prune_profiles"]

log = logging.getLogger(__name__)

PROFILE_DIR = "etc/apparmor.d"
_TOKEN = re.compile(r'"[^"]*"|\S+')


def _attachments(text: str) -> list[str | None]:
    """The attachment of each top-level profile declared in ``text`` (None: none), unquoted.

    A header starts a line and ends it with ``{``: "profile NAME [ATTACHMENT] [flags=(...)] {"
    or the older "ATTACHMENT [flags=(...)] {" (the profile named by its path).
    """
    found: list[str | None] = []
    for line in text.splitlines():
        head = line.rstrip()
        if not head.endswith("{") or not head.startswith(("profile ", "/", '"/')):
            continue
        tokens = _TOKEN.findall(head[:-1])
        if tokens[0] == "profile":
            attachment = tokens[2] if len(tokens) > 2 and tokens[2].startswith(("/", '"/')) else None
        else:
            attachment = tokens[0]
        found.append(attachment.strip('"') if attachment else None)
    return found


def glob_regex(pattern: str) -> re.Pattern[str]:
    """AppArmor's path glob as a regular expression: ``**`` any path, ``*`` and ``?`` within a
    component, ``[...]`` a class, ``{a,b}`` alternatives (nested), ``@{var}`` anything at all."""
    out: list[str] = []
    depth = 0
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("@{", i):
            i = pattern.index("}", i) + 1 if "}" in pattern[i:] else len(pattern)
            out.append(".*")
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and "]" in pattern[i + 1:]:
            close = pattern.index("]", i + 1)
            body = pattern[i + 1:close].replace("\\", "\\\\")
            out.append("[" + ("^" + body[1:] if body.startswith("^") else body) + "]")
            i = close + 1
            continue
        elif c == "{":
            depth += 1
            out.append("(?:")
        elif c == "}" and depth:
            depth -= 1
            out.append(")")
        elif c == "," and depth:
            out.append("|")
        else:
            out.append(re.escape(c))
        i += 1
    out.append(")" * depth)
    return re.compile("".join(out) + r"\Z")


_USR_MERGED = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


def image_paths(root: Path) -> set[str]:
    """Every path in ``root`` as the image names it (links not followed), with /bin, /sbin and
    /lib* also under /usr when the root links them there (merged /usr)."""
    paths: set[str] = set()
    for top, dirs, files in os.walk(root):
        base = "/" + os.path.relpath(top, root).removeprefix(".").lstrip("/")
        for name in (*dirs, *files):
            paths.add(base.rstrip("/") + "/" + name)
    for name in _USR_MERGED:
        link = root / name
        if link.is_symlink() and str(link.readlink()).strip("/") == f"usr/{name}":
            prefix = f"/usr/{name}/"
            paths |= {f"/{name}/" + p[len(prefix):] for p in paths if p.startswith(prefix)}
    return paths


def absent_program_profiles(root: Path) -> list[Path]:
    """The profile files under ``root``/etc/apparmor.d that confine only programs ``root`` lacks."""
    directory = root / PROFILE_DIR
    if not directory.is_dir():
        return []
    paths: set[str] | None = None
    absent: list[Path] = []
    for entry in sorted(directory.iterdir()):
        if entry.is_symlink() or not entry.is_file():
            continue
        attachments = _attachments(entry.read_text(errors="replace"))
        if not attachments or None in attachments:
            continue
        if paths is None:
            paths = image_paths(root)
        regexes = [glob_regex(a) for a in attachments if a is not None]
        if not any(r.match(p) for r in regexes for p in paths):
            absent.append(entry)
    return absent


def prune_profiles(root: Path) -> list[str]:
    """Remove the profiles of :func:`absent_program_profiles`; returns their file names."""
    gone = absent_program_profiles(root)
    for path in gone:
        path.unlink()
    names = [p.name for p in gone]
    if names:
        log.info("AppArmor: left out %d profiles of programs this image lacks: %s",
                 len(names), ", ".join(names))
    return names
