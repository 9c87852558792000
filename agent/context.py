"""What the agent's components share: configuration, state directory, health status, peers.

The server builds one :class:`AgentContext` and hands it to every component's
``attach(server, ctx)``; a component publishes what others may need (the inference
repository for inventory, the event log for updates) in its field of the context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config import AgentConfig
from agent.state import StateLayout

if TYPE_CHECKING:  # the components import this module; the context only names their types
    from agent.events import EventLog
    from agent.health.metrics import NodeCollector
    from agent.health.sampler import Sampler
    from agent.inference.repository import ModelRepository
    from agent.inference.service import InferenceServicer
    from agent.llm.types import GenerativeModels
    from agent.sealed import SealState
    from agent.security import CallLimits, RevocationList
    from agent.updates.manager import UpdateManager
    from agent.updates.service import UpdatesComponent
    from agent.workers import WorkerLink

__all__ = ["AgentContext"]


@dataclass
class AgentContext:
    config: AgentConfig
    # grpc_health.v1 servicer (aio); components set their services' serving status on it.
    health: Any = None
    # Published by agent.inference.service.attach.
    inference: ModelRepository | None = None
    inference_servicer: InferenceServicer | None = None
    # The served generative models (LLMs, text encoders), published by
    # agent.inference.service.attach (the repository's); the HTTPS port's /v1 routes serve them.
    generative: GenerativeModels | None = None
    # Published by agent.updates.service.attach or agent.health.service.attach, whichever
    # runs first (a test may publish its own before either).
    events: EventLog | None = None
    revocation: RevocationList | None = None  # the site CRL in force, one list for every port
    call_limits: CallLimits | None = None  # calls in progress, one count for every port
    # Published by agent.health.service.attach (a test may publish one on a fake NVML first).
    sampler: Sampler | None = None
    health_collector: NodeCollector | None = None
    health_unsubscribe: list[Callable[[], None]] = field(default_factory=list)
    # Published by agent.updates.service.attach.
    updates: UpdatesComponent | None = None
    update_manager: UpdateManager | None = None
    # This process's line to the supervisor when it is one of several serving processes.
    workers: WorkerLink | None = None
    # Set by agent.server when this boot's data partition stayed sealed (agent.sealed): then only
    # the health component runs, and Node/Unseal takes the recovery key.
    sealed: SealState | None = None

    @property
    def state_dir(self) -> Path:
        return self.config.server.state_dir

    @property
    def layout(self) -> StateLayout:
        return StateLayout(self.state_dir)
