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
import dataclasses
import logging
import math
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from serveflow.logical.table import Table
from serveflow.runtime.app import App
from serveflow.serving.auth import BearerAuth, unauthorized
from serveflow.serving.coalesce import AppStopping, Coalescer, coalescable
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
from serveflow.serving.errors import RETRY_AFTER_S, HTTPProblem, problem_from
from serveflow.serving.inflight import Admission, InFlightLimit
from serveflow.serving.limits import LimitExceeded, Limits
from serveflow.serving.metrics import PREDICT_ROUTE, UNKNOWN_FLOW, ServingMetrics, route_of
from serveflow.serving.openapi import openapi_spec

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = Limits().max_body_bytes
TIMEOUT_HEADER = "x-request-timeout-ms"
OFFLOAD_BYTES = 256 * 1024  # decode/encode bigger bodies off the event loop


class ServingState:
    """What the handlers share: the deployments, metrics and settings of one server."""

    def __init__(
        self,
        apps: Mapping[str, App],
        *,
        token: str | None,
        debug: bool,
        limits: Limits,
        stop_apps: bool,
        max_in_flight: int | None = None,
        coalesce: bool = True,
        adaptive: bool = True,
    ) -> None:
        self.apps = dict(apps)
        # Requests of row-by-row flows arriving together run as one runtime request.
        self.coalescers = {
            name: Coalescer(app)
            for name, app in self.apps.items()
            if coalesce and coalescable(app.plan)
        }
        # Flows whose requests the shedding protocol runs as soon as it has read them
        # whole (`run_at_door`), so that a refusal is answered there, without a task.
        self.doors = {
            name
            for name, app in self.apps.items()
            if app.sheds_at_once and name not in self.coalescers
        }
        self.metrics = ServingMetrics(self.apps)
        self.token = token
        self.debug = debug
        self.limits = limits
        self.max_body_bytes = limits.max_body_bytes
        self.stop_apps = stop_apps
        # Admission at the HTTP layer: past its bound of admitted requests (at most
        # `max_in_flight`, lower while they queue unless `adaptive` is False), a request
        # of a flow is refused (503) before its body is decoded or the runtime sees it.
        self.max_in_flight = max_in_flight
        self.in_flight = {  # event-loop only
            name: InFlightLimit(max_in_flight or sys.maxsize, adaptive and bool(max_in_flight))
            for name in self.apps
        }
        # the server's open HTTP connections (uvicorn's set), once the shedding
        # protocol has seen one; None: not counted (another HTTP implementation)
        self.connections: Collection[object] | None = None
        limit_message = (
            "flow {!r} has as many requests in flight as it admits now (at most {}); retry later"
        )
        self.refusal_body = {
            name: encode_json({"error": limit_message.format(name, max_in_flight)})
            for name in self.apps
        }
        self.refusal = {name: refusal_headers(body) for name, body in self.refusal_body.items()}
        self.draining = False  # set when shutdown starts: /readyz answers 503
        self.openapi: bytes | None = None  # the spec, once asked for
        self.delivery = DeliveryLag()  # event-loop only
        self.turns = LoopTurns()  # event-loop only
        self.v2_models: Any = None  # serving.v2.V2Models, once made

    def crowded(self, name: str) -> bool:
        """Whether more HTTP connections are open than flow `name`'s ceiling (then its
        in-flight bound is the adapted one); always, when they are not counted."""
        connections = self.connections
        return connections is None or len(connections) > self.in_flight[name].ceiling

    def at_limit(self, name: str) -> bool:
        """Whether flow `name` (deployed) has as many requests admitted as it takes."""
        bound = self.in_flight.get(name)
        return bound is not None and bound.admitted >= bound.bound(self.crowded(name))

    def admit(self, name: str) -> Admission | None:
        """Count a request of flow `name` in (release it with `in_flight[name]`), or
        None: refuse it."""
        return self.in_flight[name].admit(self.crowded(name))

    def shed_outright(self, name: str) -> bytes | None:
        """The body of the 503 a request of flow `name` gets now whatever it holds: an
        SLO batching stage sheds every arrival until a later moment
        (`App.refuses_outright`, which counts it); None when only running it tells."""
        app = self.apps.get(name)
        error = None if app is None else app.refuses_outright()
        return None if error is None else encode_json({"error": str(error)})

    def answered_early(self, name: str, route: str, status: int) -> None:
        """Count an answer the HTTP protocol wrote itself (no task: a 503, a 408) to a
        request of flow `name` on `route`: by flow and status, by route, as shed."""
        metrics = self.metrics.flow(name)
        metrics.count(status)
        if status == 503:
            metrics.shed.inc()
        self.metrics.count_response(route, status)

    def refused(self, name: str, model: str = "flow") -> HTTPProblem:
        """The 503 of a request of `name` refused at its in-flight bound."""
        bound = self.in_flight[name]
        return HTTPProblem(
            503,
            f"{model} {name!r} has {bound.admitted} requests in flight, as many as it admits "
            f"now (at most {bound.ceiling}); retry later",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )


def refusal_headers(body: bytes) -> list[tuple[bytes, bytes]]:
    """The headers of a 503 refusal with `body`."""
    return [
        (b"content-type", JSON.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(RETRY_AFTER_S).encode()),
    ]


def with_body_limit(limits: Limits, max_body_bytes: int | None) -> Limits:
    """`limits` with `max_body_bytes` replaced when it is given."""
    if max_body_bytes is None:
        return limits
    return dataclasses.replace(limits, max_body_bytes=max_body_bytes)


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


class _Disconnected(Exception):
    """The client went away before its request body was read."""


def stalled(limits: Limits) -> str:
    """The error of a request whose body stalled past `limits.body_timeout_s` (408)."""
    return f"request body stalled: no byte of it for {limits.body_timeout_s:g} s (--body-timeout)"


async def _read_body(receive: Receive, length: str, limits: Limits) -> bytes:
    """The body, read within `limits` (413 past its size, 408 when it stalls). A body
    uvicorn has read whole already (its request cycle says so: the usual prediction,
    read with its headers) is taken without a timer, which cost 2-5 us a request."""
    limit, wait = limits.max_body_bytes, limits.body_timeout_s
    if length.isdigit() and int(length) > limit:
        raise _too_big(limit)
    if held_whole(receive):
        return await _chunks(receive, limit)
    clock = asyncio.get_running_loop().time
    try:
        async with asyncio.timeout(wait) as stall:
            return await _chunks(receive, limit, lambda: stall.reschedule(clock() + wait))
    except TimeoutError:
        raise HTTPProblem(408, stalled(limits), headers={"Connection": "close"}) from None


def held_whole(receive: Receive) -> bool:
    """Whether uvicorn holds the request's whole body already (its cycle says so)."""
    return getattr(getattr(receive, "__self__", None), "more_body", True) is False


def whole_at(state: ServingState, arrived: float) -> float:
    """When a request whose body came after its headers (chunked, large, or sent once
    the server said to) was read whole, by the turns of the loop: its SLO counts from
    then, not from its headers (`arrived`), as at the door (`serving.shedding`)."""
    return max(arrived, state.turns.since(time.monotonic()))


def _too_big(limit: int) -> HTTPProblem:
    return HTTPProblem(413, f"request body over the limit of {limit:,} bytes (--max-body-mb)")


