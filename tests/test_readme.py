"""README stands alone and is complete: no link leaves the repository, every command is in it."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from provisioning.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse has no public way to list them
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_no_link_or_path_leaves_the_repository() -> None:
    assert "../" not in README
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if not re.match(r"[a-z]+://", target):
            assert (ROOT / target).exists(), f"README links to {target}, which is not in the repository"


def test_every_command_is_in_the_command_table() -> None:
    table = README.split("## Commands", 1)[1].split("\n## ", 1)[0]
    first_column: dict[str, str] = {}  # command -> the first cells of its rows
    for row in table.splitlines():
        cell = row.split(" | ", 1)[0]
        for command in re.findall(r"`appliance ([a-z-]+)", cell):
            first_column[command] = first_column.get(command, "") + " " + cell
    missing = []
    for name, parser in _subparsers(build_parser()).items():
        cells = first_column.get(name)
        if cells is None:
            missing.append(name)
            continue
        # `appliance pki init|issue-node|...`, `bundle inspect F` / `verify F`: word by word.
        missing += [f"{name} {a}" for a in _subparsers(parser)
                    if not re.search(rf"(?<![a-z-]){re.escape(a)}(?![a-z-])", cells)]
    assert not missing, f"commands missing from README's command table: {missing}"
