"""``appliance pki init|issue-node|issue-ak|issue-client|revoke|list|crl|request|recovery-key``: site
certificates and keys."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from agent.errors import NotFoundError
from provisioning.errors import AttestError, ImageError
from provisioning.output import emit_json, examples, print_table
from provisioning.pki import (
    CRL_DAYS,
    REASONS,
    IssuedCert,
    ca_info,
    init_pki,
    issue_attestation_key,
    issue_client,
    issue_node,
    list_certs,
    load_passphrase,
    make_request,
    revoke,
    write_crl,
)

__all__ = ["passphrase_flags", "register"]

_ROLES = ("observer", "operator", "admin")


def _dir_and_passphrase(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", type=Path, default=Path(os.environ.get("APPLIANCE_PKI", "pki")),
                        help="the PKI directory (default: $APPLIANCE_PKI or ./pki)")
    passphrase_flags(parser)


def passphrase_flags(parser: argparse.ArgumentParser) -> None:
    """--passphrase-file | --passphrase-env: how a command that signs with the CA key opens it."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--passphrase-file", type=Path, metavar="FILE",
                       help="file whose first line is the CA key's passphrase")
    group.add_argument("--passphrase-env", metavar="VAR",
                       help="environment variable holding the CA key's passphrase")


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser("pki", **examples(
            "appliance pki init --dir pki",
            "appliance pki issue-client alice --role operator --dir pki"),
        parents=[common],
                       help="site CA, node and client certificates, revocation list")
    psub = p.add_subparsers(dest="pki_command", metavar="ACTION")
    psub.required = True

    i = psub.add_parser("init", **examples(
            "appliance pki init --dir pki",
            "appliance pki init --dir pki --passphrase-env CA_PASS"),
        parents=[common], help="create the site CA (ECDSA P-256) and its CRL")
    _dir_and_passphrase(i)
    i.add_argument("--organization", "-O", default="Sovereign Appliance",
                   help="organization name in every certificate's subject")
    i.add_argument("--days", type=int, default=3650, help="CA validity (default: 3650)")
    i.set_defaults(handler=_init)

    n = psub.add_parser("issue-node", **examples(
            "appliance pki issue-node node7 --ip 10.0.0.7 --dir pki"),
        parents=[common],
                        help="issue a node's server certificate (DNS/IP names)")
    _dir_and_passphrase(n)
    n.add_argument("name", help="node name ([a-z0-9._-]); also its DNS name unless --dns is given")
    n.add_argument("--dns", action="append", default=[], help="DNS name the node answers as; repeatable")
    n.add_argument("--ip", action="append", default=[], help="IP address the node answers on; repeatable")
    n.add_argument("--days", type=int, default=365, help="validity (default: 365)")
    n.add_argument("--out", type=Path, help="where to write NAME.crt, NAME.key, ca.crt "
                                            "(default: DIR/issued/NAME)")
    n.add_argument("--csr", type=Path, metavar="FILE",
                   help="sign this request (from `pki request` on the node) instead of making a "
                        "key here: the node's private key never leaves it")
    n.set_defaults(handler=_issue_node)

    ak = psub.add_parser("issue-ak", **examples(
            "appliance pki issue-ak node7 --ak-public requests/node7.ak.pub --dir pki"),
        parents=[common],
        help="certify a node's TPM attestation key (what `fleet attest` trusts)",
        description="Reads the key's TPM2B_PUBLIC (from `appliance agent attest-key` on the node), "
                    "refuses any key that is not a restricted signing key bound to its TPM, and "
                    "writes DIR/issued/NAME/NAME.ak.crt for the node's [attest] ak_certificate.")
    _dir_and_passphrase(ak)
    ak.add_argument("name", help="node name ([a-z0-9._-]), as the fleet inventory names it")
    ak.add_argument("--ak-public", type=Path, required=True, metavar="FILE",
                    help="the attestation key's TPM2B_PUBLIC, as the node wrote it")
    ak.add_argument("--dns", action="append", default=[],
                    help="another name the node goes by in inventories; repeatable (default: NAME)")
    ak.add_argument("--days", type=int, default=365, help="validity (default: 365)")
    ak.add_argument("--out", type=Path, help="where to write NAME.ak.crt and ca.crt "
                                             "(default: DIR/issued/NAME)")
    ak.set_defaults(handler=_issue_ak)

    r = psub.add_parser("request", **examples(
            "appliance pki request node1 --key /etc/appliance/tls/node.key --csr node1.csr"),
        parents=[common],
        help="(on the node) make its private key once and a signing request for it",
        description="Writes KEY (mode 0600; an existing one is kept) and CSR. Only "
                    "CSR leaves the node; `pki issue-node NAME --csr CSR` signs it.")
    r.add_argument("name", help="node name ([a-z0-9._-])")
    r.add_argument("--key", type=Path, required=True, help="the private key to make or reuse")
    r.add_argument("--csr", type=Path, required=True, help="where to write the request (PEM)")
    r.set_defaults(handler=_request)

    c = psub.add_parser("issue-client", **examples(
            "appliance pki issue-client alice --role operator --dir pki"),
        parents=[common],
                        help="issue a person's or tool's client certificate with a role")
    _dir_and_passphrase(c)
    c.add_argument("name", help="who holds it ([a-z0-9._-])")
    c.add_argument("--role", required=True, choices=_ROLES,
                   help="observer: read and infer; operator: + updates, model load; admin: + rollback, "
                        "configuration")
    c.add_argument("--days", type=int, default=90, help="validity (default: 90)")
    c.add_argument("--out", type=Path, help="where to write NAME.crt, NAME.key, ca.crt "
                                            "(default: DIR/issued/NAME)")
    c.set_defaults(handler=_issue_client)

    r = psub.add_parser("revoke", **examples(
            "appliance pki revoke alice --reason key-compromise --dir pki"),
        parents=[common],
                        help="revoke by serial or name and re-sign the CRL")
    _dir_and_passphrase(r)
    r.add_argument("which", help="hex serial, or a name (revokes every certificate issued to it)")
    r.add_argument("--reason", choices=sorted(REASONS), default="unspecified",
                   help="the CRL reason code (default: unspecified)")
    r.add_argument("--crl-days", type=int, default=CRL_DAYS,
                   help=f"the new CRL's validity (default: {CRL_DAYS})")
    r.set_defaults(handler=_revoke)

    ls = psub.add_parser("list", **examples(
            "appliance pki list --dir pki --json"),
        parents=[common], help="certificates issued, with status")
    _dir_and_passphrase(ls)
    ls.set_defaults(handler=_list)

    _register_recovery_key(psub, common)

    _register_crl(psub, common)


