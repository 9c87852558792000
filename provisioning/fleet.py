"""Fleet access: ask many nodes at once over gRPC (mTLS), plan and run update rollouts.

Inventories are Ansible inventory files (INI or YAML, read with ansible-core's own
``InventoryManager``, so existing inventories, groups and patterns work) or a plain TOML list.
A query fans out on one event loop with bounded concurrency; every node gets the same
deadline for all of its work (connect, handshake, calls), so one dead node costs at most that
deadline, and every node that does not answer is reported with the reason.

Rollouts are planned first (:func:`plan_rollout`: a canary wave, then batches) and then run
wave by wave (:func:`run_rollout`), halting once failures pass the threshold.  With an
:class:`AttestGate` a node counts as updated only once it attests one of the expected images.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import fnmatch
import json
import math
import os
import re
import tarfile
import time
import tomllib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from google.protobuf import json_format

from agent.errors import ApplianceError, ConfigError, NotFoundError
from agent.fsutil import atomic_write_bytes
from agent.proto import node_pb2, node_pb2_grpc
from provisioning import attest
from provisioning.errors import FleetError

__all__ = [
    "DEFAULT_PORT",
    "Action",
    "AttestGate",
    "FleetAuth",
    "Node",
    "NodeResult",
    "RolloutPlan",
    "Wave",
    "WaveOutcome",
    "attest_action",
    "attest_nodes",
    "enrol_action",
    "enrol_nodes",
    "escrow_action",
    "escrow_nodes",
    "health_action",
    "inventory_action",
    "load_expected_images",
    "load_inventory",
    "load_site_crl",
    "plan_rollout",
    "query",
    "run_rollout",
    "status_action",
    "unseal_action",
    "update_action",
]

DEFAULT_PORT = 8001


@dataclasses.dataclass(frozen=True)
class Node:
    name: str
    address: str
    port: int = DEFAULT_PORT
    groups: tuple[str, ...] = ()
    tls_name: str | None = None  # the name its certificate carries, when not ``address``

    @property
    def target(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class FleetAuth:
    """Client credentials: the site CA and this person's or tool's certificate and key."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None

    @property
    def insecure(self) -> bool:
        return self.ca is None

    def credentials(self) -> grpc.ChannelCredentials:
        """One credentials object for every channel (parsing the PEMs once, not per node)."""
        cached: grpc.ChannelCredentials | None = self.__dict__.get("_creds")
        if cached is None:
            cached = grpc.ssl_channel_credentials(self.ca, self.key, self.cert)
            object.__setattr__(self, "_creds", cached)
        return cached

    @classmethod
    def from_files(cls, ca: Path | None, cert: Path | None, key: Path | None) -> FleetAuth:
        """Read the three PEM files (all or none).

        Raises:
            ConfigError: only some are given.
            NotFoundError: a file does not exist.
        """
        given = {"--ca": ca, "--cert": cert, "--key": key}
        if not any(given.values()):
            return cls()
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise ConfigError(f"mTLS needs --ca, --cert and --key; missing {', '.join(missing)}")
        data = {}
        for flag, path in given.items():
            assert path is not None
            try:
                data[flag] = path.read_bytes()
            except FileNotFoundError:
                raise NotFoundError(f"{path}: {flag} file does not exist") from None
        return cls(data["--ca"], data["--cert"], data["--key"])


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def add_credential_flags(parser: argparse.ArgumentParser) -> None:
    """--ca, --cert and --key, defaulting to $APPLIANCE_FLEET_CA/_CERT/_KEY (read by
    :meth:`FleetAuth.from_files`): the same for ``appliance fleet`` and ``appliance node``."""
    parser.add_argument("--ca", type=Path, default=_env_path("APPLIANCE_FLEET_CA"),
                        help="site CA certificate (default: $APPLIANCE_FLEET_CA)")
    parser.add_argument("--cert", type=Path, default=_env_path("APPLIANCE_FLEET_CERT"),
                        help="your client certificate (default: $APPLIANCE_FLEET_CERT)")
    parser.add_argument("--key", type=Path, default=_env_path("APPLIANCE_FLEET_KEY"),
                        help="its private key (default: $APPLIANCE_FLEET_KEY)")


# ------------------------------------------------------------------ inventories


