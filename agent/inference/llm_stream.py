"""Triton's LLM convention on ``ModelStreamInfer``: a language model as a decoupled KServe v2
model, so that ``tritonclient.grpc`` streaming clients (and Triton's vLLM/TRT-LLM examples)
work unchanged.

Inputs (each one element): ``text_input`` BYTES (the prompt), optional ``stream`` BOOL,
``sampling_parameters`` BYTES (a JSON object: ``max_tokens``, ``temperature``, ``top_p``,
``top_k``, ``seed``, ``stop``, checked by :func:`agent.llm.params.sampling_of`) and
``exclude_input_in_output`` BOOL.  Output ``text_output`` BYTES: one response per chunk when
streaming, else one response with the whole text (the prompt first unless excluded).  A
request asking for ``triton_enable_empty_final_response`` gets ``triton_final_response`` on
every response and an empty final one.  The tensors are decoded by the gRPC request path's
own :func:`~agent.inference.tensors.decode_inputs`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from agent.bundle import TensorSpec
from agent.errors import ApplianceError, InferenceError, echo
from agent.inference.tensors import decode_inputs, serialize_bytes
from agent.llm.accounting import GenerationCall
from agent.llm.params import SAMPLING_KEYS, known_keys, parse_json, sampling_of
from agent.llm.types import LanguageModel, Sampling
from agent.proto import grpc_service_pb2 as pb

__all__ = ["LLM_INPUTS", "llm_responses"]

LLM_INPUTS: dict[str, TensorSpec] = {
    "text_input": TensorSpec("text_input", "BYTES", (-1,)),
    "stream": TensorSpec("stream", "BOOL", (-1,)),
    "sampling_parameters": TensorSpec("sampling_parameters", "BYTES", (-1,)),
    "exclude_input_in_output": TensorSpec("exclude_input_in_output", "BOOL", (-1,)),
}
_FINAL_WANTED = "triton_enable_empty_final_response"
_FINAL = "triton_final_response"


def _one(arrays: dict[str, Any], name: str) -> Any:
    array = arrays[name]
    if array.size != 1:
        raise InferenceError(f"input {name!r}: one element expected, got {array.size}")
    return array.reshape(-1)[0]


def _utf8(value: bytes, name: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise InferenceError(f"input {name!r} is not UTF-8 text") from None


def _request(req: Any) -> tuple[str, bool, Sampling, bool]:
    """Prompt, stream, sampling and exclude_input_in_output of a request."""
    names = [t.name for t in req.inputs]
    unknown = [n for n in names if n not in LLM_INPUTS]
    if unknown:
        raise InferenceError(f"unknown input {echo(unknown[0])} (a language model takes "
                             f"{', '.join(LLM_INPUTS)})")
    specs = {n: s for n, s in LLM_INPUTS.items() if n in names or n == "text_input"}
    arrays = decode_inputs(req, specs)
    prompt = _utf8(_one(arrays, "text_input"), "text_input")
    stream = bool(_one(arrays, "stream")) if "stream" in arrays else False
    exclude = bool(_one(arrays, "exclude_input_in_output")) if "exclude_input_in_output" in arrays else False
    params: dict[str, Any] = {}
    if "sampling_parameters" in arrays:
        params = parse_json(_one(arrays, "sampling_parameters"), "input 'sampling_parameters'")
        known_keys(params, set(SAMPLING_KEYS))
    return prompt, stream, sampling_of(params), exclude


def _final_flags(req: Any) -> bool:
    param = req.parameters.get(_FINAL_WANTED)
    return param is not None and param.WhichOneof("parameter_choice") == "bool_param" and param.bool_param


def _response(req: Any, model: LanguageModel, text: str, final: bool | None) -> Any:
    resp = pb.ModelInferResponse(model_name=model.card.name, model_version=model.card.version, id=req.id)
    if final is not None:
        resp.parameters[_FINAL].bool_param = final
    if final is not True or text:
        resp.outputs.add(name="text_output", datatype="BYTES", shape=[1])
        resp.raw_output_contents.append(serialize_bytes(_bytes_array(text)))
    return resp


def _bytes_array(text: str) -> Any:
    array = np.empty(1, dtype=object)
    array[0] = text.encode()
    return array


async def llm_responses(model: LanguageModel, req: Any, call: GenerationCall) -> AsyncIterator[Any]:
    """The ``ModelInferResponse`` messages answering ``req``; the model's stream is closed
    however this ends (the client cancelled, an error), which frees the sequence.  ``call``
    accounts the request (metrics, the audit line) as the HTTPS routes do.

    Raises:
        InferenceError: a bad input or sampling parameter, or the model refused the request
            (``CapacityError`` when its KV budget is spent).
    """
    call.model = req.model_name
    try:
        prompt, stream, sampling, exclude = _request(req)
        flags = _final_flags(req)
        chunk_final = False if flags else None  # the flag only for a client that asked for it
        chunks = model.generate(prompt, sampling)
        try:
            parts: list[str] = []
            async for chunk in chunks:
                call.saw(chunk)
                if not stream:
                    parts.append(chunk.text)
                elif chunk.text:
                    yield _response(req, model, chunk.text, chunk_final)
            if not stream:
                text = "".join(parts)
                yield _response(req, model, text if exclude else prompt + text, chunk_final)
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        if flags:
            yield _response(req, model, "", True)
    except ApplianceError as exc:
        call.outcome = type(exc).__name__
        raise
    except BaseException:  # the client went away, the call was cancelled
        call.outcome = "cancelled"
        raise
    finally:
        call.finish()
