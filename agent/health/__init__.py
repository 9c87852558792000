"""Node health: hardware sampling (psutil, NVML), health rules, events, inventory, metrics.

Modules: :mod:`.report` (the data), :mod:`.sampler` (the background sampler and the XID
watcher), :mod:`.rules` (pure verdicts), :mod:`.metrics` (Prometheus collector),
:mod:`.inventory` and :mod:`.service` (``appliance.v1.Node`` and ``attach``).
Only :mod:`.service` needs gRPC; the rest runs with psutil and nvidia-ml-py alone.
"""
