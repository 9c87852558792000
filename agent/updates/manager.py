"""Updates of model bundles on the node: check, apply, roll back, recover after a crash.

An update of bundle NAME from the active version OLD to NEW runs these steps, each
recorded in the journal (:mod:`agent.updates.journal`) before the next begins:

1. refresh the registry (TUF) from the first configured source that answers;
2. version policy: NEW must be newer than OLD (:func:`agent.bundle.parse_version`); an
   update never goes backwards, only :meth:`UpdateManager.rollback` to a kept version may;
3. stage: download into ``STATE/updates/staging/`` with the signed length and hashes
   enforced while the bytes arrive;
4. unpack into the model store (manifest hashes re-checked) and load the ONNX Runtime
   session that will serve it; the golden vectors run on that very session (a generative
   bundle: its model opened with onnxruntime-genai or ONNX Runtime, and its golden check,
   greedy token ids or embedding vectors, run on that very model object);
5. switch (:meth:`ModelRepository.swap`): the store's ``active`` record names NEW (the
   commit point); new requests go to NEW, requests already admitted (streams of a language
   model included) finish on OLD, for up to ``drain_s`` seconds, before it is closed;
6. keep ``[updates] keep_versions`` earlier versions and delete the rest;
7. a history line, then the journal is removed and staging emptied.

A failure before step 5 is a refusal: everything the update created is removed; what a
refusal keeps is listed in :data:`KEPT_AFTER_REFUSAL`, everything else is as it was, byte for
byte.  The caller going away (deadline, cancellation, disconnect) changes nothing of this:
the work runs in a task of its own, shielded from the RPC, and holds the update lock until
its worker threads really end (:meth:`UpdateManager._shielded`).  A crash anywhere is resolved
by :meth:`UpdateManager.recover` at the next start, before anything is served: if the
``active`` record names NEW the transaction is finished, otherwise undone.

Every outcome becomes an event (``update.applied``, ``update.refused``,
``update.rolled_back``) and a log line naming the target, version and hash.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from agent.bundle import parse_version
from agent.config import UpdatesSection
from agent.errors import ApplianceError, NotFoundError, UpdateError
from agent.fsutil import atomic_write_text
from agent.inference.repository import ModelRepository, Servable
from agent.inference.store import ModelStore
from agent.state import StateLayout
from agent.updates.journal import HistoryEntry, Journal, Transaction, checkpoint
from agent.updates.sources import registry_sources

if TYPE_CHECKING:
    from agent.updates.client import RegistryClient, TargetInfo

__all__ = ["KEPT_AFTER_REFUSAL", "Outcome", "Pending", "UpdateManager"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# What a refused update keeps under the state directory (everything else stays byte for
# byte): the event log (its job), the TUF metadata the refresh verified (genuine, newer
# metadata is kept as TUF requires, so a rollback of the registry stays detectable) and the
# clock floor taken from it (agent.updates.clock).
KEPT_AFTER_REFUSAL = ("events/", "tuf/metadata/", "tuf/clock.json")


@dataclass(frozen=True)
class Pending:
    """A bundle version newer than what runs, offered on the node's channel."""

    target: str
    kind: str
    name: str
    version: str
    current_version: str
    sha256: str
    length: int


@dataclass(frozen=True)
class Outcome:
    """What became of one requested update or rollback."""

    target: str
    name: str
    version: str
    sha256: str
    outcome: str  # applied | refused | skipped | rolled-back
    reason: str = ""
    time: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "name": self.name, "version": self.version,
                "sha256": self.sha256, "outcome": self.outcome, "reason": self.reason,
                "time": self.time}


class _RefusedError(Exception):
    """An update refused before anything changed (carries the reason)."""


def _on_channel(target: TargetInfo, channel: str) -> bool:
    channels = target.custom.get("channels", target.custom.get("channel"))
    if channels is None:
        return True  # a target that names no channel is on every channel
    if isinstance(channels, str):
        channels = [channels]
    return isinstance(channels, list) and channel in channels


def _version(text: str) -> tuple[int, ...] | None:
    try:
        return parse_version(text)
    except ValueError:
        return None


async def _wait_out(future: asyncio.Future[Any]) -> None:
    """Wait until ``future`` is done, even while this task is being cancelled again."""
    while not future.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([future])


