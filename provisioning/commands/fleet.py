"""``appliance fleet status|health|inventory|attest|enrol-attest|unseal|escrow|update|rollout|sd``: many
nodes at once."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from agent.errors import ConfigError
from agent.fsutil import atomic_write_text
from provisioning import attest, pki
from provisioning.commands.pki import passphrase_flags
from provisioning.fleet import (
    Action,
    AttestGate,
    FleetAuth,
    Node,
    NodeResult,
    RolloutPlan,
    WaveOutcome,
    add_credential_flags,
    attest_nodes,
    enrol_nodes,
    escrow_nodes,
    health_action,
    inventory_action,
    load_expected_images,
    load_inventory,
    load_site_crl,
    plan_rollout,
    query,
    run_rollout,
    status_action,
    unseal_action,
    update_action,
)
from provisioning.output import emit_json, examples, print_table, progress
from provisioning.prometheus import DEFAULT_METRICS_PORT, file_sd_targets, scrape_config

__all__ = ["register"]


def _common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", "--inventory", type=Path, default=os.environ.get("APPLIANCE_INVENTORY") or None,
                        help="Ansible inventory (INI/YAML) or a .toml node list "
                             "(default: $APPLIANCE_INVENTORY)")
    parser.add_argument("--limit", "-l", default="all",
                        help="hosts or groups to include (an Ansible pattern; default: all)")
    parser.add_argument("--deadline", type=float, default=5.0,
                        help="seconds each node has for all of its work (default: 5)")
    parser.add_argument("--concurrency", type=int, default=1024,
                        help="nodes asked at the same time (default: 1024); with more nodes than "
                             "this, a slow node delays those queued behind it")
    add_credential_flags(parser)
    parser.add_argument("--insecure", action="store_true",
                        help="plain-text gRPC, for agents on loopback without TLS")


def _trust_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--site-ca", type=Path, metavar="PEM",
                        help="the CA that certifies attestation keys (default: --ca, the site CA)")
    parser.add_argument("--crl", type=Path, metavar="PEM",
                        default=os.environ.get("APPLIANCE_FLEET_CRL") or None,
                        help="the site CA's revocation list (crl.pem): a node whose attestation key "
                             "certificate it revokes does not attest (default: $APPLIANCE_FLEET_CRL)")
    parser.add_argument("--secure-boot", choices=("required", "optional"), default="required",
                        help="required (default): a node whose firmware event log does not show Secure "
                             "Boot on does not attest; optional: reported, not required (benches, VMs "
                             "without Secure Boot)")


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser("fleet", **examples(
            "appliance fleet status -i inventory.ini --ca pki/ca.crt --cert me.crt --key me.key",
            "appliance fleet rollout -i inventory.ini --target tiny@1.1.0 --dry-run"),
        parents=[common], help="ask many nodes at once; roll updates out")
    fsub = p.add_subparsers(dest="fleet_command", metavar="ACTION")
    fsub.required = True
    for name, help_text in (("status", "reachability, health verdict, versions"),
                            ("health", "full health reports"),
                            ("inventory", "full inventories")):
        q = fsub.add_parser(name, **examples(f"appliance fleet {name} -i inventory.ini --limit lab "
                                             "--ca pki/ca.crt --cert me.crt --key me.key",
                                             f"appliance fleet {name} -i nodes.toml --insecure --json"),
                            parents=[common], help=help_text)
        _common_flags(q)
        q.set_defaults(handler=_query_handler(name))
    t = fsub.add_parser("attest", **examples(
            "appliance fleet attest -i inventory.ini --expect out/image-manifest.json "
            "--ca pki/ca.crt --cert me.crt --key me.key",
            "appliance fleet attest -i nodes.toml --expect appliance-2.osrelease "
            "--expect out/image-manifest.json --json"),
        parents=[common], help="ask every node for a TPM quote; check it against the images it may run",
        description="Sends each node a fresh nonce (Node/Attest) and checks its answer: the attestation "
                    "key's certificate is the site CA's, current, not revoked (--crl) and for that node; "
                    "the quote is signed by that key over the nonce; the node's root hash is one of the "
                    "--expect images and its PCR 11 is that image's; its firmware event log replays to "
                    "the quoted PCRs 0-7 and shows Secure Boot on (--secure-boot). Exit status 1 when "
                    "any node does not attest.")
    _common_flags(t)
    t.add_argument("--expect", action="append", type=Path, default=[], metavar="FILE",
                   help="an image-manifest.json or an OS release the nodes may run; repeatable")
    _trust_flags(t)
    t.set_defaults(handler=_attest)
    e = fsub.add_parser("enrol-attest", **examples(
            "appliance fleet enrol-attest -i inventory.ini --pki-dir pki --ca pki/ca.crt --cert admin.crt "
            "--key admin.key"),
        parents=[common], help="enrol every node for attestation over its admin API (no SSH needed)",
        description="Asks each node (Node/EnrolAttestation, admin role) to make its TPM attestation key "
                    "if it has none and to send the key's public area; the site CA in --pki-dir refuses "
                    "any key that is not a restricted TPM signing key and certifies it for the node's "
                    "inventory name; the node installs the certificate. A node that already holds a "
                    "certificate of the site CA for its current key, good for 30 more days, keeps it "
                    "(--renew: issue anew). Then `appliance fleet attest` checks the nodes.")
    _common_flags(e)
    e.set_defaults(deadline=60.0, concurrency=64)
    e.add_argument("--pki-dir", type=Path, default=Path(os.environ.get("APPLIANCE_PKI", "pki")),
                   help="the site PKI that certifies the keys (default: $APPLIANCE_PKI or ./pki)")
    passphrase_flags(e)
    e.add_argument("--days", type=int, default=365, help="validity of the certificates (default: 365)")
    e.add_argument("--renew", action="store_true", help="certify every node's key anew")
    e.set_defaults(handler=_enrol)
    _register_unseal(fsub, common)
    _register_escrow(fsub, common)
    u = fsub.add_parser("update", **examples(
            "appliance fleet update -i inventory.ini --limit lab --target tiny@1.1.0 --dry-run"),
        parents=[common], help="ApplyUpdate on every selected node at once")
    _common_flags(u)
    u.add_argument("--target", action="append", default=[],
                   help="registry target to apply; repeatable (default: all pending on the channel)")
    u.add_argument("--dry-run", action="store_true", help="ask the nodes what they would do")
    u.set_defaults(handler=_update)
    r = fsub.add_parser("rollout", **examples(
            "appliance fleet rollout -i inventory.ini --target tiny@1.1.0 --canary 1 --batch-percent 25 "
            "--dry-run",
            "appliance fleet rollout -i inventory.ini --target os/appliance-2.osrelease "
            "--expect appliance-2.osrelease --ca pki/ca.crt --cert me.crt --key me.key",
            "appliance fleet rollout -i inventory.ini --target tiny@1.1.0 --no-attest"),
        parents=[common],
        help="update in waves: a canary, then batches; halt past the failure budget",
        description="Applies the update wave by wave. With --expect, a node counts as updated only once it "
                    "attests (as `fleet attest` checks) one of the expected images: after its update it is "
                    "asked for a quote every --attest-interval seconds, through an OS update's reboot, "
                    "until it attests or --attest-timeout passes; a node that does not is a failed node. "
                    "--no-attest counts a node as updated when ApplyUpdate succeeds.")
    _common_flags(r)
    r.add_argument("--target", action="append", default=[], help="registry target; repeatable")
    r.add_argument("--canary", type=int, default=1, help="nodes in the first wave (default: 1)")
    r.add_argument("--batch", type=int, help="nodes per later wave (default: --batch-percent)")
    r.add_argument("--batch-percent", type=float, default=25.0,
                   help="later waves as a share of the remaining nodes (default: 25)")
    r.add_argument("--max-failure-percent", type=float, default=0.0,
                   help="failed nodes tolerated, percent of all (default: 0: halt at the first)")
    r.add_argument("--expect", action="append", type=Path, default=[], metavar="FILE",
                   help="an image-manifest.json or an OS release an updated node must attest; repeatable "
                        "(this or --no-attest is required)")
    _trust_flags(r)
    r.add_argument("--attest-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="how long an updated node has to attest, its reboot included (default: 600)")
    r.add_argument("--attest-interval", type=float, default=5.0, metavar="SECONDS",
                   help="seconds between attestation attempts (default: 5)")
    r.add_argument("--no-attest", action="store_true",
                   help="count a node as updated when ApplyUpdate succeeds, without attestation")
    r.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    r.set_defaults(handler=_rollout)
    d = fsub.add_parser(
        "sd", **examples(
            "appliance fleet sd -i hosts.ini --out /etc/prometheus/appliance.json "
            "--ca ca.crt --cert prometheus.crt --key prometheus.key",
            "appliance fleet sd -i nodes.toml --json"),
        parents=[common],
        help="Prometheus file_sd targets for the nodes' metrics port, and the scrape job's mTLS",
        description="Writes the targets (JSON) to --out, or prints them, and prints a scrape_configs "
                    "entry with the TLS settings the nodes' mTLS metrics port needs (--ca, --cert, "
                    "--key: the site CA and a client certificate of any role). Asks no node.")
    d.add_argument("-i", "--inventory", type=Path, default=os.environ.get("APPLIANCE_INVENTORY") or None,
                   help="Ansible inventory (INI/YAML) or a .toml node list (default: $APPLIANCE_INVENTORY)")
    d.add_argument("--limit", "-l", default="all",
                   help="hosts or groups to include (an Ansible pattern; default: all)")
    d.add_argument("--out", type=Path, metavar="FILE", help="write the targets here (default: stdout)")
    d.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
                   help=f"the agents' metrics port (default: {DEFAULT_METRICS_PORT})")
    add_credential_flags(d)
    d.set_defaults(handler=_sd)


def _setup(args: argparse.Namespace) -> tuple[list[Node], FleetAuth]:
    if args.inventory is None:
        raise ConfigError("no inventory: give -i FILE or set $APPLIANCE_INVENTORY")
    nodes = load_inventory(args.inventory, args.limit)
    auth = FleetAuth.from_files(args.ca, args.cert, args.key)
    _raise_fd_limit(min(len(nodes), args.concurrency))
    if auth.insecure and not args.insecure:
        raise ConfigError("fleet access uses mTLS: give --ca, --cert and --key "
                          "(or --insecure for agents on loopback without TLS)")
    return nodes, auth


def _sd(args: argparse.Namespace) -> int:
    if args.inventory is None:
        raise ConfigError("no inventory: give -i FILE or set $APPLIANCE_INVENTORY")
    nodes = load_inventory(args.inventory, args.limit)
    targets = file_sd_targets(nodes, args.metrics_port)
    text = json.dumps(targets, indent=2) + "\n"
    sd_file = args.out.resolve() if args.out is not None else "/etc/prometheus/appliance.json"
    snippet = scrape_config(sd_file, nodes, ca=args.ca, cert=args.cert, key=args.key)
    if args.out is not None:
        atomic_write_text(args.out, text)
    if args.json:
        emit_json({"targets": targets, "out": str(args.out) if args.out else None, "scrape_config": snippet})
        return 0
    if args.out is None:
        print(text, end="")
    else:
        print(f"# {len(targets)} targets written to {args.out}", file=sys.stderr)
    print(snippet, end="", file=sys.stderr if args.out is None else sys.stdout)
    return 0


def _raise_fd_limit(connections: int) -> None:
    """Make room for one socket per node in flight (the soft limit is often 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * connections + 256
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _run(nodes: list[Node], action: Action, auth: FleetAuth, args: argparse.Namespace) -> list[NodeResult]:
    with progress("nodes", len(nodes)) as bar:
        return asyncio.run(query(nodes, action, auth=auth, deadline=args.deadline,
                                 concurrency=args.concurrency, progress=lambda _: bar.advance()))


def _summary(results: list[NodeResult]) -> dict[str, Any]:
    return {"nodes": [r.to_json() for r in results],
            "summary": {"total": len(results), "ok": sum(r.ok for r in results),
                        "failed": sum(not r.ok for r in results)}}


def _print_failures(results: list[NodeResult]) -> None:
    bad = [r for r in results if not r.ok]
    print(f"{len(results) - len(bad)} of {len(results)} nodes answered", file=sys.stderr)


def _query_handler(kind: str) -> Any:
    action = {"status": status_action, "health": health_action, "inventory": inventory_action}[kind]

    def handler(args: argparse.Namespace) -> int:
        nodes, auth = _setup(args)
        results = _run(nodes, action, auth, args)
        if args.json:
            emit_json(_summary(results))
        elif kind == "status":
            rows = [(r.node.name, r.node.target, "ok" if r.ok else "DOWN",
                     r.data.get("overall", "-"), r.data.get("image_version") or "-",
                     r.data.get("agent_version") or "-", ", ".join(r.data.get("bundles", [])) or "-",
                     r.reason) for r in results]
            print_table(("NODE", "TARGET", "STATE", "HEALTH", "IMAGE", "AGENT", "BUNDLES", "REASON"), rows)
            _print_failures(results)
        else:
            for r in results:
                print(f"== {r.node.name} ({r.node.target}): " + ("ok" if r.ok else r.reason))
                if r.ok:
                    _print_data(r.data, "  ")
            _print_failures(results)
        return 0 if all(r.ok for r in results) else 1

    return handler


def _print_data(data: Any, indent: str) -> None:
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(value, dict | list) and value:
                print(f"{indent}{key}:")
                _print_data(value, indent + "  ")
            else:
                print(f"{indent}{key}: {value}")
    elif isinstance(data, list):
        for item in data:
            if isinstance(item, dict):
                print(f"{indent}-")
                _print_data(item, indent + "  ")
            else:
                print(f"{indent}- {item}")


def _policy(args: argparse.Namespace, command: str) -> attest.Policy:
    """What the nodes must show: the images of --expect, an AK certificate from --site-ca (else
    --ca) not revoked by --crl (checked: :func:`provisioning.fleet.load_site_crl`), and Secure
    Boot unless --secure-boot optional.

    Raises:
        ConfigError: no --expect, neither CA flag, a CA file that is not a PEM certificate, a
            CRL that is not the CA's or stale; AttestError: an expected image's record is bad.
    """
    if not args.expect:
        raise ConfigError(f"{command}: give the images the nodes may run: --expect image-manifest.json or "
                          "--expect RELEASE.osrelease (repeatable)")
    images = load_expected_images(args.expect)
    ca_path = args.site_ca or args.ca
    if ca_path is None:
        raise ConfigError(f"{command} checks each attestation key's certificate against the site CA: "
                          "give --ca (or --site-ca)")
    try:
        site_ca = x509.load_pem_x509_certificate(Path(ca_path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{ca_path}: not a PEM certificate ({exc})") from None
    crl = load_site_crl(Path(args.crl), site_ca) if args.crl is not None else None
    return attest.Policy(site_ca, images, crl, secure_boot=args.secure_boot == "required")


def _attest(args: argparse.Namespace) -> int:
    policy = _policy(args, "fleet attest")
    nodes, auth = _setup(args)
    with progress("nodes", len(nodes)) as bar:
        results = asyncio.run(attest_nodes(nodes, auth=auth, policy=policy, deadline=args.deadline,
                                           concurrency=args.concurrency, progress=lambda _: bar.advance()))
    if args.json:
        emit_json(_summary(results))
    else:
        shown = {True: "on", False: "off", None: "-"}
        rows = [(r.node.name, r.node.target, "yes" if r.ok else "NO", r.data.get("image_version") or "-",
                 (r.data.get("root_hash") or "-")[:16], shown[r.data.get("secure_boot")], r.reason or "-")
                for r in results]
        print_table(("NODE", "TARGET", "ATTESTED", "IMAGE", "ROOT HASH", "SECURE BOOT", "REASON"), rows)
        print(f"{sum(r.ok for r in results)} of {len(results)} nodes attested", file=sys.stderr)
    return 0 if all(r.ok for r in results) else 1


def _enrol(args: argparse.Namespace) -> int:
    passphrase = pki.load_passphrase(args.passphrase_file, args.passphrase_env)
    pki.check_passphrase(args.pki_dir, passphrase)
    site_ca = x509.load_pem_x509_certificate((args.pki_dir / "ca.crt").read_bytes())
    nodes, auth = _setup(args)

    def certify(node: str, ak_public: bytes) -> bytes:
        issued = pki.issue_attestation_key(args.pki_dir, node, ak_public, days=args.days,
                                           passphrase=passphrase)
        return x509.load_pem_x509_certificate(Path(issued.cert_path).read_bytes()).public_bytes(Encoding.DER)

    with progress("nodes", len(nodes)) as bar:
        results = asyncio.run(enrol_nodes(nodes, auth=auth, certify=certify, site_ca=site_ca,
                                          renew=args.renew, deadline=args.deadline,
                                          concurrency=args.concurrency, progress=lambda _: bar.advance()))
    if args.json:
        emit_json(_summary(results))
    else:
        rows = [(r.node.name, r.data.get("key", "-"), r.data.get("certificate", "-"),
                 r.data.get("serial", "-"), r.reason or "-") for r in results]
        print_table(("NODE", "KEY", "CERTIFICATE", "SERIAL", "REASON"), rows)
        print(f"{sum(r.ok for r in results)} of {len(results)} nodes enrolled; check them with "
              "`appliance fleet attest`", file=sys.stderr)
    return 0 if all(r.ok for r in results) else 1


def _register_unseal(fsub: argparse._SubParsersAction[argparse.ArgumentParser],
                     common: argparse.ArgumentParser) -> None:
    s = fsub.add_parser("unseal", **examples(
            "appliance fleet unseal -i inventory.ini --limit node7 --recovery-key keys/recovery.key",
            "appliance fleet unseal -i inventory.ini --limit node7 --recovery-key keys/recovery.key "
            "--escrow node7-esp/appliance/recovery-key.enc --json"),
        parents=[common], help="give sealed nodes their recovery key (admin): they enrol their TPM again",
        description="For each selected node whose data partition stayed sealed at boot (its health "
                    "says 'data sealed'), decrypts the recovery key escrow the node sends with the "
                    "site's recovery private key, and sends the key (Node/Unseal, admin role, over "
                    "mTLS). The node checks it against its volume, enrols its TPM again (PCR 7 as it "
                    "is now, the site's signed PCR 11 policy) and reboots. Check first with `appliance "
                    "fleet attest` that the node runs an image of the site: the key opens the data. "
                    "Nodes whose data opened are left alone. Exit status 1 when any node stays sealed.")
    _common_flags(s)
    s.set_defaults(deadline=180.0, concurrency=16)
    s.add_argument("--recovery-key", type=Path, required=True, metavar="KEY",
                   help="the site's recovery private key (PEM; the profile's [tpm] recovery_key is "
                        "its public half)")
    s.add_argument("--escrow", type=Path, metavar="FILE",
                   help="a copy of the node's escrow (appliance/recovery-key.enc on its ESP) instead "
                        "of the one it sends; only with a single node")
    passphrase_flags(s)
    s.set_defaults(handler=_unseal)


def _register_escrow(fsub: argparse._SubParsersAction[argparse.ArgumentParser],
                     common: argparse.ArgumentParser) -> None:
    e = fsub.add_parser("escrow", **examples(
            "appliance fleet escrow -i inventory.ini --out escrows",
            "appliance fleet escrow -i inventory.ini --out escrows --recovery-key keys/recovery.key --json"),
        parents=[common], help="collect the nodes' recovery key escrows; check the site's key opens them",
        description="Saves each node's recovery key escrow (what the node encrypted to the site's "
                    "recovery public key and keeps on its ESP; sent with its inventory) as "
                    "OUT/NODE.recovery-key.enc, mode 0600. With --recovery-key, also checks that the "
                    "site's recovery private key opens each one (the key is not written anywhere), so "
                    "the site knows it can unseal a node before the node needs it. Nodes without sealed "
                    "data have no escrow. Exit status 1 when any node gave none, or one that does not open.")
    _common_flags(e)
    e.add_argument("--out", type=Path, required=True, help="folder for the escrows (created if missing)")
    e.add_argument("--recovery-key", type=Path, metavar="KEY",
                   help="the site's recovery private key (PEM): check that each escrow opens with it")
    passphrase_flags(e)
    e.set_defaults(handler=_escrow)


_NODE_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")


def _escrow(args: argparse.Namespace) -> int:
    from provisioning.image.recovery import load_recovery_private_key, open_escrow

    decrypt = None
    if args.recovery_key is not None:
        key = load_recovery_private_key(args.recovery_key, pki.load_passphrase(args.passphrase_file,
                                                                               args.passphrase_env))

        def decrypt(blob: bytes) -> str:
            return open_escrow(key, blob, "sent by the node")

    nodes, auth = _setup(args)
    bad = [n.name for n in nodes if not _NODE_FILE_NAME.fullmatch(n.name)]
    if bad:
        raise ConfigError(f"--inventory {args.inventory}: node name {bad[0]!r} cannot name a file in "
                          f"--out (letters, digits, '.', '_', '-')")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {args.out}: {exc.strerror or exc}") from None
    with progress("nodes", len(nodes)) as bar:
        results = asyncio.run(escrow_nodes(nodes, args.out, decrypt, auth=auth, deadline=args.deadline,
                                           concurrency=args.concurrency, progress=lambda _: bar.advance()))
    if args.json:
        emit_json(_summary(results))
    else:
        rows = [(r.node.name, r.data.get("escrow", "-"),
                 "yes" if r.data.get("opens_with_site_key") else ("-" if r.ok else "no"), r.reason or "-")
                for r in results]
        print_table(("NODE", "ESCROW", "OPENS", "REASON"), rows)
        _print_failures(results)
    return 0 if all(r.ok for r in results) else 1


def _unseal(args: argparse.Namespace) -> int:
    from provisioning.image.recovery import load_recovery_private_key, open_escrow

    key = load_recovery_private_key(args.recovery_key, pki.load_passphrase(args.passphrase_file,
                                                                           args.passphrase_env))
    nodes, auth = _setup(args)
    escrow = b""
    if args.escrow is not None:
        if len(nodes) != 1:
            raise ConfigError(f"--escrow {args.escrow}: an escrow is one node's, and --limit "
                              f"{args.limit!r} selects {len(nodes)} nodes")
        try:
            with args.escrow.open("rb") as f:
                escrow = f.read(key.key_size // 8 + 1)
        except OSError as exc:
            raise ConfigError(f"--escrow {args.escrow}: {exc.strerror or exc}") from None
        open_escrow(key, escrow, str(args.escrow))  # refuse a bad copy before asking any node

    def decrypt(blob: bytes) -> str:
        return open_escrow(key, blob, "sent by the node")

    results = _run(nodes, unseal_action(decrypt, escrow), auth, args)
    if args.json:
        emit_json(_summary(results))
    else:
        rows = [(r.node.name, r.data.get("state", "sealed" if not r.ok else "-"),
                 r.data.get("message", "") or r.reason or "-") for r in results]
        print_table(("NODE", "STATE", "MESSAGE"), rows)
        _print_failures(results)
    return 0 if all(r.ok for r in results) else 1


def _update(args: argparse.Namespace) -> int:
    nodes, auth = _setup(args)
    results = _run(nodes, update_action(args.target, args.dry_run), auth, args)
    if args.json:
        emit_json(_summary(results) | {"dry_run": args.dry_run})
    else:
        rows = []
        for r in results:
            outcomes = r.data.get("results", [])
            text = ", ".join(f"{o.get('name') or o.get('target')} {o.get('outcome')}" for o in outcomes)
            rows.append((r.node.name, "ok" if r.ok else "FAILED", text or "-", r.reason))
        print_table(("NODE", "STATE", "RESULTS", "REASON"), rows)
        _print_failures(results)
    return 0 if all(r.ok for r in results) else 1


def _print_plan(plan: RolloutPlan) -> None:
    total = sum(len(w.nodes) for w in plan.waves)
    print(f"rollout of {', '.join(plan.targets) or 'everything pending'} to {total} nodes "
          f"in {len(plan.waves)} waves; halt after {plan.max_failures + 1} failed node(s)")
    if plan.attest is None:
        print("  a node counts as updated when ApplyUpdate succeeds (no attestation)")
    else:
        print(f"  a node counts as updated once it attests one of {len(plan.attest.policy.images)} expected "
              f"image(s), within {plan.attest.timeout:g} s of its update")
    for wave in plan.waves:
        names = ", ".join(n.name for n in wave.nodes[:8]) + (" ..." if len(wave.nodes) > 8 else "")
        print(f"  {wave.name:<10} {len(wave.nodes):>4} nodes  {names}")


def _attest_gate(args: argparse.Namespace) -> AttestGate | None:
    """The rollout's attestation gate from --expect, --site-ca and --attest-*; None with --no-attest.

    Raises:
        ConfigError: both or neither of --expect and --no-attest (neither is fine for a dry run),
            or what loading the expected images or the site CA raises.
    """
    if args.expect and args.no_attest:
        raise ConfigError("give --expect FILE or --no-attest, not both")
    if not args.expect:
        if args.no_attest or args.dry_run:
            return None
        raise ConfigError("a rollout counts a node as updated once it attests the new image: give "
                          "--expect image-manifest.json or --expect RELEASE.osrelease (repeatable), "
                          "or --no-attest to count a node as updated when ApplyUpdate succeeds")
    return AttestGate(_policy(args, "fleet rollout --expect"), timeout=args.attest_timeout,
                      interval=args.attest_interval)


def _rollout(args: argparse.Namespace) -> int:
    gate = _attest_gate(args)
    nodes, auth = _setup(args)
    plan = plan_rollout(nodes, canary=args.canary, batch=args.batch, batch_percent=args.batch_percent,
                        max_failure_percent=args.max_failure_percent, targets=args.target, attest=gate)
    if args.dry_run:
        emit_json({"plan": plan.to_json(), "dry_run": True}) if args.json else _print_plan(plan)
        if gate is None and not args.no_attest:
            print("note: the rollout itself needs --expect FILE (wait for attestation) or --no-attest",
                  file=sys.stderr)
        return 0
    if not args.json:
        _print_plan(plan)

    def report(outcome: WaveOutcome) -> None:
        if args.json:
            return
        failed = [r for r in outcome.results if not r.ok]
        print(f"{outcome.wave.name}: {len(outcome.results) - len(failed)} ok, {len(failed)} failed")
        for r in failed:
            print(f"  {r.node.name}: {r.reason}")

    outcomes, skipped = asyncio.run(run_rollout(plan, auth=auth, deadline=args.deadline,
                                                concurrency=args.concurrency, on_wave=report))
    failed = sum(not r.ok for o in outcomes for r in o.results)
    halted = failed > plan.max_failures
    if args.json:
        emit_json({"plan": plan.to_json(), "waves": [o.to_json() for o in outcomes],
                   "not_started": [w.to_json() for w in skipped], "halted": halted})
    elif halted:
        print(f"HALTED: {failed} failed node(s), budget {plan.max_failures}; "
              f"{len(skipped)} wave(s) not started" + (": " if skipped else "")
              + ", ".join(w.name for w in skipped))
    return 1 if failed else 0
