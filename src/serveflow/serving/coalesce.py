"""Coalescing: the HTTP requests of one flow that arrive together run as one request.

Each HTTP request costs the runtime's driver the same work whatever its size (routing,
a message to the first stage's worker, one back, a future). Under concurrent load the
event loop reads many requests in one iteration; `Coalescer` submits those of one flow
(with the same columns) as one runtime request and hands each its own rows of the output,
told apart by their qids. Nothing waits for a batch to fill while the flow is idle: a
lone request goes alone, so latency at low load is unchanged; while every worker of the
flow's first stage has a request of it running and rows are cheap (below), a new one
waits up to `BUSY_WINDOW_S` (2 ms) for others to join it; with a worker idle it goes at
once (waiting whenever anything ran, 2 closed-loop clients on 2 workers of a 1 ms row
had a median of 2.8 ms against 1.0 ms for one client).

Only flows whose every operator works row by row are coalesced (map, row filter, lookup,
join on qid, union): there a request's output rows are exactly those derived from its
input rows, whoever else shared the call. Merging pays only while rows are cheap: a
merged request's rows run one after another in each stage, on one worker, so once rows
take milliseconds each (models), merging saves little driver time and serializes work
the pool would run in parallel (clients in a closed loop then send every round as one
merged request, which keeps one worker of a chain busy at a time). The coalescer
therefore measures what its requests take per row, from before each is sent (its answer
may be back before the event loop runs again), and merges only while the cheapest
recent one took under MERGE_BELOW_MS; otherwise it merges one group every
PROBE_EVERY_S, to measure again. Requests read together are merged into as many
runtime requests as the flow's first stage has workers, not fewer: one merged request
would run on one worker while the others idle (a flow of half-millisecond rows on 2
workers, 8 requests admitted at a time, served 15-20% less merged whole than unmerged,
in a closed loop and flooded alike); but no more than the rows' time pays for: each
part's rows must take at least a request's fixed time, both fitted to recent requests
(time = fixed + rows x per row), so rows that cost next to nothing go as one request.
Groupby/agg, joins on a column and anyof see a request as a whole and are never
coalesced, nor are flows with an SLO-batching stage (its controller does the batching,
per request). If a merged request fails (an operator raised on some row, a missing
column), each of its requests is run again alone, so only the one at fault gets the
error; overload, deadline and shutdown errors go to all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from itertools import combinations
from statistics import median

from serveflow.errors import DeadlineError, OverloadError
from serveflow.logical.operators import AnyOf, Filter, Join, Lookup, Map, Source, Union
from serveflow.logical.schema import check_schema
from serveflow.logical.table import Table
from serveflow.optimizer.plan import Plan
from serveflow.runtime.app import App

log = logging.getLogger(__name__)

MAX_ROWS = 512  # most rows in one merged request
# While every worker has a request of the flow, a new one waits this long for company.
# gRPC (grpc.aio) hands each call to the event loop in an iteration of its own, so
# "arrived together" alone merges nothing there; at 64 concurrent V2 gRPC clients this
# window cut the workers' CPU per request 2.5-3x and the driver's by 10-20%.
BUSY_WINDOW_S = 0.002
MERGE_BELOW_MS = 1.0  # per row: above, rows are worth running as requests of their own
COST_WINDOW = 64  # recent requests whose time per row decides
# While rows are dear, one group is merged this often to measure again: a time, not a
# share of groups, so that the few requests slowed by a probe stay below the p99.
PROBE_EVERY_S = 1.0
WORKERS_EVERY_S = 1.0  # how often the first stage's worker count is read
MIN_TRIPS = 8  # recent requests needed to fit what a row costs against a request
ROW_LOCAL = (Source, Map, Filter, Lookup, Join, Union)


def coalescable(plan: Plan) -> bool:
    """Whether the requests of a flow may be merged: every operator maps input rows to
    output rows on its own, and no stage batches under an SLO (its controller batches
    requests itself, and counts each one as an arrival to plan for)."""
    return row_local(plan) and not any(s.batching and s.batching.adaptive for s in plan.stages)


def row_local(plan: Plan) -> bool:
    """Whether every operator of the plan maps input rows to output rows on its own."""
    for stage in plan.stages:
        for op in stage.ops:
            if isinstance(op, Filter) and op.group:
                return False
            if isinstance(op, Join) and op.on is not None:
                return False
            if isinstance(op, AnyOf) or not isinstance(op, ROW_LOCAL):
                return False
    return True


# A request's output, and when its runtime request's first stage run began (None if
# unknown): the request was queued until then.
Outcome = tuple[Table, float | None]
Waiter = tuple[Table, "asyncio.Future[Outcome]"]


class AppStopping(Exception):
    """The deployment refuses requests because it is stopping."""


class Coalescer:
    """Merges one flow's requests that arrive in the same event-loop iteration.

    Event-loop only: `run` is called from the loop, results come back to it."""

    def __init__(
        self, app: App, max_rows: int = MAX_ROWS, busy_window_s: float = BUSY_WINDOW_S
    ) -> None:
        self.app = app
        self.max_rows = max_rows
        self.busy_window_s = busy_window_s
        self._pending: list[Waiter] = []
        self._running: dict[asyncio.Future[Outcome], tuple[list[Waiter], Future[Table]]] = {}
        self._submitted = 0  # runtime requests sent and not settled
        self._scheduled = False
        self.merged_requests = 0  # runtime requests that carried several HTTP requests
        self.requests = 0
        self.probes = 0  # groups merged while rows were dear, to measure them again
        self._ms_per_row: deque[float] = deque(maxlen=COST_WINDOW)
        self._trips: deque[tuple[int, float]] = deque(maxlen=COST_WINDOW)  # (rows, ms)
        self._row_share: float | None = None  # a row's time / a request's fixed time
        self._fitted_at = float("-inf")
        self._probed_at = 0.0  # when a group was last merged while rows were dear
        self._workers, self._workers_at = 1, float("-inf")  # the first stage's workers

    def _cheap(self) -> bool:
        """No measure yet, or the cheapest recent request took under MERGE_BELOW_MS per
        row (the cheapest: queueing only adds to what rows cost)."""
        return not self._ms_per_row or min(self._ms_per_row) < MERGE_BELOW_MS

    def _merging(self) -> bool:
        """Whether to merge the requests read together now: while rows are cheap, else
        once every PROBE_EVERY_S."""
        if self._cheap():
            return True
        now = time.monotonic()
        if now - self._probed_at < PROBE_EVERY_S:
            return False
        self._probed_at = now
        self.probes += 1
        return True

    def _parallel(self) -> int:
        """Workers the flow's first stage runs on (read at most every WORKERS_EVERY_S)."""
        now = time.monotonic()
        if now - self._workers_at >= WORKERS_EVERY_S:
            self._workers_at = now
            # not from app.stats(): its percentiles over up to 16k latencies held
            # the event loop for milliseconds (3% of its time in a flood, py-spy)
            self._workers = max(1, self.app.workers_of(0))
        return self._workers

    def _parts(self, rows: int) -> int:
        """How many runtime requests `rows` rows read together go as: one per worker of
        the flow's first stage (one merged request would leave the others idle), but
        no more than the rows' own time pays for, each part's rows taking at least a
        request's fixed time. Rows that cost next to nothing (identity maps) go as one
        request: at 64 concurrent V2 gRPC clients, cut in four they cost the driver
        25-50% and the workers 3-5x more CPU per call, for no parallel gain."""
        workers = self._parallel()
        now = time.monotonic()
        if now - self._fitted_at >= WORKERS_EVERY_S:
            self._fitted_at = now
            self._row_share = _row_share(self._trips)
        if workers == 1 or self._row_share is None:
            return workers
        return max(1, min(workers, int(rows * self._row_share)))

    async def run(self, table: Table) -> Table:
        """The output of one request (raises what the deployment raised for it).
        Cancelled (the client went away), it leaves its merged request, which is
        cancelled once nobody waits for it."""
        return (await self.run_timed(table))[0]

    async def run_timed(self, table: Table) -> Outcome:
        """As `run`, with when the request's first stage run began (time.monotonic;
        None if unknown): its time queued here and in the runtime ended then."""
        check_schema(self.app.plan.schema, table)  # a bad request fails alone, at once
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Outcome] = loop.create_future()
        self._pending.append((table, waiter))
        if not self._scheduled:
            self._scheduled = True
            busy = self._submitted >= self._parallel()
            if busy and self.busy_window_s > 0 and self._cheap():
                loop.call_later(self.busy_window_s, self._flush)
            else:
                loop.call_soon(self._flush)  # after the requests read in this iteration
        try:
            return await waiter
        except asyncio.CancelledError:
            running = self._running.pop(waiter, None)
            if running is not None:
                group, future = running
                if all(w.done() for _, w in group):
                    future.cancel()
            raise

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        groups: dict[tuple[str, ...], list[Waiter]] = {}
        for waiter in pending:
            groups.setdefault(tuple(waiter[0].columns), []).append(waiter)
        if len(pending) > 1 and not self._merging():
            for waiter in pending:
                self._submit([waiter])
            return
        for group in groups.values():
            parts = self._parts(sum(len(table) for table, _ in group))
            most = -(-len(group) // parts)  # requests per merged request
            chunk: list[Waiter] = []
            rows = 0
            for waiter in group:
                if chunk and (rows + len(waiter[0]) > self.max_rows or len(chunk) >= most):
                    self._submit(chunk)
                    chunk, rows = [], 0
                chunk.append(waiter)
                rows += len(waiter[0])
            if chunk:
                self._submit(chunk)

    def _submit(self, group: list[Waiter]) -> None:
        group = [w for w in group if not w[1].done()]  # not those whose client left
        if not group:
            return
        self.requests += len(group)
        table = group[0][0] if len(group) == 1 else Table.concat([t for t, _ in group])
        if len(group) > 1:
            self.merged_requests += 1
        # before run: the answer may come back (another thread settling the future)
        # before this thread runs again, and the time must include its whole trip
        sent, rows = time.perf_counter(), max(1, len(table))
        try:
            future = self.app.run(table)
        except RuntimeError as error:  # the app is stopping
            for _, waiter in group:
                _fail(waiter, AppStopping(str(error)))
            return
        self._submitted += 1
        loop = group[0][1].get_loop()
        for _, waiter in group:
            self._running[waiter] = (group, future)

        def done(f: Future[Table]) -> None:  # one wake-up of the loop per request
            loop.call_soon_threadsafe(self._settle, group, f, rows, time.perf_counter() - sent)

        future.add_done_callback(done)

    def _settle(self, group: list[Waiter], future: Future[Table], rows: int, took_s: float) -> None:
        self._submitted -= 1
        if not future.cancelled() and future.exception() is None:  # (the loop reads it)
            self._ms_per_row.append(took_s * 1e3 / rows)
            self._trips.append((rows, took_s * 1e3))
        for _, waiter in group:
            self._running.pop(waiter, None)
        if future.cancelled():
            return
        error = future.exception()
        if len(group) == 1:
            _, waiter = group[0]
            if error is not None:
                _fail(waiter, error)
            elif not waiter.done():
                waiter.set_result((future.result(), getattr(future, "began", None)))
            return
        if error is None:
            pieces = _split(future.result(), [t for t, _ in group])
            if pieces is not None:
                began = getattr(future, "began", None)
                for (_, waiter), piece in zip(group, pieces, strict=True):
                    if not waiter.done():
                        waiter.set_result((piece, began))
                return
            error = RuntimeError("output rows of unknown origin")
        if isinstance(error, OverloadError | DeadlineError):
            for _, waiter in group:
                _fail(waiter, error)
            return
        log.debug("merged request of %d failed (%s); running each alone", len(group), error)
        for waiter in group:
            self._submit([waiter])


def _row_share(trips: Sequence[tuple[int, float]]) -> float | None:
    """A row's time over a request's fixed time, from requests' (rows, ms) fitted as
    ms = fixed + rows x per_row; None while the rows do not vary enough to tell, or
    when the fixed time is nothing (then every part pays). The slope is read from the
    quickest request of each size (a busy machine only adds time, in slices of
    milliseconds: with two CPU hogs on 2 cores, requests of 1-4 identity rows took
    0.3, 3.3, 7.5 or 11 ms whatever their size), as Theil-Sen (the median of the
    slopes between pairs of sizes), not least squares: one request of 8 rows held 5 ms,
    among 63 of 0.2-1 ms, read as rows worth cutting per worker. The fixed time is the
    median intercept over all requests: time queued counts as fixed on purpose, since
    while requests queue the pool has no idle worker for a part to gain from, and each
    part costs a request's work."""
    if len(trips) < MIN_TRIPS:
        return None
    mean_rows = sum(r for r, _ in trips) / len(trips)
    if sum((r - mean_rows) ** 2 for r, _ in trips) < len(trips) * 0.25:
        return None  # (nearly) one size: no slope to read
    quickest: dict[int, float] = {}
    for rows, ms in trips:
        quickest[rows] = min(ms, quickest.get(rows, ms))
    per_row = median(
        (ms2 - ms1) / (r2 - r1) for (r1, ms1), (r2, ms2) in combinations(quickest.items(), 2)
    )
    fixed = median(ms - per_row * rows for rows, ms in trips)
    if fixed <= 0:
        return None
    return max(per_row, 0.0) / fixed


def _split(output: Table, inputs: list[Table]) -> list[Table] | None:
    """Each input's rows of the output, by qid; None if a row belongs to no input."""
    owner: dict[int, int] = {}
    for index, table in enumerate(inputs):
        for qid in table.qids:
            owner[qid] = index
    rows: list[list[int]] = [[] for _ in inputs]
    for position, qid in enumerate(output.qids):
        index = owner.get(qid)
        if index is None:
            return None
        rows[index].append(position)
    return [output.take(positions) for positions in rows]


def _fail(waiter: asyncio.Future[Outcome], error: BaseException) -> None:
    if not waiter.done():
        waiter.set_exception(error)