async def _to_end(work: Coroutine[Any, Any, T], discard: Callable[[T], None] | None = None) -> T:
    """Await ``work`` (a task of its own) to its end.  Work on a thread cannot be stopped:
    when this task is cancelled meanwhile, wait for ``work`` to end before the cancellation
    goes on (so that nobody undoes work still in progress), and hand a result nobody will
    take to ``discard``."""
    future = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await _wait_out(future)
        if discard is not None and not future.cancelled() and future.exception() is None:
            discard(future.result())
        raise


def _in_thread(fn: Callable[[], T], discard: Callable[[T], None] | None = None) -> Coroutine[Any, Any, T]:
    """``fn()`` on a worker thread, awaited to its end (:func:`_to_end`)."""
    return _to_end(asyncio.to_thread(fn), discard)


def _close(model: Servable) -> None:
    """Close a loaded model that will not be served (a result nobody takes)."""
    model.close()


def _reap(task: asyncio.Task[Any]) -> None:
    """Done callback of update work whose caller went away: log what nobody else will see."""
    if task.cancelled():
        log.warning("update work was cancelled (agent stopping?); its undo ran")
    elif (exc := task.exception()) is not None:
        log.error("update work failed after its caller went away", exc_info=exc)


class UpdateManager:
    """Check, apply and roll back bundle updates; recover after a crash.  See the module doc.

    ``repo`` is the inference repository or a function returning it (the inference component
    starts after this one).  ``events`` is the node's event log (None: log lines only).
    """

    def __init__(self, state_dir: Path, settings: UpdatesSection,
                 repo: ModelRepository | Callable[[], ModelRepository | None], events: Any = None, *,
                 drain_s: float = 30.0) -> None:
        self.state_dir = Path(state_dir)
        self.settings = settings
        self._repo = repo
        self.events = events
        self.drain_s = drain_s
        self.journal = Journal(self.state_dir)
        self.store = ModelStore(self.state_dir)
        self._lock = asyncio.Lock()
        self._work: set[asyncio.Task[Any]] = set()  # update work whose caller may be gone
        # Called with a bundle name once its switch committed, the update lock still held:
        # the agent's other serving processes follow it (agent.workers).
        self.after_switch: Callable[[str], Awaitable[None]] | None = None
        self._pins = dict(self._parse_pin(p) for p in settings.pins)

    @staticmethod
    def _parse_pin(spec: str) -> tuple[str, str]:
        name, sep, version = spec.partition("@")
        if not name or not sep or _version(version) is None:
            from agent.errors import ConfigError

            raise ConfigError(f"[updates] pins: {spec!r} is not NAME@VERSION (e.g. affine@1.2.0)")
        return name, version

    @property
    def repo(self) -> ModelRepository:
        repo = self._repo() if callable(self._repo) else self._repo
        if repo is None:
            raise UpdateError("no inference component runs on this node: bundles cannot be updated")
        return repo

    # ------------------------------------------------------------------ reporting

    def _event(self, kind: str, severity: str, outcome: Outcome, message: str, **extra: Any) -> None:
        level = logging.WARNING if severity != "info" else logging.INFO
        log.log(level, "%s: target %s, %s %s, sha256 %s: %s", kind, outcome.target or "-",
                outcome.name, outcome.version, outcome.sha256 or "-", message)
        if self.events is None:
            return
        try:
            self.events.record(kind, severity, outcome.name, message, target=outcome.target,
                               version=outcome.version, sha256=outcome.sha256, outcome=outcome.outcome,
                               reason=outcome.reason, **extra)
        except ApplianceError as exc:  # a full disk must not turn a refusal into a crash
            log.error("event %s not persisted: %s", kind, exc)  # noqa: TRY400 - expected

    def _refused(self, target: str, name: str, version: str, sha256: str, reason: str,
                 **extra: Any) -> Outcome:
        outcome = Outcome(target, name, version, sha256, "refused", reason, time.time())
        self._event("update.refused", "warning", outcome, f"update to {name} {version} refused: {reason}",
                    **extra)
        return outcome

    # ------------------------------------------------------------------ registry

    def _client(self) -> tuple[RegistryClient, str]:
        """A refreshed client of the first source that verifies; raises UpdateError listing all."""
        # TUF, securesystemslib and urllib3 load on the first registry call, not on the agent's
        # way to SERVING: updates are asked for, never polled (issue #14, the boot)
        from agent.updates.client import RegistryClient
        sources = registry_sources(self.settings)
        if not sources:
            raise UpdateError("no registry source: set [updates] sources, or mount a medium holding a "
                              f"published registry where [updates] mount_glob "
                              f"({self.settings.mount_glob!r}) finds it")
        failures = []
        for source in sources:
            try:
                client = RegistryClient(self.state_dir, source)
                client.refresh()
            except ApplianceError as exc:
                log.warning("registry source %s: %s", source, exc)
                failures.append(f"{source}: {exc}")
                continue
            return client, source
        raise UpdateError("no registry source could be refreshed: " + "; ".join(failures))

    def _offered(self, client: RegistryClient) -> list[TargetInfo]:
        return [t for t in client.targets()
                if t.kind == "bundle" and _on_channel(t, self.settings.channel)
                and _version(t.version) is not None]

    def _pending(self, client: RegistryClient) -> list[Pending]:
        offered = self._offered(client)
        names = sorted({m.name for m in self.store.installed()})
        out = []
        for name in names:
            current = self.store.active_version(name) or ""
            now = _version(current) or ()
            candidates = [t for t in offered if t.name == name and (_version(t.version) or ()) > now]
            pin = self._pins.get(name)
            if pin is not None:
                candidates = [t for t in candidates if t.version == pin]
            if candidates:
                best = max(candidates, key=lambda t: _version(t.version) or ())
                out.append(Pending(best.path, best.kind, name, best.version, current, best.sha256,
                                   best.length))
        return out

    def _flock(self) -> int:
        """Take the update lock between the agent's serving processes (``flock`` on the
        updates directory; the kernel drops it when a holder dies), waiting for it; the
        descriptor to close to release it."""
        self.journal.ensure()
        fd = os.open(self.journal.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        """This process's lock, then the one shared with the agent's other serving processes."""
        async with self._lock:
            fd = await asyncio.to_thread(self._flock)
            try:
                yield
            finally:
                os.close(fd)  # releases the flock

    async def _switched(self, name: str) -> None:
        if self.after_switch is None:
            return
        try:
            await self.after_switch(name)
        except ApplianceError as exc:  # committed here; the others say why they could not follow
            log.error("%s: switched in this process; %s", name, exc)  # noqa: TRY400

    async def check(self) -> tuple[list[Pending], str]:
        """Refresh from the first source that verifies; list what is newer than what runs.

        Raises:
            UpdateError: no source configured or none could be refreshed.
        """
        async with self._locked():
            client, source = await asyncio.to_thread(self._client)
            return await asyncio.to_thread(self._pending, client), source

    # ------------------------------------------------------------------ apply

    def _resolve(self, client: RegistryClient, spec: str) -> TargetInfo:
        """A target path, NAME@VERSION, or NAME (its newest version on the channel)."""
        for t in client.targets():
            if t.path == spec and t.kind in ("bundle", "os"):
                return t
        name, _, version = spec.partition("@")
        if version:
            return client.find_bundle(name, version)
        on_channel = [t for t in self._offered(client) if t.name == name]
        pin = self._pins.get(name)
        if pin is not None:
            on_channel = [t for t in on_channel if t.version == pin]
        if not on_channel:
            raise NotFoundError(f"registry {client.source_text}: no bundle {name!r} on channel "
                                f"{self.settings.channel!r}" + (f" at pinned {pin}" if pin else ""))
        return max(on_channel, key=lambda t: _version(t.version) or ())

    async def apply(self, targets: Sequence[str] = (), *, dry_run: bool = False) -> list[Outcome]:
        """Apply the named targets, or everything pending on the channel (respecting pins).

        Each target gets an :class:`Outcome`; a refusal of one does not stop the others.

        Raises:
            UpdateError: no source configured or none could be refreshed.
        """
        return await self._shielded(self._apply(list(targets), dry_run))

    async def _shielded(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` to its end in a task of its own, whatever happens to the caller.

        A gRPC handler is cancelled when its caller's deadline passes, the caller cancels or
        disconnects; an update stopped there would be neither finished nor undone.  The
        caller's cancellation stops only the wait; the task keeps the update lock until it
        ends and reports its outcome as an event and in the history as usual.
        """
        task = asyncio.create_task(work)
        self._work.add(task)
        task.add_done_callback(self._work.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                log.warning("the caller of an update went away (deadline, cancellation or "
                            "disconnect); the update runs to its end")
                task.add_done_callback(_reap)
            raise

    async def _apply(self, targets: list[str], dry_run: bool) -> list[Outcome]:
        async with self._locked():
            client, source = await asyncio.to_thread(self._client)
            if targets:
                wanted: list[TargetInfo | tuple[str, Exception]] = []
                for spec in targets:
                    try:
                        wanted.append(await asyncio.to_thread(self._resolve, client, spec))
                    except ApplianceError as exc:
                        wanted.append((spec, exc))
            else:
                pending = await asyncio.to_thread(self._pending, client)
                by_path = {t.path: t for t in client.targets()}
                wanted = [by_path[p.target] for p in pending]
            results = []
            for item in wanted:
                if isinstance(item, tuple):
                    spec, error = item
                    name = spec.partition("@")[0].rsplit("/", 1)[-1]
                    results.append(self._refused(spec, name, spec.partition("@")[2], "", str(error)))
                    continue
                results.append(await self._apply_one(client, source, item, dry_run))
            return results

    def _policy(self, target: TargetInfo) -> tuple[str | None, bool]:
        """(active version, whether the target version is already installed); raises _RefusedError."""
        if target.kind != "bundle":
            raise _RefusedError(f"kind {target.kind!r}: this agent installs model bundles only")
        new = _version(target.version)
        if new is None:
            raise _RefusedError(f"version {target.version!r} is not a bundle version")
        current = self.store.active_version(target.name)
        pin = self._pins.get(target.name)
        if pin is not None and target.version != pin:
            raise _RefusedError(f"{target.name} is pinned at {pin} ([updates] pins)")
        if current is not None:
            cur = _version(current) or ()
            if new < cur:
                raise _RefusedError(f"version {target.version} is older than the running {current}: an "
                                    "update never goes backwards (Rollback to a kept version instead)")
            if new == cur:
                running = self.store.find(target.name, current)
                if running.sha256 == target.sha256:
                    raise _RefusedError("skip: already running")
                raise _RefusedError(f"version {target.version} is already running from other bytes "
                                    f"(sha256 {running.sha256}); a released version is never replaced")
        try:
            kept = self.store.find(target.name, target.version)
        except NotFoundError:
            return current, False
        if kept.sha256 != target.sha256:
            raise _RefusedError(f"version {target.version} is kept on this node from other bytes "
                                f"(sha256 {kept.sha256}); a released version is never replaced")
        return current, True

    async def _apply_one(self, client: RegistryClient, source: str, target: TargetInfo,
                         dry_run: bool) -> Outcome:
        t = target
        if t.kind == "os":
            return await asyncio.to_thread(self._stage_os, client, source, t, dry_run)
        try:
            current, preexisting = self._policy(t)
        except _RefusedError as exc:
            reason = str(exc)
            if reason.startswith("skip: "):
                return Outcome(t.path, t.name, t.version, t.sha256, "skipped", reason[6:], time.time())
            return self._refused(t.path, t.name, t.version, t.sha256, reason)
        if dry_run:
            plan = f"dry run: would update {t.name} {current or '(none)'} -> {t.version}"
            return Outcome(t.path, t.name, t.version, t.sha256, "skipped", plan, time.time())
        tx = Transaction(uuid.uuid4().hex, "apply", t.name, current, t.version, t.path, t.sha256,
                         t.length, source, preexisting)
        serve = self.repo.is_served(t.name)
        created = [p for p in (self.store.root, self.store.root / t.name) if not p.exists()]
        model: Servable | None = None
        try:
            tx = await _in_thread(lambda: self.journal.write(tx, "begin"))
            model = await self._prepare(client, tx)
            tx = await _in_thread(lambda: self.journal.write(tx, "committing"))
            await _to_end(self.repo.swap(model, serve=serve, drain_s=self.drain_s))
        except (ApplianceError, OSError) as exc:
            if self.store.active_version(t.name) != t.version:  # not committed: undo it all
                if model is not None:
                    model.close()
                await _in_thread(lambda: self._undo(tx, created))
                return self._refused(t.path, t.name, t.version, t.sha256, str(exc), txid=tx.txid)
            log.exception("update of %s committed, but the switch failed", t.name)
        except BaseException as exc:
            # Cancelled (the agent is stopping) or a bug: the worker threads have ended
            # (_in_thread), so finish or undo right here, without yielding to the loop again.
            if self.store.active_version(t.name) != t.version:
                if model is not None:
                    model.close()
                self._undo(tx, created)
                self._refused(t.path, t.name, t.version, t.sha256,
                              f"interrupted ({type(exc).__name__}): undone", txid=tx.txid)
            else:
                self._finish(tx)
                self._applied(t, current, source, tx)
            raise
        checkpoint("swapped")
        await _in_thread(lambda: self._finish(tx))
        await self._switched(t.name)
        return self._applied(t, current, source, tx)

    def _applied(self, t: TargetInfo, current: str | None, source: str, tx: Transaction) -> Outcome:
        outcome = Outcome(t.path, t.name, t.version, t.sha256, "applied",
                          f"{current or '(none)'} -> {t.version}", time.time())
        self._event("update.applied", "info", outcome,
                    f"{t.name} updated {current or '(none)'} -> {t.version}", txid=tx.txid, source=source)
        return outcome

    def _stage_os(self, client: RegistryClient, source: str, t: TargetInfo, dry_run: bool) -> Outcome:
        """Stage a TUF-verified OS release for the root-owned installer (agent.osupdate)."""
        from agent.osupdate import PENDING, os_dir

        if dry_run:
            return Outcome(t.path, t.name, t.version, t.sha256, "skipped",
                           f"dry run: would stage OS release {t.name} {t.version}", time.time())
        staged_dir = os_dir(self.state_dir) / "staged"
        try:
            staged_dir.mkdir(parents=True, exist_ok=True)
            for old in staged_dir.iterdir():
                old.unlink()
            staged = client.download(t, staged_dir)  # length and hashes checked by TUF
        except (ApplianceError, OSError) as exc:
            for left in staged_dir.glob("*"):
                left.unlink(missing_ok=True)
            return self._refused(t.path, t.name, t.version, t.sha256, str(exc))
        request = {"target": t.path, "source": source, "file": str(staged), "version": t.version,
                   "sha256": t.sha256, "time": time.time()}
        atomic_write_text(os_dir(self.state_dir) / PENDING, json.dumps(request, sort_keys=True) + "\n")
        outcome = Outcome(t.path, t.name, t.version, t.sha256, "staged",
                          f"OS release {t.version} verified and staged; the node installs it into the "
                          "inactive root slot and reboots", time.time())
        self._event("update.os.staged", "info", outcome, f"OS {t.name} {t.version} staged for install")
        return outcome

    def report_os_attempt(self, running_roothash: str) -> str | None:
        """At start: turn a finished OS update attempt into an event; the outcome, if any."""
        from agent.osupdate import attempt_outcome

        found = attempt_outcome(self.state_dir, running_roothash)
        if found is None:
            return None
        result, attempt = found
        outcome = Outcome(f"os/{attempt.get('name', '')}", str(attempt.get("name", "")),
                          str(attempt.get("version", "")), "", result, "", time.time())
        if result == "applied":
            self._event("update.os.applied", "info", outcome,
                        f"OS {attempt.get('version')} is running from slot {attempt.get('slot')}")
        else:
            self._event("update.os.failed", "error", outcome,
                        f"OS {attempt.get('version')} did not come up healthy in slot "
                        f"{attempt.get('slot')}; the firmware went back to slot {attempt.get('from_slot')}")
        return result

    async def _prepare(self, client: RegistryClient, tx: Transaction) -> Servable:
        """Stage, verify, unpack and load ``tx.to_version``; its golden vectors pass on the result."""
        if tx.preexisting:
            model = await _to_end(self.repo.stage(tx.name, tx.to_version), _close)
            checkpoint("loaded")
            return model
        staging = self.journal.staging_dir(tx)

        def fetch_and_install() -> Servable:
            staging.mkdir(parents=True, exist_ok=True)
            self.journal.write(tx, "downloading")
            path = client.download(tx.target, staging)
            checkpoint("downloaded")
            self.journal.write(tx, "unpacking")
            installed, model = self.repo.install_for_serving(path)
            checkpoint("loaded")
            if (installed.name, installed.version, installed.sha256) != (tx.name, tx.to_version, tx.sha256):
                model.close()
                raise UpdateError(f"target {tx.target}: the bundle inside is {installed.name} "
                                  f"{installed.version} (sha256 {installed.sha256}), not what the "
                                  "signed metadata describes")
            return model

        return await _in_thread(fetch_and_install, _close)

    def _undo(self, tx: Transaction, created: Sequence[Path] = ()) -> None:
        """Remove what an uncommitted transaction made; the node is as it was before it."""
        if tx.op == "apply" and not tx.preexisting:
            with contextlib.suppress(NotFoundError):
                self.store.remove(tx.name, tx.to_version)
        self.store.clean_debris()
        self.journal.clean_staging()
        for path in reversed(created):
            with contextlib.suppress(OSError):
                path.rmdir()  # only if we created it and it is empty again
        self.journal.close()

    def _prune(self, name: str) -> list[str]:
        """Keep the active version and the ``keep_versions`` newest others; delete the rest."""
        versions = [m for m in self.store.installed(name) if not m.active]
        versions.sort(key=lambda m: parse_version(m.version), reverse=True)
        removed = []
        for m in versions[self.settings.keep_versions:]:
            self.store.remove(name, m.version)
            removed.append(m.version)
        return removed

    def _finish(self, tx: Transaction) -> HistoryEntry:
        """Complete a committed transaction (also from recovery): idempotent."""
        if tx.op == "apply":
            self.store.mark_rolled_back(tx.name, None)
            checkpoint("marked")
            removed = self._prune(tx.name)
            if removed:
                log.info("%s: removed earlier versions %s (keep_versions=%d)", tx.name,
                         ", ".join(removed), self.settings.keep_versions)
            checkpoint("pruned")
            outcome = "applied"
        else:
            self.store.mark_rolled_back(tx.name, tx.to_version)
            checkpoint("marked")
            outcome = "rolled-back"
        entry = HistoryEntry(tx.txid, time.time(), outcome, tx.name, tx.to_version, tx.from_version,
                             tx.to_version, tx.target, tx.sha256, tx.reason)
        self.journal.record(entry)
        self.journal.clean_staging()
        self.journal.close()
        checkpoint("done")
        return entry

    # ------------------------------------------------------------------ rollback

    async def rollback(self, name: str, version: str, reason: str = "") -> Outcome:
        """Make a kept earlier version of ``name`` active again: an explicit, logged act.

        Its golden vectors run on the session that will serve it first; the record shows in
        inventory (``rolled_back``) until the next update of that bundle.  Like an update, it
        runs to its end or is undone whatever the caller does (:meth:`_shielded`).
        """
        return await self._shielded(self._rollback(name, version, reason))

    async def _rollback(self, name: str, version: str, reason: str) -> Outcome:
        async with self._locked():
            current = self.store.active_version(name)
            try:
                kept = self.store.find(name, version)
            except NotFoundError as exc:
                return self._refused("", name, version, "", f"rollback: {exc}")
            if current is not None and parse_version(version) >= parse_version(current):
                return self._refused("", name, version, kept.sha256,
                                     f"rollback: {version} is not earlier than the active {current} "
                                     "(a kept newer version comes back through ApplyUpdate)")
            tx = Transaction(uuid.uuid4().hex, "rollback", name, current, version, "", kept.sha256,
                             kept.length, "", True, reason)
            serve = self.repo.is_served(name)
            model: Servable | None = None
            try:
                tx = await _in_thread(lambda: self.journal.write(tx, "begin"))
                model = await _to_end(self.repo.stage(name, version), _close)
                checkpoint("loaded")
                tx = await _in_thread(lambda: self.journal.write(tx, "committing"))
                await _to_end(self.repo.swap(model, serve=serve, drain_s=self.drain_s))
            except (ApplianceError, OSError) as exc:
                if self.store.active_version(name) != version:
                    if model is not None:
                        model.close()
                    await _in_thread(lambda: self._undo(tx))
                    return self._refused("", name, version, kept.sha256, f"rollback: {exc}", txid=tx.txid)
                log.exception("rollback of %s committed, but the switch failed", name)
            except BaseException as exc:  # cancelled or a bug: finish or undo, as in _apply_one
                if self.store.active_version(name) != version:
                    if model is not None:
                        model.close()
                    self._undo(tx)
                    self._refused("", name, version, kept.sha256,
                                  f"rollback interrupted ({type(exc).__name__}): undone", txid=tx.txid)
                else:
                    self._finish(tx)
                    self._rolled_back(tx, current, kept.sha256)
                raise
            checkpoint("swapped")
            await _in_thread(lambda: self._finish(tx))
            await self._switched(name)
            return self._rolled_back(tx, current, kept.sha256)

    def _rolled_back(self, tx: Transaction, current: str | None, sha256: str) -> Outcome:
        why = f": {tx.reason}" if tx.reason else ""
        outcome = Outcome("", tx.name, tx.to_version, sha256, "rolled-back",
                          f"{current or '(none)'} -> {tx.to_version}{why}", time.time())
        self._event("update.rolled_back", "warning", outcome,
                    f"{tx.name} rolled back {current} -> {tx.to_version}{why}", txid=tx.txid)
        return outcome

    # ------------------------------------------------------------------ recovery

    def recover(self) -> list[str]:
        """Resolve an interrupted transaction and remove staging debris (at start, before serving).

        Returns what was done, one sentence each.

        Raises:
            UpdateError: the journal is unreadable (the agent must not guess).
        """
        # Under the update lock: a sibling serving process (agent.workers) recovering at the
        # same start, or updating while this one restarts, finishes first; a journal found
        # after that was left by a process that died.
        fd = self._flock()
        try:
            return self._recover()
        finally:
            os.close(fd)

    def _recover(self) -> list[str]:
        notes: list[str] = []
        tx = self.journal.current()
        if tx is not None:
            active = self.store.active_version(tx.name)
            if active == tx.to_version:
                entry = self._finish(tx)
                note = (f"finished the interrupted {tx.op} of {tx.name} {tx.from_version} -> "
                        f"{tx.to_version} (it had committed)")
                outcome = Outcome(tx.target, tx.name, tx.to_version, tx.sha256, entry.outcome, note,
                                  entry.time)
                kind = "update.applied" if tx.op == "apply" else "update.rolled_back"
                self._event(kind, "info" if tx.op == "apply" else "warning", outcome, note, txid=tx.txid)
            else:
                self._record_interrupted(tx, active)
                note = (f"undid the interrupted {tx.op} of {tx.name} -> {tx.to_version} at phase "
                        f"{tx.phase}; {active or 'nothing'} stays active")
                self._undo(tx, [self.store.root / tx.name] if tx.from_version is None else [])
                outcome = Outcome(tx.target, tx.name, tx.to_version, tx.sha256, "refused", note, time.time())
                self._event("update.refused", "warning", outcome, note, txid=tx.txid)
            notes.append(note)
        for path in self.store.clean_debris():
            notes.append(f"removed debris {path}")
        for path in self.journal.clean_staging():
            notes.append(f"removed staging leftover {path}")
        notes.extend(self._clean_tuf_temp())
        for note in notes:
            log.warning("update recovery: %s", note)
        return notes

    def _record_interrupted(self, tx: Transaction, active: str | None) -> None:
        entry = HistoryEntry(tx.txid, time.time(), "interrupted", tx.name, active or "", tx.from_version,
                             tx.to_version, tx.target, tx.sha256, f"interrupted at phase {tx.phase}")
        self.journal.record(entry)

    def _clean_tuf_temp(self) -> list[str]:
        notes = []
        for directory in (StateLayout(self.state_dir).tuf, StateLayout(self.state_dir).tuf_metadata):
            if not directory.is_dir():
                continue
            for tmp in directory.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
                notes.append(f"removed an interrupted write {tmp}")
        return notes

    # ------------------------------------------------------------------ history

    def history(self, limit: int = 0) -> list[Outcome]:
        """Finished transactions and refusals, oldest first (the newest ``limit`` if > 0)."""
        entries = self.journal.history()
        seen = {e.txid for e in entries}
        out = [Outcome(e.target, e.name, e.version, e.sha256, e.outcome,
                       e.reason or f"{e.from_version or '(none)'} -> {e.to_version}", e.time)
               for e in entries]
        if self.events is not None:
            for ev in self.events.recent(0, 0, "update.refused"):
                if ev.details.get("txid") in seen:
                    continue
                d = ev.details
                out.append(Outcome(str(d.get("target", "")), ev.subject, str(d.get("version", "")),
                                   str(d.get("sha256", "")), "refused", str(d.get("reason", ev.message)),
                                   ev.time))
        out.sort(key=lambda o: o.time)
        return out[-limit:] if limit > 0 else out

