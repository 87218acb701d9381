"""The Open Inference Protocol over gRPC: `inference.GRPCInferenceService`.

Messages and the servicer base come from tritonclient's generated code (a superset of
KServe's `open_inference_grpc.proto`; the `grpc` extra installs it). Served: ServerLive,
ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer, ModelConfig,
ModelStatistics, RepositoryIndex; every other call answers UNIMPLEMENTED.

The server runs on the HTTP server's event loop (`GRPCServer.start` from its startup),
so both fronts share one `V2Models`: admission, coalescing, metrics and statistics.
A token is `authorization: Bearer TOKEN` metadata (not needed by ServerLive and
ServerReady). Errors are status codes: NOT_FOUND (unknown model or version),
INVALID_ARGUMENT (bad tensors, wrong columns or types), UNAUTHENTICATED,
RESOURCE_EXHAUSTED (over a request limit: gRPC's own error for a message over
--max-body-mb, else the message of HTTP's 413, naming the limit and its --max-...
option), UNAVAILABLE with retry information (`grpc-retry-pushback-ms` and a
google.rpc.RetryInfo detail) when overloaded or stopping, DEADLINE_EXCEEDED, INTERNAL
(an operator failed; the message names it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2, json_format
from google.rpc import code_pb2, error_details_pb2, status_pb2
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from serveflow.serving.auth import unauthorized
from serveflow.serving.errors import RETRY_AFTER_S, HTTPProblem
from serveflow.serving.v2 import VERSION, V2Models
from serveflow.serving.v2_tensors import InputTensor

log = logging.getLogger(__name__)

_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# InferTensorContents field holding each datatype's typed values (FP16 only travels raw).
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
SERVED = (
    "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
    "ModelInfer", "ModelConfig", "ModelStatistics", "RepositoryIndex",
)  # fmt: skip


async def _abort(context: grpc.aio.ServicerContext, problem: HTTPProblem) -> NoReturn:
    code = _CODES.get(problem.status, grpc.StatusCode.INTERNAL)
    metadata: tuple[tuple[str, str | bytes], ...] = ()
    if code is grpc.StatusCode.UNAVAILABLE:
        delay_s = int(problem.headers.get("Retry-After", RETRY_AFTER_S))
        retry = any_pb2.Any()
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=delay_s)))
        status = status_pb2.Status(
            code=code_pb2.UNAVAILABLE, message=problem.message, details=[retry]
        )
        metadata = (
            ("grpc-retry-pushback-ms", str(delay_s * 1000)),
            ("grpc-status-details-bin", status.SerializeToString()),
        )
    await context.abort(code, problem.message, trailing_metadata=metadata)
    raise AssertionError("unreachable: abort raises")


def _inputs(request: service_pb2.ModelInferRequest) -> list[InputTensor]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise HTTPProblem(
            400,
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs",
        )
    inputs = []
    for index, tensor in enumerate(request.inputs):
        if raw:
            data: bytes | Sequence[Any] = raw[index]
        else:
            field = _CONTENTS.get(tensor.datatype)
            if field is None:
                raise HTTPProblem(
                    400,
                    f"input {tensor.name!r}: {tensor.datatype!r} data must come in "
                    "raw_input_contents",
                )
            # The repeated field itself, not a list of it: the limits are checked
            # (`check_limits`, from its length) before anything is copied.
            data = getattr(tensor.contents, field)
        inputs.append(InputTensor(tensor.name, tensor.datatype, tuple(tensor.shape), data))
    return inputs


def _timeout(request: service_pb2.ModelInferRequest, context: Any) -> float | None:
    """The request's deadline in seconds: the gRPC deadline or Triton's "timeout"
    parameter (microseconds), whichever is sooner."""
    limits = []
    remaining = context.time_remaining()
    if remaining is not None:
        limits.append(max(remaining, 1e-6))
    if "timeout" in request.parameters:
        micros = request.parameters["timeout"].int64_param
        if micros <= 0:
            raise HTTPProblem(400, f"parameter timeout must be positive (µs), got {micros}")
        limits.append(micros / 1e6)
    return min(limits) if limits else None


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The V2 calls over the server's deployed flows (asyncio handlers)."""

    def __init__(self, models: V2Models) -> None:
        self.models = models

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        token = self.models.state.token
        if token is None:
            return
        metadata = context.invocation_metadata() or ()
        reason = unauthorized(((k.encode(), v.encode("latin-1")) for k, v in metadata), token)
        if reason is not None:
            await _abort(context, HTTPProblem(401, reason))

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerReadyResponse(ready=self.models.ready())

    async def ModelReady(self, request: Any, context: Any) -> Any:
        await self._authorize(context)
        try:
            self.models.app(request.name, request.version)
        except HTTPProblem:  # no such model: not ready (a yes/no question, as Triton's)
            return service_pb2.ModelReadyResponse(ready=False)
        return service_pb2.ModelReadyResponse(ready=self.models.ready())

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        await self._authorize(context)
        metadata = self.models.server_metadata()
        return json_format.ParseDict(metadata, service_pb2.ServerMetadataResponse())

    async def _about(self, context: Any, read: Any, request: Any) -> Any:
        """`read(name, version)` of the model the request names, or the call aborted
        with the protocol's status (NOT_FOUND, ...)."""
        await self._authorize(context)
        try:
            return read(request.name, request.version)
        except HTTPProblem as problem:
            await _abort(context, problem)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        metadata = await self._about(context, self.models.metadata, request)
        return json_format.ParseDict(metadata, service_pb2.ModelMetadataResponse())

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        config = await self._about(context, self.models.config, request)
        message = json_format.ParseDict(config, model_config_pb2.ModelConfig())
        return service_pb2.ModelConfigResponse(config=message)

    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        stats = await self._about(context, self.models.statistics, request)
        return json_format.ParseDict(stats, service_pb2.ModelStatisticsResponse())

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        await self._authorize(context)
        models = self.models.repository_index()
        return json_format.ParseDict({"models": models}, service_pb2.RepositoryIndexResponse())

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        await self._authorize(context)
        name = request.model_name
        try:
            with self.models.measured(name):
                tensors = await self.models.infer(
                    name,
                    request.model_version,
                    _inputs(request),
                    [output.name for output in request.outputs],
                    _timeout(request, context),
                )
                response = service_pb2.ModelInferResponse(
                    model_name=name, model_version=VERSION, id=request.id
                )
                for tensor in tensors:
                    response.outputs.add(
                        name=tensor.name, datatype=tensor.datatype, shape=tensor.shape
                    )
                response.raw_output_contents.extend([tensor.raw() for tensor in tensors])
        except HTTPProblem as problem:
            await _abort(context, problem)
        return response


