"""The TUF client workflow run in a scratch copy of the trusted metadata, then committed.

python-tuf's ``Updater`` persists each piece of metadata as soon as it verifies it.  A node
wants more: a refresh that fails (an attack, a half-copied stick) must leave its state
byte-for-byte unchanged.  So the updater works on a scratch copy of the trusted files and
:func:`updater_session` copies the result back only when the caller's block succeeds
(``keep_partial=True`` keeps the spec's step-by-step persistence instead, which the
conformance CLI wants).  The reference time for expiry comes from the clock policy.

Targets are streamed by :func:`download_verified`: length and hashes are enforced while
the bytes arrive, nothing beyond the declared length is ever written, and the file appears
at its final name only once it has verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import urllib3
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.ngclient import Updater, UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface

from agent.errors import NotFoundError, UpdateError, VerificationError
from agent.fsutil import atomic_write, atomic_write_bytes
from agent.updates.clock import format_time
from agent.updates.fetchers import CHUNK, Source

__all__ = [
    "CAPS",
    "TracingFetcher",
    "cached_name",
    "download_verified",
    "explain",
    "file_matches",
    "target_url",
    "trusted_set",
    "updater_session",
]

log = logging.getLogger(__name__)

# Metadata size caps (bytes).  A registry of a few thousand targets stays far below them;
# anything larger is refused before it is parsed.  Snapshot and targets are also held to
# the exact length their parent metadata declares.
CAPS = UpdaterConfig(
    max_root_rotations=64,
    max_delegations=32,
    root_max_length=512 * 1024,
    timestamp_max_length=16 * 1024,
    snapshot_max_length=2 * 1024 * 1024,
    targets_max_length=16 * 1024 * 1024,
)
_ROLE_ORDER = (Root.type, Timestamp.type, Snapshot.type, Targets.type)


class TracingFetcher(FetcherInterface):
    """Wraps a fetcher and remembers the last URL asked for, so errors can name the file."""

    def __init__(self, inner: FetcherInterface) -> None:
        self.inner = inner
        self.last_url = ""

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.last_url = url
        return self.inner.fetch(url)


def trusted_set(updater: Updater) -> Any:
    """The updater's verified metadata set (python-tuf keeps it private; we only read it)."""
    return updater._trusted_set  # private in python-tuf: see _set_reference_time


def _set_reference_time(updater: Updater, when: datetime) -> None:
    # python-tuf fixes its reference time with datetime.now() when the Updater is created and
    # offers no parameter; tuf-conformance's own python-tuf client sets this attribute the
    # same way.  Fail closed if a future python-tuf renames it.
    tset = trusted_set(updater)
    if not isinstance(getattr(tset, "reference_time", None), datetime):
        raise UpdateError("this python-tuf has no TrustedMetadataSet.reference_time: "
                          "refusing to check expiry against an uncontrolled clock")
    tset.reference_time = when


def _plain_files(directory: Path) -> dict[str, bytes]:
    """Role files under their plain names (``root.json``, ``timestamp.json``, ...).

    python-tuf names a delegated role's file by the URL-quoted role name, which may start
    with a dot (``..%2Fdelegatedrole.json`` for the role ``../delegatedrole``): every
    ``*.json`` file counts.  Interrupted atomic writes (``.NAME.XXXX.tmp``) do not match.
    """
    files = {}
    for path in sorted(directory.glob("*.json")):
        if path.is_file():  # root.json is a link into root_history/ in the scratch copy
            files[path.name] = path.read_bytes()
    return files


def _commit(scratch: Path, metadata_dir: Path, before: dict[str, bytes]) -> list[str]:
    after = _plain_files(scratch)
    order = [f"{r}.json" for r in _ROLE_ORDER]
    names = sorted(after, key=lambda n: (order.index(n) if n in order else len(order), n))
    changed = []
    for name in names:
        if before.get(name) != after[name]:
            atomic_write_bytes(metadata_dir / name, after[name])
            changed.append(name)
    return changed


