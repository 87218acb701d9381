"""`App`: a deployed flow, the handle users hold; and the `Runtime` interface."""

from __future__ import annotations

import abc
import contextlib
import math
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import Any, Protocol

from serveflow.errors import DeadlineError, InputError, OverloadError
from serveflow.logical.schema import check_schema
from serveflow.logical.table import Table
from serveflow.optimizer.plan import Plan
from serveflow.runtime.deadlines import Deadlines
from serveflow.runtime.kvs import KVS
from serveflow.runtime.request import Request


class Runtime(Protocol):
    """Executes plans. `sf.LocalRuntime` is the embedded one."""

    kvs: KVS

    def deploy(self, plan: Plan, *, owns_runtime: bool = False) -> App: ...

    def stop(self) -> None: ...


RequestData = Table | Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]]


def as_table(data: RequestData) -> Table:
    """A request as a Table: a Table, a mapping of columns, or a list of row mappings."""
    if isinstance(data, Table):
        return data
    if isinstance(data, Mapping):
        return Table(data)
    if isinstance(data, Sequence) and all(isinstance(row, Mapping) for row in data):
        return Table.from_rows(data)
    raise TypeError(
        f"a request is a sf.Table, a dict of columns or a list of rows, got {data!r:.80}"
    )


class App(abc.ABC):
    """A running deployment of one plan: `run` requests, read `stats`, `stop`."""

    def __init__(
        self, plan: Plan, runtime: Runtime, owns_runtime: bool, max_in_flight: int
    ) -> None:
        self.plan = plan
        self.runtime = runtime
        self._owns_runtime = owns_runtime
        self._max_in_flight = max_in_flight
        self._in_flight: set[Request] = set()
        self._lock = threading.Lock()
        self._stopped = False
        self._deadlines = Deadlines()

    @property
    def name(self) -> str:
        return self.plan.flow_name

    @property
    def kvs(self) -> KVS:
        return self.runtime.kvs

    def explain(self) -> str:
        return self.plan.explain()

    def run(
        self, table: RequestData, *, timeout: float | None = None, outside: float = 0.0
    ) -> Future[Table]:
        """Submit one request; its future holds the output table, or fails for this
        request alone with OperatorError, InputError, OverloadError (too many requests
        in flight) or DeadlineError (`timeout` seconds passed; queued work is dropped).
        `outside`: seconds of the request's latency the caller spends outside the
        runtime (its queue and parsing before this call, delivering the answer
        after), which SLO admission counts against the flow's SLOs."""
        if not 0.0 <= outside < math.inf:
            raise ValueError(f"outside must be a finite number of seconds >= 0, got {outside!r}")
        request = Request(as_table(table), timeout, self._ended)
        request.outside = outside
        with self._lock:
            if self._stopped:
                raise RuntimeError(f"app {self.name!r} is stopped")
            in_flight = len(self._in_flight)
            if in_flight < self._max_in_flight:
                self._in_flight.add(request)
        if in_flight >= self._max_in_flight:
            request.settle(
                OverloadError(
                    f"flow {self.name!r} has {in_flight} requests in flight "
                    "(the limit); retry later"
                )
            )
            return request.future
        try:
            check_schema(self.plan.schema, request.table)
        except InputError as error:
            request.settle(error)
            return request.future
        self._submit(request)
        if timeout is not None and not request.ended:  # not one refused at admission
            request.timer = self._deadlines.add(
                request.deadline, lambda: self._expire(request, timeout)
            )
            if request.ended:  # meanwhile: `_ended` may have run before the timer was set
                self._deadlines.cancel(request.timer)
        return request.future

    def _expire(self, request: Request, timeout: float) -> None:
        request.settle(DeadlineError(f"request to flow {self.name!r} took over {timeout:g} s"))

    def _ended(self, request: Request, failed: bool) -> None:
        if request.timer is not None:  # the request and its table are freed now
            self._deadlines.cancel(request.timer)
        with self._lock:
            self._in_flight.discard(request)
        self._finish(request, failed)

    @property
    def sheds_at_once(self) -> bool:
        """Whether `run` may refuse a request at once for an SLO (its future already
        failed with OverloadError when `run` returns): a server may then run the
        request as soon as it has read it, and answer a refusal on the spot."""
        return False

    def refuses_outright(self) -> OverloadError | None:
        """The refusal any request arriving now gets without being looked at: an SLO
        batching stage it must pass sheds every arrival until a later moment (counted
        there as one arrival and one refusal); None when only running it tells. Lets
        a server refuse a flood before reading the requests' bodies."""
        return None

    @abc.abstractmethod
    def _submit(self, request: Request) -> None:
        """Start executing a request's first stages."""

    @abc.abstractmethod
    def _finish(self, request: Request, failed: bool) -> None:
        """Release what a request that ended (settled or cancelled) held: called once,
        before its future is resolved; also for requests never submitted."""

    @abc.abstractmethod
    def stats(self) -> dict[str, dict[str, Any]]:
        """Live figures per stage name: requests, p50_ms, p99_ms, workers, queue,
        batch_mean, cold_starts, executions (the calls by the rows each ran: `{rows:
        {calls, gather_ns, run_ns, scatter_ns}}`), and for batching stages batch_size
        and timeout_ms."""

    @abc.abstractmethod
    def _shutdown(self) -> None:
        """Release workers; called once, after in-flight requests drained."""

    def stop(self, drain_timeout: float = 30.0) -> None:
        """Refuse new requests, let in-flight ones finish (up to `drain_timeout`
        seconds; those still running then fail with DeadlineError and their work is
        dropped), then release the workers. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            pending = list(self._in_flight)
        deadline = time.monotonic() + drain_timeout
        for request in pending:
            with contextlib.suppress(Exception):  # timed out or cancelled: stop anyway
                request.future.exception(timeout=max(0.0, deadline - time.monotonic()))
        for request in pending:
            request.settle(
                DeadlineError(
                    f"app {self.name!r} stopped before this request finished "
                    f"(drain_timeout={drain_timeout:g} s)"
                )
            )
        self._shutdown()
        self._deadlines.close()
        if self._owns_runtime:
            self.runtime.stop()

    def __enter__(self) -> App:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}: {len(self.plan.stages)} stages>"
