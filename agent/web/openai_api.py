"""OpenAI-compatible routes: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings``, over the generative runtime's contract (:mod:`agent.llm.types`).

Request bodies are checked field by field (type and range, unknown fields refused) before the
model sees them; errors name the field (OpenAI's ``param``) and the value.  Streams are
server-sent events in OpenAI's chunk format ending with ``data: [DONE]``.  A stream's errors
before its first token (unknown model, prompt over the context, KV budget spent) are plain
HTTP errors; the model's stream is always closed when the handler ends, so a client that goes
away ends its sequence and frees its KV cache.

Privacy: prompts and completions are never logged; each request leaves one ``agent.audit``
line with the subject, model, token counts and outcome, and per-model metrics
(:class:`agent.metrics.GenAiMetrics`), through :class:`~agent.llm.accounting.GenerationCall`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
from aiohttp import web

from agent.errors import ApplianceError, NotFoundError, echo
from agent.llm.accounting import GenerationCall
from agent.llm.params import (
    SAMPLING_KEYS,
    bad_value,
    known_keys,
    optional_bool,
    required_string,
    sampling_of,
)
from agent.llm.types import Chunk, EmbeddingModel, GenerativeModels, LanguageModel, Message
from agent.web.app import IDENTITY, error_body, http_status, read_json, rpc

__all__ = ["OpenAiRoutes"]

_M = "/openai.v1/"
_SAMPLING_KEYS = {"model", "stream", "stream_options", "n", "user", *SAMPLING_KEYS}
_CHAT_KEYS = _SAMPLING_KEYS | {"messages"}
_COMPLETION_KEYS = _SAMPLING_KEYS | {"prompt"}
_EMBEDDING_KEYS = {"model", "input", "encoding_format", "user"}

# The contract's "cancelled" (deadline passed) has no OpenAI word; the output was cut short.
_FINISH = {"stop": "stop", "length": "length", "cancelled": "length"}


def _content(value: Any, param: str) -> str:
    """A message's content: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise bad_value(param, value, "a string or a list of text parts")


