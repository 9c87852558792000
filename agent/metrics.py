"""Prometheus text metrics on the metrics port (8002, Triton's), names compatible with Triton.

One :data:`REGISTRY` per process.  Components add collectors with :func:`register_collector`
(the health component adds ``DCGM_FI_DEV_*`` and node metrics); the inference component's
:class:`InferenceCollector` exposes Triton's per-model counters from the repository's
statistics, labelled ``model`` and ``version`` as Triton does, so existing dashboards work.
"""

from __future__ import annotations

import logging
import ssl
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import Metric

from agent.errors import NotFoundError

if TYPE_CHECKING:  # the runtime's type only; this module must not load the runtime
    from agent.llm.served import ServedGenerative

__all__ = ["GENAI", "REGISTRY", "GenAiMetrics", "InferenceCollector", "KvCacheCollector", "exposition",
           "register_collector", "start_metrics_server"]

log = logging.getLogger(__name__)
_Row = TypeVar("_Row")

REGISTRY = CollectorRegistry(auto_describe=False)

# (Triton metric name, help, type, value from a statistics snapshot)
_INFERENCE_METRICS: tuple[tuple[str, str, str, Callable[[dict[str, Any]], float]], ...] = (
    ("nv_inference_request_success", "Number of successful inference requests, all batch sizes",
     "counter", lambda s: s["inference_stats"]["success"]["count"]),
    ("nv_inference_request_failure", "Number of failed inference requests, all batch sizes",
     "counter", lambda s: s["inference_stats"]["fail"]["count"]),
    ("nv_inference_count", "Number of inferences performed (batch elements, successful requests)",
     "counter", lambda s: s["inference_count"]),
    ("nv_inference_exec_count", "Number of model executions performed",
     "counter", lambda s: s["execution_count"]),
    ("nv_inference_request_duration_us", "Cumulative inference request duration in microseconds",
     "counter", lambda s: s["inference_stats"]["success"]["ns"] // 1000),
    ("nv_inference_queue_duration_us", "Cumulative inference queuing duration in microseconds",
     "counter", lambda s: s["inference_stats"]["queue"]["ns"] // 1000),
    ("nv_inference_compute_infer_duration_us", "Cumulative compute inference duration in microseconds",
     "counter", lambda s: s["inference_stats"]["compute_infer"]["ns"] // 1000),
    ("nv_inference_pending_request_count", "Instantaneous number of pending requests awaiting "
     "execution per model", "gauge", lambda s: s["pending"]),
)


def _scrape(read: Callable[[], list[_Row]], what: str) -> list[_Row]:
    """``read()``, or no rows when it fails: a scrape must never take the agent down."""
    try:
        return read()
    except Exception:
        log.exception("collecting %s failed", what)
        return []


class InferenceCollector:
    """Collects Triton's ``nv_inference_*`` metrics from ``statistics()`` snapshots.

    ``statistics`` is the repository's read API (``ModelRepository.statistics``).
    Counters are written without a ``_total`` suffix, exactly as Triton names them.
    """

    def __init__(self, statistics: Callable[[], list[dict[str, Any]]]) -> None:
        self._statistics = statistics

    def collect(self) -> Iterator[Metric]:
        snaps = _scrape(self._statistics, "inference statistics")
        for name, doc, kind, value in _INFERENCE_METRICS:
            metric = Metric(name, doc, kind)
            for snap in snaps:
                metric.add_sample(name, {"model": snap["name"], "version": snap["version"]},
                                  float(value(snap)))
            yield metric


# Bucket bounds of OpenTelemetry's GenAI semantic conventions (advisory explicit buckets).
_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                     40.96, 81.92)
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_LABELS = ("gen_ai_operation_name", "gen_ai_request_model")


class GenAiMetrics:
    """Per-model metrics of the generative routes, named after OpenTelemetry's GenAI semantic
    conventions in Prometheus form (``gen_ai.server.time_to_first_token`` in seconds becomes
    ``gen_ai_server_time_to_first_token_seconds``), labelled with the operation
    (``chat``, ``text_completion``, ``embeddings``) and the model."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.request_duration = Histogram(
            "gen_ai_server_request_duration_seconds", "Generative AI server request duration",
            [*_LABELS, "error_type"], buckets=_DURATION_BUCKETS, registry=registry)
        self.time_to_first_token = Histogram(
            "gen_ai_server_time_to_first_token_seconds", "Time to generate the first token",
            _LABELS, buckets=_TTFT_BUCKETS, registry=registry)
        self.time_per_output_token = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Time per output token generated after the first token", _LABELS,
            buckets=_TPOT_BUCKETS, registry=registry)
        # OpenTelemetry names no queue time yet: the gen_ai_server_ prefix, Prometheus' unit suffix
        self.queue_time = Histogram(
            "gen_ai_server_request_queue_time_seconds",
            "Time a request waited for the model's KV-cache budget before its first step", _LABELS,
            buckets=_TTFT_BUCKETS, registry=registry)
        self.token_usage = Counter(
            "gen_ai_server_token_usage", "Tokens processed, by type (input: prompt, output: completion)",
            [*_LABELS, "gen_ai_token_type"], registry=registry)

    def tokens(self, operation: str, model: str, prompt: int, completion: int) -> None:
        self.token_usage.labels(operation, model, "input").inc(prompt)
        if completion:
            self.token_usage.labels(operation, model, "output").inc(completion)


GENAI = GenAiMetrics()


_KvRow = tuple[str, int, int, int]  # model, tokens reserved, budget, sequences
_KV_METRICS: tuple[tuple[str, str, Callable[[_KvRow], float]], ...] = (
    ("gen_ai_server_kv_cache_tokens", "KV-cache tokens reserved by running sequences", lambda r: r[1]),
    ("gen_ai_server_kv_cache_budget_tokens", "KV-cache token budget of the model", lambda r: r[2]),
    ("gen_ai_server_kv_cache_usage_ratio", "Share of the KV-cache budget reserved",
     lambda r: r[1] / r[2] if r[2] else 0.0),
    ("gen_ai_server_active_sequences", "Sequences holding KV cache", lambda r: r[3]),
)


class KvCacheCollector:
    """KV-cache use of each served language model: tokens reserved and the budget
    (``gen_ai_server_kv_cache_tokens``, ``gen_ai_server_kv_cache_budget_tokens``), their ratio
    (``gen_ai_server_kv_cache_usage_ratio``) and sequences holding cache
    (``gen_ai_server_active_sequences``); OpenTelemetry has no name for these yet, so they
    follow its ``gen_ai_server_`` prefix and Prometheus' unit suffixes."""

    def __init__(self, served: ServedGenerative) -> None:
        self._served = served

    def _rows(self) -> list[_KvRow]:
        rows = []
        for card in self._served.cards():
            if card.kind != "llm":
                continue
            try:
                budget = self._served.language_model(card.name).budget
            except NotFoundError:  # unloaded between the two calls: nothing to report
                continue
            rows.append((card.name, budget.in_use, budget.total, budget.sequences))
        return rows

    def collect(self) -> Iterator[Metric]:
        rows = _scrape(self._rows, "KV-cache use")
        for name, doc, value in _KV_METRICS:
            metric = Metric(name, doc, "gauge")
            for row in rows:
                metric.add_sample(name, {"gen_ai_request_model": row[0]}, float(value(row)))
            yield metric


def register_collector(collector: Any) -> None:
    """Add a collector (an object with ``collect()`` yielding metrics) to :data:`REGISTRY`."""
    REGISTRY.register(collector)


class _One:
    def __init__(self, metric: Metric) -> None:
        self.metric = metric

    def collect(self) -> list[Metric]:
        return [self.metric]


def exposition(registry: CollectorRegistry = REGISTRY) -> bytes:
    """The registry in Prometheus text format.

    prometheus_client names every counter ``NAME_total``; Triton's and dcgm-exporter's
    counters have no such suffix, and dashboards query them by their own names.  A counter
    whose samples carry the bare name keeps it in its HELP and TYPE lines too.
    """
    parts: list[bytes] = []
    for metric in registry.collect():
        text = generate_latest(_One(metric))
        if metric.type == "counter" and all(s.name == metric.name for s in metric.samples):
            text = text.replace(f"# HELP {metric.name}_total ".encode(), f"# HELP {metric.name} ".encode(), 1)
            text = text.replace(f"# TYPE {metric.name}_total ".encode(), f"# TYPE {metric.name} ".encode(), 1)
        parts.append(text)
    return b"".join(parts)


class _Handler(BaseHTTPRequestHandler):
    registry: CollectorRegistry = REGISTRY

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404, "only /metrics is served here")
            return
        try:
            body = exposition(self.registry)
        except Exception:
            log.exception("metrics exposition failed")
            self.send_error(500, "metrics exposition failed")
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: " + format, *args)


class _TlsHandler(_Handler):
    """The TLS handshake and the client certificate's admission, in the connection's own thread
    (a slow or silent client holds only its thread, never the accept loop)."""

    timeout = 10.0  # seconds for the handshake and each read
    admit: Callable[[bytes], str | None] = staticmethod(lambda der: "no admission check")

    def setup(self) -> None:
        conn = self.request
        assert isinstance(conn, ssl.SSLSocket)
        conn.settimeout(self.timeout)
        conn.do_handshake()  # raises on a bad or missing client certificate: connection closed
        der = conn.getpeercert(binary_form=True)
        problem = "no client certificate" if der is None else type(self).admit(der)
        if problem:
            log.warning("metrics: refused %s: %s", self.client_address[0], problem)
            raise ConnectionRefusedError(problem)
        super().setup()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics: connection from %s ended: %s", client_address, sys.exc_info()[1])


def start_metrics_server(port: int, addr: str = "127.0.0.1",
                         tls: tuple[ssl.SSLContext, Callable[[bytes], str | None]] | None = None,
                         ) -> ThreadingHTTPServer:
    """Serve :data:`REGISTRY` at ``http://addr:port/metrics`` in a daemon thread; with ``tls``
    (:func:`agent.security.metrics_tls`), HTTPS that requires an admitted client certificate.

    The returned server has ``shutdown()``; ``server_port`` holds the bound port (for port 0).

    Raises:
        OSError: the port cannot be bound.
    """
    handler: type[_Handler] = _Handler
    if tls is not None:
        context, admit = tls
        handler = type("_AdmittingHandler", (_TlsHandler,), {"admit": staticmethod(admit)})
    server = _Server((addr, port), handler)
    if tls is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("metrics on %s://%s:%d/metrics", "https" if tls else "http", addr, server.server_port)
    return server