def _toml_inventory(path: Path) -> list[Node]:
    try:
        data = tomllib.loads(path.read_bytes().decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML: arrays or tables nested too deeply") from None
    default_port = data.get("port", DEFAULT_PORT)
    entries = data.get("nodes")
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: expected [[nodes]] tables with name and address")
    nodes = []
    for i, entry in enumerate(entries):
        where = f"{path}: nodes[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a table")
        unknown = sorted(set(entry) - {"name", "address", "port", "groups", "tls_name"})
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where} name = {name!r}: expected a non-empty string")
        address = entry.get("address", name)
        if not isinstance(address, str) or not address:
            raise ConfigError(f"{where} address = {address!r}: expected a host name or IP address")
        port = entry.get("port", default_port)
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise ConfigError(f"{where} port = {port!r}: not a TCP port")
        tls_name = entry.get("tls_name")
        if tls_name is not None and not isinstance(tls_name, str):
            raise ConfigError(f"{where} tls_name = {tls_name!r}: expected a host name")
        groups = entry.get("groups", [])
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise ConfigError(f"{where} groups = {groups!r}: expected a list of strings")
        nodes.append(Node(name, address, port, tuple(groups), tls_name))
    return nodes


def _check_ansible_parses(path: Path, loader: Any) -> None:
    """Parse ``path`` with the one ansible plugin its name calls for, to report its error.

    InventoryManager tries every plugin, prints each one's failure as a warning and then
    carries on with an empty inventory; the error worth showing is the INI or YAML parser's.

    Raises:
        ConfigError: that plugin cannot parse the file (its message, naming the line).
    """
    from ansible.errors import AnsibleError
    from ansible.inventory.data import InventoryData
    from ansible.plugins.loader import inventory_loader

    if path.is_dir():
        if not any(path.iterdir()):
            raise ConfigError(f"{path}: an empty directory, not an Ansible inventory")
        return  # a directory of sources: ansible's own reporting
    plugin = inventory_loader.get("yaml" if path.suffix in (".yml", ".yaml") else "ini")
    if plugin is None or not plugin.verify_file(str(path)):
        return
    try:
        plugin.parse(InventoryData(), loader, str(path.resolve()), cache=False)
    except AnsibleError as exc:
        text = " ".join(str(exc.message).split())
        raise ConfigError(f"{path}: not an Ansible inventory: {text}") from None


# Ansible expands host ranges (web[01:50], db-[a:f], with an optional :stride) into every
# host they name, several ranges in one name multiplying: a 40-byte line such as
# h[a:z][a:z][a:z][a:z] is half a million hosts, and ansible takes about half a millisecond a host.
MAX_RANGE_HOSTS = 10_000
_RANGE_RE = re.compile(r"\[(\d+|[a-zA-Z]):(\d+|[a-zA-Z])(?::(\d+))?\]")


def _range_size(match: re.Match[str]) -> int:
    start, end, stride = match.group(1), match.group(2), match.group(3) or "1"
    if start.isdigit() != end.isdigit():
        return 1  # not a range ansible expands ([1:z]): its parser says what is wrong
    if max(len(start), len(end), len(stride)) > 12:  # numbers no real fleet counts to
        return MAX_RANGE_HOSTS + 1
    first, last = (int(start), int(end)) if start.isdigit() else (ord(start), ord(end))
    return max(0, last - first) // max(1, int(stride)) + 1


def _check_host_ranges(path: Path) -> None:
    """Refuse an inventory whose host ranges name more than :data:`MAX_RANGE_HOSTS` hosts.

    Raises:
        ConfigError: naming the line and how many hosts it expands to.
    """
    if path.is_dir():
        return
    total = 0
    for number, line in enumerate(path.read_bytes().decode("utf-8", "replace").splitlines(), 1):
        sizes = [min(_range_size(m), MAX_RANGE_HOSTS + 1) for m in _RANGE_RE.finditer(line)]
        total += math.prod(sizes) if sizes else 0
        if total > MAX_RANGE_HOSTS:
            raise ConfigError(f"{path}:{number}: host ranges expand to more than {MAX_RANGE_HOSTS} "
                              f"hosts ({line.strip()[:80]!r})")


