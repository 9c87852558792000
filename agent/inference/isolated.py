"""The file work of a hot swap, in a worker process, so that it never holds the serving interpreter.

Staging a ~100 MB bundle while the agent serves costs CPU in Python: reading and hashing the
bundle, unpacking it with its hashes re-checked, and parsing the model's protobuf for the
file-reference gate (:func:`agent.modelrefs.check_model`).  On the serving process the
parsing holds the GIL for tens of milliseconds per pass, and all of it takes CPU that serving
needs; in a worker process it takes no GIL of ours and, where the sandbox lets the worker
lower its priority, only CPU that serving leaves idle.

What stays on the serving process, and why: building the ONNX Runtime session (a session
cannot cross processes, and the golden vectors must pass on the very session that serves),
the golden vectors, and the switch.  The worker's verdict on the model travels as a
:class:`~agent.modelrefs.ModelCheck`, which :func:`agent.ort.make_session` accepts only for
bytes of the same sha256.

The worker is ``python -m agent.inference.isolated``, started for one job: a request as JSON
on its stdin, the answer as JSON on its stdout.  JSON and not pickle, because the worker reads
hostile input: whatever it answers is data that this side checks, never code.  It dies with
the thread that started it (``PR_SET_PDEATHSIG``), so a killed agent leaves no worker behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from agent.bundle import MODEL, valid_name
from agent.errors import BundleError, NotFoundError, VerificationError
from agent.inference.store import InstalledModel, ModelStore, StagedBundle
from agent.lifecycle import die_with_parent
from agent.modelrefs import ModelCheck, check_model

__all__ = ["check_installed", "stage_install"]

log = logging.getLogger(__name__)

# os.nice's ceiling: the worker runs only when serving leaves a CPU idle.
_LOWEST = 19
# Errors the worker may report, by name; anything else is reported as a BundleError.
_ERRORS: dict[str, type[BundleError | VerificationError | NotFoundError]] = {
    "BundleError": BundleError, "VerificationError": VerificationError, "NotFoundError": NotFoundError}
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent.parent)


# ---------------------------------------------------------------------------- serving side

def stage_install(store: ModelStore, bundle_path: Path) -> tuple[StagedBundle | InstalledModel,
                                                                  ModelCheck | None]:
    """:meth:`ModelStore.stage` a bundle and check its model's file references (an install's
    session reads no data files), in a worker process.  A version installed already from
    that bundle comes back with no check.

    Raises:
        NotFoundError, BundleError, VerificationError: refused; nothing is left behind.
    """
    answer = _ask({"op": "stage", "state": str(store.state_dir), "bundle": str(bundle_path)})
    if "installed" in answer:
        name, version = answer["installed"]
        return store.find(str(name), str(version)), None
    tmp = _staged_dir(store, answer["tmp"])
    try:
        manifest = store.staged_manifest(tmp)
        staged = StagedBundle(tmp, manifest, str(answer["sha256"]), int(answer["length"]), str(bundle_path))
        return staged, _check_of(answer["check"])
    except BaseException:
        store.discard(tmp)
        raise


def check_installed(store: ModelStore, installed: InstalledModel) -> ModelCheck:
    """Re-check an installed version's members (:meth:`ModelStore.open`) and its model's file
    references against its data files, in a worker process.

    Raises:
        BundleError, VerificationError: its files no longer match, or the model refers to a
            file it may not read.
    """
    answer = _ask({"op": "check", "state": str(store.state_dir), "name": installed.name,
                   "version": installed.version})
    return _check_of(answer["check"])


def _ask(request: dict[str, Any]) -> dict[str, Any]:
    """Run one job in a fresh worker (blocking) and return its answer.

    Raises:
        BundleError, VerificationError, NotFoundError: what the worker refused.
        BundleError: the worker ended without an answer.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
    # argv only, no shell; killed by subprocess.run if this thread is interrupted
    proc = subprocess.run([sys.executable, "-m", __name__], input=json.dumps(request).encode(),
                          capture_output=True, env=env, check=False)
    try:
        answer = json.loads(proc.stdout)
    except ValueError:
        answer = None
    if proc.returncode != 0 or not isinstance(answer, dict):
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise BundleError(f"the worker process checking the bundle ended without an answer "
                          f"(exit status {proc.returncode}: {' / '.join(tail) or 'no output'}); "
                          "nothing was installed or loaded")
    if "error" in answer:
        kind, message = answer["error"]
        raise _ERRORS.get(str(kind), BundleError)(str(message))
    return answer


def _staged_dir(store: ModelStore, reported: object) -> Path:
    """The staging directory the worker reported, if it is one: a hidden entry directly in a
    model's directory of this store (never trust a path from the process that read the bundle)."""
    tmp = Path(str(reported))
    if not (tmp.is_absolute() and tmp.parent.parent == store.root and valid_name(tmp.parent.name)
            and tmp.name.startswith(".") and "/" not in tmp.name and tmp.is_dir() and not tmp.is_symlink()):
        raise BundleError(f"the bundle worker reported a staging directory outside the store: {tmp}")
    return tmp


def _check_of(data: Any) -> ModelCheck:
    return ModelCheck(str(data["sha256"]), frozenset(str(m) for m in data["members"]),
                      bool(data["fixed_cost"]))


# ---------------------------------------------------------------------------- worker side

def _serve_one(request: dict[str, Any]) -> dict[str, Any]:
    store = ModelStore(Path(request["state"]))
    if request["op"] == "stage":
        staged = store.stage(Path(request["bundle"]))
        if isinstance(staged, InstalledModel):
            return {"installed": [staged.name, staged.version]}
        try:
            m = staged.manifest
            check = check_model((staged.tmp / MODEL).read_bytes(), (), f"{m.name} {m.version}")
        except BaseException:
            store.discard(staged.tmp)
            raise
        return {"tmp": str(staged.tmp), "sha256": staged.sha256, "length": staged.length,
                "check": _check_json(check)}
    installed = store.find(request["name"], request["version"])
    opened = store.open(installed)
    check = check_model(opened.model, opened.manifest.data_files, f"{installed.name} {installed.version}")
    return {"check": _check_json(check)}


def _check_json(check: ModelCheck) -> dict[str, Any]:
    return {"sha256": check.sha256, "members": sorted(check.members), "fixed_cost": check.fixed_cost}


def _prepare_worker() -> None:
    """Die with the thread that started this worker; run only on CPU that serving leaves idle.
    Both best effort: a unit's system-call filter may deny them."""
    die_with_parent(signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.nice(_LOWEST)


def main() -> int:
    _prepare_worker()
    try:
        answer = _serve_one(json.loads(sys.stdin.buffer.read()))
    except (BundleError, VerificationError, NotFoundError) as exc:
        answer = {"error": [type(exc).__name__, str(exc)]}
    except OSError as exc:
        answer = {"error": ["BundleError", f"cannot read or unpack the bundle: {exc}"]}
    sys.stdout.write(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
