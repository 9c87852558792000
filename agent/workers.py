"""Several serving processes on one gRPC port: a supervisor and its workers.

One Python process serves at most one core's worth of gRPC (most of a tiny model's request is
gRPC's compiled code, run under the interpreter lock).  With ``[server] workers = N`` (N > 1)
``appliance-agent serve`` becomes a supervisor that starts N worker processes; each is a full
agent (:func:`agent.server.run_agent`) with its own ONNX Runtime sessions, and all bind the
gRPC port with ``SO_REUSEPORT``, so the kernel spreads new connections over them.

What stays single, and how:

- **the port**: the supervisor binds it first with ``SO_REUSEPORT`` and keeps that socket
  (never listening) so ``port = 0`` resolves once and the workers join the same port;
- **systemd**: only the supervisor talks to ``NOTIFY_SOCKET`` (the unit's main PID): READY=1
  when every worker serves, WATCHDOG=1 while it lives; a worker whose heartbeat stops for the
  watchdog interval is killed and restarted (the per-process form of the watchdog);
- **model changes** (RepositoryModelLoad/Unload, ApplyUpdate, Rollback) land on one worker; it
  does the change, then :meth:`WorkerLink.broadcast` has the supervisor replay it on every
  other worker and waits for all of them, so when the RPC returns every worker serves the
  same versions.  A restarted worker starts from the store's ``active`` records and then
  takes the served set of a sibling;
- **updates**: one at a time across workers (a ``flock`` in :mod:`agent.updates.manager`);
- **statistics**: ModelStatistics and the ``nv_inference_*`` metrics are totals over all
  workers (:meth:`WorkerLink.sibling_statistics`); the metrics port is served by worker 0.

Supervisor and worker talk over a socket pair, one JSON object per line; a message with an
``id`` wants a reply carrying the same ``id`` in ``reply``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agent.config import SECTIONS, AgentConfig
from agent.errors import ConfigError, UpdateError
from agent.lifecycle import die_with_parent, physical_cores, ports_free, sd_notify, setup_logging
from agent.settings import from_table

__all__ = ["Peer", "Supervisor", "WorkerLink", "run_supervisor", "worker_count"]

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

LINE_LIMIT = 64 << 20  # statistics of every served model travel in one line
HEARTBEAT_S = 1.0
STALL_MIN_S = 10.0
REPLY_TIMEOUT_S = 300.0  # a replayed load runs golden vectors on a new session
RESTART_LIMIT = 5  # restarts within RESTART_WINDOW_S before the supervisor gives up
RESTART_WINDOW_S = 60.0


def worker_count(config: AgentConfig) -> int:
    """``[server] workers`` as a number (``auto``: one per physical core within the CPU
    affinity mask)."""
    value = config.server.workers
    if value == "auto":
        return physical_cores()
    return int(value)


class Peer:
    """One end of the control socket: requests with replies, and one-way notes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 handler: Handler) -> None:
        self._reader = reader
        self._writer = writer
        self._handler = handler
        self._next = 0
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def over(cls, sock: socket.socket, handler: Handler) -> Peer:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=LINE_LIMIT)
        return cls(reader, writer, handler)

    def _send(self, message: dict[str, Any]) -> None:
        self._writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    def note(self, message: dict[str, Any]) -> None:
        """Send without waiting for a reply."""
        self._send(message)

    async def request(self, message: dict[str, Any], wait_s: float = REPLY_TIMEOUT_S) -> dict[str, Any]:
        """Send and wait for the reply.

        Raises:
            ConnectionError: the other end went away first.
            TimeoutError: no reply within ``wait_s``.
        """
        self._next += 1
        ident = self._next
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = future
        try:
            self._send(message | {"id": ident})
            return await asyncio.wait_for(future, wait_s)
        finally:
            self._waiting.pop(ident, None)

    async def run(self) -> None:
        """Read until the other end closes; replies resolve requests, requests get handled."""
        try:
            while line := await self._reader.readline():
                message = json.loads(line)
                if "reply" in message:
                    future = self._waiting.get(message["reply"])
                    if future is not None and not future.done():
                        future.set_result(message)
                    continue
                task = asyncio.create_task(self._answer(message))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(ConnectionError("the other process went away"))

    async def _answer(self, message: dict[str, Any]) -> None:
        try:
            result = await self._handler(message)
        except Exception as exc:  # reported to the asker, who decides
            log.debug("control message %s failed", message.get("kind"), exc_info=True)
            result = {"error": f"{type(exc).__name__}: {exc}"}
        if "id" in message:
            with contextlib.suppress(ConnectionError):
                self._send(result | {"reply": message["id"]})

    def close(self) -> None:
        self._writer.close()


