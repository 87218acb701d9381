"""The OpenAPI 3.1 description of one server, served at /openapi.json.

Generated from what is deployed: each flow gets its own paths (`/v1`, and `/v2` from
`v2_openapi`: the Open Inference Protocol), and its predict
request body is a pydantic model built from the flow's schema (one typed property per
declared column, bounded by the server's `Limits`), turned into JSON Schema by pydantic.
Every status the server sends on a path is listed, 401 included when a token is set.
The `{"columns": ...}` form of a predict body is described in words only: JSON Schema
cannot say that the columns have equal lengths.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, create_model
from pydantic.json_schema import models_json_schema

import serveflow
from serveflow.runtime.app import App
from serveflow.serving import v2_openapi
from serveflow.serving.codecs import INT64_MIN, UINT64_MAX
from serveflow.serving.limits import Limits
from serveflow.serving.v2_openapi import REF, TIMEOUT_PARAMETER, json_content


class Error(BaseModel):
    """Every error response."""

    error: str = Field(description="what was wrong, naming the column or operator")
    column: str | None = Field(None, description="the column of an input error (422)")
    operator: str | None = Field(None, description="the operator that failed (500)")
    traceback: str | None = Field(None, description="only with --debug")


class PredictResponse(BaseModel):
    """The flow's output rows (numpy values as nested lists and numbers)."""

    rows: list[dict[str, Any]]


