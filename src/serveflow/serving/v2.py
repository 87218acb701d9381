"""The Open Inference Protocol (KServe V2) over HTTP, under /v2; a flow is a model.

GET  /v2                                       server metadata (name, version, extensions)
GET  /v2/health/live  /v2/health/ready         liveness, readiness (never need a token)
GET  /v2/models/{flow}[/versions/1]            model metadata: inputs and outputs
GET  /v2/models/{flow}[/versions/1]/ready      model readiness
POST /v2/models/{flow}[/versions/1]/infer      inference; JSON, or JSON + binary tensors
                                               (Inference-Header-Content-Length)
GET  /v2/models/{flow}[/versions/1]/config     Triton's model configuration extension
GET  /v2/models[/{flow}[/versions/1]]/stats    Triton's statistics extension
POST /v2/repository/index                      the flows, all READY

`V2Models` holds what the HTTP front and the gRPC one (`v2_grpc.py`) share: metadata,
statistics and `infer`, which runs a request as the JSON API does (same token, request
limits, admission bound, coalescing, deadline, metrics and error classes). Tensors map
to columns as `v2_tensors` says. Errors are `{"error": message}` with the HTTP status of
the JSON API, except that input errors are 400, as the protocol asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import serveflow
from serveflow.logical.table import Table
from serveflow.runtime.app import App
from serveflow.serving.app import (
    ServingState,
    _Disconnected,
    _outcome,
    _read_body,
    _timeout_s,
    _unless_disconnected,
    held_whole,
    run_admitted,
    whole_at,
)
from serveflow.serving.auth import unauthorized
from serveflow.serving.coalesce import AppStopping, Outcome
from serveflow.serving.codecs import JSON, check_json_limits, encode_json, loads
from serveflow.serving.errors import HTTPProblem, problem_from
from serveflow.serving.inflight import Admission
from serveflow.serving.limits import LimitExceeded, Limits
from serveflow.serving.metrics import UNKNOWN_FLOW, route_of
from serveflow.serving.v2_tensors import (
    DATATYPES,
    InputTensor,
    OutputError,
    OutputTensor,
    TensorError,
    columns_from_tensors,
    schema_datatype,
    tensor_from_column,
)

try:
    import orjson
except ImportError:  # the standard library does the same, slower
    orjson = None  # type: ignore[assignment]

VERSION = "1"  # every flow is served as version "1" of its model
PLATFORM = "serveflow"
EXTENSIONS = ["binary_tensor_data", "model_configuration", "statistics"]
HEADER_LENGTH = "inference-header-content-length"
BINARY = "application/octet-stream"
TIMEOUT_HEADER = "x-request-timeout-ms"
MAX_SEEN_TENSORS = 64  # tensors per model and direction that metadata remembers


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class ModelStats:
    """Triton's per-model statistics of the V2 requests of one flow; its batch_stats
    come from the workers and count every call of the flow's stages (`batch_stats`)."""

    last_inference_ms: int = 0
    inference_count: int = 0  # rows inferred
    execution_count: int = 0  # requests run
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    # Of successful requests, as Triton: waiting before the first stage run (for the
    # coalescer's company, at the driver for a worker with room, in a worker's queue or
    # batch), then the stage runs up to the answer.
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)  # tensors -> table
    compute_infer: Duration = field(default_factory=Duration)  # first stage run to answer
    compute_output: Duration = field(default_factory=Duration)  # table -> tensors

    def as_dict(self, name: str, batches: list[dict[str, Any]]) -> dict[str, Any]:
        zero = Duration().as_dict()
        return {
            "name": name,
            "version": VERSION,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.as_dict(),
                "fail": self.fail.as_dict(),
                "queue": self.queue.as_dict(),
                "compute_input": self.compute_input.as_dict(),
                "compute_infer": self.compute_infer.as_dict(),
                "compute_output": self.compute_output.as_dict(),
                "cache_hit": zero,
                "cache_miss": zero,
            },
            "batch_stats": batches,
        }


