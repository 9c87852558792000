"""``appliance-agent`` (and ``python -m agent``): the node's own entry point.

Two commands run by the image's systemd units, one at enrolment:

- ``serve``: the agent (gRPC on 8001, metrics on 8002), run by ``appliance-agent.service``;
- ``os-install``: as root, run by ``appliance-os-update.service``: verify the OS release the
  agent staged and write it to the inactive root slot;
- ``attest-key``: as root, run by ``enroll.yml``: make the TPM attestation key once and write
  its public area for the site CA.

Flags and /etc/appliance/agent.toml come from the same table (agent.config); a flag given
on the command line overrides the file.  The operator's ``appliance agent ...`` registers
the same parsers (:func:`add_commands`), so both spell the flags and help alike.  This module
is where the node's :class:`~agent.errors.ApplianceError` becomes an exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent import __version__
from agent.config import (
    DEFAULT_CONFIG_PATH,
    AgentConfig,
    AttestSection,
    InferenceSection,
    ServerSection,
    load_config,
)
from agent.cpu import EXIT_CPU_BELOW_LEVEL, LEVELS, refusal
from agent.errors import ApplianceError, NotFoundError
from agent.lifecycle import setup_logging
from agent.settings import add_flags, apply_flags

__all__ = ["add_commands", "build_parser", "config_from_args", "main", "setup_logging"]

log = logging.getLogger("appliance-agent")

Handler = Callable[[argparse.Namespace], int]


def _tries(text: str) -> int:
    """``--tries``: systemd-boot's try counter, 1 to 9 (0 would never boot the release at all)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= 9:
        raise argparse.ArgumentTypeError(f"{value}: must be 1 to 9")
    return value


def _examples(*commands: str) -> dict[str, Any]:
    """``add_parser`` keywords that end a command's --help with real examples, kept as written."""
    text = "examples:\n" + "\n".join(f"  {c}" for c in commands)
    return {"epilog": text, "formatter_class": argparse.RawDescriptionHelpFormatter}


def add_commands(parser: argparse.ArgumentParser, common: argparse.ArgumentParser,
                 prog: str = "appliance-agent") -> None:
    """Add the ``serve``, ``os-install`` and ``attest-key`` subcommands to ``parser`` (``common``:
    --debug, --json; ``prog``: how the examples in their help spell the command)."""
    asub = parser.add_subparsers(dest="agent_command", metavar="ACTION")
    asub.required = True
    s = asub.add_parser(
        "serve", **_examples(
            f"{prog} serve --state-dir /tmp/state --registry site-registry/published "
            "--model tiny@1.0.0",
            f"{prog} serve --state-dir /tmp/state --trusted-root root.json "
            "--registry site-registry/published --model tiny",
            f"{prog} serve --config /etc/appliance/agent.toml --print-config"),
        parents=[common],
        help="serve KServe v2 / Triton gRPC inference on verified bundles, with health and metrics",
        description="Serve the models installed in the state directory (or those named with "
                    "--model, installed from the registry with full verification first). "
                    "Without TLS material the agent listens on loopback only.")
    o = asub.add_parser(
        "os-install", **_examples(f"{prog} os-install --state-dir /var/lib/appliance"),
        parents=[common],
        help="(root, run by appliance-os-update.service) verify the OS release the agent staged "
             "through TUF again, write it to the inactive root slot, install its UKI on trial",
        description="Consumes STATE/os/pending.json. Never run by hand on a node in service: "
                    "it rewrites the inactive root slot and the boot entries.")
    o.add_argument("--state-dir", type=Path, default=Path("/var/lib/appliance"),
                   help="the agent's state directory, holding os/pending.json (default: /var/lib/appliance)")
    o.add_argument("--trust-dir", type=Path, default=Path("/var/lib/appliance-os"),
                   help="the installer's own TUF metadata (root-owned)")
    o.add_argument("--trusted-root", type=Path, default=Path("/etc/appliance/registry/root.json"),
                   help="the image's baked registry root (first use of --trust-dir)")
    o.add_argument("--tries", type=_tries, default=3,
                   help="boots the new release gets on trial before the firmware falls back (1-9)")
    o.set_defaults(handler=_os_install)
    k = asub.add_parser(
        "attest-key", **_examples(f"{prog} attest-key --out /etc/appliance/tls/ak.pub"),
        parents=[common],
        help="(root, at enrolment) make the node's TPM attestation key once and write its public "
             "area for `appliance pki issue-ak`",
        description="The key (ECDSA P-256, restricted, under the TPM's endorsement key) is made "
                    "persistent at [attest] ak_handle; one already there is kept. Its private "
                    "half never leaves the TPM.")
    k.add_argument("--config", type=Path, default=None,
                   help=f"agent.toml to read (default: {DEFAULT_CONFIG_PATH} when it exists)")
    add_flags(k.add_argument_group("[attest] settings"), AttestSection)  # type: ignore[arg-type]
    k.add_argument("--out", type=Path, required=True, metavar="FILE",
                   help="where to write the key's TPM2B_PUBLIC")
    k.set_defaults(handler=_attest_key)
    s.add_argument("--config", type=Path, default=None,
                   help=f"agent.toml to read (default: {DEFAULT_CONFIG_PATH} when it exists)")
    server = s.add_argument_group("[server] settings")
    add_flags(server, ServerSection)  # type: ignore[arg-type]
    inference = s.add_argument_group("[inference] settings")
    add_flags(inference, InferenceSection)  # type: ignore[arg-type]
    inference.add_argument("--model", dest="models", action="append", metavar="NAME[@VERSION]",
                           help="serve this model (repeatable; same as --models)")
    s.add_argument("--registry", dest="sources", action="append", metavar="URL|DIR",
                   help="registry source to install missing models from ([updates] sources)")
    s.add_argument("--trusted-root", type=Path, default=None, metavar="FILE",
                   help="the registry's root.json: the node's TUF trust anchor when the state "
                        "directory has none yet; a different root later is refused unless it "
                        "chains from the trusted one (TUF root rotation)")
    s.add_argument("--print-config", action="store_true",
                   help="print the effective configuration (JSON) and exit")
    s.add_argument("--cpu-level", choices=tuple(LEVELS), default=None, metavar="LEVEL",
                   help="first check that this CPU reaches the x86-64 psABI level LEVEL "
                        f"({', '.join(LEVELS)}); below it, name the missing features and exit "
                        f"{EXIT_CPU_BELOW_LEVEL} before numpy or ONNX Runtime can die of SIGILL "
                        "(the image's unit passes its [image] cpu_level)")
    s.set_defaults(handler=_serve)


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    """agent.toml (if any) with the command line's settings applied on top.

    Raises:
        ConfigError, NotFoundError: a bad file, flag or value.
    """
    path = args.config
    if path is None and DEFAULT_CONFIG_PATH.is_file():
        path = DEFAULT_CONFIG_PATH
    config = load_config(path)
    return dataclasses.replace(
        config,
        server=apply_flags(config.server, args),
        inference=apply_flags(config.inference, args),
        updates=apply_flags(config.updates, args),
        attest=apply_flags(config.attest, args),
    )


