"""The agent's configuration: /etc/appliance/agent.toml, one section per concern.

Each section is a frozen dataclass built by :mod:`agent.settings`; a module that owns a
concern defines its section's fields here, so the whole file format reads in one place.
Unset keys take the defaults below, which are the safe ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import ConfigError, NotFoundError
from agent.settings import from_table, read_toml, setting, to_json

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "AgentConfig",
    "AttestSection",
    "HealthSection",
    "InferenceSection",
    "LimitsSection",
    "SealSection",
    "ServerSection",
    "TlsSection",
    "UpdatesSection",
    "load_config",
]

DEFAULT_CONFIG_PATH = Path("/etc/appliance/agent.toml")
FIRMWARE_LOG = Path("/sys/kernel/security/tpm0/binary_bios_measurements")  # the kernel's copy


def _port(v: int) -> str | None:
    return None if 0 <= v <= 65535 else "not a TCP port (0-65535)"


def _positive(v: int) -> str | None:
    return None if v > 0 else "must be positive"


def _non_negative(v: int) -> str | None:
    return None if v >= 0 else "must not be negative"


def _workers(v: int | str) -> str | None:
    if v == "auto" or (isinstance(v, int) and v > 0) or (isinstance(v, str) and v.isdigit() and int(v) > 0):
        return None
    return "expected a positive number of processes or 'auto'"


@dataclass(frozen=True)
class ServerSection:
    listen: str = setting("127.0.0.1", "address to listen on; beyond loopback needs mTLS")
    port: int = setting(8001, "gRPC port (Triton's)", check=_port)
    http_port: int = setting(8000, "HTTPS port (Triton's HTTP port): OpenAI-compatible /v1 and "
                                   "KServe v2 REST /v2 routes; 0 disables", check=_port)
    metrics_port: int = setting(8002, "Prometheus metrics port (Triton's); 0 disables", check=_port)
    state_dir: Path = setting(Path("/var/lib/appliance"), "state on the data partition")
    max_message_bytes: int = setting(64 << 20, "largest request or response message",
                                     check=_positive)
    grace_period_s: float = setting(10.0, "on SIGTERM, how long in-flight requests may finish")
    workers: int | str = setting(1, "serving processes sharing the gRPC port (SO_REUSEPORT); "
                                    "'auto': one per physical core the agent may run on",
                                 check=_workers)


@dataclass(frozen=True)
class InferenceSection:
    models: tuple[str, ...] = setting((), "models to serve: NAME or NAME@VERSION")
    intra_op_threads: int = setting(0, "ONNX Runtime intra-op threads (0: its default)",
                                    check=_non_negative)
    providers: tuple[str, ...] = setting((), "restrict execution providers (default: all usable)")
    max_queue: int = setting(1024, "requests waiting per model before RESOURCE_EXHAUSTED",
                             check=_positive)
    instances: int = setting(2, "sessions run concurrently per model (Triton's instance count)",
                             check=_positive)
    dynamic_batching: bool = setting(True, "batch requests for models whose bundle asks for it")


@dataclass(frozen=True)
class UpdatesSection:
    sources: tuple[str, ...] = setting((), "registry sources: http(s) URLs or directories")
    mount_glob: str = setting("/media/*/*", "where removable media holding a registry appear")
    keep_versions: int = setting(2, "earlier versions of each bundle kept for rollback",
                                 check=_non_negative)
    channel: str = setting("stable", "release channel followed by ApplyUpdate without targets")
    pins: tuple[str, ...] = setting((), "hold bundles at a version, NAME@VERSION: ApplyUpdate "
                                        "without targets moves them to that version only")


def _pct(v: float) -> str | None:
    return None if 0 <= v <= 100 else "not a percentage (0-100)"


def _interval(v: float) -> str | None:
    return None if 0.1 <= v <= 3600 else "must be between 0.1 and 3600 seconds"


# XID codes that mean the GPU (or its memory) can no longer be trusted until reset or
# replaced: 48 double-bit ECC, 61/62 internal micro-controller fault, 64 row-remapping
# failure, 74 NVLink error, 79 fallen off the bus, 95 uncontained ECC error,
# 119/120 GSP timeout/error, 140 unrecovered ECC error.
_CRITICAL_XIDS = (48, 61, 62, 64, 74, 79, 95, 119, 120, 140)


@dataclass(frozen=True)
class HealthSection:
    interval_s: float = setting(10.0, "seconds between hardware samples (psutil + NVML)",
                                check=_interval)
    require_gpu: bool = setting(False, "no usable NVML/GPU is a FAIL (else reported, PASS)")
    gate_serving: bool = setting(True, "overall FAIL makes the server's grpc.health.v1 "
                                       "status (service \"\") NOT_SERVING")
    data_warn_pct: float = setting(90.0, "data partition (state_dir) use that warns", check=_pct)
    data_fail_pct: float = setting(98.0, "data partition use that fails", check=_pct)
    memory_warn_available_pct: float = setting(5.0, "available memory below this warns", check=_pct)
    memory_fail_available_pct: float = setting(1.0, "available memory below this fails", check=_pct)
    gpu_temp_warn_c: float = setting(87.0, "GPU temperature that warns (degrees C)")
    power_warn_pct: float = setting(100.0, "GPU power draw above this share of the enforced "
                                           "limit warns", check=_positive)
    ecc_corrected_warn: int = setting(1000, "corrected (volatile) ECC errors that warn",
                                      check=_positive)
    retired_pages_warn: int = setting(1, "retired pages that warn", check=_positive)
    retired_pages_fail: int = setting(60, "retired pages that fail (NVIDIA's RMA point)",
                                      check=_positive)
    pcie_replay_warn: int = setting(1000, "PCIe replays since boot that warn", check=_positive)
    nvlink_errors_warn: int = setting(100, "NVLink error counts (summed over links) that warn",
                                      check=_positive)
    xid_critical: tuple[int, ...] = setting(_CRITICAL_XIDS, "XID codes that fail (others warn)")
    xid_window_s: float = setting(3600.0, "how long an XID keeps affecting the verdict",
                                  check=_positive)
    events_keep: int = setting(1000, "events kept in memory for GetEvents", check=_positive)
    events_max_bytes: int = setting(8 << 20, "size of events.jsonl before it rotates",
                                    check=_positive)
_ROLE_CHOICES = ("observer", "operator", "admin", "none")


def _role_choice(v: str) -> str | None:
    return None if v in _ROLE_CHOICES else f"expected one of {', '.join(_ROLE_CHOICES)}"


@dataclass(frozen=True)
class TlsSection:
    """mTLS with the site CA (agent.security); all four files come from `appliance pki`."""

    cert: Path | None = setting(None, "this node's certificate (PEM), from `appliance pki issue-node`")
    key: Path | None = setting(None, "its private key (PEM, mode 0600)")
    ca: Path | None = setting(None, "the site CA certificate; client certificates must chain to it")
    crl: Path | None = setting(None, "the site's signed revocation list (PEM); re-read when it changes")
    loopback_role: str = setting(
        "admin", "role of callers on a loopback listener without TLS (the node's own tools); "
                 "'none' refuses them", check=_role_choice)


@dataclass(frozen=True)
class LimitsSection:
    """The gRPC surface's limits (agent.security.server_options); message sizes: [server]."""

    max_metadata_bytes: int = setting(16 << 10, "largest request metadata (headers)", check=_positive)
    max_connections: int = setting(256, "open client connections, all peers together", check=_positive)
    max_concurrent_streams: int = setting(64, "concurrent calls on one HTTP/2 connection",
                                          check=_positive)
    max_concurrent_rpcs: int = setting(
        512, "calls in progress or queued, whole server (each port); beyond: RESOURCE_EXHAUSTED, "
        "HTTP 429", check=_positive)
    max_calls_per_peer: int = setting(
        128, "calls in progress from one peer address (each port); beyond: RESOURCE_EXHAUSTED, "
        "HTTP 429", check=_positive)
    max_deadline_s: float = setting(
        300.0, "longest a unary call may run; a longer or missing client deadline is cut to this",
        check=_positive)
    max_stream_s: float = setting(3600.0, "longest a streaming call may run; 0: no limit",
                                  check=_non_negative)
    handshake_timeout_s: float = setting(10.0, "a TLS handshake must finish within this",
                                         check=_positive)
    keepalive_time_s: float = setting(60.0, "ping an idle client this often to find dead peers",
                                      check=_positive)
    keepalive_timeout_s: float = setting(20.0, "drop a connection whose ping is not answered in time",
                                         check=_positive)
    min_ping_interval_s: float = setting(
        30.0, "clients pinging more often than this get a strike", check=_positive)
    max_ping_strikes: int = setting(2, "strikes before the connection is closed (GOAWAY)",
                                    check=_non_negative)
    permit_keepalive_without_calls: bool = setting(
        False, "accept client pings on connections with no call in progress")
    max_connection_idle_s: float = setting(900.0, "close connections idle this long; 0: never",
                                           check=_non_negative)


