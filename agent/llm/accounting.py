"""What one generative request leaves behind, whichever front end served it: per-model metrics
(:class:`agent.metrics.GenAiMetrics`) and one ``agent.audit`` line with the subject, model,
token counts and outcome.  Never the prompt or the completion.

The OpenAI-compatible routes (HTTPS) and Triton's LLM convention on ``ModelStreamInfer``
(gRPC) both account through :class:`GenerationCall`, so a model's metrics and audit trail do
not depend on the port a client chose.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from agent.llm.types import Chunk
from agent.metrics import GENAI
from agent.security import Identity

__all__ = ["GenerationCall"]

audit = logging.getLogger("agent.audit")


@dataclass
class GenerationCall:
    """One generation request as it runs: for the response's usage, the metrics and the audit line."""

    operation: str  # OpenTelemetry's gen_ai.operation.name: chat, text_completion, embeddings
    route: str  # the HTTP path or the gRPC method
    identity: Identity
    model: str = "-"
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    last_token: float | None = None
    queue_s: float | None = None  # waited for the model's KV budget (the engine says)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    outcome: str = "ok"

    def saw(self, chunk: Chunk) -> None:
        """Account one chunk of the model's stream."""
        if self.queue_s is None:
            self.queue_s = chunk.queue_s
        if chunk.token_ids:
            now = time.perf_counter()
            if self.first_token is None:
                self.first_token = now
            self.last_token = now
            self.completion_tokens += len(chunk.token_ids)  # so far; the last chunk says exactly
        if chunk.finish_reason is not None:
            self.prompt_tokens, self.completion_tokens = chunk.prompt_tokens, chunk.completion_tokens

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def finish(self) -> None:
        """Metrics and the audit line; never the prompt or the completion."""
        labels = (self.operation, self.model)
        GENAI.request_duration.labels(*labels, "" if self.outcome == "ok" else self.outcome).observe(
            time.perf_counter() - self.started)
        GENAI.tokens(self.operation, self.model, self.prompt_tokens, self.completion_tokens)
        if self.queue_s is not None:
            GENAI.queue_time.labels(*labels).observe(self.queue_s)
        if self.first_token is not None:
            GENAI.time_to_first_token.labels(*labels).observe(self.first_token - self.started)
            if self.completion_tokens > 1 and self.last_token is not None:
                GENAI.time_per_output_token.labels(*labels).observe(
                    (self.last_token - self.first_token) / (self.completion_tokens - 1))
        ident = self.identity
        audit.info("audit llm route=%s subject=%r serial=%s model=%s prompt_tokens=%d "
                   "completion_tokens=%d outcome=%s", self.route, ident.subject, ident.serial_hex,
                   self.model, self.prompt_tokens, self.completion_tokens, self.outcome)