def batch_stats(app: App) -> list[dict[str, Any]]:
    """Triton's `batch_stats` of a flow: its stages' calls by the rows each ran, as the
    workers measured them, whichever front (V2, the JSON API, in-process) sent the
    rows. A call runs the rows of the requests merged into it: the coalescer's runtime
    requests, a batching stage's batch. compute_input: merging those rows into one
    table for a batching map; compute_output: splitting its output per request;
    compute_infer: the rest of the call. A flow of n stages makes n calls per batch."""
    totals: dict[int, list[int]] = {}
    for figures in app.stats().values():
        for rows, call in figures.get("executions", {}).items():
            total = totals.setdefault(int(rows), [0, 0, 0, 0])
            for i, key in enumerate(("calls", "gather_ns", "run_ns", "scatter_ns")):
                total[i] += call[key]
    return [
        {
            "batch_size": rows,
            "compute_input": {"count": calls, "ns": gather_ns},
            "compute_infer": {"count": calls, "ns": run_ns},
            "compute_output": {"count": calls, "ns": scatter_ns},
        }
        for rows, (calls, gather_ns, run_ns, scatter_ns) in sorted(totals.items())
    ]


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool = False  # HTTP: send it as binary data


def _datatype_for_config(datatype: str) -> str:
    return {"BYTES": "TYPE_STRING", "": "TYPE_INVALID"}.get(datatype, f"TYPE_{datatype}")


