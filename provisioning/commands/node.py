"""``appliance node health|inventory|events``: ask one node about itself over gRPC.

For a person at one node (a table or a summary) or a script (``--json``; with ``--watch``,
one JSON document per line).  ``node health --check`` exits 0, 1 or 2 for PASS, WARN or
FAIL and 3 (UNKNOWN) when the node cannot be asked, as monitoring plugins do.  The fleet-wide
view is ``appliance fleet``.
``node update check|apply|rollback|history`` drives the node's updates component: apply and
rollback exit 1 when an update was refused (the reason is printed), 0 otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from agent.errors import AccessDeniedError, ApplianceError, NotFoundError
from provisioning.output import emit_json, examples, print_table

__all__ = ["DEFAULT_TARGET", "register"]

DEFAULT_PORT = 8001
DEFAULT_TARGET = f"127.0.0.1:{DEFAULT_PORT}"
_VERDICTS = {0: "UNSPECIFIED", 1: "PASS", 2: "WARN", 3: "FAIL"}
_CHECK_EXIT = {1: 0, 2: 1, 3: 2}
CHECK_UNKNOWN = 3  # monitoring plugin convention: the node could not be asked


def _target(text: str) -> str:
    """HOST, HOST:PORT, [V6] or [V6]:PORT; without a port, the agent's 8001."""
    if text.startswith("["):
        return text if "]:" in text else f"{text}:{DEFAULT_PORT}"
    if text.count(":") == 1:
        return text
    if ":" in text:  # a bare IPv6 address
        return f"[{text}]:{DEFAULT_PORT}"
    return f"{text}:{DEFAULT_PORT}"


# ---------------------------------------------------------------------- gRPC plumbing

def _tls_flags(parser: argparse.ArgumentParser) -> None:
    """mTLS to the node: the same flags and environment as ``appliance fleet``."""
    from provisioning.fleet import add_credential_flags

    add_credential_flags(parser)  # none given: plain text, for an agent on loopback without TLS
    parser.add_argument("--tls-name", metavar="NAME",
                        help="the name in the node's certificate, when it is not HOST")


def _stub(args: argparse.Namespace) -> Any:
    """A Node stub over mTLS when --ca/--cert/--key (or their variables) are given, else plain text.

    Raises:
        ConfigError: only some of the three files are given. NotFoundError: one is missing.
    """
    import grpc

    from agent.proto import node_pb2_grpc
    from provisioning.fleet import FleetAuth

    auth = FleetAuth.from_files(args.ca, args.cert, args.key)
    if auth.insecure:
        channel = grpc.insecure_channel(args.target)
    else:
        options = [("grpc.ssl_target_name_override", args.tls_name)] if args.tls_name else []
        channel = grpc.secure_channel(args.target, auth.credentials(), options=options)
    return node_pb2_grpc.NodeStub(channel)  # type: ignore[no-untyped-call]


def _call(args: argparse.Namespace, fn: Callable[[], Any]) -> Any:
    """Run an RPC; turn a gRPC failure into an error that names the node and the cause."""
    import grpc

    try:
        return fn()
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        text = f"{args.target}: {code.name if code else 'error'}: {details}"
        if code == grpc.StatusCode.PERMISSION_DENIED:
            raise AccessDeniedError(text) from None
        if code == grpc.StatusCode.NOT_FOUND:
            raise NotFoundError(text) from None
        raise ApplianceError(text) from None