def _persistent_handle(v: int) -> str | None:
    return None if 0x81000000 <= v <= 0x81FFFFFF else "not a TPM persistent handle (0x81000000-0x81ffffff)"


@dataclass(frozen=True)
class AttestSection:
    """Remote attestation (agent.attest): the TPM quote Node/Attest answers with."""

    tcti: str = setting("device:/dev/tpmrm0", "how tpm2-tools reach the TPM (TPM2TOOLS_TCTI): the "
                                               "kernel's resource manager on a node")
    ak_handle: int = setting(0x81010002, "persistent handle of the attestation key made at enrolment "
                                         "(default: 0x81010002)", check=_persistent_handle)
    ak_certificate: Path | None = setting(None, "the AK's certificate from the site CA (DER or PEM); "
                                                "unset: Node/Attest answers that the node is not enrolled")
    timeout_s: float = setting(30.0, "longest one quote may take", check=_positive)
    firmware_log: Path = setting(FIRMWARE_LOG,
                                 "the firmware's TPM event log (PCRs 0-7), sent with each quote; only "
                                 "root may read the kernel's, so an image's unit copies it for the agent")


@dataclass(frozen=True)
class SealSection:
    """Sealed mode (agent.sealed): the paths the image's initrd and unseal helper share with the
    agent; an image sets none of them."""

    marker: Path = setting(Path("/run/appliance/sealed.json"),
                           "written by the initrd when the data partition stayed sealed: then the "
                           "agent serves no model and takes the recovery key (Node/Unseal)")
    request: Path = setting(Path("/run/appliance-agent/unseal-key"),
                            "where Node/Unseal leaves the recovery key for the root helper")
    result: Path = setting(Path("/run/appliance-unseal/result.json"), "where the helper answers")
    escrow: Path = setting(Path("/run/appliance-agent/recovery-key.enc"),
                           "the recovery key's escrow (encrypted to the site's key), copied from the "
                           "ESP as the agent starts: the fleet collects it (inventory) and unseals with it")
    unseal_timeout_s: float = setting(120.0, "longest Node/Unseal waits for the helper", check=_positive)