class V2Models:
    """The deployed flows as V2 models. Event-loop only, like ServingState."""

    def __init__(self, state: ServingState) -> None:
        self.state = state
        state.v2_models = self
        self.stats = {name: ModelStats() for name in state.apps}
        # Datatype and cell shape of each tensor last seen, for metadata the schema
        # does not give (outputs; np.ndarray inputs).
        self.seen: dict[str, dict[str, dict[str, tuple[str, tuple[int, ...]]]]] = {
            name: {"inputs": {}, "outputs": {}} for name in state.apps
        }

    # --- lookups -------------------------------------------------------------------

    def app(self, name: str, version: str | None = None) -> App:
        """The deployment serving model `name`; HTTPProblem 404 if none (or no such
        version)."""
        app = self.state.apps.get(name)
        if app is None:
            known = ", ".join(sorted(self.state.apps)) or "none"
            raise HTTPProblem(404, f"no model (flow) named {name!r} (models: {known})")
        if version not in (None, "", VERSION):
            raise HTTPProblem(404, f"model {name!r} has no version {version!r} (versions: 1)")
        return app

    def ready(self) -> bool:
        return not self.state.draining

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "serveflow", "version": serveflow.__version__, "extensions": EXTENSIONS}

    def _tensors(self, name: str, kind: str) -> list[dict[str, Any]]:
        seen = self.seen[name][kind]
        tensors = []
        schema = self.state.apps[name].plan.schema if kind == "inputs" else None
        declared = dict(schema or {})
        for column, expected in declared.items():
            datatype = schema_datatype(expected)
            if datatype is not None:
                tensors.append({"name": column, "datatype": datatype, "shape": [-1]})
            elif column in seen:
                datatype, cell = seen[column]
                tensors.append({"name": column, "datatype": datatype, "shape": [-1, *cell]})
            else:  # np.ndarray or another type: any datatype, cells of any shape
                tensors.append({"name": column, "datatype": "", "shape": [-1, -1]})
        for column, (datatype, cell) in seen.items():
            if column not in declared:
                tensors.append({"name": column, "datatype": datatype, "shape": [-1, *cell]})
        return tensors

    def metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        self.app(name, version)
        return {
            "name": name,
            "versions": [VERSION],
            "platform": PLATFORM,
            "inputs": self._tensors(name, "inputs"),
            "outputs": self._tensors(name, "outputs"),
        }

    def config(self, name: str, version: str | None = None) -> dict[str, Any]:
        """Triton's model configuration: tensors with the row dimension as -1
        (max_batch_size 0: rows are part of every shape), the plan as a parameter."""
        app = self.app(name, version)

        def tensors(kind: str) -> list[dict[str, Any]]:
            return [
                {"name": t["name"], "data_type": _datatype_for_config(t["datatype"]),
                 "dims": t["shape"]}
                for t in self._tensors(name, kind)
            ]  # fmt: skip

        return {
            "name": name,
            "platform": PLATFORM,
            "backend": PLATFORM,
            "max_batch_size": 0,
            "input": tensors("inputs"),
            "output": tensors("outputs"),
            "parameters": {"explain": {"string_value": app.explain()}},
        }

    def statistics(self, name: str | None = None, version: str | None = None) -> dict[str, Any]:
        """Triton's statistics of one model, or of all with `name` None or ""."""
        if name:
            self.app(name, version)
            names = [name]
        else:
            names = sorted(self.state.apps)
        apps = self.state.apps
        return {"model_stats": [self.stats[n].as_dict(n, batch_stats(apps[n])) for n in names]}

    def repository_index(self) -> list[dict[str, str]]:
        state = "READY" if self.ready() else "UNAVAILABLE"
        return [{"name": n, "version": VERSION, "state": state} for n in sorted(self.state.apps)]

    # --- inference -----------------------------------------------------------------

    @contextlib.contextmanager
    def measured(self, name: str) -> Iterator[None]:
        """Record one inference request of model `name` in the server's metrics and
        the model's statistics: its status from how the block ends (an HTTPProblem's
        status, 499 when the client went away, 500 for anything else)."""
        known = name in self.state.apps
        metrics = self.state.metrics.flow(name if known else UNKNOWN_FLOW)
        started = time.perf_counter_ns()
        status = 500
        metrics.in_flight.inc()
        try:
            yield
            status = 200
        except HTTPProblem as problem:
            status = problem.status
            if status == 503:
                metrics.shed.inc()
            raise
        except (asyncio.CancelledError, _Disconnected):
            status = 499  # nginx's "client closed request": nobody reads an answer
            raise
        finally:
            elapsed = time.perf_counter_ns() - started
            metrics.in_flight.dec()
            metrics.observe(status, elapsed / 1e9)
            if known:
                stats = self.stats[name]
                (stats.success if status == 200 else stats.fail).add(elapsed)

    def answered_early(self, name: str, status: int) -> None:
        """Count an inference of model `name` that the HTTP protocol answered itself
        (a 503 refusal, a 408 stalled body: `serving.shedding`), as `measured` would."""
        self.state.answered_early(name, route_of("/v2/"), status)
        self.stats[name].fail.add(0)

    async def infer(
        self,
        name: str,
        version: str | None,
        inputs: Sequence[InputTensor],
        outputs: Sequence[str],
        timeout: float | None,
        reserved: Reserved | None = None,
    ) -> list[OutputTensor]:
        """Run one inference as the JSON API runs a prediction; the output tensors
        (`outputs` names them, empty: every output column). Raises HTTPProblem, whose
        status says which protocol error to answer. Call it inside `measured`.
        `reserved`: admitted by the HTTP protocol already (its caller releases the
        slot), and perhaps run there (`infer_at_door`)."""
        state = self.state
        begun, admission = reserved.begun if reserved is not None else None, None
        if begun is None:
            begun, admission = self._begin(name, version, inputs, timeout, reserved)
        stats = self.stats[name]
        try:
            output, began = await self._outcome_of(name, begun)
        finally:
            if admission is not None:
                state.in_flight[name].release(admission)
        t2 = time.perf_counter_ns()
        tensors = self._output_tensors(name, output, outputs)
        t3 = time.perf_counter_ns()
        # Unknown (no stage ran): all of it counts as compute. Clamped: on Ray the
        # worker's clock may be another host's.
        t1 = begun.decoded_ns
        queued = 0 if began is None else int((began - begun.queued_from) * 1e9)
        queued = min(max(queued, 0), t2 - t1)
        stats.compute_input.add(t1 - begun.began_ns)
        stats.queue.add(queued)
        stats.compute_infer.add(t2 - t1 - queued)
        stats.compute_output.add(t3 - t2)
        stats.inference_count += len(begun.table)
        stats.execution_count += 1
        stats.last_inference_ms = time.time_ns() // 1_000_000
        for kind, described in (("inputs", inputs), ("outputs", tensors)):
            seen = self.seen[name][kind]
            for tensor in described:
                # Bounded: clients choose input names, and extra columns are allowed.
                if tensor.name in seen or len(seen) < MAX_SEEN_TENSORS:
                    seen[tensor.name] = (tensor.datatype, tuple(tensor.shape[1:]))
        return tensors

    def _begin(
        self,
        name: str,
        version: str | None,
        inputs: Sequence[InputTensor],
        timeout: float | None,
        reserved: Reserved | None,
    ) -> tuple[Begun, Admission | None]:
        """Admit and decode a request (and run it unless it is coalesced): a `Begun`
        with the admission taken for it (None: `reserved`)."""
        state = self.state
        arrived = reserved.parsed if reserved else state.turns.since(time.monotonic())
        app = self.app(name, version)
        if reserved is None and state.at_limit(name):
            raise state.refused(name, "model")
        error = app.refuses_outright()  # before the tensors are decoded
        if error is not None:
            raise problem_from(error, name, debug=state.debug)
        begun = _decoded(state, app, inputs)
        admission = None
        if reserved is None:
            admission = state.admit(name)
            if admission is None:  # the bound was reached while the tensors were decoded
                raise state.refused(name, "model")
        coalescer = state.coalescers.get(name) if timeout is None else None
        try:
            if coalescer is not None:
                begun.future = coalescer.run_timed(begun.table)
            else:
                begun.future = run_admitted(state, app, begun.table, timeout, arrived)
        except BaseException as error:
            if admission is not None:
                state.in_flight[name].release(admission)
            if isinstance(error, AppStopping):
                raise HTTPProblem(503, str(error), headers={"Retry-After": "1"}) from None
            raise
        return begun, admission

    async def _outcome_of(self, name: str, begun: Begun) -> Outcome:
        """Await the run `begun` started: (its output, when its first stage began)."""
        future = begun.future
        try:
            if not isinstance(future, Future):  # the coalescer's coroutine
                return await future
            try:
                return await _outcome(future, lag=self.state.delivery), getattr(
                    future, "began", None
                )
            except asyncio.CancelledError:
                future.cancel()  # the client went away: its workers drop the request
                raise
        except AppStopping as error:
            raise HTTPProblem(503, str(error), headers={"Retry-After": "1"}) from None
        except (asyncio.CancelledError, _Disconnected, HTTPProblem):
            raise
        except Exception as error:
            problem = problem_from(error, name, debug=self.state.debug)
            if problem.status == 422:  # the protocol's status for a bad request
                problem.status = 400
            raise problem from None

    def _output_tensors(
        self, name: str, output: Table, wanted: Sequence[str]
    ) -> list[OutputTensor]:
        columns = output.columns
        if wanted:
            missing = [n for n in wanted if n not in columns]
            if missing:
                raise HTTPProblem(
                    400, f"model {name!r} has no output {missing[0]!r} (outputs: {columns})"
                )
            columns = list(wanted)
        seen = self.seen[name]["outputs"]
        try:
            return [
                tensor_from_column(c, output.column(c), seen.get(c, ("BYTES", ()))[0])
                for c in columns
            ]
        except OutputError as error:
            raise HTTPProblem(500, str(error)) from None