def _tensor_schema(depth: int) -> dict[str, Any]:
    """JSON for an `np.ndarray` column: (rectangular) nested lists of numbers, 1 to
    `depth` levels."""
    kinds = []
    schema: dict[str, Any] = {"type": "number"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
        kinds.append(schema)
    return {"anyOf": kinds}


def _column_type(expected: Any, limits: Limits) -> Any:
    """The JSON type of a column declared as `expected` in a flow's schema."""
    if isinstance(expected, tuple):
        return Union[tuple(_column_type(kind, limits) for kind in expected)]  # noqa: UP007
    if expected is bool:
        return bool
    if expected is int:
        return Annotated[int, Field(ge=INT64_MIN, le=UINT64_MAX)]
    if expected is float:
        return float
    if expected is str:
        return Annotated[str, Field(max_length=limits.max_string_chars)]
    if expected is np.ndarray:
        depth = max(1, min(4, limits.max_depth - 3))  # {"rows": [{"x": ...}]} is 3 deep
        return Annotated[Any, WithJsonSchema(_tensor_schema(depth))]
    return Any


def _model_name(flow: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", flow).strip("_") or "flow"


def predict_request_model(name: str, schema: Mapping[str, Any] | None, limits: Limits) -> type:
    """The pydantic model of a JSON predict body (`{"rows": [...]}`) for one flow."""
    columns = schema or {}
    fields: dict[str, Any] = {
        f"c{i}": (_column_type(kind, limits), Field(alias=column))
        for i, (column, kind) in enumerate(columns.items())
    }
    base = _model_name(name)
    row = create_model(
        f"{base}Row",
        __config__=ConfigDict(extra="allow", title=f"a row of flow {name!r}"),
        **fields,
    )
    rows = Annotated[list[row], Field(min_length=1, max_length=limits.max_rows)]  # type: ignore[valid-type]
    return create_model(f"{base}PredictRequest", rows=(rows, ...))


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": json_content("Error")}


def _get(summary: str, content: dict[str, Any], secured: bool) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": {"description": "OK", "content": content}}
    if secured:
        responses["401"] = _error("missing or wrong bearer token")
    return {"get": {"summary": summary, "responses": responses}}


def _predict(name: str, model: str, secured: bool, limits: Limits) -> dict[str, Any]:
    responses = {
        "200": {
            "description": "the flow's output rows",
            "content": {
                **json_content("PredictResponse"),
                "application/x-npz": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        "400": _error("malformed body (not JSON, not .npz) or a bad X-Request-Timeout-Ms"),
        "401": _error("missing or wrong bearer token"),
        "406": _error("the output cannot be sent as .npz (Accept: application/x-npz)"),
        "413": _error(
            f"over a request limit: body {limits.max_body_bytes:,} bytes, .npz inflated "
            f"{limits.max_decoded_bytes:,} bytes, {limits.max_elements:,} values, "
            f"nesting {limits.max_depth}, strings {limits.max_string_chars:,} characters, "
            f"{limits.max_rows:,} rows"
        ),
        "422": _error("wrong columns or types for the flow (names the column)"),
        "500": _error("an operator failed (names the operator)"),
        "503": _error("overloaded or shutting down; retry after Retry-After seconds"),
        "504": _error("the X-Request-Timeout-Ms deadline passed"),
    }
    if not secured:
        del responses["401"]
    return {
        "post": {
            "summary": f"Run one request through flow {name!r}",
            "description": (
                'Body: JSON `{"rows": [{column: value, ...}, ...]}` (below), or '
                '`{"columns": {column: [value, ...]}}` with columns of equal length, or an '
                "`.npz` archive (`numpy.savez`: one array per column, first axis = rows; "
                "loaded without pickle). The answer is JSON rows, or `.npz` with "
                "`Accept: application/x-npz`."
            ),
            "parameters": [TIMEOUT_PARAMETER],
            "requestBody": {
                "required": True,
                "content": {
                    **json_content(model),
                    "application/x-npz": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            "responses": responses,
        }
    }


def openapi_spec(apps: Mapping[str, App], *, limits: Limits, secured: bool) -> dict[str, Any]:
    """The spec of a server deploying `apps` with `limits`; `secured`: a token is set."""
    models: list[type[BaseModel]] = [Error, PredictResponse, *v2_openapi.MODELS]
    request_models = {}
    for name, app in apps.items():
        model = predict_request_model(name, app.plan.schema, limits)
        request_models[name] = model.__name__
        models.append(model)
    _, definitions = models_json_schema([(m, "validation") for m in models], ref_template=REF)
    json_object = {"application/json": {"schema": {"type": "object"}}}
    paths: dict[str, Any] = {
        "/v1/flows": _get(
            "Every flow: schema, SLO, explain() text, plan graph", json_object, secured
        ),
    }
    for name in sorted(apps):
        base = f"/v1/flows/{name}"
        paths[f"{base}/predict"] = _predict(name, request_models[name], secured, limits)
        paths[base] = _get(
            f"Flow {name!r}: schema, SLO, explain(), plan graph", json_object, secured
        )
        paths[f"{base}/stats"] = _get(
            f"Live per-stage figures of flow {name!r} and its end-to-end latency",
            json_object,
            secured,
        )
    text = {"text/plain": {"schema": {"type": "string"}}}
    paths["/metrics"] = _get("Prometheus metrics (text format)", text, secured)
    paths["/openapi.json"] = _get("This document", json_object, secured)
    paths.update(v2_openapi.v2_paths(apps, limits=limits, secured=secured))
    open_paths = {
        "/healthz": {"summary": "Liveness", "responses": {"200": {"description": "alive"}}},
        "/readyz": {
            "summary": "Readiness (503 while shutting down)",
            "responses": {"200": {"description": "ready"}, "503": _error("draining")},
        },
        "/": {
            "summary": "Live dashboard (HTML; with a token, open /#token=TOKEN)",
            "responses": {"200": {"description": "the page", "content": {"text/html": {}}}},
        },
    }
    for path, operation in open_paths.items():
        paths[path] = {"get": {**operation, "security": []}}
    spec: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "serveflow", "version": serveflow.__version__},
        "components": {"schemas": definitions.get("$defs", {})},
        "paths": paths,
    }
    if secured:
        spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        spec["security"] = [{"bearer": []}]
    return spec
