"""The ``appliance`` command: one entry point, subcommands registered by their modules.

Each module in :data:`COMMAND_MODULES` exposes ``register(subparsers)``, which adds its
parsers and sets ``handler`` on them.  A handler takes the parsed arguments and returns an
exit code.  This is the one place where :class:`~agent.errors.ApplianceError` becomes an
exit code and a one-line message; tracebacks appear only with ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from agent import __version__
from agent.cli import setup_logging
from agent.errors import AccessDeniedError, ApplianceError, NotFoundError
from provisioning.output import emit_json

__all__ = ["COMMAND_MODULES", "build_parser", "main"]

log = logging.getLogger("appliance")

# Order here is the order of `appliance --help`.
COMMAND_MODULES: tuple[str, ...] = (
    "provisioning.commands.demo",
    "provisioning.commands.bundle",
    "provisioning.commands.registry",
    "provisioning.commands.agent",
    "provisioning.commands.node",
    "provisioning.commands.image",
    "provisioning.commands.boot",
    "provisioning.commands.fleet",
    "provisioning.commands.pki",
)

Handler = Callable[[argparse.Namespace], int]


def _common(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="echo tool commands, show tracebacks")
    parser.add_argument("--json", action="store_true", default=default, help="print machine-readable JSON")


def build_parser() -> argparse.ArgumentParser:
    """The full parser, with every command module registered.

    ``--debug`` and ``--json`` work before and after the subcommand: the top level sets them to
    False, and the subcommands' copies set them only when given (a default there would
    overwrite the top level's True).
    """
    common = argparse.ArgumentParser(add_help=False)
    _common(common, argparse.SUPPRESS)
    top = argparse.ArgumentParser(add_help=False)
    _common(top, False)
    parser = argparse.ArgumentParser(
        prog="appliance",
        description="Build, sign, serve and manage sovereign AI appliances (no network needed).",
        parents=[top],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub, common)
    return parser


def _path_error(exc: OSError) -> ApplianceError:
    """A path the user named is missing, of the wrong kind or not ours to touch: their error."""
    text = f"{exc.filename}: {exc.strerror}"
    if isinstance(exc, FileNotFoundError | NotADirectoryError):
        return NotFoundError(text)
    if isinstance(exc, PermissionError):
        return AccessDeniedError(text)
    return ApplianceError(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.debug)
    handler: Handler = args.handler
    try:
        try:
            return handler(args)
        except OSError as exc:
            if exc.filename is None:
                raise
            raise _path_error(exc) from exc
    except ApplianceError as exc:
        if args.debug:
            log.exception("appliance: error")
        print(f"appliance: error: {exc}", file=sys.stderr)
        if args.json:  # a script reading stdout gets a document, not nothing
            emit_json({"error": str(exc), "kind": type(exc).__name__, "exit_code": exc.exit_code})
        return exc.exit_code
    except KeyboardInterrupt:
        print("appliance: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