# ---------------------------------------------------------------------- the worker's side


class WorkerLink:
    """A worker's line to its supervisor (published as ``ctx.workers``).

    ``apply`` replays a sibling's model change here; ``statistics`` returns this worker's
    snapshots; ``served`` its served (name, version) pairs.  All three are set by the
    components that own those things (agent.inference.service).
    """

    def __init__(self, index: int, count: int) -> None:
        self.index = index
        self.count = count
        self.peer: Peer | None = None
        self.apply: Callable[[dict[str, Any]], Awaitable[None]] | None = None
        self.statistics: Callable[[str, str], list[dict[str, Any]]] | None = None
        self.served: Callable[[], list[list[str]]] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def leader(self) -> bool:
        """Worker 0 serves what must exist once per node (the metrics port)."""
        return self.index == 0

    async def connect(self, sock: socket.socket) -> None:
        self.peer = await Peer.over(sock, self._handle)
        self._tasks.append(asyncio.create_task(self.peer.run()))

    async def _handle(self, message: dict[str, Any]) -> dict[str, Any]:
        kind = message.get("kind")
        if kind == "apply" and self.apply is not None:
            await self.apply(message["op"])
            return {}
        if kind == "stats" and self.statistics is not None:
            return {"stats": self.statistics(message.get("name", ""), message.get("version", ""))}
        if kind == "served" and self.served is not None:
            return {"served": self.served()}
        return {"error": f"worker {self.index} cannot answer {kind!r} (yet)"}

    def ready(self, port: int) -> None:
        """Tell the supervisor this worker serves; start the heartbeat."""
        assert self.peer is not None
        self.peer.note({"kind": "ready", "port": port})
        self._tasks.append(asyncio.create_task(self._heartbeat()))

    async def _heartbeat(self) -> None:
        # The pings come from the event loop itself: a loop blocked by a stuck handler
        # stops them, and the supervisor restarts this worker.
        while self.peer is not None:
            self.peer.note({"kind": "alive"})
            await asyncio.sleep(HEARTBEAT_S)

    async def broadcast(self, op: dict[str, Any]) -> None:
        """Have every other worker replay ``op`` (a model change done here); wait for all.

        Raises:
            UpdateError: a worker could not follow (named with its reason).
        """
        if self.peer is None:
            return
        try:
            reply = await self.peer.request({"kind": "broadcast", "op": op})
        except (ConnectionError, TimeoutError) as exc:
            raise UpdateError(f"{op.get('op')} {op.get('name', '')}: done here, but the supervisor "
                              f"did not confirm the other workers followed: {exc}") from None
        problems = reply.get("problems") or []
        if problems:
            raise UpdateError(f"{op.get('op')} {op.get('name', '')}: done here, but "
                              + "; ".join(problems))

    async def sibling_statistics(self, name: str, version: str) -> list[dict[str, Any]]:
        """The statistics snapshots of every other worker (to add to this one's)."""
        if self.peer is None:
            return []
        reply = await self.peer.request({"kind": "stats", "name": name, "version": version},
                                        wait_s=10.0)
        return list(reply.get("stats", []))

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.peer is not None:
            self.peer.close()
            self.peer = None