# --- HTTP --------------------------------------------------------------------------


def _parameters(obj: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    parameters = obj.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise HTTPProblem(400, f'{where}: "parameters" must be an object')
    return parameters


def _flag(parameters: Mapping[str, Any], name: str, where: str) -> bool | None:
    """A boolean parameter (None: not given)."""
    value = parameters.get(name)
    if value is not None and not isinstance(value, bool):
        raise HTTPProblem(400, f"{where}: parameter {name} must be true or false, got {value!r}")
    return value


def parse_infer_request(
    body: bytes, header_length: str | None, limits: Limits
) -> tuple[dict[str, Any], list[InputTensor], list[RequestedOutput]]:
    """An HTTP inference request: (the JSON object, inputs, requested outputs).
    With `header_length` (Inference-Header-Content-Length) the JSON is that many
    leading bytes and binary tensor data follows, in input order. The JSON is held to
    `limits` as a `/v1` body is (HTTPProblem 413); the tensors' shapes are checked
    later, by `V2Models.infer`."""
    if header_length is None:
        head, binary = memoryview(body), memoryview(b"")
    else:
        digits = header_length.isascii() and header_length.isdigit()  # not "²": int() fails
        if not digits or int(header_length) > len(body):
            raise HTTPProblem(
                400,
                f"Inference-Header-Content-Length {header_length!r} is not a length within "
                f"the body of {len(body)} bytes",
            )
        cut = int(header_length)
        head, binary = memoryview(body)[:cut], memoryview(body)[cut:]
    try:
        request = loads(head)
        if check_json_limits(request, limits) and orjson is not None:
            request = json.loads(bytes(head))  # orjson rounds integers over 64 bits
    except LimitExceeded as error:
        raise HTTPProblem(413, str(error)) from None
    except RecursionError:  # the standard library recurses per level
        raise HTTPProblem(413, "JSON nested too deep to parse (--max-depth)") from None
    except (ValueError, UnicodeDecodeError) as error:  # (orjson's and json's errors)
        if "depth limit" in str(error):  # orjson stops at 1,024 levels
            message = f"JSON nested too deep to parse: {error} (--max-depth)"
            raise HTTPProblem(413, message) from None
        raise HTTPProblem(400, f"malformed JSON: {error}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise HTTPProblem(400, 'the body must be a JSON object with an "inputs" list')
    inputs, offset = [], 0
    for index, raw in enumerate(request["inputs"]):
        where = f"input {index}"
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise HTTPProblem(400, f'{where} must be an object with a "name"')
        where = f"input {raw['name']!r}"
        datatype, shape = raw.get("datatype"), raw.get("shape")
        if datatype not in DATATYPES:
            raise HTTPProblem(
                400, f"{where}: datatype {datatype!r} is not one of {', '.join(DATATYPES)}"
            )
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise HTTPProblem(400, f"{where}: shape must be a list of non-negative integers")
        size = _parameters(raw, where).get("binary_data_size")
        if "data" in raw and not isinstance(raw["data"], list):
            raise HTTPProblem(400, f'{where}: "data" must be a list')
        if size is not None:
            if "data" in raw:
                raise HTTPProblem(400, f'{where} has both "data" and binary_data_size')
            if (
                not isinstance(size, int)
                or isinstance(size, bool)
                or size < 0
                or (offset + size > len(binary))
            ):
                raise HTTPProblem(
                    400,
                    f"{where}: binary_data_size {size!r} runs past the {len(binary)} bytes "
                    "of binary data",
                )
            data: bytes | list[Any] = bytes(binary[offset : offset + size])
            offset += size
        elif "data" in raw:
            data = raw["data"]
        else:
            raise HTTPProblem(400, f'{where} has no "data" list and no binary_data_size')
        inputs.append(InputTensor(raw["name"], datatype, tuple(shape), data))
    if offset != len(binary):
        raise HTTPProblem(400, f"{len(binary) - offset} bytes of binary data belong to no input")
    default_binary = _flag(_parameters(request, "request"), "binary_data_output", "request")
    wanted = request.get("outputs")
    if wanted is not None and not isinstance(wanted, list):
        raise HTTPProblem(400, '"outputs" must be a list')
    if not isinstance(request.get("id"), str | None):
        raise HTTPProblem(400, '"id" must be a string')
    outputs = []
    for raw in wanted or []:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise HTTPProblem(400, 'each of "outputs" must be an object with a "name"')
        where = f"output {raw['name']!r}"
        binary_data = _flag(_parameters(raw, where), "binary_data", where)
        binary = default_binary if binary_data is None else binary_data
        outputs.append(RequestedOutput(raw["name"], bool(binary)))
    return request, inputs, outputs


def _timeout_parameter(request: Mapping[str, Any]) -> float | None:
    """Triton's "timeout" request parameter (microseconds), in seconds."""
    micros = _parameters(request, "request").get("timeout")
    if micros is None:
        return None
    if not isinstance(micros, int) or isinstance(micros, bool) or not 0 < micros < 2**63:
        raise HTTPProblem(
            400, f"parameter timeout must be a positive 64-bit integer (µs), got {micros!r:.40}"
        )
    return micros / 1e6


def encode_infer_response(
    name: str,
    request_id: str | None,
    tensors: Sequence[OutputTensor],
    binary: Mapping[str, bool],
) -> tuple[bytes, dict[str, str]]:
    """The HTTP response body and headers: JSON, followed by binary data for the
    outputs `binary` marks (with Inference-Header-Content-Length)."""
    outputs, chunks = [], []
    for tensor in tensors:
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if binary.get(tensor.name, False):
            raw = tensor.raw()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            try:
                entry["data"] = tensor.json_data()
            except OutputError as error:
                raise HTTPProblem(500, str(error)) from None
        outputs.append(entry)
    response: dict[str, Any] = {"model_name": name, "model_version": VERSION, "outputs": outputs}
    if request_id:
        response["id"] = request_id
    head = encode_json(response)
    if not chunks:
        return head, {"content-type": JSON}
    headers = {"content-type": BINARY, HEADER_LENGTH: str(len(head))}
    return b"".join([head, *chunks]), headers


@dataclass(eq=False)
class Begun:
    """An inference decoded and started: its table, its run (a concurrent future, or
    the coalescer's coroutine), and the times `V2Models.statistics` splits it by."""

    table: Table
    began_ns: int  # perf_counter_ns: decoding began ...
    decoded_ns: int  # ... and ended
    queued_from: float  # time.monotonic, the runtime's clock (its `began`)
    future: Any = None
    request: Any = None  # at the door: the request's JSON object, its inputs and the
    inputs: Sequence[InputTensor] = ()  # ... outputs it asked for, which its answer
    requested: Sequence[RequestedOutput] = ()  # ... needs (`V2HTTP._infer`)


class Reserved(NamedTuple):
    """An inference the HTTP protocol admitted (serving.shedding): when its headers
    were parsed, and the run it started when it read the body (`infer_at_door`)."""

    parsed: float
    begun: Begun | None


def _decoded(state: ServingState, app: App, inputs: Sequence[InputTensor]) -> Begun:
    t0 = time.perf_counter_ns()
    try:
        table = Table(columns_from_tensors(inputs, app.plan.schema, state.limits))
    except TensorError as error:
        raise HTTPProblem(400, str(error)) from None
    except LimitExceeded as error:
        raise HTTPProblem(413, str(error)) from None
    return Begun(table, t0, time.perf_counter_ns(), time.monotonic())


def infer_at_door(
    state: ServingState,
    name: str,
    fields: Sequence[tuple[bytes, bytes]],
    body: bytes,
    parsed: float,
) -> Begun | None:
    """`run_at_door` for a V2 inference of model `name`, whole (headers `fields`,
    `body`): decoded and run from the HTTP parser's callback, so that a refusal is
    answered there. None, for anything but a run started (a bad body or header, the
    app stopping): the ASGI path takes it again and answers."""
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in fields}
    try:
        request, inputs, requested = parse_infer_request(
            body, headers.get(HEADER_LENGTH), state.limits
        )
        timeout = _timeout_s(headers.get(TIMEOUT_HEADER))
        if timeout is None:
            timeout = _timeout_parameter(request)
        app = state.apps[name]
        begun = _decoded(state, app, inputs)
        begun.future = run_admitted(state, app, begun.table, timeout, parsed)
    except Exception:  # answered, and logged if it must be, the ASGI way
        return None
    begun.request, begun.inputs, begun.requested = request, inputs, requested
    return begun


class V2HTTP:
    """The ASGI handler of every path under /v2 (the server routes them here before
    its router: this handler checks the token itself, health checks excepted)."""

    def __init__(self, models: V2Models) -> None:
        self.models = models

    async def __call__(
        self, scope: Any, receive: Any, send: Any, admitted: tuple[float, Any] | None = None
    ) -> None:
        """Answer a request under /v2; `admitted`: an inference the HTTP protocol
        admitted (its caller releases the slot): `Reserved`'s fields."""
        reserved = None if admitted is None else Reserved._make(admitted)
        parts = [p for p in scope["path"].split("/")[2:] if p]
        headers: dict[str, str] = {}
        for key, value in scope["headers"]:
            headers[key.decode("latin-1").lower()] = value.decode("latin-1")
        status, body, extra = 200, b"", {"content-type": JSON}
        try:
            token = self.models.state.token
            if token is not None and parts[:1] != ["health"]:
                reason = unauthorized(scope["headers"], token)
                if reason is not None:
                    raise HTTPProblem(
                        401,
                        reason,
                        headers={"www-authenticate": 'Bearer realm="serveflow"'},
                    )
            status, body, extra = await self._route(
                scope["method"], parts, headers, receive, reserved
            )
        except HTTPProblem as problem:
            status, body = problem.status, encode_json(problem.body())
            extra = {"content-type": JSON, **{k.lower(): v for k, v in problem.headers.items()}}
        except _Disconnected:
            return
        raw_headers = [(k.encode(), v.encode()) for k, v in extra.items()]
        raw_headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": body})

    async def _route(
        self,
        method: str,
        parts: list[str],
        headers: Mapping[str, str],
        receive: Any,
        reserved: Reserved | None = None,
    ) -> tuple[int, bytes, dict[str, str]]:
        models = self.models
        version = None
        if len(parts) >= 4 and parts[0] == "models" and parts[2] == "versions":
            version = parts[3]
            parts = parts[:2] + parts[4:]
        match parts:
            case []:
                _allow(method, "GET")
                return _ok(models.server_metadata())
            case ["health", "live"]:
                _allow(method, "GET")
                return _ok({"live": True})
            case ["health", "ready"]:
                _allow(method, "GET")
                ready = models.ready()
                return _ok({"ready": ready}, 200 if ready else 503)
            case ["models", "stats"]:
                _allow(method, "GET")
                return _ok(models.statistics())
            case ["repository", "index"]:
                _allow(method, "POST", "GET")
                return _ok(models.repository_index())
            case ["models", name]:
                _allow(method, "GET")
                return _ok(models.metadata(name, version))
            case ["models", name, "ready"]:
                _allow(method, "GET")
                models.app(name, version)
                ready = models.ready()
                return _ok({"name": name, "ready": ready}, 200 if ready else 503)
            case ["models", name, "config"]:
                _allow(method, "GET")
                return _ok(models.config(name, version))
            case ["models", name, "stats"]:
                _allow(method, "GET")
                return _ok(models.statistics(name, version))
            case ["models", name, "infer"]:
                _allow(method, "POST")
                return await self._infer(name, version, headers, receive, reserved)
        raise HTTPProblem(404, f"no V2 endpoint at /v2/{'/'.join(parts)}")

    async def _infer(
        self,
        name: str,
        version: str | None,
        headers: Mapping[str, str],
        receive: Any,
        reserved: Reserved | None,
    ) -> tuple[int, bytes, dict[str, str]]:
        models = self.models
        with models.measured(name):
            begun = reserved.begun if reserved is not None else None
            if begun is not None:
                request, inputs, requested = begun.request, begun.inputs, begun.requested
                timeout = None  # (the run has it)
            else:
                limits = models.state.limits
                whole = held_whole(receive)
                body = await _read_body(receive, headers.get("content-length", ""), limits)
                if reserved is not None and not whole:  # (else `_begin` takes it from now)
                    reserved = reserved._replace(parsed=whole_at(models.state, reserved.parsed))
                request, inputs, requested = parse_infer_request(
                    body, headers.get(HEADER_LENGTH), limits
                )
                timeout = _timeout_s(headers.get(TIMEOUT_HEADER))
                if timeout is None:
                    timeout = _timeout_parameter(request)
            outputs = [o.name for o in requested]
            work = models.infer(name, version, inputs, outputs, timeout, reserved)
            tensors = await _unless_disconnected(work, receive)
            default_binary = _parameters(request, "request").get("binary_data_output") is True
            binary = {t.name: default_binary for t in tensors}
            binary |= {o.name: o.binary for o in requested}
            request_id = request.get("id")
            content, extra = encode_infer_response(
                name, request_id if isinstance(request_id, str) else None, tensors, binary
            )
        return 200, content, extra


def _allow(method: str, *allowed: str) -> None:
    if method not in allowed and not (method == "HEAD" and "GET" in allowed):
        raise HTTPProblem(
            405, f"method {method} not allowed here (allowed: {', '.join(allowed)})",
            headers={"allow": ", ".join(allowed)},
        )  # fmt: skip


def _ok(data: Any, status: int = 200) -> tuple[int, bytes, dict[str, str]]:
    return status, encode_json(data), {"content-type": JSON}
