"""The contract between the generative runtime and the front ends that serve it.

A front end (HTTPS ``/v1/...`` routes, gRPC ``ModelStreamInfer``) never touches
onnxruntime-genai: it asks a :class:`GenerativeModels` for a model by name, turns the
client's request into a :class:`Sampling` and a prompt, and relays the :class:`Chunk`
stream.  Closing the stream (``aclose``, or cancelling the task that iterates it) ends the
sequence and frees its KV cache; that is how a client that goes away stops generation.

Errors are the project's family (:mod:`agent.errors`): ``NotFoundError`` for an unknown
model, ``InferenceError`` for a request the model cannot take (prompt over the context,
bad parameter), ``CapacityError`` when the KV budget is spent and the bounded wait ran out
(HTTP 429, gRPC ``RESOURCE_EXHAUSTED``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

__all__ = [
    "Chunk",
    "EmbeddingModel",
    "Embeddings",
    "GenerativeModels",
    "LanguageModel",
    "Message",
    "ModelCard",
    "Sampling",
]

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class Message:
    """One chat turn; ``role`` is ``system``, ``user`` or ``assistant``."""

    role: str
    content: str


@dataclass(frozen=True)
class Sampling:
    """How to decode.  ``temperature == 0`` (or ``top_k == 1``) means greedy.

    ``max_tokens`` of ``None`` means the bundle's cap; a value above it is refused.
    ``seed`` makes sampling repeatable for one model and prompt.
    """

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Chunk:
    """A piece of a completion.  The last chunk has ``finish_reason`` set and the usage."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # how long the request waited for the model to take it (on every chunk; not its content)
    queue_s: float = field(default=0.0, compare=False)


@dataclass(frozen=True)
class ModelCard:
    """What ``GET /v1/models`` and inventory list about one served generative model."""

    name: str
    version: str
    kind: Literal["llm", "embedding"]
    context_length: int
    parameters: int
    quantisation: str
    created: int  # seconds since the epoch: the bundle's install time


@dataclass(frozen=True)
class Embeddings:
    vectors: tuple[tuple[float, ...], ...]
    prompt_tokens: int


class LanguageModel(Protocol):
    card: ModelCard

    def chat_prompt(self, messages: Sequence[Message]) -> str:
        """The prompt for ``messages`` under the bundle's chat template.
        Raises ``InferenceError`` for an unknown role or an empty conversation."""
        ...

    def generate(
        self, prompt: str, sampling: Sampling, *, deadline: float | None = None
    ) -> AsyncIterator[Chunk]:
        """Stream the completion of ``prompt``.  ``deadline`` is ``time.monotonic()``
        based; past it the stream ends with ``finish_reason="cancelled"``.
        Raises ``InferenceError`` (bad request) or ``CapacityError`` (KV budget)."""
        ...


class EmbeddingModel(Protocol):
    card: ModelCard

    async def embed(self, texts: Sequence[str]) -> Embeddings:
        """One normalised vector per text.  Raises ``InferenceError`` for an input over
        the context length."""
        ...


class GenerativeModels(Protocol):
    """The served generative models; owned by the model repository."""

    def language_model(self, name: str) -> LanguageModel:
        """Raises ``NotFoundError`` (unknown, or not a language model)."""
        ...

    def embedding_model(self, name: str) -> EmbeddingModel:
        """Raises ``NotFoundError`` (unknown, or not an embedding model)."""
        ...

    def cards(self) -> list[ModelCard]: ...
