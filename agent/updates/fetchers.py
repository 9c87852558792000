"""Fetchers: where the TUF client's bytes come from (HTTP(S) or a directory such as a USB stick).

Both implement python-tuf's ``FetcherInterface``; verification never depends on which one
is used.  The directory fetcher answers like an HTTP server: a missing file (or anything
that is not a regular file inside the tree) is ``DownloadHTTPError`` 404, which is how the
updater learns that ``N+1.root.json`` does not exist and that the root it has is the newest.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tuf.api.exceptions import DownloadError, DownloadHTTPError
from tuf.ngclient.fetcher import FetcherInterface
from tuf.ngclient.urllib3_fetcher import Urllib3Fetcher

from agent.errors import ConfigError

__all__ = ["CHUNK", "DirectoryFetcher", "Source", "http_fetcher", "parse_source"]

CHUNK = 1 << 20  # 1 MiB: large enough to keep hashing at full speed, small enough for RSS


class DirectoryFetcher(FetcherInterface):
    """Serve ``file://`` URLs from one directory tree, with HTTP-like status codes.

    Only regular files inside ``root`` are served (after resolving symlinks); a FIFO or a
    device on a hostile stick cannot block or flood the reader.
    """

    def __init__(self, root: Path, chunk_size: int = CHUNK) -> None:
        self.root = Path(root).resolve()
        self.chunk_size = chunk_size

    def url_for(self, path: Path) -> str:
        """The URL this fetcher serves for ``path`` (a directory URL ends with a slash)."""
        url = Path(path).resolve().as_uri()
        return url if url.endswith("/") else url + "/"

    def _path(self, url: str) -> Path:
        parts = urlsplit(url)
        if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
            raise DownloadError(f"{url}: the directory fetcher reads only file:// URLs")
        path = Path(unquote(parts.path)).resolve()
        if path != self.root and self.root not in path.parents:
            raise DownloadHTTPError(f"{url}: outside the published tree {self.root}", 404)
        return path

    def _fetch(self, url: str) -> Iterator[bytes]:
        path = self._path(url)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise DownloadHTTPError(f"{path}: not found", 404) from None
        except PermissionError:
            raise DownloadHTTPError(f"{path}: permission denied", 403) from None
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.EISDIR, errno.ELOOP):
                raise DownloadHTTPError(f"{path}: not found", 404) from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise DownloadHTTPError(f"{path}: not a regular file", 404)
        return self._chunks(fd)

    def _chunks(self, fd: int) -> Iterator[bytes]:
        with os.fdopen(fd, "rb", buffering=0) as handle:
            while chunk := handle.read(self.chunk_size):
                yield chunk


def http_fetcher() -> FetcherInterface:
    """python-tuf's default HTTP fetcher (urllib3), with our chunk size."""
    return Urllib3Fetcher(socket_timeout=30, chunk_size=CHUNK, app_user_agent="sovereign-appliance")


class Source:
    """Where a published registry tree is: metadata and targets base URLs and the fetcher."""

    def __init__(self, metadata_url: str, targets_url: str, fetcher: FetcherInterface) -> None:
        self.metadata_url = metadata_url
        self.targets_url = targets_url
        self.fetcher = fetcher


def parse_source(source: str) -> Source:
    """An ``http(s)://`` URL or a directory (or ``file://`` URL) of a published tree.

    The tree has ``metadata/`` and ``targets/`` below it, as ``appliance registry`` publishes.

    Raises:
        ConfigError: neither an HTTP(S) URL nor an existing directory.
    """
    parts = urlsplit(source)
    if parts.scheme in ("http", "https"):
        base = source.rstrip("/") + "/"
        return Source(base + "metadata/", base + "targets/", http_fetcher())
    if parts.scheme == "file":
        source = unquote(parts.path)
    elif parts.scheme:
        raise ConfigError(f"registry source {source!r}: use an http(s):// URL or a directory")
    root = Path(source)
    if not root.is_dir():
        raise ConfigError(f"registry source {source}: no such directory")
    fetcher = DirectoryFetcher(root)
    return Source(fetcher.url_for(root / "metadata"), fetcher.url_for(root / "targets"), fetcher)