@contextlib.contextmanager
def updater_session(metadata_dir: Path, source: Source, reference_time: datetime, *,
                    keep_partial: bool = False) -> Iterator[tuple[Updater, TracingFetcher]]:
    """Yield an ``Updater`` over a scratch copy of ``metadata_dir``; commit when the block succeeds.

    With ``keep_partial`` the metadata verified before a failure is committed too (the
    TUF specification's step-by-step persistence).

    Raises:
        NotFoundError: ``metadata_dir/root.json`` does not exist (not initialised).
        VerificationError: the trusted root itself does not load.
    """
    root_path = metadata_dir / "root.json"
    try:
        before = _plain_files(metadata_dir)
        bootstrap = before["root.json"]
    except (FileNotFoundError, KeyError):
        raise NotFoundError(f"{root_path}: no trusted root; initialise the client first") from None
    fetcher = TracingFetcher(source.fetcher)
    with tempfile.TemporaryDirectory(prefix="appliance-tuf-") as tmp:
        scratch = Path(tmp)
        for name, data in before.items():
            (scratch / name).write_bytes(data)
        try:
            updater = Updater(str(scratch), source.metadata_url, None, source.targets_url,
                              fetcher=fetcher, config=CAPS, bootstrap=bootstrap)
        except tuf_exc.RepositoryError as exc:
            raise VerificationError(f"{root_path}: the trusted root does not load: {exc}") from None
        _set_reference_time(updater, reference_time)
        ok = False
        try:
            yield updater, fetcher
            ok = True
        finally:
            if ok or keep_partial:
                changed = _commit(scratch, metadata_dir, before)
                if changed:
                    log.debug("committed %s to %s", ", ".join(changed), metadata_dir)


def explain(exc: Exception, fetcher: TracingFetcher, updater: Updater | None = None,
            clock_note: Callable[[], str] | None = None) -> Exception:
    """Translate python-tuf's exceptions into ours, naming the file and the fact.

    Returns the exception to raise (the caller raises it ``from None``).
    """
    where = fetcher.last_url or "(no download yet)"
    result: Exception = exc
    if isinstance(exc, tuf_exc.ExpiredMetadataError):
        result = VerificationError(_expired_message(str(exc), updater, clock_note))
    elif isinstance(exc, tuf_exc.DownloadLengthMismatchError):
        result = VerificationError(f"{where}: refused: {exc} (metadata size cap or declared length)")
    elif isinstance(exc, tuf_exc.RepositoryError):
        kind = type(exc).__name__.removesuffix("Error")
        result = VerificationError(f"{where}: refused ({kind}): {exc}")
    elif isinstance(exc, tuf_exc.DownloadHTTPError):
        result = UpdateError(f"{where}: HTTP status {exc.status_code}: {exc}")
    elif isinstance(exc, tuf_exc.DownloadError):
        result = UpdateError(f"{where}: download failed: {exc.__cause__ or exc}")
    elif isinstance(exc, OSError):
        result = UpdateError(f"TUF client could not read or write its files: {exc}")
    return result


def _expired_message(text: str, updater: Updater | None, clock_note: Callable[[], str] | None) -> str:
    role = next((n for n in (Timestamp.type, Snapshot.type, Root.type, Targets.type)
                 if f"{n}.json" in text), None)
    if role is None:
        return f"{text} (refused)"
    parts = [f"{role}.json is expired"]
    if updater is not None:
        tset = trusted_set(updater)
        if role in tset:
            parts.append(f"it expired at {format_time(tset[role].expires)}")
        parts.append(f"the node's reference time is {format_time(tset.reference_time)}")
    message = "; ".join(parts)
    if clock_note is not None:
        message += f" ({clock_note()})"
    return message + ": refused (a freeze attack, or a registry that was not published in time)"


