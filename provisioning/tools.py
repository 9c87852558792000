"""The one gate for external tools.

Every subprocess (mmdebstrap, mksquashfs, veritysetup, qemu, ...) goes through :func:`run`:
argv lists only, stdin from /dev/null unless input is given, a clean environment, the command
echoed when debugging, the child killed if we fail or are interrupted, and a failure that
names the tool, its exit code and the tail of its stderr.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from provisioning.errors import ToolError

__all__ = ["CLEAN_PATH", "Completed", "clean_env", "require_tool", "run", "run_lines"]

log = logging.getLogger(__name__)

# Tools are looked up on this fixed path, not the caller's.  `./dev test` narrows it (through
# APPLIANCE_TOOL_PATH) to a folder without the system-tier packages' programs.
CLEAN_PATH = (os.environ.get("APPLIANCE_TOOL_PATH")
              or "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
_KEEP = ("LANG", "TZ", "SOURCE_DATE_EPOCH", "TMPDIR")
_TAIL_LINES = 25


@dataclass(frozen=True)
class Completed:
    """What a finished tool left behind."""

    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        """Standard output decoded as UTF-8 (replacing undecodable bytes)."""
        return self.stdout.decode(errors="replace")


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A minimal environment: a fixed PATH, C locale, and only the variables we mean to pass."""
    env = {"PATH": CLEAN_PATH, "LC_ALL": "C.UTF-8", "HOME": "/root"}
    env.update({key: os.environ[key] for key in _KEEP if key in os.environ})
    if extra:
        env.update(extra)
    return env


def require_tool(name: str) -> str:
    """Return the absolute path of tool ``name``; raise ToolError naming the package if absent."""
    found = shutil.which(name, path=CLEAN_PATH + ":" + os.environ.get("PATH", ""))
    if found is None:
        raise ToolError(name, 127, f"{name} is not installed (install it with apt-get)")
    return found


def run(
    argv: Sequence[str | Path],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    input_bytes: bytes | None = None,
    check: bool = True,
    capture: bool = True,
    timeout: float | None = None,
) -> Completed:
    """Run ``argv`` and return what it printed.

    Raises:
        ToolError: the tool is missing, exits non-zero (with ``check``) or times out.
    """
    args = [str(a) for a in argv]
    if not args:
        raise ValueError("run() needs a command")
    log.debug("+ %s", shlex.join(args))
    stdin = subprocess.PIPE if input_bytes is not None else subprocess.DEVNULL
    out = subprocess.PIPE if capture else None
    try:
        proc = subprocess.Popen(
            args,
            stdin=stdin,
            stdout=out,
            stderr=subprocess.PIPE if capture else None,
            env=clean_env(env),
            cwd=cwd,
            start_new_session=False,
        )
    except FileNotFoundError as exc:
        raise ToolError(args[0], 127, f"{args[0]}: not found ({exc.strerror})") from exc
    try:
        stdout, stderr = proc.communicate(input=input_bytes, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        proc.communicate()
        raise ToolError(args[0], -9, f"timed out after {timeout} s") from exc
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    stdout = stdout or b""
    stderr = stderr or b""
    if check and proc.returncode != 0:
        tail = "\n".join(stderr.decode(errors="replace").splitlines()[-_TAIL_LINES:])
        raise ToolError(Path(args[0]).name, proc.returncode, tail)
    return Completed(tuple(args), proc.returncode, stdout, stderr)


def run_lines(
    argv: Sequence[str | Path],
    on_line: Callable[[str], None],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
) -> Completed:
    """Run ``argv`` like :func:`run`, handing each line it prints to ``on_line`` as it comes.

    Standard output and error are one stream (a tool's progress is on either); its last lines
    are the failure's tail.  The child is killed when ``on_line`` raises, on an interrupt, or
    after ``timeout`` seconds.  The returned :class:`Completed` has that tail as ``stderr``.

    Raises:
        ToolError: the tool is missing, exits non-zero or times out.
    """
    args = [str(a) for a in argv]
    if not args:
        raise ValueError("run_lines() needs a command")
    log.debug("+ %s", shlex.join(args))
    try:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=clean_env(env), cwd=cwd)
    except FileNotFoundError as exc:
        raise ToolError(args[0], 127, f"{args[0]}: not found ({exc.strerror})") from exc
    tail: deque[str] = deque(maxlen=_TAIL_LINES)
    timed_out = threading.Event()

    def expire() -> None:
        timed_out.set()
        proc.kill()

    timer = threading.Timer(timeout, expire) if timeout is not None else None
    try:
        if timer is not None:
            timer.start()
        assert proc.stdout is not None  # stdout=PIPE above
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            tail.append(line)
            on_line(line)
        proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        if timer is not None:
            timer.cancel()
        if proc.stdout is not None:
            proc.stdout.close()
    if timed_out.is_set():
        raise ToolError(Path(args[0]).name, -9, f"timed out after {timeout} s")
    text = "\n".join(tail)
    if proc.returncode != 0:
        raise ToolError(Path(args[0]).name, proc.returncode, text)
    return Completed(tuple(args), proc.returncode, b"", text.encode())
