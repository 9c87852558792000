"""--help teaches: every command ends with real examples, every argument says what it is."""

from __future__ import annotations

import argparse
import shlex

import pytest

from provisioning.cli import build_parser


def _parsers(parser: argparse.ArgumentParser,
             words: tuple[str, ...] = ()) -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(" ".join(words), parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found += _parsers(child, (*words, name))
    return found


PARSERS = _parsers(build_parser())[1:]  # every command and command group below `appliance`


@pytest.mark.parametrize(("command", "parser"), PARSERS, ids=[c for c, _ in PARSERS])
def test_help_ends_with_an_example_of_that_command(command: str, parser: argparse.ArgumentParser) -> None:
    assert parser.epilog and parser.epilog.startswith("examples:\n"), f"appliance {command}: no examples"
    lines = parser.epilog.splitlines()[1:]
    top = command.split(maxsplit=1)[0]
    assert lines and all(ln.strip().startswith(f"appliance {top}") for ln in lines), lines
    assert parser.format_help().rstrip().endswith(lines[-1].rstrip())  # kept as written
    for line in lines:  # a real example: the parser takes it as written
        build_parser().parse_args(shlex.split(line)[1:])


@pytest.mark.parametrize(("command", "parser"), PARSERS, ids=[c for c, _ in PARSERS])
def test_every_argument_has_help_and_plain_defaults(command: str, parser: argparse.ArgumentParser) -> None:
    missing = [a.dest for a in parser._actions
               if not a.help and not isinstance(a, argparse._SubParsersAction)]
    assert not missing, f"appliance {command}: no help for {missing}"
    text = parser.format_help()
    assert "PosixPath(" not in text
    for line in text.splitlines():
        assert line.count("(default") <= 1, line
    assert " ".join(text.split()).count("(default") <= len([a for a in parser._actions if a.help])
