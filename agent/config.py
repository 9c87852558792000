"""The agent's configuration: /etc/appliance/agent.toml, one section per concern.

Each section is a frozen dataclass built by :mod:`agent.settings`; a module that owns a
concern defines its section's fields here, so the whole file format reads in one place.
Unset keys take the defaults below, which are the safe ones.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import ConfigError, NotFoundError
from agent.settings import from_table, setting, to_json

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "AgentConfig",
    "InferenceSection",
    "ServerSection",
    "UpdatesSection",
    "load_config",
]

DEFAULT_CONFIG_PATH = Path("/etc/appliance/agent.toml")


def _port(v: int) -> str | None:
    return None if 0 <= v <= 65535 else "not a TCP port (0-65535)"


def _positive(v: int) -> str | None:
    return None if v > 0 else "must be positive"


def _non_negative(v: int) -> str | None:
    return None if v >= 0 else "must not be negative"


@dataclass(frozen=True)
class ServerSection:
    listen: str = setting("127.0.0.1", "address to listen on; beyond loopback needs mTLS")
    port: int = setting(8001, "gRPC port (Triton's)", check=_port)
    metrics_port: int = setting(8002, "Prometheus metrics port (Triton's); 0 disables", check=_port)
    state_dir: Path = setting(Path("/var/lib/appliance"), "state on the data partition")
    max_message_bytes: int = setting(64 << 20, "largest request or response message",
                                     check=_positive)
    grace_period_s: float = setting(10.0, "on SIGTERM, how long in-flight requests may finish")


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


@dataclass(frozen=True)
class AgentConfig:
    server: ServerSection = field(default_factory=ServerSection)
    inference: InferenceSection = field(default_factory=InferenceSection)
    updates: UpdatesSection = field(default_factory=UpdatesSection)
    origin: str = "defaults"

    def to_json(self) -> dict[str, Any]:
        return {"server": to_json(self.server), "inference": to_json(self.inference),
                "updates": to_json(self.updates)}


SECTIONS: dict[str, type[Any]] = {
    "server": ServerSection,
    "inference": InferenceSection,
    "updates": UpdatesSection,
}


def load_config(path: Path | None) -> AgentConfig:
    """Read agent.toml; ``None`` gives the defaults.

    Raises:
        NotFoundError: ``path`` does not exist.
        ConfigError: malformed TOML, an unknown section or key, a value of the wrong type.
    """
    if path is None:
        return AgentConfig()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"{path}: no such configuration file") from None
    try:
        data = tomllib.loads(raw.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section [{unknown[0]}] (known: {', '.join(SECTIONS)})")
    sections = {name: from_table(cls, data.get(name, {}), f"{path}: [{name}]")
                for name, cls in SECTIONS.items()}
    return AgentConfig(**sections, origin=str(path))