def _register_crl(psub: argparse._SubParsersAction[argparse.ArgumentParser],
                  common: argparse.ArgumentParser) -> None:
    crl = psub.add_parser("crl", **examples('appliance pki crl --dir pki --days 30'), parents=[common],
                          help="re-sign the CRL with a fresh next-update time (run before it lapses)")
    _dir_and_passphrase(crl)
    crl.add_argument("--days", type=int, default=CRL_DAYS, help=f"validity (default: {CRL_DAYS})")
    crl.set_defaults(handler=_crl)


def _register_recovery_key(psub: argparse._SubParsersAction[argparse.ArgumentParser],
                           common: argparse.ArgumentParser) -> None:
    rk = psub.add_parser("recovery-key", **examples(
            "appliance pki recovery-key recovery-key.enc --key keys/recovery.key",
            "appliance pki recovery-key node7-esp/appliance/recovery-key.enc --key keys/recovery.key "
            "--passphrase-file pass.txt --json"),
        parents=[common],
                         help="decrypt a sealed node's recovery key escrow (appliance/recovery-key.enc "
                              "on its ESP) with the site's recovery private key")
    rk.add_argument("escrow", type=Path, help="the escrow file, copied from the node's ESP")
    rk.add_argument("--key", type=Path, required=True,
                    help="the site's recovery private key (PEM; the profile's [tpm] recovery_key is its "
                         "public half)")
    passphrase_flags(rk)
    rk.set_defaults(handler=_recovery_key)


def _passphrase(args: argparse.Namespace) -> bytes | None:
    return load_passphrase(args.passphrase_file, args.passphrase_env)


def _init(args: argparse.Namespace) -> int:
    info = init_pki(args.dir, organization=args.organization, days=args.days,
                    passphrase=_passphrase(args))
    if args.json:
        emit_json(info.to_json())
    else:
        print(f"site CA {info.subject}")
        print(f"  {args.dir / 'ca.crt'}  valid until {info.not_after:%Y-%m-%d}  sha256 {info.sha256}")
        print(f"  {args.dir / 'ca.key'}  mode 0600{'  (encrypted)' if info.encrypted else ''}")
        print(f"  {args.dir / 'crl.pem'}  distribute it with the registry; nodes load it as [tls] crl")
    return 0