def worker_main(config: AgentConfig, index: int, count: int, fd: int, debug: bool) -> int:
    """A worker process's body: serve over the control socket ``fd``; return the exit code."""
    # Imported here, in the worker only: the supervisor never loads gRPC or ONNX Runtime.
    from agent.server import run_agent

    # SIGTERM when the supervisor dies, however it dies, so no worker keeps the port after it
    die_with_parent(signal.SIGTERM)
    setup_logging(debug, prefix=f"worker {index}: ")  # whose line is it, in the shared journal
    sock = socket.socket(fileno=fd)

    async def main() -> int:
        link = WorkerLink(index, count)
        await link.connect(sock)
        try:
            return await run_agent(config, worker=link)
        finally:
            link.close()

    try:
        code = asyncio.run(main())
    except Exception as exc:
        log.error("%s", exc, exc_info=debug)  # noqa: TRY400 - the prefix names the worker
        code = getattr(exc, "exit_code", 1)
    return int(code)


def config_from_json(data: dict[str, Any], origin: str) -> AgentConfig:
    """:meth:`AgentConfig.to_json` read back, every value checked as in agent.toml.

    Raises:
        ConfigError: a section or value the configuration would refuse.
    """
    return AgentConfig(**{name: from_table(cls, data.get(name, {}), f"{origin}: [{name}]")
                          for name, cls in SECTIONS.items()}, origin=origin)


def main(argv: list[str] | None = None) -> int:
    """``python -m agent.workers FD INDEX COUNT [--debug]``, the configuration (JSON) on stdin:
    how the supervisor starts a worker."""
    args = sys.argv[1:] if argv is None else argv
    fd, index, count = (int(a) for a in args[:3])
    config = config_from_json(json.loads(sys.stdin.buffer.read()), "the supervisor's configuration")
    return worker_main(config, index, count, fd, "--debug" in args[3:])


# ---------------------------------------------------------------------- the supervisor


@dataclasses.dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes]
    peer: Peer | None = None
    ready: bool = False
    seen: float = 0.0  # monotonic time of the last heartbeat
    tasks: list[asyncio.Task[None]] = dataclasses.field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid  # the worker is the process the supervisor started


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (never listen on) the gRPC port with SO_REUSEPORT: resolves port 0 once for all
    workers, and holds the port while a worker restarts.

    Raises:
        ConfigError: the port is taken.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def _spawn(config: AgentConfig, index: int, count: int, fd: int, debug: bool) -> subprocess.Popen[bytes]:
    """Start worker ``index``: ``python -m agent.workers`` with the control socket ``fd`` and the
    configuration on stdin.  Not through a run-to-completion tool gate: a worker lives as
    long as the agent, and its output is the agent's own log."""
    argv = [sys.executable, "-m", "agent.workers", str(fd), str(index), str(count)]
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}  # systemd: supervisor only
    here = str(Path(__file__).resolve().parent.parent)  # the very code the supervisor runs
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    process = subprocess.Popen([*argv, *(["--debug"] if debug else [])], stdin=subprocess.PIPE,
                               pass_fds=[fd], env=env)
    assert process.stdin is not None
    with process.stdin:
        process.stdin.write(json.dumps(config.to_json()).encode())
    return process


