"""The Open Inference Protocol (V2) paths of /openapi.json: what `v2.V2HTTP` serves.

Every flow gets its own model paths (`/v2/models/{flow}/...`, and the same under
`/versions/{version}`), as it gets its own `/v1` paths. The bodies are pydantic models
turned into JSON Schema by `openapi.openapi_spec`, written to accept everything the
server accepts (extra fields and parameters included) and no more: a field of the
wrong type, a datatype outside the protocol's, a negative dimension is refused with 400.
JSON Schema cannot say that a tensor's data holds as many elements as its shape says,
nor which columns a flow needs: such a request matches the schema and is refused with
400 naming the input, which each flow's description lists.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from serveflow.runtime.app import App
from serveflow.serving.limits import Limits
from serveflow.serving.v2_tensors import DATATYPES, schema_datatype

Datatype = Literal[tuple(DATATYPES)]  # type: ignore[valid-type]
_OPEN = ConfigDict(extra="allow")  # the protocol lets clients add fields and parameters


class V2TensorParameters(BaseModel):
    model_config = _OPEN
    binary_data_size: int | None = Field(
        None, ge=0, description="the tensor's bytes follow the JSON (binary tensor data)"
    )


class V2InputTensor(BaseModel):
    """An input tensor: a column of the flow, its first dimension the rows."""

    model_config = _OPEN
    name: str
    datatype: Datatype
    shape: list[Annotated[int, Field(ge=0)]] = Field(
        description="rows first; each row a cell of the other dimensions"
    )
    parameters: V2TensorParameters | None = None
    data: list[Any] = Field(
        None,  # type: ignore[arg-type]  # absent, not null: binary_data_size instead
        description="row-major values, flat or nested (or binary_data_size instead); "
        "as many as the shape says",
    )


class V2OutputParameters(BaseModel):
    model_config = _OPEN
    binary_data: bool | None = Field(None, description="send this output as binary data")


class V2RequestedOutput(BaseModel):
    model_config = _OPEN
    name: str
    parameters: V2OutputParameters | None = None


class V2InferParameters(BaseModel):
    model_config = _OPEN
    binary_data_output: bool | None = Field(None, description="send every output as binary")
    timeout: int | None = Field(None, gt=0, description="deadline in microseconds")


class V2InferRequest(BaseModel):
    """An inference request: JSON, or JSON followed by binary tensor data (its length
    in Inference-Header-Content-Length)."""

    model_config = _OPEN
    id: str | None = None
    parameters: V2InferParameters | None = None
    inputs: list[V2InputTensor]
    outputs: list[V2RequestedOutput] | None = Field(
        None, description="the outputs wanted (default: every output column)"
    )


class V2OutputTensor(BaseModel):
    name: str
    datatype: Datatype
    shape: list[int]
    data: list[bool | int | float | str] | None = None
    parameters: V2TensorParameters | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[V2OutputTensor]


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2MetadataTensor(BaseModel):
    name: str
    datatype: str = Field(description='a V2 datatype, "" where any numeric one will do')
    shape: list[int] = Field(description="-1: any size")


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2MetadataTensor]
    outputs: list[V2MetadataTensor]


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool


class V2ModelReady(BaseModel):
    name: str
    ready: bool


class V2ConfigTensor(BaseModel):
    name: str
    data_type: str
    dims: list[int]


class V2ModelConfig(BaseModel):
    """Triton's model configuration (model_configuration extension)."""

    name: str
    platform: str
    backend: str
    max_batch_size: int
    input: list[V2ConfigTensor]
    output: list[V2ConfigTensor]
    parameters: dict[str, dict[str, str]]


class V2Duration(BaseModel):
    count: int
    ns: int


class V2InferenceStats(BaseModel):
    success: V2Duration
    fail: V2Duration
    queue: V2Duration
    compute_input: V2Duration
    compute_infer: V2Duration
    compute_output: V2Duration
    cache_hit: V2Duration
    cache_miss: V2Duration


class V2BatchStats(BaseModel):
    """Calls of the flow's stages that ran `batch_size` rows (every front's rows)."""

    batch_size: int
    compute_input: V2Duration = Field(description="merging the rows into one table")
    compute_infer: V2Duration = Field(description="the rest of the call")
    compute_output: V2Duration = Field(description="splitting the output per request")