def _print_issued(cert: IssuedCert) -> None:
    names = ", ".join([*cert.dns, *cert.ips])
    print(f"{cert.kind} certificate {cert.subject}  serial {cert.serial:x}")
    print(f"  valid {cert.not_before:%Y-%m-%d} to {cert.not_after:%Y-%m-%d}"
          + (f"  role {cert.role}" if cert.role else "") + (f"  names {names}" if names else ""))
    print(f"  {cert.cert_path}" + (f"\n  {cert.key_path}  (mode 0600)" if cert.key_path else ""))


def _request(args: argparse.Namespace) -> int:
    made = make_request(args.name, args.key, args.csr)
    if args.json:
        emit_json({"key": str(args.key), "csr": str(args.csr), "new_key": made})
    else:
        print(f"{'new' if made else 'kept'} key {args.key}; request {args.csr}")
    return 0


def _issue_node(args: argparse.Namespace) -> int:
    try:
        csr = args.csr.read_bytes() if args.csr is not None else None
    except OSError as exc:
        raise NotFoundError(f"--csr {args.csr}: cannot read it: {exc.strerror}") from None
    cert = issue_node(args.dir, args.name, dns=args.dns, ips=args.ip, days=args.days,
                      passphrase=_passphrase(args), out=args.out, csr=csr)
    emit_json(cert.to_json()) if args.json else _print_issued(cert)
    return 0


def _issue_ak(args: argparse.Namespace) -> int:
    try:
        public = args.ak_public.read_bytes()
    except OSError as exc:
        raise NotFoundError(f"--ak-public {args.ak_public}: cannot read it: {exc.strerror}") from None
    try:
        cert = issue_attestation_key(args.dir, args.name, public, dns=args.dns, days=args.days,
                                     passphrase=_passphrase(args), out=args.out)
    except AttestError as exc:
        raise AttestError(f"--ak-public {args.ak_public}: {exc}") from None
    emit_json(cert.to_json()) if args.json else _print_issued(cert)
    return 0


def _issue_client(args: argparse.Namespace) -> int:
    cert = issue_client(args.dir, args.name, args.role, days=args.days,
                        passphrase=_passphrase(args), out=args.out)
    emit_json(cert.to_json()) if args.json else _print_issued(cert)
    return 0


def _revoke(args: argparse.Namespace) -> int:
    certs = revoke(args.dir, args.which, reason=args.reason, passphrase=_passphrase(args),
                   crl_days=args.crl_days)
    crl = args.dir / "crl.pem"
    if args.json:
        emit_json({"revoked": [c.to_json() for c in certs], "crl": str(crl)})
    else:
        for c in certs:
            print(f"revoked {c.subject}  serial {c.serial:x}  ({c.reason})")
        print(f"CRL re-signed: {crl}; distribute it to the nodes")
    return 0


def _list(args: argparse.Namespace) -> int:
    certs = list_certs(args.dir)
    if args.json:
        emit_json({"ca": ca_info(args.dir).to_json(), "certificates": [c.to_json() for c in certs]})
        return 0
    rows = [(f"{c.serial:x}"[:16], c.kind, c.name, c.role or "-", f"{c.not_after:%Y-%m-%d}",
             c.status() + (f" ({c.reason})" if c.reason else "")) for c in certs]
    print_table(("SERIAL", "KIND", "NAME", "ROLE", "EXPIRES", "STATUS"), rows)
    return 0


def _recovery_key(args: argparse.Namespace) -> int:
    from provisioning.image.recovery import load_recovery_private_key, open_escrow

    key = load_recovery_private_key(args.key, _passphrase(args))
    try:
        with args.escrow.open("rb") as f:
            blob = f.read(key.key_size // 8 + 1)  # hostile input: never more than that is read
    except FileNotFoundError:
        raise NotFoundError(f"recovery key escrow {args.escrow}: does not exist") from None
    except OSError as exc:
        raise ImageError(f"recovery key escrow {args.escrow}: {exc.strerror or exc}") from None
    recovery = open_escrow(key, blob, str(args.escrow))
    if args.json:
        emit_json({"escrow": str(args.escrow), "recovery_key": recovery})
    else:
        print(recovery)
    return 0


def _crl(args: argparse.Namespace) -> int:
    path = write_crl(args.dir, passphrase=_passphrase(args), days=args.days)
    if args.json:
        emit_json({"crl": str(path), "days": args.days})
    else:
        print(f"CRL re-signed: {path} (valid {args.days} days)")
    return 0
