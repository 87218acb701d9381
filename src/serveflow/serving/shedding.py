"""Admitting or refusing a flow's requests at its in-flight limit inside the HTTP parser.

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
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serveflow.serving.app import ADMITTED
from serveflow.serving.auth import token_matches
from serveflow.serving.metrics import PREDICT_ROUTE

if TYPE_CHECKING:
    from serveflow.serving.app import ServingState

_PREFIX, _SUFFIX = b"/v1/flows/", b"/predict"


class _Answered:
    """The request cycle of a request the protocol answered itself: uvicorn drops the
    body of a cycle whose response is complete."""

    response_complete = True
    disconnected = False
    keep_alive = True
    message_event = asyncio.Event()  # connection_lost sets it; nobody waits


_ANSWERED = _Answered()


def shedding_protocol(state: ServingState) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, answering requests over `state`'s in-flight limit
    with 503 as soon as their headers are parsed."""
    responses = {}
    for name, body in state.refusal_body.items():
        head = b"".join(k + b": " + v + b"\r\n" for k, v in state.refusal[name])
        responses[name.encode()] = b"HTTP/1.1 503 Service Unavailable\r\n" + head + b"\r\n" + body
    token = state.token

    class SheddingProtocol(HttpToolsProtocol):
        def on_headers_complete(self) -> None:
            name = self._judged()
            if name is None:
                super().on_headers_complete()
                return
            bound = state.in_flight[name]
            admission = bound.admit()  # counted now: the next request parsed sees it
            if admission is None:
                self._refuse(name)
                return
            self.scope[ADMITTED] = (name, admission)  # type: ignore[literal-required]
            cycle = self.cycle
            super().on_headers_complete()
            if self.cycle is cycle:  # no request cycle started (an upgrade)
                bound.release(admission)

        def _judged(self) -> str | None:
            """The flow of a prediction this protocol admits or refuses itself; None
            for requests the ASGI path judges."""
            url = self.url
            if not (url.startswith(_PREFIX) and url.endswith(_SUFFIX)):
                return None
            raw = url[len(_PREFIX) : -len(_SUFFIX)]
            if raw not in responses:
                return None
            if self.cycle is not None and not self.cycle.response_complete:
                return None  # pipelined behind an unanswered request: answers keep order
            if self.parser.get_method() != b"POST":
                return None
            if token is not None and not any(
                key == b"authorization" and token_matches(value, token)
                for key, value in self.headers
            ):
                return None  # the token check answers (401)
            return raw.decode()

        def _refuse(self, name: str) -> None:
            self.cycle = _ANSWERED  # type: ignore[assignment]
            self.transport.write(responses[name.encode()])
            flow = state.metrics.flow(name)
            flow.shed.inc()
            flow.count(503)
            state.metrics.count_response(PREDICT_ROUTE, 503)
            if self.parser.should_keep_alive():
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler
                )
            else:
                self.transport.close()

    return SheddingProtocol
