"""What the agent's components share: configuration, state directory, health status, peers.

The server builds one :class:`AgentContext` and hands it to every component's
``attach(server, ctx)``; a component publishes what others may need (the inference
repository for inventory, the event log for updates) in ``ctx.components`` under its name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import AgentConfig

__all__ = ["AgentContext"]


@dataclass
class AgentContext:
    config: AgentConfig
    # grpc_health.v1 servicer (aio); components set their services' serving status on it.
    health: Any = None
    # Named components: "inference" (model repository), "events" (event log), "sampler", ...
    components: dict[str, Any] = field(default_factory=dict)

    @property
    def state_dir(self) -> Path:
        return self.config.server.state_dir

    def component(self, name: str) -> Any:
        """The component registered as ``name``, or None when it is not running."""
        return self.components.get(name)