def _to_dict(message: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    data: dict[str, Any] = MessageToDict(message, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)
    return data


def _emit_line(data: Any) -> None:
    sys.stdout.write(json.dumps(data, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------- presentation

def _when(ts: Any) -> str:
    seconds = ts.seconds + ts.nanos / 1e9
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ") if seconds else "-"


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.1f}G"


def _duration(seconds: float) -> str:
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    return f"{days}d{hours:02d}h{rest // 60:02d}m" if days else f"{hours}h{rest // 60:02d}m"


def _print_health(r: Any) -> None:
    h = r.host
    nvml = (f"NVML {r.driver_version} / CUDA {r.cuda_driver_version}, {len(r.gpus)} GPU(s)"
            if r.nvml_available else f"no NVML: {r.nvml_reason}")
    print(f"health: {_VERDICTS[r.overall]}   sampled {_when(r.sampled_at)}   {nvml}")
    print(f"host: cpu {h.cpu_pct:.0f}% of {len(h.cpu_per_core_pct)} cores, load "
          f"{h.load1:.2f} {h.load5:.2f} {h.load15:.2f}, memory {_gib(h.memory_available_bytes)} free of "
          f"{_gib(h.memory_total_bytes)}, swap {_gib(h.swap_used_bytes)} of {_gib(h.swap_total_bytes)}, "
          f"up {_duration(h.uptime_s)}")
    if h.disks:
        print_table(["DISK", "ROLE", "USED", "SIZE", "USE%"],
                    [[d.mountpoint, d.role, _gib(d.used_bytes), _gib(d.total_bytes), f"{d.used_pct:.1f}"]
                     for d in h.disks])
    if r.gpus:
        print_table(["GPU", "NAME", "TEMP", "POWER", "UTIL", "MEMORY", "THROTTLE", "ECC C/U", "XID"],
                    [[g.index, g.name, "LOST" if g.lost else f"{g.temperature_c:.0f}C",
                      f"{g.power_w:.0f}/{g.power_limit_w:.0f}W", f"{g.utilization_gpu_pct:.0f}%",
                      f"{_gib(g.memory_used_bytes)}/{_gib(g.memory_total_bytes)}",
                      ",".join(g.throttle_reasons) or "-",
                      f"{g.ecc_corrected_volatile}/{g.ecc_uncorrected_volatile}",
                      g.last_xid or "-"] for g in r.gpus])
    rules = sorted(r.rules, key=lambda x: (-x.verdict, x.subject, x.rule))
    print_table(["VERDICT", "RULE", "SUBJECT", "REASON"],
                [[_VERDICTS[x.verdict], x.rule, x.subject, x.reason] for x in rules])


def _cpu_level(inv: Any) -> str:
    if not inv.cpu_level_required:
        return "-"
    if inv.cpu_missing_features:
        return (f"{inv.cpu_level_required} NOT MET: missing "
                f"{' '.join(inv.cpu_missing_features)}")
    return f"{inv.cpu_level_required} (met)"


EXPOSED = 5.0  # the middle of systemd-analyze security's 0..10 scale: services above it are named


def _compliance_rows(inv: Any) -> list[tuple[str, Any]]:
    """The image's audit summary: the scan, one row per profile, Lynis, exposure."""
    if not inv.HasField("compliance"):
        return [("compliance", "-")]
    c = inv.compliance
    rows: list[tuple[str, Any]] = [("compliance scan", f"{c.scope} ({c.scanner})")]
    rows += [("compliance", f"{p.profile} {p.pass_ratio * 100:.1f}% pass ({p.passed} pass, "
                            f"{p.fail} fail, {p.waived} waived)") for p in c.profiles]
    exposed = sorted((s for s in c.services if s.exposure > EXPOSED), key=lambda s: (-s.exposure, s.unit))
    named = ": " + ", ".join(f"{s.unit} {s.exposure:.1f}" for s in exposed) if exposed else ""
    rows += [("lynis index", c.lynis_hardening_index),
             ("agent exposure", f"{c.agent_exposure:.1f}"),
             ("exposed services", f"{len(exposed)} of {len(c.services)} above {EXPOSED:.1f}{named}")]
    return rows


def _print_inventory(inv: Any) -> None:
    rows = [
        ("node id", inv.node_id), ("hostname", inv.hostname),
        ("image", inv.image_version or "-"), ("active slot", inv.active_slot or "-"),
        ("kernel", inv.kernel), ("agent", inv.agent_version),
        ("registry root", inv.registry_root_version or "-"),
        ("firmware manifest", inv.firmware_manifest_id or "-"),
        ("execution providers", ", ".join(inv.execution_providers) or "-"),
        ("cpu level", _cpu_level(inv)),
        *_compliance_rows(inv),
    ]
    if inv.clock_override:
        rows.append(("clock override", inv.clock_override))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if inv.gpus:
        print_table(["GPU", "NAME", "UUID", "DRIVER", "CUDA"],
                    [[g.index, g.name, g.uuid, g.driver_version, g.cuda_driver_version] for g in inv.gpus])
    if inv.bundles:
        print_table(["BUNDLE", "VERSION", "ACTIVE", "SHA256"],
                    [[b.name, b.version, "*" if b.active else "", b.sha256[:16]] for b in inv.bundles])
    else:
        print("no model bundles installed")


def _event_rows(events: Any) -> list[list[Any]]:
    return [[e.seq, _when(e.time), e.severity, e.kind, e.subject, e.message] for e in events]


# ---------------------------------------------------------------------- handlers

def _health(args: argparse.Namespace) -> int:
    from agent.proto import node_pb2

    stub = _stub(args)
    if not args.watch:
        try:
            report = _call(args, lambda: stub.GetHealth(node_pb2.GetHealthRequest(), timeout=args.timeout))
        except ApplianceError as exc:
            if not args.check:
                raise
            # A monitoring plugin reports an unreachable node as UNKNOWN (3), not as FAIL.
            print(f"UNKNOWN: {exc}", file=sys.stderr)
            if args.json:
                emit_json({"overall": "UNKNOWN", "error": str(exc)})
            return CHECK_UNKNOWN
        if args.json:
            emit_json(_to_dict(report))
        else:
            _print_health(report)
        return _CHECK_EXIT.get(report.overall, 2) if args.check else 0
    request = node_pb2.WatchHealthRequest(interval_ms=int(args.interval * 1000))
    for report in _stream(args, lambda: stub.WatchHealth(request)):
        if args.json:
            _emit_line(_to_dict(report))
        else:
            _print_health(report)
            print(flush=True)
    return 0


def _stream(args: argparse.Namespace, start: Callable[[], Iterator[Any]]) -> Iterator[Any]:
    """Items of a server stream; a gRPC failure at any point becomes an ApplianceError."""
    iterator = _call(args, start)
    while True:
        try:
            item = _call(args, lambda: next(iterator))
        except StopIteration:
            return
        yield item


def _inventory(args: argparse.Namespace) -> int:
    from agent.proto import node_pb2

    stub = _stub(args)
    inv = _call(args, lambda: stub.GetInventory(node_pb2.GetInventoryRequest(), timeout=args.timeout))
    if args.json:
        emit_json(_to_dict(inv))
    else:
        _print_inventory(inv)
    return 0


def _events(args: argparse.Namespace) -> int:
    from agent.proto import node_pb2

    stub = _stub(args)

    def fetch(after: int) -> list[Any]:
        request = node_pb2.GetEventsRequest(after_seq=after, limit=args.limit, kind_prefix=args.kind)
        return list(_call(args, lambda: stub.GetEvents(request, timeout=args.timeout)).events)

    events = fetch(args.after)
    if args.json and not args.watch:
        emit_json([_to_dict(e) for e in events])
        return 0
    headers = ["SEQ", "TIME", "SEVERITY", "KIND", "SUBJECT", "MESSAGE"]
    if not args.watch:
        if events:
            print_table(headers, _event_rows(events))
        else:
            print("no events")
        return 0
    last = args.after
    while True:
        for e in events:
            if args.json:
                _emit_line(_to_dict(e))
            else:
                print("  ".join(str(c) for c in _event_rows([e])[0]), flush=True)
            last = max(last, e.seq)
        time.sleep(args.interval)
        events = fetch(last)


def _print_results(results: Any) -> None:
    if not results:
        print("nothing to do")
        return
    print_table(["OUTCOME", "BUNDLE", "VERSION", "SHA256", "REASON"],
                [[r.outcome, r.name, r.version, r.sha256[:16] or "-", r.reason] for r in results])


def _update_check(args: argparse.Namespace) -> int:
    from agent.proto import node_pb2

    stub = _stub(args)
    reply = _call(args, lambda: stub.CheckUpdates(node_pb2.CheckUpdatesRequest(), timeout=args.timeout))
    if args.json:
        emit_json(_to_dict(reply))
    elif reply.pending:
        print(f"registry: {reply.source}")
        print_table(["BUNDLE", "RUNNING", "AVAILABLE", "SIZE", "TARGET"],
                    [[p.name, p.current_version or "-", p.version, p.length, p.target]
                     for p in reply.pending])
    else:
        print(f"up to date (registry: {reply.source})")
    return 0


def _update_apply(args: argparse.Namespace) -> int:
    from agent.proto import node_pb2

    stub = _stub(args)
    if not args.json:
        what = ", ".join(args.targets) or "everything pending"
        print(f"{args.target}: applying {what}{' (dry run)' if args.dry_run else ''} ...",
              file=sys.stderr, flush=True)
    request = node_pb2.ApplyUpdateRequest(targets=args.targets, dry_run=args.dry_run)
    reply = _call(args, lambda: stub.ApplyUpdate(request, timeout=args.timeout))
    if args.json:
        emit_json(_to_dict(reply))
    else:
        _print_results(reply.results)
    return 1 if any(r.outcome == "refused" for r in reply.results) else 0


def _update_rollback(args: argparse.Namespace) -> int:
    from agent.proto import node_pb2

    stub = _stub(args)
    request = node_pb2.RollbackRequest(name=args.name, version=args.version, reason=args.reason)
    reply = _call(args, lambda: stub.Rollback(request, timeout=args.timeout))
    if args.json:
        emit_json(_to_dict(reply))
    else:
        _print_results([reply.result])
    return 1 if reply.result.outcome == "refused" else 0


def _update_history(args: argparse.Namespace) -> int:
    from agent.proto import node_pb2

    stub = _stub(args)
    reply = _call(args, lambda: stub.UpdateHistory(node_pb2.UpdateHistoryRequest(limit=args.limit),
                                                   timeout=args.timeout))
    if args.json:
        emit_json([_to_dict(e) | {"time": _when(t)}
                   for e, t in zip(reply.entries, reply.times, strict=True)])
    elif reply.entries:
        print_table(["TIME", "OUTCOME", "BUNDLE", "VERSION", "SHA256", "REASON"],
                    [[_when(t), e.outcome, e.name, e.version, e.sha256[:16] or "-", e.reason]
                     for e, t in zip(reply.entries, reply.times, strict=True)])
    else:
        print("no updates yet")
    return 0


def _register_update(verbs: Any, common: argparse.ArgumentParser, target: argparse.ArgumentParser) -> None:
    update = verbs.add_parser("update", **examples(
            "appliance node update check --target node7",
            "appliance node update apply --target node7 tiny@1.1.0"),
        parents=[common], help="check, apply, roll back and list updates")
    uverbs = update.add_subparsers(dest="update_command", metavar="VERB")
    uverbs.required = True
    long_call = argparse.ArgumentParser(add_help=False)
    long_call.add_argument("--target", type=_target, default=DEFAULT_TARGET, metavar="HOST[:PORT]",
                           help=f"the node's agent (default: {DEFAULT_TARGET}; port {DEFAULT_PORT} "
                                "when not given)")
    long_call.add_argument("--timeout", type=float, default=600.0,
                           help="seconds the node may take (default: 600)")
    _tls_flags(long_call)
    check = uverbs.add_parser("check", **examples(
            "appliance node update check --target node7 --json"),
        parents=[common, long_call],
                              help="refresh from the registry; list bundles newer than what runs")
    check.set_defaults(handler=_update_check)
    apply = uverbs.add_parser("apply", **examples(
            "appliance node update apply --target node7 --dry-run",
            "appliance node update apply --target node7 tiny@1.1.0"),
        parents=[common, long_call],
                              help="apply named targets, or everything pending on the node's channel")
    apply.add_argument("targets", nargs="*", metavar="TARGET",
                       help="NAME, NAME@VERSION or a TUF target path (default: everything pending)")
    apply.add_argument("--dry-run", action="store_true", help="say what would be applied; change nothing")
    apply.set_defaults(handler=_update_apply)
    rollback = uverbs.add_parser("rollback", **examples(
            "appliance node update rollback --target node7 tiny 1.0.0 --reason 'accuracy regression'"),
        parents=[common, long_call],
                                 help="make a kept earlier version active again (admin)")
    rollback.add_argument("name", help="bundle name")
    rollback.add_argument("version", help="a version kept on the node")
    rollback.add_argument("--reason", default="", help="why (recorded in the event and history)")
    rollback.set_defaults(handler=_update_rollback)
    history = uverbs.add_parser("history", **examples(
            "appliance node update history --target node7 --limit 20"),
        parents=[common, target], help="applied, refused, rolled back")
    history.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    history.set_defaults(handler=_update_history)


# ---------------------------------------------------------------------- parser

def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``appliance node ...`` to the CLI."""
    target = argparse.ArgumentParser(add_help=False)
    target.add_argument("--target", type=_target, default=DEFAULT_TARGET, metavar="HOST[:PORT]",
                        help=f"the node's agent (default: {DEFAULT_TARGET}; port {DEFAULT_PORT} "
                             "when not given)")
    target.add_argument("--timeout", type=float, default=10.0, help="seconds per call (default: 10)")
    _tls_flags(target)
    node = sub.add_parser("node", **examples(
            "appliance node health --target node7 --check",
            "appliance node inventory --target 10.0.0.7:8001 --json"),
        parents=[common], help="ask one node for its health, inventory, events",
                          description=__doc__)
    verbs = node.add_subparsers(dest="node_command", metavar="VERB")
    verbs.required = True

    health = verbs.add_parser("health", **examples(
            "appliance node health --target node7 --check",
            "appliance node health --target node7 --watch --json"),
        parents=[common, target], help="hardware health and verdicts")
    health.add_argument("--watch", action="store_true", help="keep streaming reports")
    health.add_argument("--interval", type=float, default=0.0,
                        help="with --watch: seconds between reports (default 0: on verdict change)")
    health.add_argument("--check", action="store_true",
                        help="exit 0/1/2 for PASS/WARN/FAIL, 3 (UNKNOWN) when the node cannot be "
                             "asked (monitoring plugin convention)")
    health.set_defaults(handler=_health)

    inventory = verbs.add_parser("inventory", **examples(
            "appliance node inventory --target node7 --ca pki/ca.crt --cert me.crt --key me.key"),
        parents=[common, target],
                                 help="identity, image, bundles, GPUs, execution providers")
    inventory.set_defaults(handler=_inventory)

    events = verbs.add_parser("events", **examples(
            "appliance node events --target node7 --kind gpu. --watch"),
        parents=[common, target], help="recent events (XID, throttling, ...)")
    events.add_argument("--after", type=int, default=0, metavar="SEQ", help="only events after SEQ")
    events.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    events.add_argument("--kind", default="", metavar="PREFIX", help="only kinds starting with PREFIX")
    events.add_argument("--watch", action="store_true", help="keep polling for new events")
    events.add_argument("--interval", type=float, default=1.0, help="with --watch: poll interval (s)")
    events.set_defaults(handler=_events)

    _register_update(verbs, common, target)
