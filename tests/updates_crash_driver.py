"""Crash-safety driver: SIGKILL the real update code at random points, restart, check.

Run as a process (``python tests/updates_crash_driver.py STATE SOURCE ITERATIONS SEED``).
It imports the agent once, then for each iteration forks a child that does what the agent
does at start and during an update:

1. ``UpdateManager.recover()`` on the state directory (the real recovery code);
2. checks the invariants: no open journal, no staging or store debris, the active version is
   the old or the new one of the interrupted transaction and agrees with the last history
   line, and loading it runs its golden vectors on a real ONNX Runtime session and serves the
   function of that version;
3. starts an update (or a rollback) with the real code and is SIGKILLed, either by itself at a
   named step (:func:`agent.updates.journal.set_crash_point`) or by this driver after a random
   delay, i.e. anywhere, including in the middle of a download, an unpack or an fsync.

Forking from an interpreter that has imported everything keeps one iteration to tens of
milliseconds.  Prints one JSON summary on stdout; exit status 0 when every check held.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import select
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.bundle import parse_version  # noqa: E402
from agent.config import InferenceSection, UpdatesSection  # noqa: E402
from agent.events import EventLog  # noqa: E402
from agent.inference.repository import ModelRepository  # noqa: E402
from agent.updates import journal as journal_mod  # noqa: E402
from agent.updates.client import RegistryClient  # noqa: E402
from agent.updates.manager import UpdateManager  # noqa: E402
from testsupport.updates_support import X, expected  # noqa: E402

NAME = "affine"
STEPS = ("journal:begin", "journal:downloading", "downloaded", "journal:unpacking", "loaded",
         "journal:committing", "swapped", "marked", "pruned", "history", "done")


def _write(fd: int, record: dict[str, Any]) -> None:
    os.write(fd, (json.dumps(record, sort_keys=True) + "\n").encode())


def _debris(state: Path, manager: UpdateManager) -> list[str]:
    found = []
    if manager.journal.path.exists():
        found.append(str(manager.journal.path))
    found += [str(p) for p in manager.journal.staging.iterdir()]
    mdir = state / "models" / NAME
    for entry in mdir.iterdir():
        if entry.name.startswith(".") or (entry.is_dir() and not (entry / "install.json").is_file()):
            found.append(str(entry))
    for directory in (state / "tuf", state / "tuf" / "metadata"):
        found += [str(p) for p in directory.glob(".*")]
    return found


async def _check(state: Path, manager: UpdateManager, repo: ModelRepository) -> dict[str, Any]:
    problems = _debris(state, manager)
    active = repo.store.active_version(NAME)
    history = manager.journal.history()
    if history:
        last = history[-1]
        if last.version != (active or ""):
            problems.append(f"history says {last.outcome} with {last.version} active, store says {active}")
    model = await repo.load(NAME)  # runs the golden vectors on the session that serves
    result = await model.infer({"x": X}, ["y"])
    if model.version != active:
        problems.append(f"served {model.version}, active {active}")
    if not (result.outputs["y"] == expected(model.version)).all():
        problems.append(f"{model.version} computed {result.outputs['y'].tolist()}")
    installed = [m.version for m in repo.store.installed(NAME)]
    if len(installed) > 1 + manager.settings.keep_versions + 1:
        problems.append(f"too many versions kept: {installed}")
    await repo.close()
    return {"active": active, "installed": installed, "problems": problems,
            "history": len(history), "last": history[-1].outcome if history else None}


def _plan(rng: random.Random, repo: ModelRepository, offered: list[str]) -> tuple[str, str] | None:
    installed = [m.version for m in repo.store.installed(NAME)]
    active = parse_version(repo.store.active_version(NAME) or "0")
    earlier = [v for v in installed if parse_version(v) < active]
    later = [v for v in installed if parse_version(v) > active]  # kept after a rollback
    newest = max(parse_version(v) for v in installed)
    fresh = [v for v in offered if parse_version(v) > newest]
    if earlier and (rng.random() < 0.3 or not (fresh or later)):
        return "rollback", rng.choice(earlier)
    if later and (rng.random() < 0.3 or not fresh):
        return "apply", rng.choice(later)  # a kept version comes back without a download
    if fresh:
        return "apply", min(fresh, key=parse_version)
    return None


def child(state: Path, source: str, seed: int, results_fd: int, go_fd: int, crash: str | None,
          final: bool) -> None:
    rng = random.Random(seed)
    tempfile.tempdir = str(state.parent / "tmp")
    repo = ModelRepository.for_state_dir(state, InferenceSection(instances=1))
    events = EventLog.open(state)
    settings = UpdatesSection(sources=(source,), mount_glob="", keep_versions=1)
    manager = UpdateManager(state, settings, repo, events, drain_s=5)
    if not final and rng.random() < 0.1:  # sometimes die again while recovering: it must be idempotent
        journal_mod.set_crash_point(rng.choice(("marked", "pruned", "history", "done")))
    notes = manager.recover()
    journal_mod.set_crash_point(None)
    check = asyncio.run(_check(state, manager, repo))
    _write(results_fd, {"kind": "check", "notes": notes, **check})
    if final:
        return
    offered = sorted({t.version for t in RegistryClient(state, source).targets()
                      if t.kind == "bundle" and t.name == NAME}, key=parse_version)
    plan = _plan(rng, repo, offered)
    if plan is None:
        return
    op, version = plan

    async def run() -> Any:
        await repo.load(NAME)
        _write(results_fd, {"kind": "start", "op": op, "from": repo.store.active_version(NAME),
                            "to": version, "crash": crash})
        os.write(go_fd, b"g")
        journal_mod.set_crash_point(crash)
        if op == "apply":
            return (await manager.apply([f"{NAME}@{version}"]))[0]
        return await manager.rollback(NAME, version, "crash test")

    outcome = asyncio.run(run())
    _write(results_fd, {"kind": "done", "outcome": outcome.outcome, "reason": outcome.reason})


def _fork(state: Path, source: str, seed: int, results_fd: int, crash: str | None, final: bool,
          delay: float | None) -> tuple[str, float]:
    r_go, w_go = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r_go)
        code = 0
        try:
            child(state, source, seed, results_fd, w_go, crash, final)
        except BaseException:
            _write(results_fd, {"kind": "error", "traceback": traceback.format_exc()})
            code = 3
        os._exit(code)
    os.close(w_go)
    started = time.monotonic()
    if delay is not None and select.select([r_go], [], [], 60)[0] and os.read(r_go, 1):
        time.sleep(delay)
        with contextlib.suppress(ProcessLookupError):  # it finished first
            os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    os.close(r_go)
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}", time.monotonic() - started
    return f"exit {os.WEXITSTATUS(status)}", time.monotonic() - started


def main(argv: list[str]) -> int:
    state, source, iterations, seed = Path(argv[0]), argv[1], int(argv[2]), int(argv[3])
    rng = random.Random(seed)
    (state.parent / "tmp").mkdir(exist_ok=True)
    results_path = state.parent / "crash-results.jsonl"
    results_fd = os.open(results_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    ends: Counter[str] = Counter()
    crashes: Counter[str] = Counter()
    t0 = time.monotonic()
    for i in range(iterations + 1):
        final = i == iterations
        crash = None if final or rng.random() < 0.5 else rng.choice(STEPS)
        delay = None if final or crash else rng.uniform(0.0, 0.08)
        end, _ = _fork(state, source, rng.randrange(1 << 30), results_fd, crash, final, delay)
        ends[end] += 1
        crashes[crash or ("random delay" if delay is not None else "final check")] += 1
        if end not in ("exit 0", f"signal {signal.SIGKILL}"):
            break
    os.close(results_fd)
    records = [json.loads(line) for line in results_path.read_text().splitlines()]
    failures, resolved = _verify(records)
    summary = {"iterations": iterations, "seconds": round(time.monotonic() - t0, 1), "ends": dict(ends),
               "crash_points": dict(crashes), "failures": failures, "resolved": dict(resolved),
               "checks": sum(r["kind"] == "check" for r in records)}
    print(json.dumps(summary, sort_keys=True))
    return 1 if failures else 0


def _verify(records: list[dict[str, Any]]) -> tuple[list[str], Counter[str]]:
    """Every check passed, and after each interrupted transaction the old or new version runs."""
    failures: list[str] = []
    resolved: Counter[str] = Counter()
    start: dict[str, Any] | None = None
    for n, r in enumerate(records):
        if r["kind"] == "error":
            failures.append(f"record {n}: {r['traceback']}")
        elif r["kind"] == "start":
            start = r
        elif r["kind"] == "check":
            failures += [f"record {n}: {p}" for p in r["problems"]]
            if start is not None:
                if r["active"] not in (start["from"], start["to"]):
                    failures.append(f"record {n}: {start['op']} {start['from']} -> {start['to']} "
                                    f"left {r['active']} active")
                resolved["new" if r["active"] == start["to"] else "old"] += 1
            start = None
    return failures, resolved


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
