"""Admitting or refusing a flow's requests (predictions, and V2 inferences over HTTP)
at its in-flight limit inside the HTTP parser;
and refusing there those an SLO batching stage of the flow sheds outright for now
(`App.refuses_outright`: every arrival until a call ends), with that stage's 503.

Under a flood, most requests are refused. Through ASGI each refusal costs a task, a
scope, several awaits and two sends on the event loop, and the admitted requests wait
behind those in every turn of the loop: at 3x the sustainable rate the server spent
its time refusing and served a fraction of what it sustains. Here the refusal is
written from uvicorn's httptools protocol the moment the request line and headers are
parsed: a prebuilt 503 with Retry-After, no task, no body read (it is dropped as it
arrives). A request under the limit is counted as admitted at that same moment, not
when its ASGI task first runs: a flood parsed in one turn of the loop would otherwise
all pass the check, overshoot the limit and be refused the dear way, in ASGI (it was
most refusals at 32 in flight). Requests it cannot judge so cheaply (pipelined behind
an unfinished one, a missing or wrong token, a percent-encoded or query-carrying path)
take the ASGI path, which gives the same answers.

While a flow is at its limit, a request that arrives whole in one read (the usual
prediction: a few hundred bytes) is refused before the parser sees it (`_refused_raw`):
uvicorn's parser callbacks build a scope, a header list and a callback per header for
each request. Measured in one flood on this machine: 74 us of server CPU per refusal
through the parser, 61 us without it, 38 us for a bare uvloop server answering 503.
Then the counting (plain ints, see `FlowMetrics.refused`) and the keep-alive timer
(moved only when it fires) went from 11 to about 1 us: 59 -> 46 us.
Anything that is not plainly one complete HTTP/1.1 POST with a Content-Length goes to
the parser.

A request of a flow whose SLO stage may refuse it at once (`ServingState.doors`) and
whose body is small and announced by a Content-Length gets no task until its body is
read: then it is decoded and run from the parser's callback (`run_at_door`; a V2
inference, `POST /v2/models/NAME/infer`, by `serving.v2.infer_at_door`), a refusal
answered there, so the arrivals read after it in the same turn of the loop find the
stage closed (above) instead of all being judged, later, through ASGI.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from typing import TYPE_CHECKING

from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from serveflow.errors import OverloadError
from serveflow.serving.app import (
    ADMITTED,
    OFFLOAD_BYTES,
    refusal_headers,
    run_at_door,
    stalled,
    whole_at,
)
from serveflow.serving.auth import token_matches, unauthorized
from serveflow.serving.codecs import encode_json
from serveflow.serving.metrics import PREDICT_ROUTE
from serveflow.serving.v2 import VERSION, infer_at_door

if TYPE_CHECKING:
    from serveflow.serving.app import ServingState
    from serveflow.serving.limits import Limits

_PREFIX, _SUFFIX = b"/v1/flows/", b"/predict"
_V2_PREFIX, _V2_SUFFIX = b"/v2/models/", b"/infer"  # V2 inference, unversioned ...
_V2_VERSION = f"/versions/{VERSION}".encode()  # ... or of the one version served
_POST = b"POST " + _PREFIX
_END = _SUFFIX + b" HTTP/1.1\r\n"
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9a-z-]+")  # a header name (RFC 9110), lower case


def _refusal(body: bytes) -> bytes:
    """A whole 503 response with `body`."""
    head = b"".join(k + b": " + v + b"\r\n" for k, v in refusal_headers(body))
    return b"HTTP/1.1 503 Service Unavailable\r\n" + head + b"\r\n" + body


class _Answered:
    """The request cycle of a request the protocol answered itself: uvicorn drops the
    body of a cycle whose response is complete."""

    response_complete = True
    disconnected = False
    keep_alive = True
    message_event = asyncio.Event()  # connection_lost sets it; nobody waits


_ANSWERED = _Answered()


def _timed_out(error: str) -> bytes:
    """A whole 408 response with `error`, closing the connection."""
    body = encode_json({"error": error})
    head = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    return head + b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


def timed_protocol(limits: Limits) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, answering 408 to a request whose headers are not
    read whole within `limits.body_timeout_s` (and closing its connection): uvicorn
    times out neither a request's headers nor a connection sending them, and 300
    connections each holding half a request line stayed open."""
    wait = limits.body_timeout_s
    late = _timed_out(f"request headers not whole within {wait:g} s (--body-timeout)")

    class TimedProtocol(HttpToolsProtocol):
        heading = False  # a request's headers are being read ...
        head: asyncio.TimerHandle | None = None  # ... by this deadline, once a read ended

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # armed once a read ends inside them: a timer per request cost ~3 us
            if self.heading and self.head is None:
                self.head = self.loop.call_later(wait, self._head_stalled)

        def on_message_begin(self) -> None:
            self.heading = True
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._headed()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._headed()
            super().connection_lost(exc)

        def _headed(self) -> None:
            """The headers are read (or never will be): no deadline for them."""
            self.heading = False
            if self.head is not None:
                self.head.cancel()
                self.head = None

        def _head_stalled(self) -> None:
            self.transport.write(late)
            self.transport.close()

    return TimedProtocol


