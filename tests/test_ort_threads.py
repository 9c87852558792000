"""ONNX Runtime sessions log no error in the agent's sandbox, which forbids pinning threads.

The agent's unit filters ``@resources`` (sched_setaffinity among them). With its default
thread count ONNX Runtime pins each intra-op thread and logs "pthread_setaffinity_np failed"
at every session. The test installs the same refusal with real seccomp (libseccomp, through
ctypes, in a child process) and builds a real session there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.ort import default_intra_op_threads

ROOT = Path(__file__).resolve().parent.parent

CHILD = r'''
import ctypes, ctypes.util, errno, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2")
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
ctx = lib.seccomp_init(0x7FFF0000)  # SCMP_ACT_ALLOW
nr = lib.seccomp_syscall_resolve_name(b"sched_setaffinity")
assert lib.seccomp_rule_add(ctx, 0x00050000 | errno.EPERM, nr, 0) == 0  # SCMP_ACT_ERRNO(EPERM)
assert lib.seccomp_load(ctx) == 0
import os
try:
    os.sched_setaffinity(0, os.sched_getaffinity(0))
    sys.exit("seccomp did not refuse sched_setaffinity")
except PermissionError:
    pass
from agent.ort import make_session
session = make_session(Path(sys.argv[2]).read_bytes())
print("threads", session.get_session_options().intra_op_num_threads)
'''


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: ONNX Runtime pins nothing")
def test_a_session_in_a_sandbox_that_forbids_pinning_logs_no_error(tmp_path: Path) -> None:
    from provisioning.demo.models import affine_model

    model = affine_model(tmp_path / "a.onnx")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(model)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pthread_setaffinity_np" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert proc.stdout.split() == ["threads", str(default_intra_op_threads())]


def test_the_default_thread_count_stays_within_the_cpus_the_process_may_use() -> None:
    assert 1 <= default_intra_op_threads() <= len(os.sched_getaffinity(0))


def test_the_default_thread_count_survives_a_sandbox_that_hides_the_cpus(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    def refused(*_: object, **__: object) -> object:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_getaffinity", refused)
    monkeypatch.setattr(psutil, "cpu_count", refused)
    assert default_intra_op_threads() == (os.cpu_count() or 1)
