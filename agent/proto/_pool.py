"""The descriptor pool of the agent's ``inference.*`` protos (see PRIVATE_POOL_PROTOS)."""

from __future__ import annotations

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
