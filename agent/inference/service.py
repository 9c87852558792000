# ruff: noqa: N802 - servicer methods carry the protocol's RPC names
"""``inference.GRPCInferenceService``: KServe v2 over the model repository.

:func:`attach` is this component's entry point for agent.server: it builds the model
repository over the state directory, installs and loads the configured models, registers
the servicer and per-model health, and publishes the repository as
``ctx.inference``.

This module and agent.server are the only places where the exception family becomes gRPC
status codes (ApplianceError.grpc_code); anything unexpected becomes INTERNAL, never a
crashed server or a hung call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2

from agent import __version__
from agent.context import AgentContext
from agent.errors import ApplianceError, NotFoundError
from agent.inference.install import ensure_models
from agent.inference.llm_stream import llm_responses
from agent.inference.model import LoadedModel
from agent.inference.repository import ModelRepository
from agent.inference.stats import add_snapshots
from agent.inference.tensors import check_requested_outputs, decode_inputs, encode_output
from agent.llm.accounting import GenerationCall
from agent.llm.types import GenerativeModels, LanguageModel
from agent.proto import grpc_service_pb2 as pb
from agent.proto import grpc_service_pb2_grpc as pb_grpc
from agent.proto import model_config_pb2 as mc
from agent.security import caller_of

if TYPE_CHECKING:
    from agent.workers import WorkerLink

__all__ = ["MODEL_HEALTH_PREFIX", "SERVICE_NAME", "InferenceServicer", "attach", "model_health_name"]

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"
_STREAM_METHOD = f"/{SERVICE_NAME}/ModelStreamInfer"
MODEL_HEALTH_PREFIX = "inference.model/"
SERVER_NAME = "sovereign-appliance"
EXTENSIONS = ("model_repository", "model_configuration", "statistics", "parameters")
PLATFORM = "onnxruntime_onnx"

T = TypeVar("T")


def model_health_name(model: str) -> str:
    """The grpc.health.v1 service name under which a model's serving status is published."""
    return MODEL_HEALTH_PREFIX + model


_DATA_TYPE = {
    "BOOL": mc.TYPE_BOOL, "UINT8": mc.TYPE_UINT8, "UINT16": mc.TYPE_UINT16, "UINT32": mc.TYPE_UINT32,
    "UINT64": mc.TYPE_UINT64, "INT8": mc.TYPE_INT8, "INT16": mc.TYPE_INT16, "INT32": mc.TYPE_INT32,
    "INT64": mc.TYPE_INT64, "FP16": mc.TYPE_FP16, "FP32": mc.TYPE_FP32, "FP64": mc.TYPE_FP64,
    "BYTES": mc.TYPE_STRING,
}


# Status details travel in a header; a client refuses one past its metadata limit (8-16 KiB).
MAX_STATUS_MESSAGE = 2048


def _details(message: str) -> str:
    """A status message short enough for any client (echoed input is cut where it is
    written, :func:`agent.errors.echo`; this is the last guard)."""
    if len(message) <= MAX_STATUS_MESSAGE:
        return message
    return f"{message[:MAX_STATUS_MESSAGE]}...({len(message)} chars)"


def _status(exc: ApplianceError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, exc.grpc_code, grpc.StatusCode.INTERNAL)


def model_config(model: LoadedModel, triton_version: str = "") -> Any:
    """The Triton ModelConfig of a served model (provider, bundle version, its Triton
    version number and sha256 in ``parameters``)."""
    batched = model.max_batch > 0
    cfg = mc.ModelConfig(name=model.name, platform=PLATFORM, backend="onnxruntime",
                         max_batch_size=model.max_batch, default_model_filename="model.onnx")
    cfg.version_policy.latest.num_versions = 1
    for spec in model.manifest.inputs:
        dims = spec.shape[1:] if batched else spec.shape
        cfg.input.add(name=spec.name, data_type=_DATA_TYPE[spec.datatype], dims=list(dims))
    for spec in model.manifest.outputs:
        dims = spec.shape[1:] if batched else spec.shape
        cfg.output.add(name=spec.name, data_type=_DATA_TYPE[spec.datatype], dims=list(dims))
    gpu = model.provider != "CPUExecutionProvider"
    kind = mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU
    group = cfg.instance_group.add(name=f"{model.name}_0", count=model.instances, kind=kind)
    if gpu:
        group.gpus.append(0)
    if model.dynamic_batching:
        b = model.batching_cfg
        cfg.dynamic_batching.preferred_batch_size.extend(b.preferred_batch_sizes)
        cfg.dynamic_batching.max_queue_delay_microseconds = b.max_queue_delay_us
        cfg.dynamic_batching.default_queue_policy.max_queue_size = model.max_queue
    params = {
        "execution_provider": model.provider,
        "execution_providers": ",".join(model.providers),
        "version": model.version,
        "triton_version": triton_version,
        "bundle_sha256": model.sha256,
        # which serving process answered (several share the port: agent.workers)
        "worker_pid": str(os.getpid()),
    }
    for key, value in params.items():
        cfg.parameters[key].string_value = value
    return cfg


