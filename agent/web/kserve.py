"""KServe v2 REST routes (what ``tritonclient.http`` speaks), over the gRPC servicer's request path.

A REST request becomes the ``ModelInferRequest`` a gRPC client would have sent (JSON ``data``
into the typed contents field of its datatype, binary data into ``raw_input_contents``) and
goes through :meth:`agent.inference.service.InferenceServicer.infer`, so validation, batching
and statistics are the gRPC port's.  What is checked here is only what JSON adds: the type of
each field and element.

Triton's binary-data extension: a request whose ``Inference-Header-Content-Length`` header
gives the JSON header's size carries input tensors after it, in input order, each sized by
the input's ``parameters.binary_data_size``; outputs asked for with ``binary_data`` (or all,
with ``parameters.binary_data_output``) come back the same way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from agent import __version__
from agent.dtypes import by_kserve
from agent.errors import RequestError, echo
from agent.inference.service import EXTENSIONS, SERVER_NAME, InferenceServicer
from agent.inference.tensors import TYPED_FIELD, deserialize_bytes
from agent.llm.params import parse_json
from agent.proto import grpc_service_pb2 as pb
from agent.web.app import rpc

__all__ = ["HEADER_LENGTH", "add_routes", "to_infer_request", "triton_json"]

HEADER_LENGTH = "Inference-Header-Content-Length"
_M = "/inference.GRPCInferenceService/"
MAX_ELEMENTS = 1 << 28  # JSON elements in one request; the body cap comes first in practice


def _field(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str,
           default: Any = None) -> Any:
    if key not in obj:
        return default
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise RequestError(f"{where}.{key}: expected {names}, got {echo(json.dumps(value))}",
                           f"{where}.{key}")
    return value


def _flatten(data: Any, where: str) -> list[Any]:
    """Nested JSON lists flattened row-major (the protocol accepts both forms)."""
    out: list[Any] = []
    stack: list[Any] = [iter([data])]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        else:
            out.append(item)
            if len(out) > MAX_ELEMENTS:
                raise RequestError(f"{where}: more than {MAX_ELEMENTS} elements", where)
    return out


_END = object()


def _fits(datatype: str, v: Any) -> bool:
    if datatype == "BOOL":
        return isinstance(v, bool)
    if datatype in ("FP32", "FP64"):
        return isinstance(v, int | float) and not isinstance(v, bool)
    if datatype == "BYTES":
        return isinstance(v, str)
    return isinstance(v, int) and not isinstance(v, bool)


def _typed(datatype: str, values: list[Any], where: str) -> list[Any]:
    """JSON elements checked (and BYTES encoded) for the typed contents of ``datatype``."""
    bad = next((v for v in values if not _fits(datatype, v)), _END)
    if bad is not _END:
        raise RequestError(f"{where}: element {echo(json.dumps(bad))} is not a {datatype} value"
                           f"{' (BYTES elements are strings)' if datatype == 'BYTES' else ''}", where)
    return [v.encode() for v in values] if datatype == "BYTES" else values


def _add_input(req: Any, spec: Any, i: int, binary: list[bytes] | None) -> None:
    where = f"inputs[{i}]"
    if not isinstance(spec, dict):
        raise RequestError(f"{where}: expected an object, got {echo(json.dumps(spec))}", where)
    name = _field(spec, "name", str, where, "")
    datatype = _field(spec, "datatype", str, where, "")
    shape = _field(spec, "shape", list, where, [])
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise RequestError(f"{where}.shape: expected a list of integers, got {echo(json.dumps(shape))}",
                           f"{where}.shape")
    tensor = req.inputs.add(name=name, datatype=datatype, shape=shape)
    if binary is not None:
        return
    if "data" not in spec:
        raise RequestError(f"{where} ({echo(name)}): no data and no parameters.binary_data_size",
                           f"{where}.data")
    field = TYPED_FIELD.get(datatype)
    if field is None:
        raise RequestError(f"{where} ({echo(name)}): {echo(datatype)} travels only as binary data "
                           "(parameters.binary_data_size)", f"{where}.datatype")
    values = _typed(datatype, _flatten(spec["data"], f"{where}.data"), f"{where}.data")
    try:
        getattr(tensor.contents, field).extend(values)
    except (TypeError, ValueError, OverflowError) as exc:
        raise RequestError(f"{where}.data: a value does not fit {datatype}: {exc}", f"{where}.data") from None


def _binary_sizes(inputs: Sequence[Any]) -> list[int] | None:
    sizes: list[int | None] = []
    for i, spec in enumerate(inputs):
        params = spec.get("parameters", {}) if isinstance(spec, dict) else {}
        if not isinstance(params, dict):
            raise RequestError(f"inputs[{i}].parameters: expected an object", f"inputs[{i}].parameters")
        size = params.get("binary_data_size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise RequestError(f"inputs[{i}].parameters.binary_data_size: expected a size in bytes, "
                               f"got {echo(json.dumps(size))}", f"inputs[{i}].parameters.binary_data_size")
        sizes.append(size)
    if all(s is None for s in sizes):
        return None
    if any(s is None for s in sizes):
        raise RequestError("inputs: either every input is binary data or none is "
                           "(this node does not mix JSON and binary inputs)", "inputs")
    return [s for s in sizes if s is not None]


def to_infer_request(body: dict[str, Any], binary: bytes, model: str, version: str,
                     ) -> tuple[Any, set[str], bool]:
    """The ``ModelInferRequest`` for a REST body, the outputs wanted as binary, and whether
    all outputs are.

    Raises:
        RequestError: a field of the wrong type, binary sizes that do not add up.
    """
    req = pb.ModelInferRequest(model_name=model, model_version=version,
                               id=_field(body, "id", str, "request", ""))
    inputs = _field(body, "inputs", list, "request", [])
    sizes = _binary_sizes(inputs)
    if sizes is None and binary:
        raise RequestError(f"{len(binary)} bytes of binary data, but no input has "
                           "parameters.binary_data_size", "inputs")
    if sizes is not None and sum(sizes) != len(binary):
        raise RequestError(f"inputs declare {sum(sizes)} bytes of binary data, the body carries "
                           f"{len(binary)}", "inputs")
    chunks: list[bytes] = []
    pos = 0
    for size in sizes or []:
        chunks.append(binary[pos:pos + size])
        pos += size
    for i, spec in enumerate(inputs):
        _add_input(req, spec, i, chunks if sizes is not None else None)
    req.raw_input_contents.extend(chunks)
    params = _field(body, "parameters", dict, "request", {})
    all_binary = _field(params, "binary_data_output", bool, "request.parameters", False)
    binary_out: set[str] = set()
    for i, out in enumerate(_field(body, "outputs", list, "request", [])):
        where = f"outputs[{i}]"
        if not isinstance(out, dict):
            raise RequestError(f"{where}: expected an object, got {echo(json.dumps(out))}", where)
        name = _field(out, "name", str, where, "")
        req.outputs.add(name=name)
        out_params = _field(out, "parameters", dict, where, {})
        if _field(out_params, "binary_data", bool, f"{where}.parameters", False):
            binary_out.add(name)
    return req, binary_out, all_binary


def _json_data(raw: bytes, datatype: str, shape: Sequence[int]) -> list[Any]:
    count = int(np.prod(shape)) if len(shape) else 1
    if datatype == "BYTES":
        return [b.decode("utf-8", "replace") for b in deserialize_bytes(raw, count, "output").tolist()]
    array = np.frombuffer(raw, dtype=by_kserve(datatype).numpy.newbyteorder("<"))
    return list(array.tolist())


def _response(resp: Any, binary_out: set[str], all_binary: bool) -> web.Response:
    outputs: list[dict[str, Any]] = []
    tail: list[bytes] = []
    for tensor, raw in zip(resp.outputs, resp.raw_output_contents, strict=True):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype,
                                 "shape": list(tensor.shape)}
        if all_binary or tensor.name in binary_out:
            entry["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        else:
            entry["data"] = _json_data(raw, tensor.datatype, list(tensor.shape))
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": resp.model_name, "model_version": resp.model_version,
                            "outputs": outputs}
    if resp.id:
        body["id"] = resp.id
    if not tail:
        return web.json_response(body)
    header = web.json_response(body).body
    assert isinstance(header, bytes)
    return web.Response(body=header + b"".join(tail), content_type="application/octet-stream",
                        headers={HEADER_LENGTH: str(len(header))})


# protobuf's JSON writes 64-bit integers as strings; Triton writes numbers (perf_analyzer reads
# max_batch_size and dims as numbers), so those fields are turned back.
_INT64 = frozenset({FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
                    FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64})


def triton_json(message: Any) -> dict[str, Any]:
    """``message`` as Triton's HTTP endpoint writes it: proto field names, enums by name,
    fields without presence printed even when zero, 64-bit integers as JSON numbers."""
    doc = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                    always_print_fields_with_no_presence=True)
    _numbers(message.DESCRIPTOR, doc)
    return doc


def _numbers(desc: Descriptor, doc: dict[str, Any]) -> None:
    for f in desc.fields:
        if f.name not in doc:
            continue
        value = doc[f.name]
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            target = f.message_type.fields_by_name["value"]
            if target.message_type is not None:
                for item in value.values():
                    _numbers(target.message_type, item)
            elif target.type in _INT64:
                doc[f.name] = {k: int(v) for k, v in value.items()}
        elif f.message_type is not None:
            for item in value if f.is_repeated else [value]:
                _numbers(f.message_type, item)
        elif f.type in _INT64:
            doc[f.name] = [int(v) for v in value] if f.is_repeated else int(value)


def _split_body(data: bytes, header: str | None) -> tuple[dict[str, Any], bytes]:
    if header is None:
        return parse_json(data), b""
    if not header.isdigit() or int(header) > len(data):
        raise RequestError(f"{HEADER_LENGTH}: {echo(header)} is not a size within the "
                           f"{len(data)}-byte body", HEADER_LENGTH)
    size = int(header)
    return parse_json(data[:size]), data[size:]


def _parameters(data: bytes, known: dict[str, type]) -> dict[str, Any]:
    """The ``parameters`` of a repository request body (which may be empty), each of a known
    name and type.  Anything else is refused, Triton's ``config`` and ``file:`` overrides
    above all: this node serves only the verified bundle's own files and settings.

    Raises:
        RequestError: the body is not JSON, or a parameter is unknown or of the wrong type.
    """
    body = parse_json(data) if data.strip() else {}
    params = _field(body, "parameters", dict, "request", {})
    for key in params:
        if key not in known:
            raise RequestError(f"request.parameters: {echo(key)} is not accepted here (known: "
                               f"{', '.join(sorted(known))}); this node serves a model only from "
                               "its verified bundle, with no config or file override",
                               "request.parameters")
        _field(params, key, known[key], "request.parameters")
    return dict(params)


def add_routes(app: web.Application, servicer: InferenceServicer) -> None:
    """Add the ``/v2`` routes over ``servicer`` to ``app``."""

    @rpc(_M + "ServerLive")
    async def live(request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    @rpc(_M + "ServerReady")
    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"ready": servicer.ready}, status=200 if servicer.ready else 400)

    @rpc(_M + "ServerMetadata")
    async def server_metadata(request: web.Request) -> web.Response:
        return web.json_response({"name": SERVER_NAME, "version": __version__,
                                  "extensions": [*EXTENSIONS, "binary_tensor_data"]})

    @rpc(_M + "ModelMetadata")
    async def model_metadata(request: web.Request) -> web.Response:
        m = servicer.metadata(request.match_info["model"], request.match_info.get("version", ""))
        return web.json_response({
            "name": m.name, "versions": list(m.versions), "platform": m.platform,
            "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in m.inputs],
            "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                        for t in m.outputs]})

    @rpc(_M + "ModelReady")
    async def model_ready(request: web.Request) -> web.Response:
        up = servicer.ready and servicer.repo.is_ready(request.match_info["model"],
                                                       request.match_info.get("version", ""))
        return web.json_response({"ready": up}, status=200 if up else 400)

    @rpc(_M + "ModelInfer")
    async def infer(request: web.Request) -> web.Response:
        body, binary = _split_body(await request.read(), request.headers.get(HEADER_LENGTH))
        req, binary_out, all_binary = to_infer_request(
            body, binary, request.match_info["model"], request.match_info.get("version", ""))
        return _response(await servicer.infer(req), binary_out, all_binary)

    @rpc(_M + "ModelConfig")
    async def model_config(request: web.Request) -> web.Response:
        config = servicer.config(request.match_info["model"], request.match_info.get("version", ""))
        return web.json_response(triton_json(config))

    @rpc(_M + "ModelStatistics")
    async def model_statistics(request: web.Request) -> web.Response:
        resp = await servicer.statistics_response(request.match_info.get("model", ""),
                                                  request.match_info.get("version", ""))
        return web.json_response(triton_json(resp))

    @rpc(_M + "RepositoryIndex")
    async def repository_index(request: web.Request) -> web.Response:
        data = await request.read()
        body = parse_json(data) if data.strip() else {}  # tritonclient sends an empty body
        ready = _field(body, "ready", bool, "request", False)
        return web.json_response([triton_json(m) for m in servicer.repository_index(ready).models])

    @rpc(_M + "RepositoryModelLoad")
    async def model_load(request: web.Request) -> web.Response:
        params = _parameters(await request.read(), {"version": str})
        await servicer.load(request.match_info["model"], params.get("version", ""))
        return web.json_response({})

    @rpc(_M + "RepositoryModelUnload")
    async def model_unload(request: web.Request) -> web.Response:
        _parameters(await request.read(), {"unload_dependents": bool})  # no model has dependents
        await servicer.unload(request.match_info["model"])
        return web.json_response({})

    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2", server_metadata)
    app.router.add_get("/v2/models/stats", model_statistics)  # before {model} would take "stats"
    app.router.add_post("/v2/repository/index", repository_index)
    app.router.add_post("/v2/repository/models/{model}/load", model_load)
    app.router.add_post("/v2/repository/models/{model}/unload", model_unload)
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        app.router.add_get(base, model_metadata)
        app.router.add_get(base + "/ready", model_ready)
        app.router.add_get(base + "/config", model_config)
        app.router.add_get(base + "/stats", model_statistics)
        app.router.add_post(base + "/infer", infer)