def _serve(args: argparse.Namespace) -> int:
    # Before anything that imports numpy: below the level it would die of SIGILL.
    if args.cpu_level is not None and (line := refusal(args.cpu_level)) is not None:
        log.error("%s", line)
        return EXIT_CPU_BELOW_LEVEL
    # Imported here so that `appliance --help` does not load gRPC and ONNX Runtime, and a
    # supervisor of several serving processes never does (agent.workers).
    from agent.workers import run_supervisor, worker_count

    config = config_from_args(args)
    count = worker_count(config)
    if args.print_config or count == 1:
        from agent.server import check_config

        check_config(config)  # --print-config refuses what serve refuses
    if args.print_config:
        print(json.dumps(config.to_json(), indent=2, sort_keys=True))
        return 0
    if args.trusted_root is not None:
        _adopt_root(config.server.state_dir, args.trusted_root)
    if count > 1:
        return run_supervisor(config, count, debug=bool(args.debug))
    from agent.server import run_agent

    return asyncio.run(run_agent(config))


def _adopt_root(state_dir: Path, path: Path) -> None:
    """Give the node ``path`` as its trust anchor (see RegistryClient.adopt_root).

    Raises:
        NotFoundError: ``path`` cannot be read.
        VerificationError: not a usable root, or one that does not chain from the node's.
    """
    from agent.updates.client import RegistryClient

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise NotFoundError(f"--trusted-root {path}: cannot read it: {exc.strerror}") from None
    outcome = RegistryClient.adopt_root(state_dir, data, origin=f"--trusted-root {path}")
    log.info("trusted root %s: %s", path, {
        "initialised": "the node's trust anchor from now on",
        "unchanged": "already the node's trust anchor",
        "older": "older than the node's trusted root (rotated since); not used",
        "rotated": "the next root version, chained from the trusted one; adopted",
    }[outcome])


def _os_install(args: argparse.Namespace) -> int:
    from agent.osupdate import install_pending

    attempt = install_pending(args.state_dir, args.trust_dir, args.trusted_root, tries=args.tries)
    if args.json:
        print(json.dumps(attempt, indent=2, sort_keys=True, default=str))
    else:
        print(f"OS {attempt['name']} {attempt['version']} written to slot {attempt['slot']}; "
              f"boot entry {attempt['uki']} (on trial)")
    return 0


def _attest_key(args: argparse.Namespace) -> int:
    from agent.attest import handle_name, make_attestation_key

    section = config_from_args(args).attest
    made = make_attestation_key(section, args.out)
    handle = handle_name(section)
    if args.json:
        print(json.dumps({"ak_public": str(args.out), "handle": handle, "new_key": made}, indent=2))
    else:
        print(f"{'new' if made else 'kept'} attestation key at TPM handle {handle}; "
              f"its public area in {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """``appliance-agent``'s parser: ``serve``, ``os-install`` and ``attest-key``."""
    # The subcommands' copies of --debug/--json set a value only when given, so either
    # position works (a default there would overwrite the top level's True).
    top, common = (argparse.ArgumentParser(add_help=False) for _ in range(2))
    for parser_, default in ((top, False), (common, argparse.SUPPRESS)):
        parser_.add_argument("--debug", action="store_true", default=default, help="show tracebacks")
        parser_.add_argument("--json", action="store_true", default=default,
                             help="print machine-readable JSON")
    parser = argparse.ArgumentParser(
        prog="appliance-agent", parents=[top],
        description="The appliance's on-device agent: serve verified models, install OS updates.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_commands(parser, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``appliance-agent``; return the process exit code."""
    args = build_parser().parse_args(argv)
    setup_logging(args.debug)
    handler: Handler = args.handler
    try:
        return handler(args)
    except ApplianceError as exc:
        if args.debug:
            log.exception("appliance-agent: error")
        print(f"appliance-agent: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("appliance-agent: interrupted", file=sys.stderr)
        return 130
