"""Per-model-version inference statistics, with the fields of Triton's ModelStatistics.

Counters are updated on the event loop's thread only; readers on other threads (the
Prometheus collector) take :meth:`ModelStats.snapshot`, whose plain ints are consistent
enough for monitoring.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BatchStats", "Duration", "ModelStats", "add_snapshots"]


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += max(0, ns)

    def to_json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class ModelStats:
    """Cumulative statistics of one loaded model version (Triton's field names)."""

    name: str
    version: str
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchStats] = field(default_factory=dict)
    pending: int = 0  # requests admitted and not yet answered (queued or running)

    def record_execution(self, batch_size: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One model execution over ``batch_size`` inferences."""
        self.execution_count += 1
        b = self.batches.get(batch_size)
        if b is None:
            b = self.batches[batch_size] = BatchStats()
        b.compute_input.add(input_ns)
        b.compute_infer.add(infer_ns)
        b.compute_output.add(output_ns)

    def record_request(self, ok: bool, total_ns: int, *, batch_size: int = 1, queue_ns: int = 0,
                       input_ns: int = 0, infer_ns: int = 0, output_ns: int = 0) -> None:
        """One answered request; on success its share of queue and compute time."""
        if not ok:
            self.fail.add(total_ns)
            return
        self.success.add(total_ns)
        self.queue.add(queue_ns)
        self.compute_input.add(input_ns)
        self.compute_infer.add(infer_ns)
        self.compute_output.add(output_ns)
        self.inference_count += batch_size
        self.last_inference_ms = int(time.time() * 1000)

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy: what inventory, metrics and ModelStatistics read."""
        return {
            "name": self.name,
            "version": self.version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "pending": self.pending,
            "inference_stats": {
                "success": self.success.to_json(),
                "fail": self.fail.to_json(),
                "queue": self.queue.to_json(),
                "compute_input": self.compute_input.to_json(),
                "compute_infer": self.compute_infer.to_json(),
                "compute_output": self.compute_output.to_json(),
            },
            "batch_stats": [
                {"batch_size": size, "compute_input": b.compute_input.to_json(),
                 "compute_infer": b.compute_infer.to_json(),
                 "compute_output": b.compute_output.to_json()}
                for size, b in sorted(self.batches.items())
            ],
        }


def _add_durations(into: dict[str, int], more: dict[str, int]) -> None:
    into["count"] += more["count"]
    into["ns"] += more["ns"]


def _add_one(into: dict[str, Any], more: dict[str, Any]) -> None:
    into["last_inference"] = max(into["last_inference"], more["last_inference"])
    for key in ("inference_count", "execution_count", "pending"):
        into[key] += more[key]
    for key, value in more["inference_stats"].items():
        _add_durations(into["inference_stats"][key], value)
    sizes = {b["batch_size"]: b for b in into["batch_stats"]}
    for b in more["batch_stats"]:
        mine = sizes.get(b["batch_size"])
        if mine is None:
            into["batch_stats"].append(copy.deepcopy(b))
            continue
        for key in ("compute_input", "compute_infer", "compute_output"):
            _add_durations(mine[key], b[key])
    into["batch_stats"].sort(key=lambda b: b["batch_size"])


def add_snapshots(snapshots: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Snapshots of the same model version (several serving processes) added into one each,
    in the order each version first appears.  Counts, durations and pending requests add up;
    ``last_inference`` is the latest."""
    totals: dict[tuple[str, str], dict[str, Any]] = {}
    for snap in snapshots:
        key = (snap["name"], snap["version"])
        if key in totals:
            _add_one(totals[key], snap)
        else:
            totals[key] = copy.deepcopy(snap)
    return list(totals.values())