class Supervisor:
    """Starts ``count`` workers, replays model changes between them, adds up their statistics,
    restarts one that dies, and drains them all on SIGTERM."""

    def __init__(self, config: AgentConfig, count: int, debug: bool = False) -> None:
        self.config = config
        self.count = count
        self.debug = debug
        self.workers: dict[int, _Worker] = {}
        self.stopping = asyncio.Event()
        self.failed = asyncio.Event()
        self.exit_code = 1  # when failed
        self._restarts: list[float] = []
        self._all_ready = asyncio.Event()
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        self.ping_s = usec / 2e6 if usec > 0 else 0.0
        # A worker is killed after this long without a heartbeat: systemd's interval, but
        # never so short that a busy machine's scheduling delay looks like a hung loop.
        self.stall_s = max(usec / 1e6, STALL_MIN_S) if usec > 0 else 0.0

    # ------------------------------------------------------------ workers

    async def start(self, index: int) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with theirs:
            process = _spawn(self.config, index, self.count, theirs.fileno(), self.debug)
        worker = _Worker(index, process, seen=time.monotonic())
        self.workers[index] = worker
        worker.peer = await Peer.over(mine, lambda m: self._handle(worker, m))
        worker.tasks.append(asyncio.create_task(self._watch(worker, worker.peer)))

    async def _watch(self, worker: _Worker, peer: Peer) -> None:
        """Serve the worker's messages until it goes; then restart it (unless stopping)."""
        with contextlib.suppress(ConnectionError, ValueError):
            await peer.run()
        await asyncio.to_thread(worker.process.wait)
        worker.ready = False
        if self.stopping.is_set():
            return
        if not self._all_ready.is_set():  # it could not start: starting it again would not help
            log.error("agent: worker %d (pid %d) failed to start (exit code %s)", worker.index,
                      worker.pid, worker.process.returncode)
            self.exit_code = worker.process.returncode or 1
            self.failed.set()
            return
        log.error("agent: worker %d (pid %d) exited with %s; restarting it", worker.index,
                  worker.pid, worker.process.returncode)
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW_S] + [now]
        if len(self._restarts) > RESTART_LIMIT:
            log.error("agent: %d worker restarts within %.0f s; giving up", len(self._restarts),
                      RESTART_WINDOW_S)
            self.failed.set()
            return
        await self.start(worker.index)

    async def _handle(self, worker: _Worker, message: dict[str, Any]) -> dict[str, Any]:
        kind = message.get("kind")
        if kind == "alive":
            worker.seen = time.monotonic()
        elif kind == "ready":
            await self._ready(worker)
        elif kind == "broadcast":
            return {"problems": await self._replay(worker, message["op"])}
        elif kind == "stats":
            return {"stats": await self._gather(worker, message)}
        return {}

    async def _ready(self, worker: _Worker) -> None:
        worker.seen = time.monotonic()
        if self._all_ready.is_set():
            # A restarted worker: it serves the store's active versions; it takes a sibling's
            # served set, and the siblings follow an update it finished in its recovery.
            await self._adopt_served(worker)
            await self._replay(worker, {"op": "sync"})
        worker.ready = True
        log.info("agent: worker %d (pid %d) serving", worker.index, worker.pid)
        if all(w.ready for w in self.workers.values()) and len(self.workers) == self.count:
            self._all_ready.set()

    async def _adopt_served(self, worker: _Worker) -> None:
        for other in self._others(worker):
            assert other.peer is not None
            try:
                served = (await other.peer.request({"kind": "served"}, wait_s=10.0))["served"]
            except (ConnectionError, TimeoutError, KeyError):
                continue
            assert worker.peer is not None
            with contextlib.suppress(ConnectionError, TimeoutError):
                await worker.peer.request({"kind": "apply", "op": {"op": "match", "served": served}})
            return

    def _others(self, worker: _Worker) -> list[_Worker]:
        return [w for w in self.workers.values() if w is not worker and w.ready and w.peer]

    async def _replay(self, origin: _Worker, op: dict[str, Any]) -> list[str]:
        async def one(w: _Worker) -> str:
            assert w.peer is not None
            try:
                reply = await w.peer.request({"kind": "apply", "op": op})
            except (ConnectionError, TimeoutError) as exc:
                return f"worker {w.index} (pid {w.pid}): {type(exc).__name__}: {exc}"
            return f"worker {w.index} (pid {w.pid}): {reply['error']}" if "error" in reply else ""

        results = await asyncio.gather(*(one(w) for w in self._others(origin)))
        return [r for r in results if r]

    async def _gather(self, origin: _Worker, message: dict[str, Any]) -> list[dict[str, Any]]:
        async def one(w: _Worker) -> list[dict[str, Any]]:
            assert w.peer is not None
            try:
                reply = await w.peer.request(message | {"kind": "stats"}, wait_s=10.0)
            except (ConnectionError, TimeoutError):
                return []  # a worker going away takes its counts with it
            return list(reply.get("stats", []))

        parts = await asyncio.gather(*(one(w) for w in self._others(origin)))
        return [s for part in parts for s in part]

    # ------------------------------------------------------------ lifetime

    async def _watchdog(self) -> None:
        """WATCHDOG=1 at half systemd's interval; a worker silent for a whole interval is
        killed (and so restarted)."""
        if self.ping_s <= 0:
            return
        while True:
            sd_notify("WATCHDOG=1")
            now = time.monotonic()
            for w in list(self.workers.values()):
                if w.ready and now - w.seen > self.stall_s and w.process.poll() is None:
                    log.error("agent: worker %d (pid %d) silent for %.0f s; killing it", w.index,
                              w.pid, now - w.seen)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(w.pid, signal.SIGKILL)
            await asyncio.sleep(self.ping_s)

    async def run(self, reserved: socket.socket) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        for index in range(self.count):
            await self.start(index)
        host = self.config.server.listen
        ready = asyncio.create_task(self._all_ready.wait())
        ended = asyncio.create_task(self._first(self.stopping, self.failed))
        await asyncio.wait({ready, ended}, return_when=asyncio.FIRST_COMPLETED)
        watchdog = None
        if ready.done() and not self.failed.is_set():
            log.info("agent: serving on %s:%d (%d worker processes)", host,
                     reserved.getsockname()[1], self.count)
            sd_notify("READY=1")
            watchdog = asyncio.create_task(self._watchdog())
        await ended
        ready.cancel()
        sd_notify("STOPPING=1")
        if watchdog is not None:
            watchdog.cancel()
        codes = await self._stop_all()
        reserved.close()
        log.info("agent: stopped")
        if self.failed.is_set():
            return self.exit_code if self.exit_code > 0 else 1
        return max(codes, default=0)

    @staticmethod
    async def _first(*events: asyncio.Event) -> None:
        waits = [asyncio.create_task(e.wait()) for e in events]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()

    async def _stop_all(self) -> list[int]:
        """SIGTERM to every worker (each drains its calls), SIGKILL past the grace period."""
        self.stopping.set()
        for w in self.workers.values():
            if w.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGTERM)
        limit = self.config.server.grace_period_s + 10.0
        codes = []
        for w in self.workers.values():
            try:
                await asyncio.to_thread(w.process.wait, limit)
            except subprocess.TimeoutExpired:
                log.error("agent: worker %d (pid %d) did not stop; killing it",  # noqa: TRY400
                          w.index, w.pid)
                w.process.kill()
                await asyncio.to_thread(w.process.wait)
            codes.append(w.process.returncode or 0)
            for task in w.tasks:
                task.cancel()
        return [c if c >= 0 else 1 for c in codes]


def run_supervisor(config: AgentConfig, count: int, debug: bool = False) -> int:
    """Serve with ``count`` worker processes until SIGTERM/SIGINT; return the exit code.
    The TLS material is checked by each worker as it starts (a worker that cannot start fails
    the agent with its exit code).

    Raises:
        ConfigError: a port is taken.
    """
    ports_free(config)
    reserved = reserve_port(config.server.listen, config.server.port)
    port = reserved.getsockname()[1]
    server = dataclasses.replace(config.server, port=port)
    inference = config.inference
    if not inference.intra_op_threads:  # N workers share the cores: no oversubscription
        threads = max(1, physical_cores() // count)
        inference = dataclasses.replace(inference, intra_op_threads=threads)
    shared = dataclasses.replace(config, server=server, inference=inference)
    return asyncio.run(Supervisor(shared, count, debug).run(reserved))


if __name__ == "__main__":
    sys.exit(main())