def _duration(target: Any, data: dict[str, int]) -> None:
    target.count = data["count"]
    target.ns = data["ns"]


def _statistics(snap: dict[str, Any]) -> Any:
    # Triton's integer version: perf_analyzer matches statistics by std::stoll(version).
    out = pb.ModelStatistics(name=snap["name"], version=snap["triton_version"],
                             last_inference=snap["last_inference"],
                             inference_count=snap["inference_count"],
                             execution_count=snap["execution_count"])
    for key, value in snap["inference_stats"].items():
        _duration(getattr(out.inference_stats, key), value)
    for b in snap["batch_stats"]:
        entry = out.batch_stats.add(batch_size=b["batch_size"])
        for key in ("compute_input", "compute_infer", "compute_output"):
            _duration(getattr(entry, key), b[key])
    return out


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The KServe v2 / Triton servicer over a :class:`ModelRepository`."""

    def __init__(self, repo: ModelRepository, link: WorkerLink | None = None,
                 generative: GenerativeModels | None = None) -> None:
        self.repo = repo
        self.link = link  # the other serving processes, when there are any
        self.generative = generative  # language models answer ModelStreamInfer too
        self.ready = True  # False once the agent is shutting down
        self.loop: asyncio.AbstractEventLoop | None = None  # where statistics_blocking asks

    async def statistics(self, name: str = "", version: str = "") -> list[dict[str, Any]]:
        """Statistics snapshots (:meth:`ModelRepository.statistics`), totals over every serving
        process.

        Raises:
            NotFoundError: ``name`` (or that version) is not being served.
        """
        mine = self.repo.statistics(name, version)
        if self.link is None:
            return mine
        return add_snapshots(mine + await self.link.sibling_statistics(name, version))

    def statistics_blocking(self) -> list[dict[str, Any]]:
        """:meth:`statistics` of every model, from another thread (the metrics collector)."""
        loop = self.loop
        if self.link is None or loop is None:
            return self.repo.statistics()
        return asyncio.run_coroutine_threadsafe(self.statistics(), loop).result(timeout=15)

    def _language_model(self, name: str) -> LanguageModel | None:
        """The language model ``name`` when one is served under it (and no tensor model is)."""
        if self.generative is None or self.repo.is_ready(name):
            return None
        try:
            return self.generative.language_model(name)
        except NotFoundError:
            return None

    async def _guard(self, context: Any, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except ApplianceError as exc:
            await context.abort(_status(exc), _details(str(exc)))
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            log.exception("internal error")
            await context.abort(grpc.StatusCode.INTERNAL,
                                _details(f"internal error: {type(exc).__name__}: {exc}"))
        raise AssertionError("unreachable")  # context.abort raises

    # ------------------------------------------------------------------ health and metadata

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.ready)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        return pb.ModelReadyResponse(ready=self.ready and self.repo.is_ready(request.name, request.version))

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

    def metadata(self, name: str, version: str = "") -> Any:
        """The ModelMetadataResponse of a served model (both ports); raises NotFoundError."""
        model = self.repo.get(name, version)
        resp = pb.ModelMetadataResponse(name=model.name, versions=self.repo.versions(model.name),
                                        platform=PLATFORM)
        for spec in model.manifest.inputs:
            resp.inputs.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
        for spec in model.manifest.outputs:
            resp.outputs.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
        return resp

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        async def run() -> Any:
            return self.metadata(request.name, request.version)

        return await self._guard(context, run)

    def config(self, name: str, version: str = "") -> Any:
        """The ModelConfig of a served model (both ports); raises NotFoundError."""
        model = self.repo.get(name, version)
        return model_config(model, self.repo.triton_version(model.name, model.version))

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        async def run() -> Any:
            return pb.ModelConfigResponse(config=self.config(request.name, request.version))

        return await self._guard(context, run)

    async def statistics_response(self, name: str = "", version: str = "") -> Any:
        """The ModelStatisticsResponse for all models or one (both ports); raises NotFoundError."""
        snaps = await self.statistics(name, version)
        return pb.ModelStatisticsResponse(model_stats=[_statistics(s) for s in snaps])

    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        return await self._guard(context, lambda: self.statistics_response(request.name, request.version))

    # ------------------------------------------------------------------ inference

    async def infer(self, request: Any) -> Any:
        """Run one ModelInferRequest (the one request path of both ports); raises ApplianceError
        subclasses for what the caller got wrong."""
        start = time.perf_counter_ns()
        model = self.repo.get(request.model_name, request.model_version)
        ok = False
        try:
            feeds = decode_inputs(request, model.inputs, model.max_batch)
            names = check_requested_outputs(request, model.outputs)
            decoded = time.perf_counter_ns()
            result = await model.infer(feeds, names)
            t0 = time.perf_counter_ns()
            resp = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
            raw = []
            for name in names:
                array = result.outputs[name]
                datatype = model.outputs[name].datatype
                resp.outputs.add(name=name, datatype=datatype, shape=array.shape)
                raw.append(encode_output(array, datatype))
            resp.raw_output_contents.extend(raw)
            ok = True
        finally:
            end = time.perf_counter_ns()
            if ok:
                batch = int(next(iter(feeds.values())).shape[0]) if model.max_batch > 0 else 1
                model.stats.record_request(True, end - start, batch_size=batch, queue_ns=result.queue_ns,
                                           input_ns=result.input_ns + decoded - start,
                                           infer_ns=result.infer_ns, output_ns=result.output_ns + end - t0)
            else:
                model.stats.record_request(False, end - start)
        return resp

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        return await self._guard(context, lambda: self.infer(request))

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[Any],
                               context: Any) -> AsyncIterator[Any]:
        """Requests on a stream run concurrently; responses come in completion order.

        A failed request yields a response with ``error_message`` and the stream goes on.
        """
        results: asyncio.Queue[Any] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        async def one(req: Any) -> None:
            try:
                llm = self._language_model(req.model_name)
                if llm is not None:  # decoupled: a response per chunk (Triton's LLM convention)
                    call = GenerationCall("text_completion", _STREAM_METHOD, caller_of(context))
                    async for resp in llm_responses(llm, req, call):
                        await results.put(pb.ModelStreamInferResponse(infer_response=resp))
                    return
                resp = await self.infer(req)
                await results.put(pb.ModelStreamInferResponse(infer_response=resp))
            except ApplianceError as exc:
                await results.put(pb.ModelStreamInferResponse(
                    error_message=str(exc),
                    infer_response=pb.ModelInferResponse(model_name=req.model_name, id=req.id)))
            except Exception as exc:
                log.exception("internal error in stream")
                await results.put(pb.ModelStreamInferResponse(error_message=f"internal error: {exc}"))

        async def reader() -> None:
            try:
                async for req in request_iterator:
                    task = asyncio.create_task(one(req))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                await asyncio.gather(*list(tasks))
            except BaseException as exc:
                # The request stream ended the call (a malformed message aborts it, the
                # client went away): hand that to the writer loop below, which would
                # otherwise wait for results forever and pin the HTTP/2 stream.
                await results.put(exc)
                raise
            await results.put(None)

        read_task = asyncio.create_task(reader())
        try:
            while True:
                item = await results.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
            await read_task
        finally:
            read_task.cancel()
            for task in list(tasks):
                task.cancel()

    # ------------------------------------------------------------------ repository

    def repository_index(self, ready_only: bool = False) -> Any:
        """The RepositoryIndexResponse: every installed version and its state (both ports)."""
        resp = pb.RepositoryIndexResponse()
        for e in self.repo.index(ready_only=ready_only):
            resp.models.add(name=e.name, version=e.version, state=e.state, reason=e.reason)
        return resp

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        async def run() -> Any:
            return self.repository_index(request.ready)

        return await self._guard(context, run)

    async def load(self, name: str, version: str = "") -> None:
        """Serve an installed version of ``name`` (default: the active one) in every serving
        process (both ports).

        Raises:
            NotFoundError, BundleError, VerificationError: see :meth:`ModelRepository.serve`.
        """
        await self.repo.serve(name, version or None)
        if self.link is not None:
            await self.link.broadcast({"op": "load", "name": name, "version": version})

    async def unload(self, name: str) -> None:
        """Stop serving ``name`` in every serving process (both ports); raises NotFoundError."""
        await self.repo.unload(name)
        if self.link is not None:
            await self.link.broadcast({"op": "unload", "name": name})

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        async def run() -> Any:
            version = ""
            param = request.parameters.get("version")
            if param is not None and param.WhichOneof("parameter_choice") == "string_param":
                version = param.string_param
            await self.load(request.model_name, version)
            return pb.RepositoryModelLoadResponse()

        return await self._guard(context, run)

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        async def run() -> Any:
            await self.unload(request.model_name)
            return pb.RepositoryModelUnloadResponse()

        return await self._guard(context, run)


def _health_listener(ctx: AgentContext) -> Callable[[str, bool], None]:
    pending: set[asyncio.Task[None]] = set()
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING

    def listener(name: str, up: bool) -> None:
        if ctx.health is None:
            return
        task = asyncio.get_running_loop().create_task(
            ctx.health.set(model_health_name(name), serving if up else not_serving))
        pending.add(task)
        task.add_done_callback(pending.discard)

    return listener


async def attach(server: grpc.aio.Server, ctx: AgentContext) -> list[str]:
    """Build the repository, load the configured models, register the servicer.

    Models named in ``[inference] models`` that are not installed are installed from the
    configured registry sources first (signature-verified).  With no models named, every
    installed model's active version is served.  A model that fails its checks is logged
    and left UNAVAILABLE; the agent still starts.

    Raises:
        ApplianceError: a named model can be neither found installed nor installed from a
            registry (the agent refuses to start without a model it was told to serve).
    """
    repo = ModelRepository.for_state_dir(ctx.state_dir, ctx.config.inference)
    repo.add_listener(_health_listener(ctx))
    servicer = InferenceServicer(repo, ctx.workers, repo.generative)
    servicer.loop = asyncio.get_running_loop()
    if ctx.workers is not None:
        _follow_siblings(ctx.workers, repo, ctx.config.server.grace_period_s)
    ctx.inference = repo
    ctx.inference_servicer = servicer
    ctx.generative = repo.generative  # for the HTTPS port's /v1 routes
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    wanted = await ensure_models(repo, ctx.config)
    for name, version in wanted:
        try:
            await repo.serve(name, version, isolated=False)  # nothing is served yet
        except ApplianceError as exc:
            log.error("model %s%s is not served: %s",  # noqa: TRY400 - expected, no traceback
                      name, f"@{version}" if version else "", exc)
    return [SERVICE_NAME]


# ---------------------------------------------------------------------- several serving processes


async def follow_active(repo: ModelRepository, drain_s: float, name: str = "") -> None:
    """Serve the store's active version of ``name`` (default: of every served model, tensor
    or generative) where another serving process switched it (an update or rollback it applied)."""
    for served in [name] if name else sorted({n for n, _ in repo.serving()}):
        active = repo.store.active_version(served)
        if not active or not repo.is_served(served) or repo.serving_versions(served) == [active]:
            continue
        model = await repo.stage(served, active)
        await repo.swap(model, drain_s=drain_s)


async def _match(repo: ModelRepository, served: list[list[str]]) -> None:
    """Serve the model versions a sibling serves, generative ones too (a restarted worker
    catching up with the loads, unloads, updates and rollbacks made while it was down): a
    name served here in other versions than the sibling's is served again in exactly its."""
    wanted: dict[str, set[str]] = {}
    for name, version in served:
        wanted.setdefault(name, set()).add(version)
    have: dict[str, set[str]] = {}
    for name, version in repo.serving():
        have.setdefault(name, set()).add(version)
    for name in sorted(have.keys() - wanted.keys()):
        with contextlib.suppress(NotFoundError):
            await repo.unload(name)
    for name, versions in sorted(wanted.items()):
        if have.get(name, set()) - versions:  # a version the sibling does not serve
            with contextlib.suppress(NotFoundError):
                await repo.unload(name)
            have.pop(name, None)
        for version in sorted(versions - have.get(name, set())):
            await repo.serve(name, version)


def _follow_siblings(link: WorkerLink, repo: ModelRepository, drain_s: float) -> None:
    """Let ``link`` replay here the model changes another serving process made."""

    async def apply(op: dict[str, Any]) -> None:
        kind = op.get("op")
        if kind == "load":
            await repo.serve(op["name"], op.get("version") or None)
        elif kind == "unload":
            with contextlib.suppress(NotFoundError):  # already not served here
                await repo.unload(op["name"])
        elif kind == "sync":
            await follow_active(repo, drain_s, op.get("name", ""))
        elif kind == "match":
            await _match(repo, op["served"])
        else:
            raise ValueError(f"unknown model change {kind!r}")

    def statistics(name: str, version: str) -> list[dict[str, Any]]:
        try:
            return repo.statistics(name, version)
        except NotFoundError:
            return []

    link.apply = apply
    link.statistics = statistics
    link.served = lambda: [[n, v] for n, v in repo.serving()]
