"""``appliance demo --image``: the main job on its embedded default, end to end on one machine.

1. a bench in WORK (:mod:`provisioning.demo.bench`): a site PKI, a TUF registry holding the bundle
   ``affine``, ``images/hil.toml`` pointed at both, the offline mirror (``appliance mirror
   sync``, the only step that uses the network) and the image (``appliance build --offline``);
   everything is cached, so a second run only boots;
2. ``appliance boot`` the image under qemu (KVM when it works), the agent's ports forwarded to
   loopback;
3. ask its agent from the host with the fleet CLI over mTLS (``appliance fleet status``, then
   ``inventory`` and ``health``) with an admin certificate from the site PKI;
4. power the machine off (``--keep-running`` leaves it up and prints how to ask it yourself).

Every step runs the real ``appliance`` command an operator would, and prints it first.
"""

from __future__ import annotations

import json
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any

from agent.errors import ApplianceError
from provisioning.demo.bench import Bench, _appliance, prepare
from provisioning.image.boot import LOOPBACK_FORWARDS

__all__ = ["DEFAULT_PORTS", "run_image_demo"]

DEFAULT_PORTS = LOOPBACK_FORWARDS  # guest port -> host loopback port
NODE = "appliance-hil"  # images/hil.toml [image] hostname, and its certificate's name


def _say(message: str) -> None:
    sys.stderr.write(f"demo: {message}\n")
    sys.stderr.flush()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports() -> dict[int, int]:
    """The default forwards when free (README's commands use them), otherwise any free ports."""
    if all(_port_free(p) for p in DEFAULT_PORTS.values()):
        return dict(DEFAULT_PORTS)
    ports = {}
    for guest in DEFAULT_PORTS:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports[guest] = int(s.getsockname()[1])
    return ports


def _fleet_args(bench: Bench, nodes: Path) -> list[str]:
    c = bench.client
    return ["-i", str(nodes), "--ca", str(c["ca"]), "--cert", str(c["cert"]), "--key", str(c["key"])]


def _shown(args: list[str]) -> str:
    return "appliance " + " ".join(shlex.quote(a) for a in args)


def _fleet_json(args: list[str], timeout: float) -> dict[str, Any]:
    proc = _appliance(*args, "--json", timeout=timeout)
    try:
        reply: dict[str, Any] = json.loads(proc.stdout)
    except ValueError:
        raise ApplianceError(f"{_shown(args)} printed no JSON (exit {proc.returncode}):\n"
                             f"{proc.stderr[-2000:]}") from None
    return reply


def _stop(state: Path) -> None:
    if (state / "machine.json").is_file():
        _appliance("boot", "--stop", str(state), timeout=120)


def _wait_answer(fleet: list[str], state: Path, powered: float, bound: float) -> dict[str, Any]:
    """Poll ``fleet status`` until the node answers; its JSON reply. ApplianceError after ``bound``."""
    _say(f"waiting for the agent to answer: {_shown(['fleet', 'status', *fleet])} "
         f"(console: {state / 'console.log'})")
    last_said = time.monotonic()
    while True:
        status = _fleet_json(["fleet", "status", *fleet, "--deadline", "10"], timeout=60)
        if status.get("summary", {}).get("ok") == 1:
            return status
        waited = time.monotonic() - powered
        if waited > bound:
            console = state / "console.log"
            tail = console.read_text(errors="replace")[-3000:] if console.is_file() else ""
            raise ApplianceError(f"the agent did not answer within {bound:.0f} s of power-on; "
                                 f"console tail:\n{tail}")
        if time.monotonic() - last_said >= 20:
            reason = status.get("nodes", [{}])[0].get("reason", "")
            _say(f"  {waited:.0f} s: not yet ({reason or 'no answer'})")
            last_said = time.monotonic()
        time.sleep(3.0)


def _show(fleet: list[str]) -> None:
    """The fleet CLI's own tables, each under the command that printed it."""
    for what in ("status", "inventory", "health"):
        args = ["fleet", what, *fleet, "--deadline", "30"]
        out = _appliance(*args, timeout=60)
        sys.stdout.write(f"$ {_shown(args)}\n{out.stdout}")
        sys.stdout.flush()


def _boot(bench: Bench, state: Path, ports: dict[int, int], accel: str) -> dict[str, Any]:
    _stop(state)  # a machine left running by an earlier --keep-running
    boot = ["boot", str(bench.image), "--state", str(state), "--accel", accel, "--detach",
            *(a for g, h in sorted(ports.items()) for a in ("--port", f"{g}={h}"))]
    _say(_shown(boot))
    proc = _appliance(*boot, "--json", timeout=180)
    if proc.returncode != 0:
        raise ApplianceError(f"{_shown(boot)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    machine: dict[str, Any] = json.loads(proc.stdout)
    return machine


def run_image_demo(work: Path, *, accel: str = "auto", bound: float = 900.0,
                   keep_running: bool = False, show: bool = True) -> dict[str, Any]:
    """Build (cached), boot and query the default bench image; returns what was found.

    ``show``: print the fleet CLI's own tables as it runs (off for ``--json``, which instead
    puts the inventory and health answers into the result).

    Raises:
        ApplianceError: a step failed (naming the command and the tail of its output), or the
            agent did not answer within ``bound`` seconds of power-on (with the console's tail).
    """
    work = work.resolve()
    began = time.monotonic()
    _say(f"bench in {work}: site PKI, registry, offline mirror and image (cached after the first run)")
    try:
        bench = prepare(work, stream=True)
    except RuntimeError as exc:
        raise ApplianceError(str(exc)) from None
    prepared = time.monotonic() - began
    _say(f"image ready: {bench.image} ({prepared:.0f} s)")
    state, nodes, ports = work / "vm", work / "nodes.toml", _ports()
    nodes.write_text(f'[[nodes]]\nname = "{NODE}"\naddress = "127.0.0.1"\nport = {ports[8001]}\n')
    fleet = _fleet_args(bench, nodes)
    powered = time.monotonic()
    machine = _boot(bench, state, ports, accel)
    try:
        status = _wait_answer(fleet, state, powered, bound)
        serving = time.monotonic() - powered
        _say(f"the agent answered over mTLS {serving:.1f} s after power-on")
        answers = {"status": status["nodes"][0]}
        if show:  # the fleet CLI's own tables for people; its JSON for scripts
            _show(fleet)
        else:
            for what in ("inventory", "health"):
                reply = _fleet_json(["fleet", what, *fleet, "--deadline", "30"], timeout=60)
                answers[what] = reply["nodes"][0]
    finally:
        if not keep_running:
            _stop(state)
            _say("machine powered off")
    if keep_running:
        _say("left running; ask it yourself, then stop it:\n  "
             + "\n  ".join((_shown(["fleet", "inventory", *fleet]), _shown(["boot", "--stop", str(state)]))))
    return {
        "image": str(bench.image), "work": str(work), "accel": "kvm" if machine.get("kvm") else "tcg",
        "prepare_seconds": round(prepared, 1), "power_on_to_answer_seconds": round(serving, 1),
        **answers,
        "running": keep_running, "pid": machine.get("pid"), "fleet_args": fleet,
    }