def _messages(body: dict[str, Any]) -> list[Message]:
    value = body.get("messages")
    if not isinstance(value, list) or not value:
        raise bad_value("messages", value, "a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_value(f"messages[{i}]", m, 'an object with a string "role"')
        out.append(Message(role=m["role"], content=_content(m.get("content"), f"messages[{i}].content")))
    return out


def _prompt(body: dict[str, Any]) -> str:
    value = body.get("prompt")
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise bad_value("prompt", value, "a string (or a list of one string)")
    return value


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise bad_value("stream_options", options, 'an object with "include_usage"')
    return optional_bool(options, "include_usage", "stream_options.include_usage")


@contextlib.asynccontextmanager
async def _closing(chunks: AsyncIterator[Chunk]) -> AsyncIterator[AsyncIterator[Chunk]]:
    """Close the model's stream however the handler ends (the client went away, an error,
    the task cancelled): that ends the sequence and frees its KV cache."""
    try:
        yield chunks
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()


def _sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else _dumps(data)
    return f"data: {text}\n\n".encode()


class OpenAiRoutes:
    """The ``/v1`` routes over a :class:`GenerativeModels` (None: no generative runtime)."""

    def __init__(self, models: GenerativeModels | None, max_call_s: float, max_stream_s: float) -> None:
        self._models = models
        self._max_call_s = max_call_s
        self._max_stream_s = max_stream_s or None

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)

    def _language_model(self, name: str) -> LanguageModel:
        if self._models is None:
            raise NotFoundError(f"model {echo(name)} is not served (no generative models on this node)")
        return self._models.language_model(name)

    def _embedding_model(self, name: str) -> EmbeddingModel:
        if self._models is None:
            raise NotFoundError(f"model {echo(name)} is not served (no generative models on this node)")
        return self._models.embedding_model(name)

    @rpc(_M + "ListModels")
    async def list_models(self, request: web.Request) -> web.Response:
        cards = self._models.cards() if self._models is not None else []
        return web.json_response({"object": "list", "data": [
            {"id": c.name, "object": "model", "created": c.created, "owned_by": "site"} for c in cards]})

    @rpc(_M + "ChatCompletions")
    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        known_keys(body, _CHAT_KEYS)
        call = GenerationCall("chat", request.path, request[IDENTITY])
        return await self._generate(request, body, call, lambda model: model.chat_prompt(_messages(body)))

    @rpc(_M + "Completions")
    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        known_keys(body, _COMPLETION_KEYS)
        call = GenerationCall("text_completion", request.path, request[IDENTITY])
        return await self._generate(request, body, call, lambda model: _prompt(body))

    async def _generate(self, request: web.Request, body: dict[str, Any], call: GenerationCall,
                        prompt_of: Callable[[LanguageModel], str]) -> web.StreamResponse:
        try:
            name = required_string(body, "model")
            sampling = sampling_of(body)
            stream = optional_bool(body, "stream", "stream")
            include_usage = _include_usage(body)
            call.model = name
            model = self._language_model(name)
            prompt = prompt_of(model)
            limit = self._max_stream_s if stream else self._max_call_s
            deadline = None if limit is None else time.monotonic() + limit
            chunks = model.generate(prompt, sampling, deadline=deadline)
            async with _closing(chunks):
                if stream:
                    return await self._stream(request, chunks, call, include_usage)
                return await self._whole(chunks, call)
        except ApplianceError as exc:
            call.outcome = type(exc).__name__
            raise
        except BaseException:
            call.outcome = "cancelled"
            raise
        finally:
            call.finish()

    async def _whole(self, chunks: AsyncIterator[Chunk], call: GenerationCall) -> web.Response:
        parts: list[str] = []
        reason = "stop"
        async for chunk in chunks:
            call.saw(chunk)
            parts.append(chunk.text)
            if chunk.finish_reason is not None:
                reason = _FINISH[chunk.finish_reason]
        text = "".join(parts)
        chat = call.operation == "chat"
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return web.json_response({
            "id": _id(chat), "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": call.model, "choices": [choice],
            "usage": call.usage()})

    async def _stream(self, request: web.Request, chunks: AsyncIterator[Chunk], call: GenerationCall,
                      include_usage: bool) -> web.StreamResponse:
        chat = call.operation == "chat"
        head = {"id": _id(chat), "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": call.model}
        frames = _Frames(head, chat, include_usage)
        first = await anext(chunks, None)  # errors before the first token are plain HTTP errors
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        chunk = first
        try:
            await resp.prepare(request)
            if chat:
                await resp.write(frames.role)
            while chunk is not None:
                call.saw(chunk)
                reason = None if chunk.finish_reason is None else _FINISH[chunk.finish_reason]
                if chunk.text or reason is not None:
                    await resp.write(frames.piece(chunk.text, reason))
                chunk = await anext(chunks, None)
            if include_usage:
                await resp.write(_sse({**head, "choices": [], "usage": call.usage()}))
            await resp.write(_sse("[DONE]"))
            await resp.write_eof()
        except ApplianceError as exc:  # after the first token the status is sent: an error event
            call.outcome = type(exc).__name__
            with contextlib.suppress(ConnectionResetError):
                await resp.write(_sse(error_body(request.path, http_status(exc), str(exc))))
                await resp.write(_sse("[DONE]"))
        except ConnectionResetError:  # the client went away; the caller closes the model's stream
            call.outcome = "disconnected"
        return resp

    @rpc(_M + "Embeddings")
    async def embeddings(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        known_keys(body, _EMBEDDING_KEYS)
        call = GenerationCall("embeddings", request.path, request[IDENTITY])
        try:
            call.model = required_string(body, "model")
            texts = body.get("input")
            if isinstance(texts, str):
                texts = [texts]
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
                raise bad_value("input", body.get("input"), "a string or a non-empty list of strings")
            fmt = body.get("encoding_format", "float")
            if fmt not in ("float", "base64"):
                raise bad_value("encoding_format", fmt, '"float" or "base64"')
            result = await self._embedding_model(call.model).embed(texts)
            call.prompt_tokens = result.prompt_tokens
        except ApplianceError as exc:
            call.outcome = type(exc).__name__
            raise
        finally:
            call.finish()
        data = [{"object": "embedding", "index": i, "embedding": _vector(v, fmt)}
                for i, v in enumerate(result.vectors)]
        return web.json_response({"object": "list", "data": data, "model": call.model,
                                  "usage": {"prompt_tokens": result.prompt_tokens,
                                            "total_tokens": result.prompt_tokens}})


def _vector(values: tuple[float, ...], fmt: str) -> list[float] | str:
    if fmt == "float":
        return list(values)
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()


def _id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"


class _Frames:
    """The events of one stream, as bytes: the parts every chunk repeats (id, object, created,
    model, index, logprobs, usage) are encoded once, so a token costs one ``json.dumps`` of its
    text.  The JSON is what :func:`json.dumps` of the whole chunk would give, keys reordered."""

    def __init__(self, head: dict[str, Any], chat: bool, include_usage: bool) -> None:
        self._chat = chat
        self._open = ("data: " + _dumps(head)[:-1] + ',"choices":[{"index":0,"logprobs":null,'
                      + ('"delta":' if chat else '"text":')).encode()
        self._close = "}]" + (',"usage":null' if include_usage else "") + "}\n\n"
        self.role = self._frame('{"role":"assistant","content":""}', None)

    def piece(self, text: str, reason: str | None) -> bytes:
        if self._chat:
            return self._frame('{"content":' + _dumps(text) + "}" if text else "{}", reason)
        return self._frame(_dumps(text), reason)

    def _frame(self, payload: str, reason: str | None) -> bytes:
        return self._open + (payload + ',"finish_reason":' + _dumps(reason) + self._close).encode()


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