@dataclass(frozen=True)
class AgentConfig:
    server: ServerSection = field(default_factory=ServerSection)
    inference: InferenceSection = field(default_factory=InferenceSection)
    updates: UpdatesSection = field(default_factory=UpdatesSection)
    health: HealthSection = field(default_factory=HealthSection)
    tls: TlsSection = field(default_factory=TlsSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    attest: AttestSection = field(default_factory=AttestSection)
    seal: SealSection = field(default_factory=SealSection)
    origin: str = "defaults"

    def to_json(self) -> dict[str, Any]:
        return {name: to_json(getattr(self, name)) for name in SECTIONS}


SECTIONS: dict[str, type[Any]] = {
    "server": ServerSection,
    "inference": InferenceSection,
    "updates": UpdatesSection,
    "health": HealthSection,
    "tls": TlsSection,
    "limits": LimitsSection,
    "attest": AttestSection,
    "seal": SealSection,
}


def load_config(path: Path | None) -> AgentConfig:
    """Read agent.toml; ``None`` gives the defaults.

    Raises:
        NotFoundError: ``path`` does not exist.
        ConfigError: malformed TOML, an unknown section or key, a value of the wrong type.
    """
    if path is None:
        return AgentConfig()
    data = read_toml(path, missing=NotFoundError)
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section [{unknown[0]}] (known: {', '.join(SECTIONS)})")
    sections = {name: from_table(cls, data.get(name, {}), f"{path}: [{name}]")
                for name, cls in SECTIONS.items()}
    return AgentConfig(**sections, origin=str(path))