def shedding_protocol(state: ServingState) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, answering requests over `state`'s in-flight limit,
    and those an SLO stage sheds outright, with 503 as soon as their headers are parsed."""
    responses = {name.encode(): _refusal(body) for name, body in state.refusal_body.items()}
    token = state.token
    wait = state.limits.body_timeout_s
    late = _timed_out(stalled(state.limits))

    class SheddingProtocol(timed_protocol(state.limits)):  # type: ignore[misc]
        between = True  # the parser is between messages (none begun and unfinished)
        active_at = -math.inf  # when this protocol last refused a request (loop time)
        defer = False  # hold the next request's task until its body is read (`_door`)
        deferred: tuple[RequestResponseCycle, object] | None = None  # ... that request's
        stall: asyncio.TimerHandle | None = None  # ... its body's deadline, and when
        body_at = -math.inf  # ... its body last grew (loop time: a stall, not a slow body)

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            state.connections = self.connections  # uvicorn's set of open connections

        def data_received(self, data: bytes) -> None:
            state.turns.reading(self.loop)
            if not (self.between and data.startswith(_POST) and self._refused_raw(data)):
                super().data_received(data)

        def on_message_begin(self) -> None:
            self.between = False
            super().on_message_begin()

        def on_message_complete(self) -> None:
            self.between = True
            super().on_message_complete()
            if self.deferred is not None:
                self._door(*self.deferred)

        def _start_asgi_task(self, cycle: RequestResponseCycle, app: object) -> None:  # type: ignore[override]
            if self.defer:
                self.deferred = (cycle, app)
                self.body_at = self.loop.time()
                self.stall = self.loop.call_later(wait, self._stalled)
                return
            super()._start_asgi_task(cycle, app)  # type: ignore[arg-type]

        def on_body(self, body: bytes) -> None:
            super().on_body(body)
            if self.deferred is not None:
                self.body_at = self.loop.time()  # (the timer is moved only when it fires)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.deferred is not None:  # gone before its body came: no task to release it
                self._undefer(release=True)
            super().connection_lost(exc)

        def _stalled(self) -> None:
            """The deferred request's body stalled: 408, and the connection closed
            (as the ASGI path does, `Limits.body_timeout_s`)."""
            idle = self.loop.time() - self.body_at
            if idle < wait:  # it grew meanwhile
                self.stall = self.loop.call_later(wait - idle, self._stalled)
                return
            v2 = self.deferred[0].scope["path"].startswith("/v2/")  # type: ignore[index]
            self._count(self._undefer(release=True), v2, 408)
            self.transport.write(late)
            self.transport.close()

        def _count(self, name: str, v2: bool, status: int) -> None:
            """Count an answer this protocol wrote (a prediction's 503 of the in-flight
            bound, counted cheaper, excepted): by flow and route, for a V2 inference in
            its model's statistics too."""
            if v2:
                state.v2_models.answered_early(name, status)
            else:
                state.answered_early(name, PREDICT_ROUTE, status)

        def _undefer(self, release: bool = False) -> str:
            """Forget the deferred request (its slot released, if `release`): its flow."""
            cycle, _ = self.deferred  # type: ignore[misc]
            self.deferred = None
            self.stall.cancel()  # type: ignore[union-attr]
            name, admission, *_ = cycle.scope[ADMITTED]  # type: ignore[misc]
            if release:
                state.in_flight[name].release(admission)
            return name

        def _door(self, cycle: RequestResponseCycle, app: object) -> None:
            """Run a request of a door flow now that its body is read (`run_at_door`):
            a refusal is answered here, an admitted request gets its task."""
            self._undefer()
            name, admission, parsed, _ = cycle.scope[ADMITTED]  # type: ignore[misc]
            # the SLO counts from the request read whole, not its headers: a body
            # uploaded over seconds had been refused as late on arrival
            parsed = whole_at(state, parsed)
            v2 = cycle.scope["path"].startswith("/v2/")
            run = infer_at_door if v2 else run_at_door
            running = run(state, name, self.headers, bytes(cycle.body), parsed)
            future = running.future if v2 and running is not None else running
            if future is not None and future.done() and not future.cancelled():
                error = future.exception()
                if isinstance(error, OverloadError):
                    state.in_flight[name].release(admission)
                    self.cycle = _ANSWERED  # type: ignore[assignment]
                    body = encode_json({"error": str(error)})
                    self._answer_refusal(name, cycle.keep_alive, _refusal(body), v2)
                    return
            cycle.scope[ADMITTED] = (name, admission, parsed, running)  # type: ignore[literal-required]
            super()._start_asgi_task(cycle, app)  # type: ignore[arg-type]

        def _whole(self) -> bool:
            """Whether the request whose headers were just parsed comes with a body
            small enough to be read before its task starts: a Content-Length within
            what is decoded on the event loop (and read without pausing the socket),
            no chunks, no `Expect: 100-continue` (the client waits for its task)."""
            if self.expect_100_continue:
                return False
            length = b""
            for key, value in self.headers:
                if key == b"transfer-encoding":
                    return False
                if key == b"content-length":
                    length = value
            limit = min(OFFLOAD_BYTES, HIGH_WATER_LIMIT, state.max_body_bytes)
            return length.isdigit() and int(length) <= limit

        def _refused_raw(self, data: bytes) -> bool:
            """Refuse `data` unparsed if it is one whole prediction request of a flow
            at its limit, with the token; False (nothing done) otherwise."""
            line = data.find(b"\r\n")
            end = data.find(_END, len(_POST), line + 2)
            if end < 0 or (name := data[len(_POST) : end]) not in responses:
                return False
            if self.cycle is not None and not self.cycle.response_complete:
                return False
            flow = name.decode()
            if not state.at_limit(flow):
                return False
            head_end = data.find(b"\r\n\r\n", line)
            if head_end < 0:
                return False
            fields = {}
            for field in data[line + 2 : head_end].split(b"\r\n"):
                key, colon, value = field.partition(b":")
                key = key.lower()
                if not colon or key in fields or (not key.isalnum() and not _TOKEN.fullmatch(key)):
                    return False  # odd or repeated: the parser judges it
                fields[key] = value.strip(b" \t")
            length = fields.get(b"content-length", b"")
            if b"transfer-encoding" in fields or not length.isdigit():
                return False
            if len(data) != head_end + 4 + int(length):
                return False  # more or less than one request
            if token is not None and not token_matches(fields.get(b"authorization", b""), token):
                return False
            keep_alive = fields.get(b"connection", b"").lower() != b"close"
            self._answer_refusal(flow, keep_alive)
            return True

        def on_headers_complete(self) -> None:
            self._headed()
            name = self._judged()
            if name is None:
                super().on_headers_complete()
                return
            if not state.at_limit(name) and (shed := state.shed_outright(name)) is not None:
                self._refuse(name, _refusal(shed))
                return
            bound = state.in_flight[name]
            admission = state.admit(name)  # counted now: the next request parsed sees it
            if admission is None:
                self._refuse(name)
                return
            arrived = state.turns.since(time.monotonic())
            self.scope[ADMITTED] = (name, admission, arrived, None)  # type: ignore[literal-required]
            cycle = self.cycle
            self.defer = name in state.doors and self._whole()
            try:
                super().on_headers_complete()
            finally:
                self.defer = False
            if self.cycle is cycle:  # no request cycle started (an upgrade)
                bound.release(admission)

        def _judged(self) -> str | None:
            """The flow of a prediction this protocol admits or refuses itself; None
            for requests the ASGI path judges."""
            url = self.url
            if url.startswith(_PREFIX) and url.endswith(_SUFFIX):
                raw = url[len(_PREFIX) : -len(_SUFFIX)]
            elif url.startswith(_V2_PREFIX) and url.endswith(_V2_SUFFIX):
                raw = url[len(_V2_PREFIX) : -len(_V2_SUFFIX)].removesuffix(_V2_VERSION)
            else:
                return None
            if raw not in responses:
                return None
            if self.cycle is not None and not self.cycle.response_complete:
                return None  # pipelined behind an unanswered request: answers keep order
            if self.parser.get_method() != b"POST":
                return None
            if token is not None and unauthorized(self.headers, token) is not None:
                return None  # the token check answers (401)
            return raw.decode()

        def _refuse(self, name: str, response: bytes | None = None) -> None:
            self.cycle = _ANSWERED  # type: ignore[assignment]
            v2 = self.url.startswith(_V2_PREFIX)
            self._answer_refusal(name, self.parser.should_keep_alive(), response, v2)

        def _answer_refusal(
            self, name: str, keep_alive: bool, response: bytes | None = None, v2: bool = False
        ) -> None:
            """Write flow `name`'s 503: `response`, or its in-flight bound's (`v2`: to a
            V2 inference)."""
            response = response or responses[name.encode()]
            if v2:
                self._count(name, True, 503)
            else:
                state.metrics.flow(name).refused()
            if not keep_alive:  # said so after the status line (RFC 9112, 9.6)
                self.transport.write(response.replace(b"\r\n", b"\r\nconnection: close\r\n", 1))
                self.transport.close()
                return
            self.transport.write(response)
            # The keep-alive timer is not moved per refusal (a cancel and a new timer
            # were 5 of the 44 us one took): the refusal's time is noted, and a timer
            # that fires early is set again for the rest of the idle time.
            self.active_at = self.loop.time()
            if self.timeout_keep_alive_task is None:
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler
                )

        def timeout_keep_alive_handler(self) -> None:
            idle = self.loop.time() - self.active_at
            if idle < self.timeout_keep_alive:
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive - idle, self.timeout_keep_alive_handler
                )
                return
            super().timeout_keep_alive_handler()

    return SheddingProtocol
