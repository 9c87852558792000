"""``appliance agent serve|os-install``: the node's own commands (:mod:`agent.cli`) on the operator's CLI.

The parsers and handlers live with the node (``appliance-agent``, what the image's units run);
registering them here keeps ``appliance agent serve`` for a development machine.
"""

from __future__ import annotations

import argparse

from agent.cli import add_commands, config_from_args
from provisioning.output import examples

__all__ = ["config_from_args", "register"]


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser("agent", **examples(
            "appliance agent serve --state-dir /tmp/state --registry site-registry/published --model tiny"),
        help="run the on-device agent", parents=[common])
    add_commands(p, common, prog="appliance agent")