def _ansible_inventory(path: Path, pattern: str) -> list[Node]:
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader

    _check_host_ranges(path)
    loader = DataLoader()
    _check_ansible_parses(path, loader)
    manager = InventoryManager(loader=loader, sources=[str(path)])
    if not manager.hosts and not manager.groups.get("all", None):
        raise ConfigError(f"{path}: ansible could not read any hosts from it")
    nodes = []
    for host in manager.get_hosts(pattern=pattern):
        hv = host.get_vars()
        port = hv.get("appliance_port", DEFAULT_PORT)
        try:
            port = int(port)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: host {host.name} appliance_port = {port!r}: not a port") from None
        groups = tuple(sorted(g.name for g in host.get_groups() if g.name not in ("all", "ungrouped")))
        nodes.append(Node(host.name, str(hv.get("ansible_host", host.name)), port, groups,
                          hv.get("appliance_tls_name")))
    return nodes


def load_inventory(path: Path, limit: str = "all") -> list[Node]:
    """The nodes of an inventory, restricted to ``limit`` (a host or group name or pattern).

    ``.toml`` files are the plain list; anything else goes to ansible-core (INI, YAML, ...).
    Host variables used: ``ansible_host`` (address), ``appliance_port``, ``appliance_tls_name``.

    Raises:
        NotFoundError: the file does not exist.
        ConfigError: it cannot be parsed, or ``limit`` matches no node.
    """
    if not path.exists():
        raise NotFoundError(f"{path}: inventory does not exist")
    if path.suffix == ".toml":
        nodes = _toml_inventory(path)
        if limit != "all":
            nodes = [n for n in nodes if any(fnmatch.fnmatchcase(x, p) for p in limit.split(",")
                                             for x in (n.name, *n.groups))]
    else:
        nodes = _ansible_inventory(path, limit)
    if not nodes:
        raise ConfigError(f"{path}: no nodes match {limit!r}")
    names = [n.name for n in nodes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{path}: node {dupes[0]!r} appears more than once")
    return nodes


# ------------------------------------------------------------------ querying


@dataclasses.dataclass
class NodeResult:
    node: Node
    ok: bool
    reason: str = ""
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.node.name, "target": self.node.target, "groups": list(self.node.groups),
                "ok": self.ok, "reason": self.reason, "data": self.data,
                "seconds": round(self.seconds, 3)}


Action = Callable[[node_pb2_grpc.NodeStub, float], Awaitable[dict[str, Any]]]


def _as_dict(message: Any) -> dict[str, Any]:
    out: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return out


def _reason(err: grpc.aio.AioRpcError, deadline: float) -> str:
    code = err.code()
    details = err.details() or ""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer within {deadline:g} s"
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"unreachable: {details}"
    return f"{code.name}: {details}"


