"""``appliance-tuf-client``: the TUF conformance test suite's client command line.

    appliance-tuf-client --metadata-dir DIR init TRUSTED_ROOT
    appliance-tuf-client --metadata-dir DIR --metadata-url URL refresh
    appliance-tuf-client --metadata-dir DIR --metadata-url URL --target-name PATH [--target-name ...]
                         --target-dir DIR --target-base-url URL download

Global options come before the subcommand.  Exit status 0 on success, 1 on any failure.
Trusted metadata is kept in ``--metadata-dir`` under plain names (``root.json``,
``timestamp.json``, ...); what verified before a failure is kept, as the TUF specification
persists it step by step.  Artifacts are stored in ``--target-dir`` under their URL-quoted
target path; one already there with matching hashes is not fetched again.  Time comes from
the system clock (run it under ``faketime`` to move it).  The same verification code as the
node's :class:`~agent.updates.client.RegistryClient` runs underneath.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn
from urllib.parse import unquote, urlsplit

from tuf.api import exceptions as tuf_exc
from tuf.ngclient import Updater

from agent.errors import ApplianceError, NotFoundError
from agent.fsutil import atomic_write_bytes
from agent.updates import _session
from agent.updates.clock import system_now
from agent.updates.fetchers import DirectoryFetcher, Source, http_fetcher

__all__ = ["main"]

log = logging.getLogger("appliance-tuf-client")
PROG = "appliance-tuf-client"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="TUF client speaking the tuf-conformance CLI protocol")
    p.add_argument("--metadata-dir", type=Path, required=True, help="trusted metadata directory")
    p.add_argument("--metadata-url", help="base URL of the repository's metadata")
    p.add_argument("--target-name", action="append", default=[], help="target path (repeatable)")
    p.add_argument("--target-dir", type=Path, help="where downloaded artifacts are stored")
    p.add_argument("--target-base-url", help="base URL of the repository's targets")
    p.add_argument("--debug", action="store_true", help="log every step")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    i = sub.add_parser("init", help="store the trusted root (no network)")
    i.add_argument("trusted_root", type=Path)
    sub.add_parser("refresh", help="update top-level metadata (full TUF client workflow)")
    sub.add_parser("download", help="refresh, then download each --target-name in order")
    return p


def _source(metadata_url: str, targets_url: str | None) -> Source:
    def base(url: str) -> str:
        return url if url.endswith("/") else url + "/"

    if urlsplit(metadata_url).scheme in ("http", "https"):
        return Source(base(metadata_url), base(targets_url or metadata_url), http_fetcher())
    # file:// URLs or plain directories: the directory fetcher, rooted at the common parent.
    meta = Path(unquote(urlsplit(metadata_url).path) if metadata_url.startswith("file:") else metadata_url)
    tgt = Path(unquote(urlsplit(targets_url).path) if targets_url and targets_url.startswith("file:")
               else targets_url or meta)
    fetcher = DirectoryFetcher(Path("/"))
    return Source(fetcher.url_for(meta), fetcher.url_for(tgt), fetcher)


def _init(args: argparse.Namespace) -> None:
    try:
        data = args.trusted_root.read_bytes()
    except OSError as exc:
        raise NotFoundError(f"{args.trusted_root}: cannot read the trusted root: {exc}") from None
    args.metadata_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.metadata_dir / "root.json", data)
    log.info("initialised %s", args.metadata_dir)


def _need(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if not getattr(args, n)]
    if missing:
        raise NotFoundError(f"{args.command} needs {', '.join(missing)}")


def _run(args: argparse.Namespace) -> None:
    _need(args, "metadata_url")
    if args.command == "download":
        _need(args, "target_name", "target_dir", "target_base_url")
    source = _source(args.metadata_url, args.target_base_url)
    updater = None
    fetcher = None
    try:
        with _session.updater_session(args.metadata_dir, source, system_now(),
                                      keep_partial=True) as (updater, fetcher):
            updater.refresh()
            for name in args.target_name if args.command == "download" else []:
                _download(updater, fetcher, source, name, args.target_dir)
    except (tuf_exc.RepositoryError, tuf_exc.DownloadError, OSError) as exc:
        if fetcher is None:
            raise
        raise _session.explain(exc, fetcher, updater) from None


def _download(updater: Updater, fetcher: _session.TracingFetcher, source: Source, name: str,
              target_dir: Path) -> None:
    info = updater.get_targetinfo(name)
    if info is None:
        raise NotFoundError(f"target {name!r}: not in the repository's signed metadata")
    dest = target_dir / _session.cached_name(info.path)
    if _session.file_matches(dest, info):
        log.info("%s: already present with matching hashes; not fetched again", dest)
        return
    url = _session.target_url(updater, source.targets_url, info)
    _session.download_verified(fetcher, url, info, dest)
    log.info("downloaded %s to %s", name, dest)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; 0 on success, 1 on any failure."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format=f"{PROG}: %(message)s", stream=sys.stderr)
    try:
        if args.command == "init":
            _init(args)
        else:
            _run(args)
    except ApplianceError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 1
    except Exception as exc:  # the protocol wants exit 1 on any failure
        log.debug("unexpected failure", exc_info=True)
        sys.stderr.write(f"{PROG}: error: {type(exc).__name__}: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
