"""The Starlette application: routes of the HTTP API over deployed flows.

POST /v1/flows/{name}/predict   JSON rows/columns or .npz in, rows out (see codecs)
GET  /v1/flows                  every flow: schema, SLO, explain(), plan graph
GET  /v1/flows/{name}           one flow, the same fields
GET  /v1/flows/{name}/stats     live per-stage and end-to-end figures (the dashboard's)
GET  /healthz /readyz /metrics /openapi.json /   (health, readiness, Prometheus, spec,
                                                  dashboard)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from serveflow.runtime.app import App
from serveflow.serving.auth import BearerAuth
from serveflow.serving.codecs import (
    JSON,
    DecodeError,
    EncodeError,
    ShapeError,
    decode_table,
    encode_json,
    encode_table,
)
from serveflow.serving.dashboard import PAGE
from serveflow.serving.describe import flow_info
from serveflow.serving.errors import HTTPProblem, problem_from
from serveflow.serving.metrics import UNKNOWN_FLOW, ServingMetrics
from serveflow.serving.openapi import openapi_spec

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
TIMEOUT_HEADER = "x-request-timeout-ms"
_OFFLOAD_BYTES = 256 * 1024  # decode/encode bigger bodies off the event loop


class ServingState:
    """What the handlers share: the deployments, metrics and settings of one server."""

    def __init__(
        self,
        apps: Mapping[str, App],
        *,
        token: str | None,
        debug: bool,
        max_body_bytes: int,
        stop_apps: bool,
    ) -> None:
        self.apps = dict(apps)
        self.metrics = ServingMetrics(self.apps)
        self.token = token
        self.debug = debug
        self.max_body_bytes = max_body_bytes
        self.stop_apps = stop_apps
        self.draining = False  # set when shutdown starts: /readyz answers 503


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(encode_json(data), status_code=status, media_type=JSON, headers=headers)


def _problem_response(problem: HTTPProblem) -> Response:
    return _json(problem.body(), problem.status, problem.headers)


def _state(request: Request) -> ServingState:
    return request.app.state.serving


def _app_or_404(state: ServingState, name: str) -> App:
    app = state.apps.get(name)
    if app is None:
        known = ", ".join(sorted(state.apps)) or "none"
        raise HTTPProblem(404, f"no flow named {name!r} (flows: {known})")
    return app


async def _read_body(request: Request, limit: int) -> bytes:
    too_big = HTTPProblem(413, f"request body over the limit of {limit} bytes")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _timeout_s(request: Request) -> float | None:
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        ms = float(raw)
    except ValueError:
        ms = -1.0
    if not ms > 0 or ms == float("inf"):
        raise HTTPProblem(400, f"X-Request-Timeout-Ms must be a positive number, got {raw!r}")
    return ms / 1e3


async def _off_loop_if_big(size: int, fn: Any, *args: Any) -> Any:
    if size > _OFFLOAD_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


async def predict(request: Request) -> Response:
    state = _state(request)
    name = request.path_params["name"]
    label = name if name in state.apps else UNKNOWN_FLOW
    started = time.perf_counter()
    status = 500
    state.metrics.in_flight.labels(label).inc()
    try:
        response = await _predict(state, request, name)
        status = response.status_code
        return response
    except HTTPProblem as problem:
        status = problem.status
        if status == 503:
            state.metrics.shed.labels(label).inc()
        return _problem_response(problem)
    finally:
        state.metrics.in_flight.labels(label).dec()
        state.metrics.observe(label, status, time.perf_counter() - started)


async def _predict(state: ServingState, request: Request, name: str) -> Response:
    app = _app_or_404(state, name)
    timeout = _timeout_s(request)
    body = await _read_body(request, state.max_body_bytes)
    content_type = request.headers.get("content-type", JSON)
    try:
        table = await _off_loop_if_big(len(body), decode_table, body, content_type, app.plan.schema)
    except DecodeError as error:
        raise HTTPProblem(400, str(error)) from None
    except ShapeError as error:
        raise HTTPProblem(422, str(error)) from None
    try:
        future = app.run(table, timeout=timeout)
    except RuntimeError as error:  # the app is stopping
        raise HTTPProblem(503, str(error), headers={"Retry-After": "1"}) from None
    try:
        output = await asyncio.wrap_future(future)
    except Exception as error:
        raise problem_from(error, name, debug=state.debug) from None
    accept = request.headers.get("accept", JSON)
    try:
        content, media = await _off_loop_if_big(len(body), encode_table, output, accept)
    except EncodeError as error:
        raise HTTPProblem(406 if "npz" in accept else 500, str(error)) from None
    return Response(content, media_type=media)


async def list_flows(request: Request) -> Response:
    state = _state(request)
    return _json({"flows": [flow_info(app) for app in state.apps.values()]})


async def get_flow(request: Request) -> Response:
    state = _state(request)
    try:
        return _json(flow_info(_app_or_404(state, request.path_params["name"])))
    except HTTPProblem as problem:
        return _problem_response(problem)


async def flow_stats(request: Request) -> Response:
    state = _state(request)
    name = request.path_params["name"]
    try:
        app = _app_or_404(state, name)
    except HTTPProblem as problem:
        return _problem_response(problem)
    return _json(
        {
            "flow": name,
            "time": time.time(),
            "http": state.metrics.http_summary(name),
            "stages": app.stats(),
        }
    )


async def healthz(request: Request) -> Response:
    return _json({"status": "ok"})


async def readyz(request: Request) -> Response:
    state = _state(request)
    if state.draining:
        return _json({"error": "shutting down", "status": "draining"}, 503)
    return _json({"status": "ready", "flows": sorted(state.apps)})


async def metrics(request: Request) -> Response:
    state = _state(request)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def openapi(request: Request) -> Response:
    return _json(openapi_spec(sorted(_state(request).apps)))


async def dashboard(request: Request) -> Response:
    return HTMLResponse(PAGE)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _json({"error": exc.detail}, exc.status_code, exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error serving %s", request.url.path, exc_info=exc)
    return _json({"error": f"internal server error: {type(exc).__name__}"}, 500)


def create_app(
    apps: Mapping[str, App],
    *,
    token: str | None = None,
    debug: bool = False,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    stop_apps: bool = True,
) -> Starlette:
    """An ASGI app serving `apps` (flow name -> deployed App).

    `token`: require `Authorization: Bearer <token>` except on /healthz, /readyz and
    the static dashboard page. `debug`: include tracebacks in 500 responses.
    `stop_apps`: stop (drain) every app when the ASGI lifespan ends.
    """
    state = ServingState(
        apps, token=token, debug=debug, max_body_bytes=max_body_bytes, stop_apps=stop_apps
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        state.draining = True
        if state.stop_apps:
            for app in state.apps.values():
                await asyncio.to_thread(app.stop)

    routes = [
        Route("/", dashboard, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/v1/flows", list_flows, methods=["GET"]),
        Route("/v1/flows/{name}", get_flow, methods=["GET"]),
        Route("/v1/flows/{name}/stats", flow_stats, methods=["GET"]),
        Route("/v1/flows/{name}/predict", predict, methods=["POST"]),
    ]
    middleware = [Middleware(BearerAuth, token=token)] if token else []
    asgi = Starlette(
        debug=False,  # our own JSON errors; --debug only adds tracebacks to them
        routes=routes,
        middleware=middleware,
        exception_handlers={HTTPException: _http_exception, Exception: _internal_error},
        lifespan=lifespan,
    )
    asgi.state.serving = state
    return asgi