async def _chunks(receive: Receive, limit: int, more: Callable[[], None] | None = None) -> bytes:
    """The body's chunks, joined; `more` is called after each chunk but the last."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_big(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if more is not None:
            more()


def _timeout_s(raw: str | None) -> float | None:
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
    if size > OFFLOAD_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


# How long an answer waits for the event loop, from the runtime settling its future to
# its handler running again: LAG_QUANTILE of the answers of the last LAG_WINDOW_S (at
# most LAG_KEPT), taken again every LAG_EVERY answers or LAG_EVERY_S. The median: at
# 200 connections (see `DeliveryLag`), counting none left 1.9-4.1% of the answers late,
# the 90th percentile 1.0-6.8% (and one run answered a quarter as many), the median
# 1.8-2.4% (3 runs each).
LAG_QUANTILE = 0.5
LAG_WINDOW_S = 1.0
LAG_KEPT = 512
LAG_EVERY = 32
LAG_EVERY_S = 0.1


class DeliveryLag:
    """What an answer waits for the event loop after its future settles. Under load
    the loop parses and admits many requests a turn, and an answer waits behind them
    for two turns (its wake-up, then its handler): at 200 connections in a closed loop
    (`wrk`) against `serveflow serve` with one SLO stage (100 ms; 2 + 0.5 ms per row, 2
    workers), 10-20 ms at the median, 55-90 ms at the 99th percentile, and 2.8-7.2% of
    the answers took over 100 ms in the server though the stage's own p99 was within
    it. A request's admission counts `typical` in its latency, with the time it spent
    in the server before `App.run` (see `run_admitted`): 1.2-2.5% (6 runs each), as many
    answered within the SLO a second."""

    def __init__(self) -> None:
        self.typical = 0.0
        self._lags: deque[tuple[float, float]] = deque(maxlen=LAG_KEPT)  # (when, lag)
        self._new = 0
        self._taken_at = -math.inf

    def observe(self, now: float, lag: float) -> None:
        self._lags.append((now, lag))
        self._new += 1
        if self._new >= LAG_EVERY or now - self._taken_at >= LAG_EVERY_S:
            self._take(now)

    def expected(self, now: float) -> float:
        """`typical`, taken again first if older than LAG_EVERY_S (the loop went quiet)."""
        if now - self._taken_at >= LAG_EVERY_S:
            self._take(now)
        return self.typical

    def _take(self, now: float) -> None:
        lags = sorted(lag for when, lag in self._lags if when >= now - LAG_WINDOW_S)
        self.typical = lags[int(LAG_QUANTILE * (len(lags) - 1))] if lags else 0.0
        self._new, self._taken_at = 0, now


class LoopTurns:
    """When the event loop's turns begin, while requests keep it busy: a request read
    in one turn came after the reads of the one before, so it may have waited unread
    since that turn began. Under `hey -c 100 -q 30` (3,000 requests/s in bursts of
    100) against one SLO stage (30 ms; 4 + 1 ms per row, 2 workers), refusals, answered
    as they were read (`run_at_door`), took 6.6 ms at the median and 16 ms at the 99th
    percentile on the wire (tcpdump), none of it seen by the server: the answers' p99
    was 0.83x the SLO in the server, 1.66x on the wire; counted from `since` (the
    shedding protocol's `arrived`), 1.03x on the wire. A callback marks each turn's
    start, and stops marking after a turn that read nothing (an idle loop would spin
    on it)."""

    def __init__(self) -> None:
        self.current = self.previous = -math.inf
        self.ticking = False
        self.read = False  # a request was read since the last mark

    def reading(self, loop: asyncio.AbstractEventLoop) -> None:
        """A request is being read (from the protocol's read callback)."""
        self.read = True
        if not self.ticking:
            self.ticking = True
            self.current = self.previous = time.monotonic()  # read at once: idle till now
            loop.call_soon(self._mark, loop)

    def _mark(self, loop: asyncio.AbstractEventLoop) -> None:
        self.previous, self.current = self.current, time.monotonic()
        if self.read:
            self.read = False
            loop.call_soon(self._mark, loop)
        else:
            self.ticking = False

    def since(self, now: float) -> float:
        """The earliest a request read now may have come: as the previous turn began."""
        return min(self.previous, now) if self.ticking else now


def run_admitted(
    state: ServingState, app: App, table: Table, timeout: float | None, arrived: float
) -> Future[Table]:
    """`app.run`, its SLO admission counting the time the request has spent in the
    server since `arrived` (`time.monotonic`) and the wait its answer is expected to
    have for the event loop (`DeliveryLag`)."""
    now = time.monotonic()
    outside = now - arrived + state.delivery.expected(now)
    try:
        return app.run(table, timeout=timeout, outside=outside)
    except RuntimeError as error:
        raise AppStopping(str(error)) from None


def run_at_door(
    state: ServingState,
    name: str,
    fields: Sequence[tuple[bytes, bytes]],
    body: bytes,
    arrived: float,
) -> Future[Table] | None:
    """`run_admitted` for a request of flow `name` (one of `state.doors`) that the HTTP
    protocol has read whole, with its header `fields`: decoded and run from the
    parser's callback, so that a refusal is answered there, and the arrivals read
    after it in the same turn of the event loop find the stage closed (refused for
    the price of a parse: `App.refuses_outright`). Run from their tasks, a burst read
    in one turn was judged only in the next, all of it through ASGI: against one SLO
    stage (30 ms; 4 + 1 ms per row, 2 workers) under `hey -c 100 -q 30`, 78% of the
    refusals went that way, and under `hey -c 64` (a closed-loop flood) the server
    refused 5,300 requests a second, and its answers waited behind them. None: it
    goes the ASGI way, which answers whatever else goes wrong (the app stopping); a
    body it cannot decode, or a bad header, fails the future with its HTTPProblem
    (decoded once: a 60 KB npz may take a quarter of a second to inflate)."""
    app = state.apps[name]
    headers = {_PREDICT_HEADERS[k]: v.decode("latin-1") for k, v in fields if k in _PREDICT_HEADERS}
    try:
        timeout = _timeout_s(headers.get(TIMEOUT_HEADER))
        table = decode_table(body, headers.get("content-type", JSON), app.plan.schema, state.limits)
    except (DecodeError, ShapeError, LimitExceeded, HTTPProblem) as error:
        failed: Future[Table] = Future()
        failed.set_exception(error if isinstance(error, HTTPProblem) else _undecodable(error))
        return failed
    except Exception:  # answered, and logged, the ASGI way
        return None
    try:
        return run_admitted(state, app, table, timeout, arrived)
    except Exception:  # the app stopping, or a bug of ours: answered (500), logged, there
        # (raised here, in the parser's callback, it was answered as the client's: a
        # 400 "Invalid HTTP request received", and the connection closed)
        return None


def _undecodable(error: DecodeError | ShapeError | LimitExceeded) -> HTTPProblem:
    """The answer to a body that cannot be decoded into the flow's table."""
    status = (
        400 if isinstance(error, DecodeError) else 422 if isinstance(error, ShapeError) else 413
    )
    column = getattr(error, "column", None)
    return HTTPProblem(status, str(error), **({} if column is None else {"column": column}))


def _settled(future: Future[Table]) -> Table:
    """The result of a done future (raises its exception)."""
    return future.result()


async def _outcome(
    future: Future[Table], receive: Receive | None = None, lag: DeliveryLag | None = None
) -> Table:
    """Await a concurrent future from the event loop: no wait at all when it is done
    already (a refusal), else one thread-safe wake-up when it settles (lighter than
    asyncio.wrap_future, which chains cancellation and state both ways). With
    `receive`, a client that goes away cancels the request: its workers drop it.
    `lag` learns how long the wake-up took."""
    if future.done():
        return _settled(future)
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    settled = [0.0]

    def wake(_: Future[Table]) -> None:
        settled[0] = time.monotonic()
        loop.call_soon_threadsafe(_wake, waiter)

    future.add_done_callback(wake)
    watch = None if receive is None else loop.create_task(_watch_disconnect(receive, future))
    try:
        await waiter
    finally:
        if watch is not None:
            watch.cancel()
    if future.cancelled():
        raise _Disconnected
    if lag is not None:
        now = time.monotonic()
        lag.observe(now, now - settled[0])
    return _settled(future)


async def _watch_disconnect(receive: Receive, future: Future[Table] | asyncio.Task[Table]) -> None:
    """Cancel `future` when the client disconnects (the body is read: the next
    message is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    future.cancel()


async def _unless_disconnected(work: Coroutine[Any, Any, Table], receive: Receive) -> Table:
    """Await `work`, cancelled if the client disconnects meanwhile."""
    task = asyncio.ensure_future(work)
    watch = asyncio.get_running_loop().create_task(_watch_disconnect(receive, task))
    try:
        return await task
    except asyncio.CancelledError:
        if task.cancelled() and not watch.done():
            raise  # we are cancelled ourselves
        raise _Disconnected from None
    finally:
        watch.cancel()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


_PREDICT_HEADERS = {
    b"content-length": "content-length",
    b"content-type": "content-type",
    b"accept": "accept",
    TIMEOUT_HEADER.encode(): TIMEOUT_HEADER,
}


async def serve_predict(
    state: ServingState,
    name: str,
    headers: Mapping[str, str],
    receive: Receive,
    reserved: bool = False,
    arrived: float | None = None,
    running: Future[Table] | None = None,
) -> tuple[int, bytes, str, Mapping[str, str]]:
    """One prediction: (status, body, media type, extra headers), metrics recorded.
    `reserved`: admitted already (the shedding protocol counted it; its caller releases).
    `arrived`: when its headers were parsed (`time.monotonic`; default now).
    `running`: its future, when the shedding protocol ran it (`run_at_door`).
    Raises _Disconnected when the client left before sending its body."""
    metrics = state.metrics.flow(name if name in state.apps else UNKNOWN_FLOW)
    started = time.perf_counter()
    if arrived is None:
        arrived = time.monotonic()
    status = 500
    metrics.in_flight.inc()
    try:
        body, media = await _predict(state, name, headers, receive, reserved, arrived, running)
        status = 200
        return status, body, media, {}
    except HTTPProblem as problem:
        status = problem.status
        if status == 503:
            metrics.shed.inc()
        return status, encode_json(problem.body()), JSON, problem.headers
    except _Disconnected:
        status = 499  # nginx's "client closed request": nobody reads an answer
        raise
    finally:
        metrics.in_flight.dec()
        metrics.observe(status, time.perf_counter() - started)


async def _predict(
    state: ServingState,
    name: str,
    headers: Mapping[str, str],
    receive: Receive,
    reserved: bool,
    arrived: float,
    running: Future[Table] | None = None,
) -> tuple[bytes, str]:
    app = _app_or_404(state, name)
    timeout = _timeout_s(headers.get(TIMEOUT_HEADER))
    if reserved:
        return await _run_predict(state, app, name, timeout, headers, receive, arrived, running)
    bound = state.in_flight[name]
    admission = state.admit(name)
    if admission is None:
        await _read_body(receive, headers.get("content-length", ""), state.limits)
        raise state.refused(name)
    try:
        return await _run_predict(state, app, name, timeout, headers, receive, arrived)
    finally:
        bound.release(admission)


async def _run_predict(
    state: ServingState,
    app: App,
    name: str,
    timeout: float | None,
    headers: Mapping[str, str],
    receive: Receive,
    arrived: float,
    running: Future[Table] | None = None,
) -> tuple[bytes, str]:
    coalescer = None
    if running is not None:  # read, decoded and run by the shedding protocol
        size = int(headers["content-length"])
    else:
        whole = held_whole(receive)
        body = await _read_body(receive, headers.get("content-length", ""), state.limits)
        if not whole:
            arrived = whole_at(state, arrived)
        size = len(body)
        content_type = headers.get("content-type", JSON)
        try:
            table = await _off_loop_if_big(
                size, decode_table, body, content_type, app.plan.schema, state.limits
            )
        except (DecodeError, ShapeError, LimitExceeded) as error:
            raise _undecodable(error) from None
        coalescer = state.coalescers.get(name) if timeout is None else None
    try:
        if running is not None:
            output = await _outcome(running, receive, state.delivery)
        elif coalescer is not None:
            output = await _unless_disconnected(coalescer.run(table), receive)
        else:
            future = run_admitted(state, app, table, timeout, arrived)
            output = await _outcome(future, receive, state.delivery)
    except AppStopping as error:
        raise HTTPProblem(503, str(error), headers={"Retry-After": "1"}) from None
    except (_Disconnected, HTTPProblem):  # (a body `run_at_door` could not decode)
        raise  # nobody to answer, and no failure of the flow
    except Exception as error:
        raise problem_from(error, name, debug=state.debug) from None
    accept = headers.get("accept", JSON)
    try:
        content, media = await _off_loop_if_big(size, encode_table, output, accept)
    except EncodeError as error:
        raise HTTPProblem(406 if "npz" in accept else 500, str(error)) from None
    return content, media


async def predict(request: Request) -> Response:
    """The Starlette route of /v1/flows/{name}/predict (ServingASGI takes the fast path
    around it; this one serves whatever reaches the router, e.g. under test clients)."""
    wanted = _PREDICT_HEADERS.values()
    headers = {key: request.headers[key] for key in wanted if key in request.headers}
    try:
        status, body, media, extra = await serve_predict(
            _state(request), request.path_params["name"], headers, request.receive
        )
    except _Disconnected:
        return Response(b"", status_code=499)
    return Response(body, status_code=status, media_type=media, headers=extra)


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
    state = _state(request)
    if state.openapi is None:  # built on first use: what is deployed does not change
        state.openapi = encode_json(
            openapi_spec(state.apps, limits=state.limits, secured=state.token is not None)
        )
    return Response(state.openapi, media_type=JSON)


async def dashboard(request: Request) -> Response:
    return HTMLResponse(PAGE)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _json({"error": exc.detail}, exc.status_code, exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error serving %s", request.url.path, exc_info=exc)
    return _json({"error": f"internal server error: {type(exc).__name__}"}, 500)


_PREDICT_PREFIX, _PREDICT_SUFFIX = "/v1/flows/", "/predict"
# Scope key of a prediction (or V2 inference) the shedding protocol admitted: (flow,
# its admission, when its headers were parsed, its run if the protocol started it:
# `run_at_door`'s future, `serving.v2.infer_at_door`'s `Begun`),
# counted when its headers were parsed, so a burst parsed in one turn of the loop
# cannot overshoot the bound and then be refused the dear way; the ASGI app releases it.
ADMITTED = "serveflow.admitted"


class ServingASGI(Starlette):
    """Starlette, with `POST /v1/flows/{name}/predict` served straight from the ASGI
    scope: no router, middleware stack or Request object on the hot path (about a
    third of the server's per-request CPU went there). Same answers as the route."""

    serving: ServingState
    v2: Any  # serving.v2.V2HTTP: every path under /v2 (the Open Inference Protocol)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        reserved = scope.pop(ADMITTED, None)  # a slot the shedding protocol took
        path: str = scope["path"]
        if reserved is not None and not path.startswith("/v2/"):
            name, admission, parsed, running = reserved
            try:
                await self._fast_predict(name, scope, receive, send, parsed, running)
            finally:
                self.serving.in_flight[name].release(admission)
            return
        predict = path.startswith(_PREDICT_PREFIX) and path.endswith(_PREDICT_SUFFIX)
        if predict and scope["method"] == "POST":
            name = path[len(_PREDICT_PREFIX) : -len(_PREDICT_SUFFIX)]
            fast = name and "/" not in name
            if fast and await self._fast_predict(name, scope, receive, send):
                return
        status = 0

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if reserved is not None:  # a V2 inference (`serving.v2.infer_at_door`)
                name, admission, parsed, running = reserved
                try:
                    await self.v2(scope, receive, counted, (parsed, running))
                finally:
                    self.serving.in_flight[name].release(admission)
            elif (path + "/").startswith("/v2/"):
                await self.v2(scope, receive, counted)
            else:
                await super().__call__(scope, receive, counted)
        finally:
            self._count(path, status)

    def _count(self, path: str, status: int) -> None:
        """Count a response of the routes (the predict fast path counts its own)."""
        if not status:
            return  # nothing was sent
        metrics = self.serving.metrics
        route = route_of(path)
        metrics.count_response(route, status)
        if route == PREDICT_ROUTE and status == 401:  # answered by the token check
            name = path[len(_PREDICT_PREFIX) : -len(_PREDICT_SUFFIX)]
            metrics.flow(name if name in self.serving.apps else UNKNOWN_FLOW).count(401)

    async def _refuse(
        self,
        state: ServingState,
        name: str,
        headers: Mapping[str, str],
        receive: Receive,
        send: Send,
        body: bytes | None = None,
    ) -> None:
        """Answer 503: the in-flight bound's, or with `body`."""
        started = time.perf_counter()
        metrics = state.metrics.flow(name)
        with contextlib.suppress(_Disconnected, HTTPProblem):  # refused either way
            await _read_body(receive, headers.get("content-length", ""), state.limits)
        head = state.refusal[name] if body is None else refusal_headers(body)
        await send({"type": "http.response.start", "status": 503, "headers": head})
        await send({"type": "http.response.body", "body": body or state.refusal_body[name]})
        metrics.shed.inc()
        metrics.observe(503, time.perf_counter() - started)
        state.metrics.count_response(PREDICT_ROUTE, 503)

    async def _fast_predict(
        self,
        name: str,
        scope: Scope,
        receive: Receive,
        send: Send,
        parsed: float | None = None,
        running: Future[Table] | None = None,
    ) -> bool:
        """Serve a prediction; False (nothing sent) when it must go the slow way: a
        missing or wrong token, which the auth middleware answers. `parsed`: when the
        shedding protocol, which checked the token, parsed its headers and admitted it;
        `running`: its future, if the protocol ran it too."""
        state = self.serving
        reserved = parsed is not None
        headers: dict[str, str] = {}
        for key, value in scope["headers"]:
            wanted = _PREDICT_HEADERS.get(key)
            if wanted is not None:
                headers[wanted] = value.decode("latin-1")
        if not reserved:
            if state.token is not None and unauthorized(scope["headers"], state.token) is not None:
                return False
            if state.at_limit(name):  # the cheapest refusal: no task, problem or encoding
                await self._refuse(state, name, headers, receive, send)
                return True
            shed = state.shed_outright(name)
            if shed is not None:
                await self._refuse(state, name, headers, receive, send, shed)
                return True
        try:
            status, body, media, extra = await serve_predict(
                state, name, headers, receive, reserved, parsed, running
            )
        except _Disconnected:
            return True
        except Exception as error:
            log.error("unhandled error serving %s", scope["path"], exc_info=error)
            status, media, extra = 500, JSON, {}
            body = encode_json({"error": f"internal server error: {type(error).__name__}"})
        raw_headers = [
            (b"content-type", media.encode()),
            (b"content-length", str(len(body)).encode()),
        ]
        raw_headers += [(k.lower().encode(), v.encode()) for k, v in extra.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": body})
        state.metrics.count_response(PREDICT_ROUTE, status)
        return True


def create_app(
    apps: Mapping[str, App],
    *,
    token: str | None = None,
    debug: bool = False,
    max_body_bytes: int | None = None,
    stop_apps: bool = True,
    max_in_flight: int | None = None,
    coalesce: bool = True,
    limits: Limits | None = None,
    adaptive_in_flight: bool = True,
) -> ServingASGI:
    """An ASGI app serving `apps` (flow name -> deployed App).

    `token`: require `Authorization: Bearer <token>` except on /healthz, /readyz and
    the static dashboard page. `debug`: include tracebacks in 500 responses.
    `limits`: what one request may hold (serving.limits; default `Limits()`);
    `max_body_bytes`, when given, replaces its `max_body_bytes`.
    `stop_apps`: stop (drain) every app when the ASGI lifespan ends.
    `max_in_flight`: most requests of one flow admitted at once; more get 503 with
    Retry-After at once, before their body is decoded (cheap shedding under overload).
    `adaptive_in_flight`: admit fewer than that while admitted requests queue (see
    serving.inflight); False holds the bound at `max_in_flight`.
    `coalesce`: run the requests of a row-by-row flow that arrive together as one
    runtime request (see serving.coalesce); requests with a deadline always go alone.
    """
    state = ServingState(
        apps,
        token=token,
        debug=debug,
        limits=with_body_limit(limits or Limits(), max_body_bytes),
        stop_apps=stop_apps,
        max_in_flight=max_in_flight,
        coalesce=coalesce,
        adaptive=adaptive_in_flight,
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
    asgi = ServingASGI(
        debug=False,  # our own JSON errors; --debug only adds tracebacks to them
        routes=routes,
        middleware=middleware,
        exception_handlers={HTTPException: _http_exception, Exception: _internal_error},
        lifespan=lifespan,
    )
    asgi.state.serving = state
    asgi.serving = state
    from serveflow.serving.v2 import V2HTTP, V2Models  # imports this module

    asgi.v2 = V2HTTP(V2Models(state))
    return asgi
