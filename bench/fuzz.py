#!/usr/bin/env python3
"""Coverage-guided fuzzing (atheris / libFuzzer) of every parser that takes outside bytes.

    python bench/fuzz.py [--seconds-per-target N] [--runs N] [--target NAME ...] [--out DIR] [--json]

Each target of ``bench/fuzz_targets.py`` runs in its own process for N seconds, starting
from real, valid seeds (plus every saved finding under ``bench/fuzz_corpus/TARGET/``).
An input must end in success or in one of the parser's documented errors; any other
exception is a finding: the input is saved under ``OUT/findings/TARGET/`` and the target
restarts on its growing corpus (``OUT/corpus/TARGET/``) for the rest of its time.
Prints, per target: seconds, executions, exec/s, libFuzzer's ``cov:`` (edges) and ``ft:``
(features), and findings.  Exit status 1 when there is a finding.

atheris is not a dependency of the project: ``pip install atheris`` (the ``fuzz`` extra)
before running; the replay of seeds and saved findings (tests/test_fuzz_targets.py) needs
no atheris.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# What atheris instruments for coverage: our parsers and the pure-Python standard-library
# parsers they sit on (tarfile, tomllib); ansible's inventory parsers for the INI/YAML target.
INSTRUMENT = ["agent", "provisioning", "bench.fuzz_targets", "tarfile", "tomllib", "base64",
              "ansible.plugins.inventory"]
_STATUS_RE = re.compile(r"^#(\d+)\s+\S+\s+cov: (\d+) ft: (\d+)", re.MULTILINE)
_DONE_RE = re.compile(r"^Done \d+ runs in (\d+) second", re.MULTILINE)
_ARTIFACT_RE = re.compile(r"Test unit written to (\S+)")
_MAX_RESTARTS = 25


@dataclasses.dataclass
class Finding:
    artifact: str
    kind: str  # crash, timeout, oom, ...
    summary: str  # the exception and where it was raised

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Result:
    target: str
    seconds: float = 0.0  # wall time, start-up included
    fuzz_seconds: float = 0.0  # libFuzzer's own time (what exec/s is over)
    executions: int = 0
    cov: int = 0
    ft: int = 0
    findings: list[Finding] = dataclasses.field(default_factory=list)
    error: str = ""

    @property
    def exec_per_s(self) -> float:
        return self.executions / self.fuzz_seconds if self.fuzz_seconds else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "seconds": round(self.seconds, 1),
                "fuzz_seconds": round(self.fuzz_seconds, 1), "executions": self.executions,
                "exec_per_s": round(self.exec_per_s, 1), "cov": self.cov, "ft": self.ft,
                "findings": [f.to_json() for f in self.findings], "error": self.error}


# ------------------------------------------------------------------ the worker (one target)


def worker(name: str, seconds: int, runs: int, out: Path) -> None:
    """Fuzz one target in this process (atheris takes over; it exits when done)."""
    import atheris

    corpus = out / "corpus" / name
    artifacts = out / "findings" / name
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    shm = Path("/dev/shm")
    work = Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-", dir=shm if os.access(shm, os.W_OK) else None))
    os.environ.setdefault("ANSIBLE_HOME", str(work / "ansible"))
    os.environ.setdefault("ANSIBLE_LOCAL_TEMP", str(work / "ansible-tmp"))
    # ansible's own machinery (hundreds of modules) is imported before the import hook, which
    # would take most of a minute over them; its inventory plugins load later, instrumented.
    import ansible.inventory.manager
    import ansible.parsing.dataloader  # noqa: F401
    with atheris.instrument_imports(include=INSTRUMENT):
        from bench.fuzz_targets import run_one, saved_inputs, target

        t = target(name)
        fn, seeds = t.prepare(work)
        inputs = seeds + [data for _, data in saved_inputs(name)]
        # Parsers import some modules on first use (ansible, the GPU manifest reader): run
        # the inputs once here, so that those are instrumented too.
        for data in inputs:
            with contextlib.suppress(Exception):
                run_one(t, fn, data)
    import hashlib

    for data in inputs:
        (corpus / f"seed-{hashlib.sha1(data).hexdigest()}").write_bytes(data)

    def one_input(data: bytes) -> None:
        run_one(t, fn, data)

    argv = [sys.argv[0], f"-artifact_prefix={artifacts}/", "-timeout=20", "-rss_limit_mb=4096",
            f"-max_len={max(4096, 2 * max(len(d) for d in inputs))}", "-print_final_stats=1"]
    argv.append(f"-runs={runs}" if runs else f"-max_total_time={seconds}")
    atheris.Setup([*argv, str(corpus)], one_input)
    atheris.Fuzz()


# ------------------------------------------------------------------ the driver


def _summary(output: str) -> tuple[str, str]:
    """(a key that groups crashes of one bug, a summary): the exception type and the deepest
    line of our code in atheris's traceback; the summary adds the message."""
    tail = output.split("=== Uncaught Python exception: ===", 1)[-1]
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', tail)
    lines = [ln for ln in tail.splitlines() if ln and not ln.startswith((" ", "\t", "Traceback"))]
    exc = next((ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Exit|Interrupt)\b", ln)), "")
    ours = [f for f in frames if f[0].startswith(str(ROOT)) and "/bench/" not in f[0]] or frames
    if not ours:
        return exc.split(":", 1)[0] or "no traceback", exc or "no Python traceback (see the log)"
    path, line, func = ours[-1]
    where = f"{os.path.relpath(path, ROOT) if path.startswith(str(ROOT)) else path}:{line} in {func}"
    return f"{exc.split(':', 1)[0]} at {where}", f"{exc[:300]} at {where}"


def run_target(name: str, seconds: int, runs: int, out: Path, log: Path) -> Result:
    """Fuzz ``name`` for ``seconds`` (or ``runs`` inputs), restarting after each finding."""
    result = Result(name)
    start = time.monotonic()
    seen: set[str] = set()
    for _ in range(_MAX_RESTARTS):
        left = seconds - (time.monotonic() - start)
        if not runs and left < 2:
            break
        argv = [sys.executable, str(Path(__file__).resolve()), "--worker", name,
                "--seconds-per-target", str(max(1, int(left))), "--runs", str(runs), "--out", str(out)]
        t0 = time.monotonic()
        try:
            proc = subprocess.run(argv, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, errors="replace", timeout=max(left, 60) + 120, check=False)
            output = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            output = str(exc.stdout or "") + str(exc.stderr or "")
            result.error = "worker did not finish in time"
        result.seconds += time.monotonic() - t0
        with log.open("a") as fh:
            fh.write(f"===== {name}: {' '.join(argv)}\n{output}\n")
        done = _DONE_RE.search(output)
        result.fuzz_seconds += int(done.group(1)) if done else time.monotonic() - t0
        status = _STATUS_RE.findall(output)
        if status:
            execs, cov, ft = (int(x) for x in status[-1])
            result.executions += execs
            result.cov, result.ft = max(result.cov, cov), max(result.ft, ft)
        # A "slow-unit" artifact is libFuzzer's report of its slowest input, not a finding.
        artifact = next((m for m in _ARTIFACT_RE.finditer(output)
                         if not Path(m.group(1)).name.startswith("slow-unit-")), None)
        if artifact is None:
            if "Done" not in output and not result.error:
                result.error = output.strip().splitlines()[-1][:300] if output.strip() else "no output"
            break
        path = artifact.group(1)
        key, summary = _summary(output)
        kind = Path(path).name.split("-", 1)[0]
        if key not in seen:
            seen.add(key)
            result.findings.append(Finding(path, kind, summary))
        if runs:
            break
    return result


def _table(results: list[Result]) -> str:
    rows = [("target", "seconds", "fuzzing s", "executions", "exec/s", "cov", "ft", "findings")]
    rows += [(r.target, f"{r.seconds:.0f}", f"{r.fuzz_seconds:.0f}", str(r.executions),
              f"{r.exec_per_s:.0f}", str(r.cov), str(r.ft),
              str(len(r.findings)) + (f" ({r.error})" if r.error else "")) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True))) for row in rows]
    for r in results:
        lines.extend(f"  {r.target}: {f.kind}: {f.summary}\n    input: {f.artifact}" for f in r.findings)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--seconds-per-target", type=int, default=60)
    parser.add_argument("--runs", type=int, default=0, help="a number of inputs instead of a time")
    parser.add_argument("--target", action="append", help="only this target (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("fuzz-out"), help="corpus, findings and log")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if args.worker:  # before importing the targets, so that atheris instruments them
        worker(args.worker, args.seconds_per_target, args.runs, out)
        return 0
    from bench.fuzz_targets import NAMES

    unknown = sorted(set(args.target or ()) - set(NAMES))
    if unknown:
        parser.error(f"unknown target {unknown[0]} (targets: {', '.join(NAMES)})")
    try:
        import atheris  # noqa: F401 - only to say early that it is missing
    except ImportError:
        print("atheris is not installed: pip install atheris (or the project's 'fuzz' extra)",
              file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    log = out / "fuzz.log"
    results = []
    for name in args.target or NAMES:
        if not args.json:
            print(f"fuzzing {name} for {args.runs or args.seconds_per_target} "
                  f"{'runs' if args.runs else 's'} ...", file=sys.stderr, flush=True)
        results.append(run_target(name, args.seconds_per_target, args.runs, out, log))
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=1))
    else:
        print(_table(results))
        print(f"log: {log}")
    return 1 if any(r.findings or r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