class _UpdateRefusedError(Exception):
    def __init__(self, message: str, results: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.results = results


class _NotAttestedError(Exception):
    def __init__(self, verdict: attest.Verdict) -> None:
        super().__init__(verdict.reason)
        self.verdict = verdict


class _RefusedError(Exception):
    """What a node answered does not do: the node's result fails with ``what`` and the reason."""

    what = "refused"


class _NotEnrolledError(_RefusedError):
    """The site CA would not certify what the node sent as its attestation key."""

    what = "not enrolled"


class _StillSealedError(_RefusedError):
    """A sealed node's data stays sealed: no escrow, one the site's key does not open, a refusal."""

    what = "still sealed"


class _NoEscrowError(_RefusedError):
    """The node has no recovery key escrow to give, or one the site's key does not open."""

    what = "no usable escrow"


def _channel(node: Node, auth: FleetAuth) -> grpc.aio.Channel:
    options: list[tuple[str, Any]] = [("grpc.enable_retries", 0)]
    if auth.insecure:
        return grpc.aio.insecure_channel(node.target, options=options)
    if node.tls_name:
        options.append(("grpc.ssl_target_name_override", node.tls_name))
    return grpc.aio.secure_channel(node.target, auth.credentials(), options=options)


async def _ask(node: Node, action: Action, auth: FleetAuth, deadline: float) -> NodeResult:
    """``action`` on ``node`` over a channel of its own, all of it within ``deadline``; every
    failure is a result with its reason (the channel is closed either way)."""
    start = time.monotonic()
    channel = _channel(node, auth)
    try:
        async with asyncio.timeout(deadline):
            stub = node_pb2_grpc.NodeStub(channel)  # type: ignore[no-untyped-call]
            data = await action(stub, deadline)
        return NodeResult(node, True, data=data, seconds=time.monotonic() - start)
    except grpc.aio.AioRpcError as err:
        return NodeResult(node, False, _reason(err, deadline), seconds=time.monotonic() - start)
    except TimeoutError:
        return NodeResult(node, False, f"no answer within {deadline:g} s",
                          seconds=time.monotonic() - start)
    except _UpdateRefusedError as exc:
        return NodeResult(node, False, f"update refused: {exc}", data={"results": exc.results},
                          seconds=time.monotonic() - start)
    except _NotAttestedError as exc:
        return NodeResult(node, False, f"not attested: {exc}", data=exc.verdict.to_json(),
                          seconds=time.monotonic() - start)
    except _RefusedError as exc:
        return NodeResult(node, False, f"{exc.what}: {exc}", seconds=time.monotonic() - start)
    finally:
        await channel.close(grace=None)


async def query(nodes: Sequence[Node], action: Action, *, auth: FleetAuth, deadline: float = 5.0,
                concurrency: int = 1024, progress: Callable[[NodeResult], None] | None = None,
                ) -> list[NodeResult]:
    """Run ``action`` on every node, at most ``concurrency`` at a time; results in node order.

    Raises:
        ConfigError: ``deadline`` or ``concurrency`` is not positive.
    """
    _check_limits(deadline, concurrency)
    return await _fan_out(nodes, lambda node: _ask(node, action, auth, deadline),
                          concurrency=concurrency, progress=progress)


def _check_limits(deadline: float, concurrency: int) -> None:
    if deadline <= 0 or concurrency <= 0:
        raise ConfigError("--deadline and --concurrency must be positive")


async def _fan_out(nodes: Sequence[Node], visit: Callable[[Node], Awaitable[NodeResult]], *,
                   concurrency: int, progress: Callable[[NodeResult], None] | None) -> list[NodeResult]:
    """``visit(node)`` for every node, at most ``concurrency`` at a time; results in node order."""
    gate = asyncio.Semaphore(concurrency)

    async def tracked(node: Node) -> NodeResult:
        async with gate:
            result = await visit(node)
        if progress is not None:
            progress(result)
        return result

    return list(await asyncio.gather(*(tracked(n) for n in nodes)))


# The actions: each asks one node and returns JSON-ready data.

async def status_action(stub: node_pb2_grpc.NodeStub, deadline: float) -> dict[str, Any]:
    health, inventory = await asyncio.gather(
        stub.GetHealth(node_pb2.GetHealthRequest(), timeout=deadline),
        stub.GetInventory(node_pb2.GetInventoryRequest(), timeout=deadline))
    failing = [r.rule for r in health.rules if r.verdict == node_pb2.FAIL]
    return {"overall": node_pb2.Verdict.Name(health.overall), "failing_rules": failing,
            "image_version": inventory.image_version, "agent_version": inventory.agent_version,
            "active_slot": inventory.active_slot,
            "bundles": [f"{b.name}@{b.version}" for b in inventory.bundles if b.active]}


async def health_action(stub: node_pb2_grpc.NodeStub, deadline: float) -> dict[str, Any]:
    return _as_dict(await stub.GetHealth(node_pb2.GetHealthRequest(), timeout=deadline))


async def inventory_action(stub: node_pb2_grpc.NodeStub, deadline: float) -> dict[str, Any]:
    return _as_dict(await stub.GetInventory(node_pb2.GetInventoryRequest(), timeout=deadline))


def update_action(targets: Sequence[str], dry_run: bool) -> Action:
    """ApplyUpdate on one node; the node's failure outcomes make the result not ok."""

    async def apply(stub: node_pb2_grpc.NodeStub, deadline: float) -> dict[str, Any]:
        reply = await stub.ApplyUpdate(node_pb2.ApplyUpdateRequest(targets=list(targets),
                                                                   dry_run=dry_run), timeout=deadline)
        results = [_as_dict(r) for r in reply.results]
        bad = [r for r in reply.results if r.outcome in ("refused", "rolled-back")]
        if bad:
            raise _UpdateRefusedError("; ".join(f"{r.name or r.target}: {r.outcome} ({r.reason})"
                                                for r in bad), results)
        return {"results": results}

    return apply


async def _verdict(stub: node_pb2_grpc.NodeStub, node: str, deadline: float,
                   policy: attest.Policy) -> attest.Verdict:
    """Node/Attest with a fresh nonce, judged (:func:`provisioning.attest.judge`) by ``policy``."""
    nonce = os.urandom(32)
    r = await stub.Attest(node_pb2.AttestRequest(nonce=nonce), timeout=deadline)
    answer = attest.Answer(r.attest, r.signature, r.pcr_values, r.ak_public, r.ak_certificate,
                           r.root_hash, r.image_version, r.event_log)
    return attest.judge(answer, nonce=nonce, node=node, policy=policy)


def attest_action(node: str, policy: attest.Policy) -> Action:
    """Node/Attest with a fresh nonce, judged (:func:`provisioning.attest.judge`) by ``policy``;
    a node that does not attest is a failed result with the reason."""

    async def ask(stub: node_pb2_grpc.NodeStub, deadline: float) -> dict[str, Any]:
        verdict = await _verdict(stub, node, deadline, policy)
        if not verdict.ok:
            raise _NotAttestedError(verdict)
        return verdict.to_json()

    return ask


async def attest_nodes(nodes: Sequence[Node], *, auth: FleetAuth, policy: attest.Policy,
                       deadline: float = 10.0, concurrency: int = 1024,
                       progress: Callable[[NodeResult], None] | None = None) -> list[NodeResult]:
    """:func:`attest_action` on every node (each judged under its own inventory name), at most
    ``concurrency`` at a time; results in node order.

    Raises:
        ConfigError: ``deadline`` or ``concurrency`` is not positive.
    """
    _check_limits(deadline, concurrency)

    def visit(node: Node) -> Awaitable[NodeResult]:
        return _ask(node, attest_action(node.name, policy), auth, deadline)

    return await _fan_out(nodes, visit, concurrency=concurrency, progress=progress)


Decrypt = Callable[[bytes], str]  # a node's recovery key escrow -> the recovery key


def unseal_action(decrypt: Decrypt, escrow: bytes = b"") -> Action:
    """Sealed mode (issue #17) on one node: read its seal state (Node/GetHealth); when its data
    partition stayed sealed at boot, decrypt the recovery key escrow it sends (or ``escrow``, a
    copy from its ESP) with ``decrypt`` (the site's recovery key) and send the key (Node/Unseal,
    admin): the node enrols its TPM again and reboots. A node whose data opened is left alone.
    The recovery key never leaves this process but in that one call over mTLS."""

    async def unseal(stub: node_pb2_grpc.NodeStub, deadline: float) -> dict[str, Any]:
        report = await stub.GetHealth(node_pb2.GetHealthRequest(), timeout=deadline)
        seal = report.data_seal
        if not seal.sealed:
            return {"state": "open", "message": "its data partition opened at boot: nothing to do"}
        blob = escrow or seal.recovery_escrow
        if not blob:
            raise _StillSealedError("the node sent no recovery key escrow (none on its ESP?); "
                                    "give the copy with --escrow")
        try:
            key = await asyncio.to_thread(decrypt, blob)
        except ApplianceError as exc:
            raise _StillSealedError(str(exc)) from None
        reply = await stub.Unseal(node_pb2.UnsealRequest(recovery_key=key), timeout=deadline)
        return {"state": "unsealed", "was": seal.reason, "pcrs_sha256": dict(seal.pcrs_sha256),
                "message": reply.message}

    return unseal


def escrow_action(node: str, out: Path, decrypt: Decrypt | None = None) -> Action:
    """Collect one node's recovery key escrow (Node/GetInventory) into ``out``/NODE.recovery-key.enc
    (0600; written whole or not at all). With ``decrypt`` (the site's recovery key), check that it
    opens, so the site knows before a node fails that it can unseal it; the key is not kept."""

    async def collect(stub: node_pb2_grpc.NodeStub, deadline: float) -> dict[str, Any]:
        inventory = await stub.GetInventory(node_pb2.GetInventoryRequest(), timeout=deadline)
        blob = inventory.recovery_escrow
        if not blob:
            raise _NoEscrowError("the node has none (no sealed data partition, or not enrolled yet)")
        checked = False
        if decrypt is not None:
            try:
                await asyncio.to_thread(decrypt, blob)
            except ApplianceError as exc:
                raise _NoEscrowError(str(exc)) from None
            checked = True
        path = out / f"{node}.recovery-key.enc"
        await asyncio.to_thread(atomic_write_bytes, path, blob, 0o600)
        return {"escrow": str(path), "bytes": len(blob), "opens_with_site_key": checked}

    return collect


async def escrow_nodes(nodes: Sequence[Node], out: Path, decrypt: Decrypt | None = None, *, auth: FleetAuth,
                       deadline: float = 10.0, concurrency: int = 64,
                       progress: Callable[[NodeResult], None] | None = None) -> list[NodeResult]:
    """:func:`escrow_action` on every node under its inventory name; results in node order.

    Raises:
        ConfigError: ``deadline`` or ``concurrency`` is not positive.
    """
    _check_limits(deadline, concurrency)

    def visit(node: Node) -> Awaitable[NodeResult]:
        return _ask(node, escrow_action(node.name, out, decrypt), auth, deadline)

    return await _fan_out(nodes, visit, concurrency=concurrency, progress=progress)


Certify = Callable[[str, bytes], bytes]  # (node name, AK TPM2B_PUBLIC) -> DER certificate


def enrol_action(node: str, certify: Certify, site_ca: x509.Certificate, *, renew: bool = False,
                 renew_within: datetime.timedelta = datetime.timedelta(days=30)) -> Action:
    """Enrol one node for attestation over its admin API (Node/EnrolAttestation): the node makes
    its AK if it has none and sends the key's public area; ``certify`` has the site CA certify it
    (:func:`provisioning.pki.issue_attestation_key`, which refuses a key that is no restricted
    TPM signing key); the node installs the certificate.  A node whose installed certificate is
    the site CA's, for its current key and good for more than ``renew_within``, keeps it unless
    ``renew``."""

    async def enrol(stub: node_pb2_grpc.NodeStub, deadline: float) -> dict[str, Any]:
        first = await stub.EnrolAttestation(node_pb2.EnrolAttestationRequest(), timeout=deadline)
        kept = "" if renew else _still_good(first.ak_certificate, first.ak_public, node, site_ca,
                                               renew_within)
        if kept:
            return {"key": "made" if first.created else "kept", "certificate": "kept", "serial": kept}
        try:
            der = await asyncio.to_thread(certify, node, first.ak_public)
        except attest.AttestError as exc:
            raise _NotEnrolledError(f"the site CA refused the node's attestation key: {exc}") from None
        second = await stub.EnrolAttestation(node_pb2.EnrolAttestationRequest(ak_certificate=der),
                                             timeout=deadline)
        serial = x509.load_der_x509_certificate(second.ak_certificate).serial_number
        return {"key": "made" if first.created else "kept", "certificate": "installed",
                "serial": f"{serial:x}"}

    return enrol


def _still_good(der: bytes, ak_public: bytes, node: str, site_ca: x509.Certificate,
                margin: datetime.timedelta) -> str:
    """The serial (hex) of ``der`` when it would still pass :func:`provisioning.attest.judge`'s
    certificate check ``margin`` from now, for the key of ``ak_public``; "" otherwise (none,
    another key after a TPM clear, another CA's, expiring)."""
    if not der:
        return ""
    try:
        public = attest.parse_public(ak_public)
        cert = x509.load_der_x509_certificate(der)
    except (ValueError, attest.AttestError):
        return ""
    later = datetime.datetime.now(datetime.UTC) + margin
    if attest.check_ak_certificate(der, public, site_ca, node, now=later, crl=None):
        return ""
    return f"{cert.serial_number:x}"


async def enrol_nodes(nodes: Sequence[Node], *, auth: FleetAuth, certify: Certify, site_ca: x509.Certificate,
                      renew: bool = False, deadline: float = 30.0, concurrency: int = 64,
                      progress: Callable[[NodeResult], None] | None = None) -> list[NodeResult]:
    """:func:`enrol_action` on every node under its inventory name; results in node order.

    Raises:
        ConfigError: ``deadline`` or ``concurrency`` is not positive.
    """
    _check_limits(deadline, concurrency)

    def visit(node: Node) -> Awaitable[NodeResult]:
        return _ask(node, enrol_action(node.name, certify, site_ca, renew=renew), auth, deadline)

    return await _fan_out(nodes, visit, concurrency=concurrency, progress=progress)


def load_expected_images(paths: Sequence[Path]) -> dict[str, bytes]:
    """Root hash -> expected PCR 11 from image-manifest.json files and OS release files (their
    ``release.json``), as the build records them.

    Raises:
        ConfigError: a file is missing or neither kind; AttestError: a record is missing or bad.
    """
    def read(path: Path) -> object:
        if not tarfile.is_tarfile(path):
            return json.loads(path.read_text())
        with tarfile.open(path, "r:") as tar:
            member = tar.extractfile("release.json")  # KeyError when it has none
            return json.loads(member.read()) if member is not None else None

    docs: list[Mapping[str, object]] = []
    for path in paths:
        try:
            doc = read(path)
        except (OSError, ValueError, KeyError, tarfile.TarError) as exc:
            raise ConfigError(f"{path}: not an image-manifest.json or an OS release ({exc})") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: holds {type(doc).__name__}, expected a JSON object")
        docs.append(doc)
    return attest.expected_images(docs, [str(p) for p in paths])


def load_site_crl(path: Path, site_ca: x509.Certificate,
                  now: datetime.datetime | None = None) -> x509.CertificateRevocationList:
    """The site CA's revocation list (``appliance pki crl`` writes it as crl.pem), checked: signed
    by ``site_ca`` and not past its next update (a stale list may miss a revocation).

    Raises:
        ConfigError: unreadable, not a PEM CRL, another issuer's, a bad signature, or stale.
    """
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--crl {path}: not a PEM certificate revocation list ({exc})") from None
    if crl.issuer != site_ca.subject or not crl.is_signature_valid(site_ca.public_key()):  # type: ignore[arg-type]
        raise ConfigError(f"--crl {path}: not signed by the site CA ({site_ca.subject.rfc4514_string()})")
    now = now or datetime.datetime.now(datetime.UTC)
    if crl.next_update_utc is not None and crl.next_update_utc < now:
        raise ConfigError(f"--crl {path}: stale since {crl.next_update_utc:%Y-%m-%d %H:%M} UTC; re-sign "
                          "it with `appliance pki crl` and use the new one")
    return crl


# ------------------------------------------------------------------ rollouts


@dataclasses.dataclass(frozen=True)
class Wave:
    name: str
    nodes: tuple[Node, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "nodes": [n.name for n in self.nodes]}


@dataclasses.dataclass(frozen=True)
class AttestGate:
    """When a rollout counts a node as updated: once, after its update, it answers Node/Attest
    with a quote :func:`provisioning.attest.judge` passes by ``policy`` (the new image among its
    images).  An OS update reboots the node, so it is asked every ``interval`` seconds (a fresh
    nonce each time) until it attests or ``timeout`` seconds have passed.

    Raises:
        ConfigError: ``timeout`` or ``interval`` is not positive, or the policy has no images.
    """

    policy: attest.Policy
    timeout: float = 600.0
    interval: float = 5.0

    def __post_init__(self) -> None:
        if not self.timeout > 0 or not self.interval > 0:
            raise ConfigError(f"--attest-timeout {self.timeout:g} and --attest-interval {self.interval:g}: "
                              "both must be positive")
        if not self.policy.images:
            raise ConfigError("an attestation gate needs at least one expected image (--expect FILE)")

    def to_json(self) -> dict[str, Any]:
        return {"root_hashes": sorted(self.policy.images), "timeout": self.timeout, "interval": self.interval,
                "crl": self.policy.crl is not None, "secure_boot": self.policy.secure_boot}


@dataclasses.dataclass(frozen=True)
class RolloutPlan:
    waves: tuple[Wave, ...]
    max_failures: int  # halt once more nodes than this have failed, all waves together
    targets: tuple[str, ...]
    attest: AttestGate | None = None  # None: a node counts as updated when ApplyUpdate succeeds

    def to_json(self) -> dict[str, Any]:
        return {"waves": [w.to_json() for w in self.waves], "max_failures": self.max_failures,
                "targets": list(self.targets),
                "nodes": sum(len(w.nodes) for w in self.waves),
                "attest": None if self.attest is None else self.attest.to_json()}


def plan_rollout(nodes: Sequence[Node], *, canary: int = 1, batch: int | None = None,
                 batch_percent: float = 25.0, max_failure_percent: float = 0.0,
                 targets: Sequence[str] = (), attest: AttestGate | None = None) -> RolloutPlan:
    """Waves: ``canary`` nodes first, then batches of ``batch`` (or ``batch_percent`` of the rest).

    The failure budget is ``max_failure_percent`` of all nodes, rounded down: with the default
    0 the first failure halts the rollout.  With ``attest``, a node counts as updated only once
    it attests (see :class:`AttestGate`).

    Raises:
        FleetError: no nodes, or sizes out of range.
    """
    if not nodes:
        raise FleetError("nothing to roll out to: the inventory selection is empty")
    if canary < 0 or (batch is not None and batch <= 0) or not 0 < batch_percent <= 100 \
            or not 0 <= max_failure_percent <= 100:
        raise FleetError("--canary >= 0, --batch > 0, 0 < --batch-percent <= 100 and "
                         "0 <= --max-failure-percent <= 100, please")
    ordered = list(nodes)
    waves = []
    if canary:
        waves.append(Wave("canary", tuple(ordered[:canary])))
    rest = ordered[canary:]
    size = batch or max(1, math.ceil(len(rest) * batch_percent / 100))
    for i in range(0, len(rest), size):
        waves.append(Wave(f"batch {i // size + 1}", tuple(rest[i:i + size])))
    budget = math.floor(len(ordered) * max_failure_percent / 100)
    return RolloutPlan(tuple(waves), budget, tuple(targets), attest)


@dataclasses.dataclass
class WaveOutcome:
    wave: Wave
    results: list[NodeResult]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.wave.name, "results": [r.to_json() for r in self.results],
                "failed": sum(not r.ok for r in self.results)}