def target_url(updater: Updater, base_url: str, target: TargetFile) -> str:
    """The URL of ``target``: hash-prefixed file name when the root uses consistent snapshots."""
    path = target.path
    if trusted_set(updater).root.consistent_snapshot:
        digest = next(iter(target.hashes.values()))
        dirname, sep, basename = path.rpartition("/")
        path = f"{dirname}{sep}{digest}.{basename}"
    return base_url + quote(path)


def _hashers(target: TargetFile) -> dict[str, Any]:
    hashers = {}
    for algo in target.hashes:
        try:
            hashers[algo] = hashlib.new(algo)
        except ValueError:
            raise VerificationError(f"target {target.path}: unsupported hash algorithm {algo!r}") from None
    if not hashers:
        raise VerificationError(f"target {target.path}: its metadata lists no hashes")
    return hashers


def file_matches(path: Path, target: TargetFile) -> bool:
    """Whether ``path`` already holds exactly ``target`` (length and every hash)."""
    try:
        if path.stat().st_size != target.length:
            return False
        hashers = _hashers(target)
        with path.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                for h in hashers.values():
                    h.update(chunk)
    except OSError:
        return False
    return all(h.hexdigest() == target.hashes[a] for a, h in hashers.items())


def download_verified(fetcher: FetcherInterface, url: str, target: TargetFile, dest: Path,
                      on_chunk: Callable[[int], None] | None = None) -> Path:
    """Stream ``url`` into ``dest``, enforcing ``target``'s length and hashes while reading.

    Bytes beyond the declared length are never written; ``dest`` appears (atomically) only
    once everything verified, and is left as it was otherwise.

    Raises:
        VerificationError: longer or shorter than declared, or a hash differs.
        UpdateError: the download itself failed.
    """
    hashers = _hashers(target)
    expected = target.length
    received = 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dest.parent).free
    if free < expected:
        raise UpdateError(f"{dest.parent}: {free} bytes free, target {target.path} needs {expected}")
    try:
        chunks = fetcher.fetch(url)
        with contextlib.ExitStack() as stack:
            # A generator's close() ends the HTTP response or closes the file at once.
            stack.callback(getattr(chunks, "close", lambda: None))
            out = stack.enter_context(atomic_write(dest))
            writer = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="tuf-write"))
            # One write in flight while the next chunk is hashed: hashlib and file writes both
            # release the GIL, so the two overlap and at most two chunks are held in memory.
            pending: Future[int] | None = None
            for chunk in chunks:
                if len(chunk) > expected - received:
                    raise VerificationError(
                        f"{url}: target {target.path} is longer than the {expected} bytes its "
                        f"metadata declares: download stopped at {received} bytes")
                received += len(chunk)
                if pending is not None:
                    pending.result()
                pending = writer.submit(out.write, chunk)
                for h in hashers.values():
                    h.update(chunk)
                if on_chunk is not None:
                    on_chunk(len(chunk))
            if pending is not None:
                pending.result()
            if received != expected:
                raise VerificationError(f"{url}: target {target.path} has {received} bytes, its "
                                        f"metadata declares {expected}")
            for algo, h in hashers.items():
                if h.hexdigest() != target.hashes[algo]:
                    raise VerificationError(f"{url}: target {target.path}: {algo} {h.hexdigest()} "
                                            f"does not match the signed {target.hashes[algo]}")
    except tuf_exc.DownloadHTTPError as exc:
        raise UpdateError(f"{url}: HTTP status {exc.status_code}: {exc}") from None
    except (tuf_exc.DownloadError, urllib3.exceptions.HTTPError) as exc:
        # python-tuf's fetcher lets a connection broken mid-body through as urllib3's own error
        raise UpdateError(f"{url}: download failed after {received} of {expected} bytes: "
                          f"{exc.__cause__ or exc}") from None
    return dest


def cached_name(target_path: str) -> str:
    """python-tuf's file name for a target in a flat target directory (URL-quoted path)."""
    return quote(target_path, "")