class V2ModelStatistics(BaseModel):
    name: str
    version: str
    last_inference: int = Field(description="ms since the epoch")
    inference_count: int = Field(description="rows inferred")
    execution_count: int = Field(description="requests run")
    inference_stats: V2InferenceStats
    batch_stats: list[V2BatchStats]


class V2Statistics(BaseModel):
    """Triton's statistics extension."""

    model_stats: list[V2ModelStatistics]


class V2RepositoryModel(BaseModel):
    name: str
    version: str
    state: str


MODELS: list[type[BaseModel]] = [
    V2InferRequest, V2InferResponse, V2ServerMetadata, V2ModelMetadata, V2Live, V2Ready,
    V2ModelReady, V2ModelConfig, V2Statistics, V2RepositoryModel,
]  # fmt: skip


REF = "#/components/schemas/{model}"  # where the document keeps its models
# the deadline header every predict path takes (the JSON API's and V2's)
TIMEOUT_PARAMETER = {
    "name": "X-Request-Timeout-Ms",
    "in": "header",
    "required": False,
    "description": "deadline in milliseconds; past it the request fails with 504",
    "schema": {"type": "number", "exclusiveMinimum": 0},
}


def json_content(model: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": REF.format(model=model)}}}


def _responses(ok: dict[str, Any], *statuses: tuple[int, str]) -> dict[str, Any]:
    responses = {"200": ok}
    for status, description in statuses:
        responses[str(status)] = {"description": description, "content": json_content("Error")}
    return responses


def _operation(
    method: str,
    summary: str,
    responses: dict[str, Any],
    secured: bool,
    public: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """One operation; `public`: it never needs the token (health checks)."""
    if public:
        extra["security"] = []
    elif secured:
        responses = {**responses, "401": {"description": "missing or wrong bearer token",
                                          "content": json_content("Error")}}  # fmt: skip
    return {method: {"summary": summary, "responses": responses, **extra}}


def _ok(model: str, description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": json_content(model)}


def _inputs_text(app: App) -> str:
    schema = app.plan.schema or {}
    if not schema:
        return "The flow declares no input columns: any tensors are its columns."
    listed = ", ".join(
        f"`{column}` ({schema_datatype(kind) or 'any numeric datatype, cells of any shape'})"
        for column, kind in schema.items()
    )
    return f"Inputs (columns, first dimension the rows): {listed}."


# One row of a declared column, as a JSON tensor: (datatype, cell shape, value).
_EXAMPLE_CELLS: dict[Any, tuple[str, list[int], Any]] = {
    bool: ("BOOL", [], True),
    int: ("INT64", [], 1),
    float: ("FP64", [], 0.5),
    str: ("BYTES", [], "text"),
    bytes: ("BYTES", [], "bytes"),
    np.ndarray: ("FP32", [2], [1.0, 2.0]),
}


def _example(app: App) -> dict[str, Any] | None:
    """A one-row request of a flow whose columns are all declared with a type above."""
    schema = app.plan.schema or {}
    cells = [(column, _EXAMPLE_CELLS.get(kind)) for column, kind in schema.items()]
    if not cells or any(cell is None for _, cell in cells):
        return None
    inputs = [
        {"name": column, "datatype": datatype, "shape": [1, *shape], "data": [value]}
        for column, (datatype, shape, value) in cells  # type: ignore[misc]
    ]
    return {"inputs": inputs}


def _infer(name: str, app: App, limits: Limits, secured: bool) -> dict[str, Any]:
    header = {
        "name": "Inference-Header-Content-Length",
        "in": "header",
        "required": False,
        "description": "with binary tensor data: the length of the JSON that starts the body",
        "schema": {"type": "integer", "minimum": 0},
    }
    binary = {
        "description": "JSON and, after it, the outputs asked for as binary data",
        "headers": {
            "Inference-Header-Content-Length": {
                "description": "the length of the JSON that starts the body",
                "schema": {"type": "integer", "minimum": 0},
            }
        },
        "content": {
            **json_content("V2InferResponse"),
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
    responses = _responses(
        binary,
        (400, "malformed request, tensors that do not fit the flow (names the input)"),
        (413, f"over a request limit: body {limits.max_body_bytes:,} bytes, "
              f"{limits.max_elements:,} elements, {limits.max_rows:,} rows, decoded "
              f"{limits.max_decoded_bytes:,} bytes, strings {limits.max_string_chars:,}"),
        (500, "an operator failed (names the operator), or an output no tensor carries"),
        (503, "overloaded or shutting down; retry after Retry-After seconds"),
        (504, "the deadline passed"),
    )  # fmt: skip
    body: dict[str, Any] = {
        **json_content("V2InferRequest"),
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    }
    example = _example(app)
    if example is not None:
        body["application/json"] = {**body["application/json"], "example": example}
    return _operation(
        "post",
        f"V2 inference through flow {name!r}",
        responses,
        secured,
        description=f"{_inputs_text(app)} Outputs: the flow's output columns, or those "
        "asked for. Body: JSON, or JSON followed by binary tensor data "
        "(Inference-Header-Content-Length).",
        parameters=[header, TIMEOUT_PARAMETER],
        requestBody={"required": True, "content": body},
    )


def v2_paths(apps: Mapping[str, App], *, limits: Limits, secured: bool) -> dict[str, Any]:
    """The /v2 paths of a server deploying `apps`; their schemas are `MODELS`."""
    not_found = (404, "no such model version")
    index = {
        "description": "OK",
        "content": {"application/json": {"schema": {"type": "array", "items": {
            "$ref": "#/components/schemas/V2RepositoryModel"}}}},
    }  # fmt: skip
    paths: dict[str, Any] = {
        "/v2": _operation("get", "V2 server metadata: extensions served",
                          {"200": _ok("V2ServerMetadata")}, secured),
        "/v2/health/live": _operation("get", "V2 liveness", {"200": _ok("V2Live")}, secured,
                                      public=True),
        "/v2/health/ready": _operation(
            "get", "V2 readiness (503 while shutting down)",
            {"200": _ok("V2Ready"), "503": _ok("V2Ready", "shutting down")}, secured, public=True,
        ),
        "/v2/models/stats": _operation("get", "Statistics of every model (flow)",
                                       {"200": _ok("V2Statistics")}, secured),
        "/v2/repository/index": {
            **_operation("get", "The models (flows), all READY", {"200": index}, secured),
            **_operation("post", "The models (flows), all READY", {"200": index}, secured),
        },
    }  # fmt: skip
    version = {
        "name": "version",
        "in": "path",
        "required": True,
        "description": "every flow is version 1 of its model",
        "schema": {"type": "string", "enum": ["1"]},
    }
    for name in sorted(apps):
        app = apps[name]
        for base, extra in (
            (f"/v2/models/{name}", {}),
            (f"/v2/models/{name}/versions/{{version}}", {"parameters": [version]}),
        ):
            errors = (not_found,) if extra else ()
            ready = _ok("V2ModelReady", "ready")
            paths[base] = {
                **_operation("get", f"Metadata of model {name!r}: inputs and outputs",
                             _responses(_ok("V2ModelMetadata"), *errors), secured),
                **extra,
            }  # fmt: skip
            paths[f"{base}/ready"] = {
                **_operation(
                    "get", f"Whether model {name!r} is ready (503 while shutting down)",
                    {**_responses(ready, *errors), "503": _ok("V2ModelReady", "shutting down")},
                    secured,
                ),
                **extra,
            }  # fmt: skip
            paths[f"{base}/config"] = {
                **_operation("get", f"Triton's model configuration of {name!r}",
                             _responses(_ok("V2ModelConfig"), *errors), secured),
                **extra,
            }  # fmt: skip
            paths[f"{base}/stats"] = {
                **_operation("get", f"Triton's statistics of model {name!r}",
                             _responses(_ok("V2Statistics"), *errors), secured),
                **extra,
            }  # fmt: skip
            infer = _infer(name, app, limits, secured)
            if extra:
                infer["post"]["responses"]["404"] = {"description": not_found[1],
                                                     "content": json_content("Error")}  # fmt: skip
            paths[f"{base}/infer"] = {**infer, **extra}
    return paths
