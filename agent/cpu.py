"""Does this CPU have the instructions the image's libraries were built for?

The x86-64 psABI names micro-architecture levels (x86-64-v2, -v3, -v4), each a set of
instruction-set extensions on top of the one before.  numpy 2.x wheels are built for
x86-64-v2 as their baseline, so on a CPU below it (qemu's default ``qemu64`` model) the agent
dies with SIGILL at import.  This module names the missing features instead, from the
kernel's ``/proc/cpuinfo`` flags.

It imports nothing but the standard library so that it runs on any x86-64, before anything
that might need the missing instructions::

    python -m agent.cpu --level x86-64-v2 [--console]

prints one line and exits 0 when the CPU has the level, 1 (naming the missing flags) when not.

The agent runs the same check in its own process, first thing (``appliance-agent serve
--cpu-level LEVEL``, :func:`refusal`): on a CPU below the level it exits
:data:`EXIT_CPU_BELOW_LEVEL` before numpy is imported, and its unit neither restarts it nor
starts a second interpreter on every boot to ask first.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["CPUINFO", "DEFAULT_LEVEL", "EXIT_CPU_BELOW_LEVEL", "LEVELS", "check_line", "cpu_flags",
           "image_level", "main", "missing_features", "refusal"]

CPUINFO = Path("/proc/cpuinfo")
CONSOLE = Path("/dev/console")
IMAGE_METADATA = Path("/usr/lib/appliance/image.json")
DEFAULT_LEVEL = "x86-64-v2"
# sysexits' EX_CONFIG: the machine does not suit the image.  The agent's unit lists it in
# RestartPreventExitStatus=, since no restart gives the CPU the instructions it lacks.
EXIT_CPU_BELOW_LEVEL = 78

# /proc/cpuinfo flag names per level (the kernel's names: lahf_lm for LAHF-SAHF, abm for
# LZCNT, pni for SSE3).  Each level includes the ones before it.
_V1 = ("cmov", "cx8", "fpu", "fxsr", "mmx", "sse", "sse2")
_V2 = ("cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3")
_V3 = ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave")
_V4 = ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")
LEVELS: dict[str, tuple[str, ...]] = {
    "x86-64": _V1,
    "x86-64-v2": _V1 + _V2,
    "x86-64-v3": _V1 + _V2 + _V3,
    "x86-64-v4": _V1 + _V2 + _V3 + _V4,
}


def missing_features(level: str, flags: Iterable[str]) -> tuple[str, ...]:
    """The flags ``level`` needs that are not in ``flags``, in the level's order.

    Raises:
        ValueError: ``level`` is not one of :data:`LEVELS`.
    """
    try:
        needed = LEVELS[level]
    except KeyError:
        raise ValueError(f"unknown x86-64 level {level!r} (known: {', '.join(LEVELS)})") from None
    have = set(flags)
    return tuple(f for f in needed if f not in have)


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The ``flags`` of the first processor in ``cpuinfo`` (empty when there is none).

    Raises:
        OSError: ``cpuinfo`` cannot be read.
    """
    for line in cpuinfo.read_text(errors="replace").splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def image_level(image_metadata: Path = IMAGE_METADATA) -> str:
    """The ``cpu_level`` the image was built for (:data:`DEFAULT_LEVEL` when not recorded)."""
    try:
        doc = json.loads(image_metadata.read_text())
    except (OSError, ValueError):
        return DEFAULT_LEVEL
    level = doc.get("cpu_level") if isinstance(doc, dict) else None
    return level if isinstance(level, str) and level in LEVELS else DEFAULT_LEVEL


def check_line(level: str, missing: Sequence[str]) -> str:
    """The one line a person reads on the console or in the journal."""
    if not missing:
        return f"appliance-cpu: this CPU has every feature of {level}"
    return (f"appliance-cpu: this CPU lacks {' '.join(missing)}, needed by {level} (the image's "
            f"numpy/ONNX Runtime would die with SIGILL); give the machine a newer CPU model "
            f"(qemu: -cpu host, or a model at {level} or above)")


def refusal(level: str, cpuinfo: Path | None = None) -> str | None:
    """The line that refuses to start on this CPU, or None when it has every feature of ``level``.

    ``cpuinfo`` defaults to :data:`CPUINFO`, read when called.  An unreadable one refuses too:
    ONNX Runtime reads it at load and would abort.
    """
    cpuinfo = CPUINFO if cpuinfo is None else cpuinfo
    try:
        flags = cpu_flags(cpuinfo)
    except OSError as exc:
        return f"appliance-cpu: {cpuinfo}: unreadable ({exc.strerror}); cannot check {level}"
    missing = missing_features(level, flags)
    return check_line(level, missing) if missing else None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m agent.cpu``: 0 when the CPU has the level, 1 when not, 2 on misuse."""
    parser = argparse.ArgumentParser(prog="python -m agent.cpu",
                                     description="Check this CPU against an x86-64 psABI level.")
    parser.add_argument("--level", choices=tuple(LEVELS),
                        help=f"level to check (default: the image's, from {IMAGE_METADATA}, "
                        f"else {DEFAULT_LEVEL})")
    parser.add_argument("--cpuinfo", type=Path, default=CPUINFO, help=f"default {CPUINFO}")
    parser.add_argument("--console", action="store_true",
                        help=f"also write a failure to {CONSOLE} (the node's screen and serial line)")
    parser.add_argument("--console-path", type=Path, default=CONSOLE, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    level = args.level or image_level()
    try:
        flags = cpu_flags(args.cpuinfo)
    except OSError as exc:
        sys.stderr.write(f"appliance-cpu: {args.cpuinfo}: unreadable ({exc.strerror}); "
                         f"cannot check {level}\n")
        return 2
    missing = missing_features(level, flags)
    line = check_line(level, missing)
    out = sys.stderr if missing else sys.stdout  # the journal marks stderr lines
    out.write(line + "\n")
    out.flush()
    if missing and args.console:
        try:
            with args.console_path.open("a") as console:
                console.write(line + "\n")
        except OSError as exc:
            sys.stderr.write(f"appliance-cpu: {args.console_path}: {exc.strerror}\n")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
