"""``appliance registry init|add|publish|rotate-key|status|serve``."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from agent.errors import ConfigError, NotFoundError
from provisioning import registry
from provisioning.output import emit_json, examples, print_table

__all__ = ["register"]

log = logging.getLogger(__name__)


def _passphrase_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--passphrase-file", type=Path, metavar="FILE",
                   help=f"file holding the key passphrase (else ${registry.PASSPHRASE_ENV})")


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser("registry", **examples(
            "appliance registry init site-registry",
            "appliance registry status site-registry"),
        help="the site's local TUF registry: keys, targets, publish, serve",
                       parents=[common])
    rsub = p.add_subparsers(dest="registry_command", metavar="ACTION")
    rsub.required = True

    i = rsub.add_parser("init", **examples(
            "appliance registry init site-registry",
            "appliance registry init site-registry --root-threshold 2 --root-keys 3"),
        parents=[common], help="create keys and version 1 of every role")
    i.add_argument("dir", type=Path, help="the registry directory to create (new or empty)")
    i.add_argument("--root-threshold", type=int, default=1,
                   help="root signatures needed (default 1 for a lab; use >= 2 in production)")
    i.add_argument("--root-keys", type=int, default=None, help="number of root keys (default: the threshold)")
    _passphrase_args(i)
    i.set_defaults(handler=_init)

    a = rsub.add_parser("add", **examples(
            "appliance registry add site-registry tiny.bundle",
            "appliance registry add site-registry os.release --kind os --name edge --version 1"),
        parents=[common], help="add a bundle or other artifact as a pending target")
    a.add_argument("dir", type=Path, help="the registry directory")
    a.add_argument("file", type=Path, help="the bundle or other artifact")
    a.add_argument("--kind", choices=registry.KINDS, help="default: bundle for *.bundle, else file")
    a.add_argument("--name", help="target name (bundles: from the manifest)")
    a.add_argument("--version", help="target version (bundles: from the manifest)")
    a.set_defaults(handler=_add)

    pu = rsub.add_parser("publish", **examples(
            "appliance registry publish site-registry",
            "appliance registry publish site-registry --passphrase-file /run/secrets/registry"),
        parents=[common],
                         help="sign new targets, snapshot and timestamp versions (renews expiries)")
    pu.add_argument("dir", type=Path, help="the registry directory")
    _passphrase_args(pu)
    pu.set_defaults(handler=_publish)

    r = rsub.add_parser("rotate-key", **examples(
            "appliance registry rotate-key site-registry timestamp"),
        parents=[common], help="replace a role's key(s); new root version")
    r.add_argument("dir", type=Path, help="the registry directory")
    r.add_argument("role", choices=("root", "targets", "snapshot", "timestamp"),
                   help="the role whose key(s) to replace")
    r.add_argument("--key", help="key id (or unique prefix) to replace; default: all of the role's keys")
    _passphrase_args(r)
    r.set_defaults(handler=_rotate)

    s = rsub.add_parser("status", **examples(
            "appliance registry status site-registry --json"),
        parents=[common], help="versions, expiries, keys, targets, warnings")
    s.add_argument("dir", type=Path, help="the registry directory")
    s.set_defaults(handler=_status)

    v = rsub.add_parser("serve", **examples(
            "appliance registry serve site-registry --port 8080 --bind 0.0.0.0"),
        parents=[common], help="read-only HTTP of the published tree")
    v.add_argument("dir", type=Path, help="the registry directory (its published/ tree is served)")
    v.add_argument("--port", type=int, required=True, help="TCP port (0: any free port)")
    v.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    v.set_defaults(handler=_serve)


def _passphrase(args: argparse.Namespace) -> str | None:
    """From --passphrase-file (one line; trailing newline dropped) or the environment."""
    if args.passphrase_file is not None:
        try:
            text: str = args.passphrase_file.read_text()
        except FileNotFoundError:
            raise NotFoundError(f"{args.passphrase_file}: no such passphrase file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{args.passphrase_file}: cannot read the passphrase: {exc}") from None
        text = text.rstrip("\r\n")
        if not text:
            raise ConfigError(f"{args.passphrase_file}: the passphrase file is empty")
        return text
    env = os.environ.get(registry.PASSPHRASE_ENV, "")
    return env or None


def _print_status(st: dict[str, Any]) -> None:
    print(f"registry {st['registry']}  (published tree: {st['published']})")
    rows = [[role, r["version"], r["expires"] + (" EXPIRED" if r["expired"] else ""),
             f"{r['threshold']}/{len(r['keys'])}", r["signatures"],
             ", ".join(f"{k['keyid'][:12]}({k['private_key']})" for k in r["keys"])]
            for role, r in st["roles"].items()]
    print_table(["role", "version", "expires", "threshold", "signatures", "keys"], rows)
    print(f"{len(st['targets'])} target(s), {len(st['pending'])} pending publish")
    for t in st["targets"]:
        print(f"  {t['path']}  {t['length']} bytes  sha256 {t['sha256'][:16]}…")
    for p in st["pending"]:
        print(f"  (pending) {p}")
    for w in st["warnings"]:
        print(f"warning: {w}")


def _init(args: argparse.Namespace) -> int:
    st = registry.init_registry(args.dir, root_threshold=args.root_threshold, root_keys=args.root_keys,
                                passphrase=_passphrase(args))
    if args.json:
        emit_json(st)
    else:
        _print_status(st)
        print(f"give nodes {args.dir / 'published' / 'metadata' / '1.root.json'} as their trusted root")
    return 0


def _add(args: argparse.Namespace) -> int:
    res = registry.add_target(args.dir, args.file, kind=args.kind, name=args.name, version=args.version)
    if args.json:
        emit_json(res)
    else:
        print(f"{res['state']}: {res['path']}  {res['length']} bytes  sha256 {res['sha256']}")
        print("run `appliance registry publish` to sign it")
    return 0


def _publish(args: argparse.Namespace) -> int:
    res = registry.publish(args.dir, passphrase=_passphrase(args))
    if args.json:
        emit_json(res)
    else:
        v = res["versions"]
        print(f"published targets v{v['targets']}, snapshot v{v['snapshot']}, timestamp v{v['timestamp']}")
        for path in res["published"]:
            print(f"  new: {path}")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    res = registry.rotate_key(args.dir, args.role, keyid=args.key, passphrase=_passphrase(args))
    if args.json:
        emit_json(res)
    else:
        print(f"{res['role']}: new key(s) {', '.join(k[:12] for k in res['new'])}; root is now "
              f"v{res['root_version']}; retired {', '.join(k[:12] for k in res['retired'])} "
              "(moved to keys/retired/)")
    return 0


def _status(args: argparse.Namespace) -> int:
    st = registry.registry_status(args.dir)
    if args.json:
        emit_json(st)
    else:
        _print_status(st)
    return 0


def _serve(args: argparse.Namespace) -> int:
    server = registry.make_server(args.dir, args.port, args.bind)
    host, port = server.server_address[:2]
    url = f"http://{host!s}:{port}/"
    if args.json:
        emit_json({"url": url, "published": str(args.dir / "published")})
    else:
        print(f"serving {args.dir / 'published'} read-only at {url} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopped")
    finally:
        server.server_close()
    return 0