async def run_rollout(plan: RolloutPlan, *, auth: FleetAuth, deadline: float, concurrency: int = 64,
                      on_wave: Callable[[WaveOutcome], None] | None = None,
                      ) -> tuple[list[WaveOutcome], list[Wave]]:
    """Apply the update wave by wave (each node then attesting, when the plan has an
    :class:`AttestGate`); stop once failures pass the plan's budget.

    Returns the outcomes of the waves run and the waves not started.

    Raises:
        ConfigError: ``deadline`` or ``concurrency`` is not positive.
    """
    _check_limits(deadline, concurrency)
    apply = update_action(plan.targets, dry_run=False)

    def visit(node: Node) -> Awaitable[NodeResult]:
        # Each node goes on to its attestation as soon as its own update returned: a slow
        # reboot holds up that node's slot, not the wave's other nodes.
        return _roll_node(node, apply, plan.attest, auth, deadline)

    outcomes: list[WaveOutcome] = []
    failed = 0
    for n, wave in enumerate(plan.waves):
        results = await _fan_out(wave.nodes, visit, concurrency=concurrency, progress=None)
        outcome = WaveOutcome(wave, results)
        outcomes.append(outcome)
        if on_wave is not None:
            on_wave(outcome)
        failed += sum(not r.ok for r in results)
        if failed > plan.max_failures:
            return outcomes, list(plan.waves[n + 1:])
    return outcomes, []