def _unimplemented(method: str) -> Any:
    async def answer(self: InferenceServicer, request: Any, context: Any) -> Any:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"serveflow does not implement {method}; it serves {', '.join(SERVED)}",
        )

    answer.__name__ = method
    return answer


for _method in dir(service_pb2_grpc.GRPCInferenceServiceServicer):
    if _method[0].isupper() and _method not in SERVED:
        setattr(InferenceServicer, _method, _unimplemented(_method))


class GRPCServer:
    """A grpc.aio server of `InferenceServicer` on the running event loop."""

    def __init__(self, models: V2Models, host: str, port: int) -> None:
        self.models = models
        self.host = host
        self.port = port
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def start(self) -> int:
        """Bind and serve; returns the port (a free one when asked for 0)."""
        limit = self.models.state.max_body_bytes
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),  # a port in use is an error, not shared
            ]
        )
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.models), self._server
        )
        try:
            port = self._server.add_insecure_port(self.address)
        except RuntimeError:  # grpc's "Failed to bind"
            port = 0
        if port == 0:
            raise OSError(f"cannot serve gRPC on {self.address}: address in use or unavailable")
        self.port = port
        await self._server.start()
        log.info("V2 gRPC on %s", self.address)
        return port

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls, let those running finish for up to `grace_s`."""
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
