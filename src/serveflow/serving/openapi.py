"""The OpenAPI 3.1 description of the HTTP API, served at /openapi.json."""

from __future__ import annotations

from typing import Any

import serveflow


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def openapi_spec(flow_names: list[str]) -> dict[str, Any]:
    """The spec; `flow_names` are listed as the allowed values of `{name}`."""
    name_param = {
        "name": "name",
        "in": "path",
        "required": True,
        "description": "flow name (the Flow's `name`)",
        "schema": {"type": "string", "enum": flow_names},
    }
    json_text = {"application/json": {"schema": {"type": "object"}}}
    predict = {
        "summary": "Run one request through a flow",
        "description": (
            "Body: JSON rows or columns, or a `.npz` archive (numpy.savez: one array per "
            "column, first axis = rows; loaded without pickle). The response is JSON rows, "
            "or `.npz` with `Accept: application/x-npz`."
        ),
        "parameters": [
            name_param,
            {
                "name": "X-Request-Timeout-Ms",
                "in": "header",
                "required": False,
                "description": "deadline in milliseconds; past it the request fails with 504",
                "schema": {"type": "number", "exclusiveMinimum": 0},
            },
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}},
                "application/x-npz": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        "responses": {
            "200": {
                "description": "the flow's output rows",
                "content": {
                    "application/json": {
                        "schema": {"$ref": "#/components/schemas/PredictResponse"}
                    },
                    "application/x-npz": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            "400": _error("malformed body (not JSON / not .npz) or bad timeout header"),
            "401": _error("missing or wrong bearer token"),
            "404": _error("no flow with that name"),
            "406": _error("the output cannot be encoded as .npz"),
            "413": _error("body over the size limit"),
            "422": _error("wrong columns or types for the flow (names the column)"),
            "500": _error("an operator failed (names the operator)"),
            "503": _error("overloaded; retry after the Retry-After header's seconds"),
            "504": _error("the X-Request-Timeout-Ms deadline passed"),
        },
    }

    def get(summary: str, content: dict[str, Any], *params: dict[str, Any]) -> dict[str, Any]:
        op: dict[str, Any] = {
            "summary": summary,
            "responses": {"200": {"description": "OK", "content": content}},
        }
        if params:
            op["parameters"] = list(params)
            op["responses"]["404"] = _error("no flow with that name")
        return {"get": op}

    return {
        "openapi": "3.1.0",
        "info": {"title": "serveflow", "version": serveflow.__version__},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {"type": "string"},
                        "column": {"type": ["string", "null"]},
                        "operator": {"type": "string"},
                        "traceback": {"type": "string", "description": "only with --debug"},
                    },
                },
                "PredictRequest": {
                    "oneOf": [
                        {
                            "type": "object",
                            "required": ["rows"],
                            "properties": {"rows": {"type": "array", "items": {"type": "object"}}},
                        },
                        {
                            "type": "object",
                            "required": ["columns"],
                            "properties": {
                                "columns": {
                                    "type": "object",
                                    "additionalProperties": {"type": "array"},
                                }
                            },
                        },
                    ]
                },
                "PredictResponse": {
                    "type": "object",
                    "properties": {"rows": {"type": "array", "items": {"type": "object"}}},
                },
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/flows/{name}/predict": {"post": predict},
            "/v1/flows": get("Every flow: schema, SLO, explain() text and plan graph", json_text),
            "/v1/flows/{name}": get("One flow's description", json_text, name_param),
            "/v1/flows/{name}/stats": get(
                "Live per-stage figures (app.stats()) and end-to-end latency",
                json_text,
                name_param,
            ),
            "/healthz": {
                "get": {
                    "summary": "Liveness",
                    "security": [],
                    "responses": {"200": {"description": "alive"}},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness (503 while shutting down)",
                    "security": [],
                    "responses": {"200": {"description": "ready"}, "503": _error("draining")},
                }
            },
            "/metrics": get("Prometheus metrics", {"text/plain": {"schema": {"type": "string"}}}),
            "/openapi.json": get("This document", json_text),
            "/": {
                "get": {
                    "summary": "Live dashboard (HTML)",
                    "security": [],
                    "responses": {"200": {"description": "the page", "content": {"text/html": {}}}},
                }
            },
        },
    }