async def _roll_node(node: Node, apply: Action, gate: AttestGate | None, auth: FleetAuth,
                     deadline: float) -> NodeResult:
    """Update one node, then (with a gate) wait until it attests: ok only when both happened."""
    updated = await _ask(node, apply, auth, deadline)
    if not updated.ok or gate is None:
        return updated
    verdict, why, attempts, seconds = await _await_attestation(node, gate, auth, deadline)
    found = verdict.to_json() if verdict is not None else {"attested": False, "reason": why}
    data = updated.data | {"attestation": found | {"attempts": attempts}}
    if verdict is not None and verdict.ok:
        return NodeResult(node, True, data=data, seconds=updated.seconds + seconds)
    return NodeResult(node, False, f"updated, not attested within {gate.timeout:g} s: {why}", data=data,
                      seconds=updated.seconds + seconds)


async def _await_attestation(node: Node, gate: AttestGate, auth: FleetAuth,
                             deadline: float) -> tuple[attest.Verdict | None, str, int, float]:
    """Ask ``node`` to attest until a verdict passes or ``gate.timeout`` has passed (the last
    attempt may run up to ``deadline`` past it).  Returns the last attempt's verdict (None when
    the node did not answer), why it failed ("" when it passed), the attempts and the seconds."""
    start = time.monotonic()
    attempts = 0
    while True:
        attempts += 1
        verdict, why = await _attest_once(node, gate, auth, deadline)
        if verdict is not None and verdict.ok:
            break
        if time.monotonic() + gate.interval - start >= gate.timeout:
            break
        await asyncio.sleep(gate.interval)
    return verdict, why, attempts, time.monotonic() - start


async def _attest_once(node: Node, gate: AttestGate, auth: FleetAuth,
                       deadline: float) -> tuple[attest.Verdict | None, str]:
    """One Node/Attest over a fresh channel: a channel that saw the node go down for its reboot
    would wait out its reconnect backoff (up to minutes) instead of trying again now."""
    seen: list[attest.Verdict] = []

    async def ask(stub: node_pb2_grpc.NodeStub, deadline: float) -> dict[str, Any]:
        seen.append(await _verdict(stub, node.name, deadline, gate.policy))
        return {}

    result = await _ask(node, ask, auth, deadline)
    if seen:
        return seen[0], seen[0].reason
    return None, result.reason
