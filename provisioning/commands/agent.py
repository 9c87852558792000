"""``appliance agent serve``: run the on-device agent (gRPC on 8001, metrics on 8002).

Flags and /etc/appliance/agent.toml come from the same table (agent.config); a flag given
on the command line overrides the file.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
from pathlib import Path

from agent.config import DEFAULT_CONFIG_PATH, AgentConfig, InferenceSection, ServerSection, load_config
from agent.settings import add_flags, apply_flags
from provisioning.output import examples

__all__ = ["config_from_args", "register"]


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser("agent", **examples(
            "appliance agent serve --state-dir /tmp/state --registry site-registry/published --model tiny"),
        help="run the on-device agent", parents=[common])
    asub = p.add_subparsers(dest="agent_command", metavar="ACTION")
    asub.required = True
    s = asub.add_parser("serve", **examples(
            "appliance agent serve --state-dir /tmp/state --registry site-registry/published --model "
            "tiny@1.0.0",
            "appliance agent serve --config /etc/appliance/agent.toml --print-config"),
        parents=[common],
        help="serve KServe v2 / Triton gRPC inference on verified bundles, with health and metrics",
        description="Serve the models installed in the state directory (or those named with "
                    "--model, installed from the registry with full verification first). "
                    "Without TLS material the agent listens on loopback only.")
    o = asub.add_parser("os-install", **examples(
            "appliance agent os-install --state-dir /var/lib/appliance"),
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
    o.add_argument("--tries", type=int, default=3, help="boot tries before the firmware falls back")
    o.set_defaults(handler=_os_install)
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
    s.add_argument("--print-config", action="store_true",
                   help="print the effective configuration (JSON) and exit")
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
    )


def _serve(args: argparse.Namespace) -> int:
    from agent.server import check_config

    config = config_from_args(args)
    check_config(config)  # --print-config refuses what serve refuses
    if args.print_config:
        print(json.dumps(config.to_json(), indent=2, sort_keys=True))
        return 0
    from agent.server import run_agent

    return asyncio.run(run_agent(config))


def _os_install(args: argparse.Namespace) -> int:
    from agent.osupdate import install_pending
    from provisioning.output import emit_json

    attempt = install_pending(args.state_dir, args.trust_dir, args.trusted_root, tries=args.tries)
    if args.json:
        emit_json(attempt)
    else:
        print(f"OS {attempt['name']} {attempt['version']} written to slot {attempt['slot']}; "
              f"boot entry {attempt['uki']} (on trial)")
    return 0
