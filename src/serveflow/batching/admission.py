"""Admission for an SLO batching stage: each arriving request's latency, predicted from
the stage's state now, and a refusal when it would miss the SLO.

`StageLedger` mirrors each worker of the stage as the runtime runs it (`BatchRule`):
the requests routed to a worker queue there in order, and the worker, once free, runs
the queued ones as one call when the call is due (full at the planned batch size, or
its oldest request has waited the planned timeout; at once with no timeout): up to
`size` requests, or up to `merge` when more than a batch is queued. The call a worker
runs is anchored on what was seen, not on predictions: it starts when the call before
it was seen ending (or when its requests were due, on an idle worker), holds the
requests queued by then, and ends `service(n)` later. An arriving request's latency
is the end of the call it would run in (the queue ahead of it, cut into calls as the
worker will cut it), plus the runtime's own overhead, less now. It is refused when
that misses the SLO, or when it would make a call late for a request already in it.

The loop is closed twice:

- each call seen ending re-anchors its worker: its next call starts then, with the
  requests queued, so predictions start from the last end seen and their errors do
  not accumulate. A call not seen ending by its typical end is still
  running (a stall: the worker, or the machine, was slow), and the calls behind it
  wait for it. A stage whose ends the driver does not see (its output is not the
  flow's) learns them from its workers' reports, which come later: its calls are
  taken to end as predicted, and each report corrects the worker by its surprise;
- the residuals (seen end - (start + service): dispatch, sockets, wake-ups, the GIL,
  timer slack, service noise) are kept over a sliding window (the last `RESIDUALS`
  calls of the last `RESIDUAL_WINDOW_S` seconds, at least `MIN_RESIDUALS`), and the
  admission adds a high quantile of them (`admit_quantile`: 0.9 for a p99 SLO). Not
  the SLO's percentile itself: the tail of the residuals is stalls of the whole
  machine or driver (a core taken away, a long GIL hold) that hit every request in
  flight alike, which no refusal avoids, while refusing on them would refuse nearly
  everything. Under overload, where every admitted request is near the SLO, the
  overhead also covers the work ahead of a request running late as calls have run
  late, per second of a call (see `_predict`).
- residuals come in spells: on a shared machine a model's calls run 2-3x slower for
  a second, then not (and the service profile, refitted meanwhile, first lags the
  spell, then lags its end). The level of the latest calls' residuals (their
  median over `LEVEL_S`) is compared with the window's median: its `excess`, when
  it is beyond the window's spread (a spell; or, after a spell, a profile still
  refitted to it), is added to the law admission uses, and each residual is kept
  less the excess at its time. A spell thus raises the predictions within a few
  calls, and once it is over they fall back as fast: its calls do not stay in the
  spread for the whole window, refusing what would now be served in time. The
  level is taken against the service times in force: when the profile is refitted
  (say, to a spell the level has already seen), the latest calls' residuals are
  taken again against the new service times, not counted twice. Without a spell
  the excess is 0, and the law is the window's residuals as they came.
- workers are not alike: on a 2-core machine MiniLM's two workers ran 7-12 ms per
  call apart (the slower one sharing its core with the driver, which one changing
  every few seconds), and pooled residuals made the slower one's calls late.
  Each worker's bias (the median, over its calls of the last `WORKER_LEVEL_S`, of
  each residual less the level as it came) is added to its predictions, when it is
  beyond what chance gives such a median, and its residuals are kept less it.

A request may hold many rows (a table sent whole): calls are cut by requests, as the
worker cuts them, and timed by their rows (`plan`'s service times are by rows; a request
is one row unless `admit` says otherwise), and a call seen ending is learned as one of
its rows. Taken by its requests, a call of one request of 64 rows (4 + 1 ms per row: 68
ms) was learned as a call of 1, and every one-row request after it refused for 140-250
ms; and a 16-row request in the queue was taken for 5 ms of work, not 20 (30% of the
requests of 16 rows among ones of 1, at 300/s, SLO 50 ms: p99 1.5-2.1x the SLO).

A fresh stage (no call timed yet: no service times) cannot predict: each worker then
queues at most `merge` requests behind its running call, and a call ends only when
seen to (or reported, or one of its requests answered by a later stage), so what a
flood at deploy admits is a backlog the predictions see once calls are timed.

Pure computation; the controller calls it under its lock.
"""

from __future__ import annotations

import math
import statistics
import threading
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import NamedTuple

import numpy as np

from serveflow.runtime.dispatch import FILLING_MARGIN

RESIDUALS = 400  # observed calls the overhead quantile is taken over, at most
RESIDUAL_WINDOW_S = 5.0  # ... and only those of the last seconds: it settles that fast
MIN_RESIDUALS = 50  # ... and at least this many (when there are)
FIRST_RESIDUALS = 8  # before this many, DEFAULT_OVERHEAD_S stands in: a flood from
# deploy, planned at once for calls of 16 (100 ms at 20 + 5b), was answered 10-20 ms late
# for 2.5 s while the first 50 calls ended (residuals at 2-8 ms, 13-15 at the tail)
REQUANTILE_EVERY = 8  # new residuals between recomputations of the quantiles
LEVEL_S = 0.3  # the level (see the docstring): the median residual of this many seconds,
LEVEL_CALLS = 128  # ... at most this many calls, at least LEVEL_MIN (refusing most
LEVEL_MIN = 3  # arrivals, few calls end, and a spell's calls would set it for long)
# ... taken again once a call ends this long after the last time (and a worker's bias
# once one of its calls does): they follow spells of tenths of a second, and each take
# walks up to LEVEL_CALLS calls (at 1 + 0.2 ms per row, 3,300 requests/s, 670 calls/s:
# 7% of the driver's time when taken after every call)
RELEVEL_S = 0.005
WORKER_LEVEL_S = 1.0  # a worker's bias: of its calls of this many seconds, ...
WORKER_LEVEL_MIN = 8  # ... at least this many
DEFAULT_OVERHEAD_S = 0.001
PROBE_EVERY_S = 0.2  # an idle worker takes one request this often whatever its prediction,
PROBE_CALLS = 20  # ... or every this many single-request calls' time, when shorter,
PROBE_MIN_S = 0.01  # ... but no more often than this
REOPEN_GRID = 50  # after a refusal, admission is tried again every SLO / this ...
REOPEN_STEPS = 8  # ... this many times ahead; arrivals in between are refused outright
RUNNING_STRETCH_MAX = 0.2  # an opener's room for its running call's stretch (`_window`)
STRETCH_CALLS = 3  # the stretch is charged on this many full calls' time at most (`_predict`)
STRETCH_MAX = 1.0  # ... and is at most this (work at half speed)
STALE_S = 2.0  # a call predicted to have ended this long ago, never seen, is dropped
UNREPORTED = 256  # calls taken to have ended whose reports are awaited, at most


@dataclass(eq=False)
class _Entry:
    """An admitted request queued on a worker."""

    rid: int
    sent: float  # when it was routed there
    deadline: float  # the latest call end it accepts (its SLO less the overhead quantile)
    due: float  # when its SLO ends
    rows: int = 1


@dataclass(eq=False)
class _Call:
    """A call a worker runs (or, for a stage whose ends come with reports, ran)."""

    rids: dict[int, int]  # its requests' rows
    start: float
    end: float  # start + service: predicted, without the overhead

    def rows(self) -> int:
        return sum(self.rids.values())


@dataclass(eq=False)
class _Worker:
    index: int = -1  # the runtime's worker (-1: a stand-in for one not mirrored yet)
    queue: deque[_Entry] = field(default_factory=deque)
    run: _Call | None = None
    # its latest calls as (end, residual less the stage's level then), and its bias
    # (see the module docstring)
    latest: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=LEVEL_CALLS))
    bias: float = 0.0
    free_since: float = -math.inf  # its last call was seen (or taken) to end then
    biased_at: float = -math.inf  # the end of its call its bias was last taken at
    seen: object = None  # which of its calls was last seen ending, when told (`finished`)
    # what `_learn` kept of its last call (amended when it held more: see `finished`)
    # and its (rows, requests)
    learned: (
        tuple[tuple[float, float, float, float], tuple[float, float, int], tuple[int, int]] | None
    ) = None
    # calls taken to have ended, their reports still to come (ends not seen as they happen)
    unreported: deque[_Call] = field(default_factory=lambda: deque(maxlen=UNREPORTED))
    cold: bool = False  # it loaded the stage for its next call (see `loading`)
    cut: _Cut | None = None  # its queue cut into calls, all but the last (`_closed`)


@dataclass(eq=False)
class _Cut:
    """A worker's queue cut into calls, all but the last (`StageLedger._closed`): from
    `free`; from `free` + d, the same calls, each d later, for d in [`low`, `high`]."""

    key: tuple[float, int, float, int]  # overheads, busy calls, plan it was cut with
    free: float
    first: int = 0  # the last call's first request: its index in the queue, ...
    opener: _Entry | None = None  # ... and itself
    last: float = -math.inf  # when the worker is free for the last call
    low: float = -math.inf
    high: float = math.inf
    # of each call before the last: its end, and its oldest request's deadline and due
    calls: list[tuple[float, float, float]] = field(default_factory=list)

    def shift(self, d: float) -> None:
        """The same cut from `free` + d."""
        self.free, self.last, self.low, self.high = (
            self.free + d,
            self.last + d,
            self.low - d,
            self.high - d,
        )
        self.calls = [(end + d, deadline, due) for end, deadline, due in self.calls]


class _Basis(NamedTuple):
    """What predictions on one worker share whatever the time (`StageLedger._basis`)."""

    median: float
    high: float
    base: float
    stretch: float


class _Prediction(NamedTuple):  # not a frozen dataclass: made per arrival, 3x as fast
    """A request's prospects on one worker: its call ends at `end` (without overhead);
    `fits`: the requests already queued there still meet theirs; `latency`, with the
    overhead quantile `high`; `typical`, with the median overhead; `idle`: nothing
    runs or waits there; `lead`: how long before its call starts it arrives, when it
    would open a call of its own behind a busy worker (else 0)."""

    end: float
    fits: bool
    latency: float
    typical: float
    idle: bool
    high: float
    lead: float

    def meets(self, slo_s: float, window_s: float = math.inf) -> bool:
        """Within `slo_s`; and, opening a call, at most `window_s` before it starts."""
        return (self.fits and self.latency <= slo_s and self.lead <= window_s) or (
            self.idle and self.typical <= slo_s
        )


class Verdict(NamedTuple):
    """One admission: `admit`; `latency_s`, the predicted latency with the overhead
    quantile; `worker`, the worker it was entered on; `leaves`, when its call is
    expected to end, with the typical overhead."""

    admit: bool
    latency_s: float
    worker: int | None
    leaves: float = -math.inf


class StageLedger:
    """The mirrored workers of one SLO batching stage; see the module docstring.
    `plan(...)` sets the batching in force and the service times; `admit(rid, now,
    slo_s, ...)` predicts and enters; `routed` moves an entered request to the worker
    the router chose; `finished` / `observed` report ends."""

    def __init__(self, percentile: float = 0.99, lanes: Lanes | None = None) -> None:
        self.percentile = percentile
        # the other SLO stages' calls running on each worker (see `Lanes`)
        self._lanes = lanes if lanes is not None else Lanes()
        self.later: set[int] = set()  # `id`s of the ledgers of stages after it in a flow
        self.app: int | None = None  # the runtime's app it is of (see `Lanes`)
        # its stage's SLO as its workers know it (seconds): they run a call when its
        # oldest request's send plus this comes first (see `Lanes`)
        self.slack = 0.0
        # a tenth of the SLO's tail share, as a quantile (0.99 -> 0.9, 0.95 -> 0.5)
        self.admit_quantile = max(0.5, 1.0 - 10.0 * (1.0 - percentile))
        self.size = 1
        self.timeout_s = 0.0
        self.merge = 1
        self.rate = 0.0
        self._service = [0.0, 0.0]  # seconds by rows per call (index 0 unused)
        self._per_row = 0.0  # ... and for each row past those (see `plan`)
        self._plans = 0  # how many were made (queues cut under an earlier one are cut again)
        self._workers: dict[int, _Worker] = {}
        self._where: dict[int, int] = {}  # an entered request's worker, until its call ends
        # (end, the residual less the excess at its time, the residual, the call's
        # service time), seconds
        self._residuals: deque[tuple[float, float, float, float]] = deque(maxlen=RESIDUALS)
        # the latest calls as (end, seconds from start to end, rows: see `_learn`)
        self._latest: deque[tuple[float, float, int]] = deque(maxlen=LEVEL_CALLS)
        self._level = 0.0  # the latest calls' median residual (see the docstring)
        self._excess = 0.0  # of the level over the window's median
        # the median overhead as the stage was last found quiet, and the calls learned
        # since (as of the last level: see `_then`)
        self._calm = math.inf
        self._busy = self._busy_calls = 0
        self._peak = 0.0  # the highest excess since `spell_excess` was last asked
        self._unsettled: _Worker | None = None  # whose call was amended since (`_learn`)
        self._leveled_at = -math.inf  # the end of the call the level was last taken at
        self._fresh = REQUANTILE_EVERY  # residuals since the quantiles were computed
        self._spread: tuple[float, float] | None = None  # deviations' (median, quantile)
        self._tail = 0.0  # ... and their quantile at the SLO's percentile
        self._stretch = 0.0  # how late work runs under overload, per second (see `_predict`)
        self._stretch_span = math.inf  # ... on at most this much of it (see `plan`)
        self._sorted: list[float] = []  # the deviations, sorted, as of the cached quantiles
        self.prompt = False  # ends are reported as they happen (`finished`), not later
        self.closed_until = -math.inf  # arrivals before this are refused (`closed`)
        self.overloaded_at = -math.inf  # an arrival last found more arriving than it serves
        self._probed_at = -math.inf
        self._probe_every = PROBE_EVERY_S  # see `admit`
        self._fastest = math.inf  # see `plan`
        self._windows: dict[tuple[float, float, float, float, int], float] = {}  # see `_window`
        self._multirow = False  # a request of more than one row was admitted (`_rows`)

    # --- configuration ---------------------------------------------------------------

    def plan(
        self,
        size: int,
        timeout_s: float,
        merge: int,
        service_s: Sequence[float],
        rate: float,
        per_row: float | None = None,
    ) -> None:
        """The batching in force: `size` requests per batch, `timeout_s`, at most
        `merge` requests per call; `service_s[n]`: seconds for a call of n rows (n = 1
        .. merge; a call's rows are its requests' rows, one each but where told, see
        `admit`); `per_row`: seconds each row past those adds (None: as the last one
        listed did; the first, when only one is); `rate`: arrivals per second offered
        to the stage now."""
        self.size, self.timeout_s = max(1, size), max(0.0, timeout_s)
        self.merge = max(self.size, merge)
        service = np.asarray(service_s, dtype=float)
        if len(service) < self.merge + 1:
            raise ValueError(f"StageLedger.plan: service_s needs {self.merge + 1} entries")
        self._service = service.tolist()  # floats: read per arrival
        if per_row is None:
            per_row = service[-1] - service[-2] if len(service) > 2 else service[-1]
        self._per_row = max(float(per_row), 0.0)
        self._plans += 1
        # a worker's most requests per second: at its most efficient call size
        self._fastest = max(n / max(self._service[n], 1e-9) for n in range(1, self.merge + 1))
        self._stretch_span = STRETCH_CALLS * self._service[self.merge]
        self._probe_every = min(PROBE_EVERY_S, max(PROBE_MIN_S, PROBE_CALLS * self._service[1]))
        self.arriving(rate)
        self._relevel()

    def arriving(self, rate: float) -> None:
        """Arrivals per second offered to the stage now."""
        self.rate = max(0.0, rate)
        self._windows.clear()
        self.closed_until = -math.inf

    def overhead(self, overloaded: bool = False, w: _Worker | None = None) -> tuple[float, float]:
        """(median, `admit_quantile` quantile) of the next call's residual, seconds:
        the recent residuals', with the current excess (see the module docstring), and
        on worker `w` with its bias. `overloaded`: the quantile at the SLO's percentile
        instead (see `_window`)."""
        if self._fresh >= REQUANTILE_EVERY:
            self._fresh = 0
            if self._residuals:
                newest = self._residuals[-1][0]
                while (
                    len(self._residuals) > MIN_RESIDUALS
                    and self._residuals[0][0] < newest - RESIDUAL_WINDOW_S
                ):
                    self._residuals.popleft()
            # plain floats, sorted once: this runs every few calls on the driver's
            # receiving thread (numpy's sort and quantiles of 400 residuals: 263 us;
            # this: 55 us), and `bisect` searches the list per arrival
            kept = self._sorted = sorted(d for _, d, _, _ in self._residuals)
            if len(kept) >= FIRST_RESIDUALS:
                median, high = _quantile(kept, 0.5), _quantile(kept, self.admit_quantile)
                self._spread = (median, max(high, median))
                self._tail = max(_quantile(kept, self.percentile), self._spread[1])
                # per second of a call of at least the batch size: a short call's
                # residuals are mostly the runtime's own costs, not a slower machine
                floor = max(self._service[min(self.size, len(self._service) - 1)], 1e-6)
                over = [(r - high) / max(s, floor) for _, _, r, s in self._residuals if r > high]
                ratios = [0.0] * (len(self._residuals) - len(over)) + sorted(over)
                self._stretch = min(_quantile(ratios, self.percentile), STRETCH_MAX)
            else:
                self._spread = None
                self._stretch = 0.0
        if self._spread is None:
            return DEFAULT_OVERHEAD_S, DEFAULT_OVERHEAD_S
        high = self._tail if overloaded else self._spread[1]
        shift = self._shift(w)
        return shift + self._spread[0], shift + high

    def _shift(self, w: _Worker | None) -> float:
        """What worker `w`'s next residual is moved by now: the excess and its bias."""
        if self._unsettled is not None:
            self._settle()
        return self._excess + (w.bias if w is not None else 0.0)

    def _quiet(self, w: _Worker, now: float, workers: Sequence[int]) -> bool:
        """Whether the stage is quiet now (see `_then`): none of its `workers` (`w`
        among them) runs or holds a call, and none ended a call for LEVEL_S. Not a
        moment between two calls of an overload: taken for quiet, MiniLM at 3x
        overload, SLO 20x, answered 24-26% of its arrivals within the SLO, not 27-28%
        (3 runs each)."""
        if w.run is not None or w.queue or (self._latest and self._latest[-1][0] > now - LEVEL_S):
            return False
        return all(self._worker(k).run is None and not self._worker(k).queue for k in workers)

    def _then(self, end: float, median: float, calls: int) -> float:
        """When a worker's queue's next call starts after one ending at `end`, `calls`
        calls into the queue: a `median` overhead later; past as many calls as the
        stage ran since it was last found quiet, at most its median overhead then. A
        spell that came with the work is taken to last as long again as it was seen,
        not for all of a deep queue. A driver held up by a burst it was sent (1,000
        requests from a thread of its process, with a busy loop on one of 2 cores)
        read the burst's first calls 10-30 ms apart, and the workers, starved of the
        cores, ran them as far apart, for the 50 ms the burst took to send; charged on
        each of a queue of 60-100 calls, a burst its 2 workers answered within 0.3 s
        (2 + 0.5 ms per row) was predicted to take 1-1.3 s, and 320-500 of it were
        refused under an SLO of 1 s (1 burst in 4)."""
        if calls > self._busy_calls:
            median = min(median, self._calm)
        return end + median

    def residuals(self) -> np.ndarray:
        """The law of the next residual (seconds), as samples: the recent residuals,
        oldest first, with the current excess, each on one of the workers in turn, with
        its bias (see the module docstring)."""
        self._settle()
        kept = self._kept() + self._excess
        biases = [w.bias for w in self._workers.values()]
        if len(biases) > 1 and len(kept):
            kept += np.resize(np.array(biases), len(kept))
        return kept

    def _kept(self) -> np.ndarray:
        return np.fromiter((d for _, d, _, _ in self._residuals), float, len(self._residuals))

    def _relevel(self) -> None:
        """The level (the median residual of the calls of the last `LEVEL_S` seconds,
        at most `LEVEL_CALLS`, at least `LEVEL_MIN`, against the service times in
        force), and the excess: the level less the window's median, when the two are
        further apart than the window's spread (its median to its `admit_quantile`)."""
        if not self._latest:
            return
        # plain floats and `statistics.median`: this runs after every call, on the
        # driver's receiving thread (numpy's scalars and median: 66 us for 128 calls;
        # this: 41; stopping at the first call older than LEVEL_S, in the order seen:
        # 15 for the 50 calls of 0.3 s at 2 workers under overload)
        newest = self._latest[-1][0]
        latest = []
        for end, took, n in reversed(self._latest):
            if len(latest) >= LEVEL_MIN and end < newest - LEVEL_S:
                break
            latest.append(took - self._time(n))
        self._level = statistics.median(latest)
        self._busy_calls = self._busy
        if self._spread is None:
            self._excess = 0.0
            return
        median, high = self._spread
        gap = self._level - median
        self._excess = gap if abs(gap) > high - median else 0.0
        self._peak = max(self._peak, self._excess)

    def _rebias(self, w: _Worker, newest: float) -> None:
        """Worker `w`'s bias, its call having ended at `newest`: the median of its
        residuals of the last `WORKER_LEVEL_S` seconds less the level as each came,
        when at least `WORKER_LEVEL_MIN` and beyond what such a median strays by
        chance (about the spread over the square root of their count), else 0. The
        other workers' too when they had no call since then. At most every RELEVEL_S
        of `w`'s call ends."""
        if newest - w.biased_at < RELEVEL_S:
            return
        w.biased_at = newest
        since = newest - WORKER_LEVEL_S
        for other in self._workers.values():
            if other is not w and other.latest and other.latest[-1][0] < since:
                other.bias = 0.0
        offsets = []
        for end, offset in reversed(w.latest):
            if end < since:
                break
            offsets.append(offset)
        w.bias = 0.0
        if len(offsets) >= WORKER_LEVEL_MIN and self._spread is not None:
            median, high = self._spread
            bias = statistics.median(offsets)
            if abs(bias) > 2.0 * (high - median) / math.sqrt(len(offsets)):
                w.bias = bias

    def call_size(self) -> int:
        """Rows per call, the median of the latest calls (0 before any; see `_learn`)."""
        return int(statistics.median(n for _, _, n in self._latest)) if self._latest else 0

    def spell_excess(self) -> float:
        """The highest excess (seconds; a slow spell of the machine) since the last
        call of this."""
        self._settle()
        peak, self._peak = self._peak, max(self._excess, 0.0)
        return peak

    # --- decisions -------------------------------------------------------------------

    def admit(
        self,
        rid: int,
        now: float,
        slo_s: float,
        workers: Sequence[int],
        worker: int | None = None,
        enter_anyway: bool = False,
        arrives: float | None = None,
        rows: int = 1,
        spill: Sequence[int] = (),
    ) -> Verdict:
        """Predict request `rid`'s latency if it arrives now (or at `arrives`: a stage
        downstream of others, which it reaches once they ran), on `worker` (the one
        the router will pick; None: the one of the stage's `workers` that frees
        first), and enter it there when it meets the SLO (or `enter_anyway`: it will
        be served late). `rows`: the request's (the calls' times are by their rows).
        `spill`: workers past the plan's that it may go to when none of `workers` can
        take it in time."""
        at = now if arrives is None else max(now, arrives)
        if not workers:
            return Verdict(True, 0.0, None, at)
        overloaded = self.rate > self._fastest * len(workers)
        if overloaded:
            self.overloaded_at = now
        # the router's pick, unless it would refuse and another worker would take it
        # (the router follows: `worker_of`)
        if worker is None:
            worker = self.first_free(workers, now)
        w = self._worker(worker)
        self._advance(w, now)
        if self._quiet(w, now, workers):  # what comes is judged from its overhead now
            self._calm, self._busy, self._busy_calls = self.overhead(w=w)[0], 0, 0
        if rows > 1:
            self._multirow = True
        p = self._predict(w, now, overloaded, at, rows=rows)
        window = math.inf
        if overloaded:
            window = self._window(slo_s, p.high, p.typical + at - p.end, len(workers))
        meets = p.meets(slo_s, window)
        if not meets:
            # the router's pick balances outstanding requests, blind to which worker's
            # next call is filling: 47% of the refusals at 4 + 1 ms per row, 3x
            # overload, 2 workers, met the SLO on the other worker; and below
            # capacity (0.8 of it, SLO 50 ms), 0.8-0.9% of all arrivals were refused,
            # where batches of 16 within 10 ms and no admission answered 99.7% in time.
            # Then the workers the plan leaves: a plan on fewer workers than the pool
            # holds (cheaper: bigger calls) left a burst to one worker while another,
            # idle, had the stage loaded (two flows of 4 + 1 ms per row, SLO 25 ms, at
            # 300/s each on 2 workers: one planned on 1 refused 0-3.8%, now 0-0.2%)
            for other in (*workers, *spill):
                if other != worker:
                    o = self._worker(other)
                    self._advance(o, now)
                    q = self._predict(o, now, overloaded, at, rows=rows)
                    if q.meets(slo_s, window):
                        worker, w, p, meets = other, o, q, True
                        break
        # Even past the idle rule (see `_predict`), one every `_probe_every` probes: a
        # profile learned from a slow spell (a model's first calls) would otherwise
        # refuse everything for long. Nothing else renews the residuals when all is
        # refused: at 1 + 0.2 ms per row, SLO 3.6 ms, requests sent one at a time, a
        # profile's first extrapolation (0.5 ms a call of 1, not 1.2) refused every
        # one for up to a second, a probe every 0.2 s.
        # (not one whose SLO has passed already: no service time is short enough)
        probe = p.idle and slo_s > 0 and now - self._probed_at >= self._probe_every
        if probe and not meets and p.typical > slo_s:
            self._probed_at = now
        admit = meets or probe
        if not admit and not enter_anyway and not p.idle:
            workers = (*workers, *spill)
            self.closed_until = self._reopens(workers, now, slo_s, overloaded, window, at - now)
        if admit or enter_anyway:
            sent = max(at, w.queue[-1].sent) if w.queue else at
            deadline = at + slo_s - (p.latency + at - p.end)
            w.queue.append(_Entry(rid, sent, deadline, at + slo_s, max(rows, 1)))
            self._where[rid] = worker
        return Verdict(admit, p.latency, worker, at + p.typical)

    @property
    def timed(self) -> bool:
        """Whether the service times of a timed call are in (see `plan`)."""
        return bool(self._service[1])

    def awaits_timing(self, now: float, workers: Sequence[int]) -> bool:
        """Whether no call of the stage is timed yet and each of `workers` holds as many
        requests as `_predict` then enters (one merged call's worth): an arrival now
        would be refused for want of a timing, not for a predicted miss."""
        if self.timed or not workers:
            return False
        for worker in workers:
            w = self._worker(worker)
            self._advance(w, now)
            if len(w.queue) < self.merge:
                return False
        return True

    def _predict(
        self,
        w: _Worker,
        now: float,
        overloaded: bool = False,
        at: float | None = None,
        basis: _Basis | None = None,
        rows: int = 1,
    ) -> _Prediction:
        """What a request arriving now on worker `w` would meet (pure): the queue
        with it, cut into calls from when the worker frees. Under overload, where each
        admitted request is near the SLO (see `_window`), its overhead is at least
        `admit_quantile`'s plus a stretch of the work whose end is not seen yet (from
        the running call's start to the end of its own call): the residuals' excess
        over `admit_quantile`'s quantile, per second of a call, at the SLO's
        percentile (`_stretch`), taken as they came, a spell's included. One call's
        residual is not all such a request meets: a slow spell of the machine slows
        the running call and its own alike (MiniLM at 20x, 3x overload: calls of
        200-300 ms ran 0.8-1.7x their service time, two in a row correlated 0.43, and
        the requests of the second answered up to 1.5x the SLO; at 4 + 1 ms per row,
        SLO 15 ms, 3x overload, simulated: p99 1.04-1.11x the SLO). But a spell's, not
        every call's tail in a row: on at most STRETCH_CALLS full calls' time, at most
        STRETCH_MAX. Charged over a burst's whole queue, a stretch of 2-8 (the jitter
        of calls of 2 at light load, 3 ms each) refused the deeper half of a burst of
        2,000 that 2 workers answered within 0.6 s, under an SLO of 1 s. `at`: when the
        request reaches the worker, if later than `now` (see `admit`); `basis`: what
        predictions on `w` share whatever the time, from `_basis(w, overloaded)`;
        `rows`: the request's."""
        at = now if at is None else at
        median, high, base, stretch = basis or self._basis(w, overloaded)
        entries = w.queue
        unseen = min(now, w.run.start) if w.run is not None else now
        span = self._stretch_span
        sent = max(at, entries[-1].sent) if entries else at
        free = self._frees(w, now, median)
        ahead = self._lanes.view(w.index, self)
        crowded = False  # another stage's calls run there first
        if ahead is not None:
            head = entries[0].sent if entries else sent
            own = max(free, head)
            free = ahead.wait(head + self.slack, free, own, self._call_s(len(entries) + 1))
            crowded = free > own
        closed = self._closed(w, free, median, ahead)
        # the requests queued meet their SLOs: each call's oldest does
        fits = all(
            end <= deadline and end + base + stretch * min(end - unseen, span) <= due
            for end, deadline, due in closed.calls
        )
        last, sents = _from(entries, closed.first)
        sents.append(sent)
        first, start, end = 0, now, now
        calls = self._cut(
            sents, closed.last, median, ahead, self._rows(last, rows), len(closed.calls)
        )
        for call in calls:
            first, take, start, end = call
            if first < len(last) and (
                end > last[first].deadline
                or end + base + stretch * min(end - unseen, span) > last[first].due
            ):
                fits = False  # that call's oldest request would miss its SLO
            if first + take == len(sents):
                break
        first += closed.first
        # A worker with nothing to run before this request serves it as soon as the
        # stage can: refusing it would help no other request, and the stage would
        # stop learning (no calls, no residuals) while a tail of stalls inflates its
        # overhead quantile. It is admitted when its typical latency meets the SLO.
        # Not so behind other stages' calls: a probe (see `admit`) there waited for
        # them (1 + 0.2 ms per row, SLO 5 ms, next to a stage of 20 + 5 ms per row
        # that kept both workers busy: 9% of the requests admitted, all 10-20x late).
        idle = w.run is None and not entries and not crowded
        if not self._service[1]:
            # No call timed yet (a fresh stage): how long calls take is unknown, so
            # each worker queues at most one merged call's worth behind the running
            # one. All of a flood at deploy was admitted before (at 13x, 866 requests
            # in the first 0.25 s), and every later request waited behind them,
            # unseen: all answered 0.6-3 s late, for as long as the flood lasted.
            fits = len(entries) < self.merge
        lead = start - at if first == len(entries) and not idle else 0.0
        margin = max(high, base + stretch * min(end - unseen, span))
        return _Prediction(end, fits, end + margin - at, end + median - at, idle, high, lead)

    def _basis(self, w: _Worker, overloaded: bool) -> _Basis:
        """What `_predict` on worker `w` takes whatever the time: the overhead's median
        and quantile (see `overhead`), the base and stretch of the margin, the queue."""
        median, high = self.overhead(overloaded, w)
        if not overloaded:
            return _Basis(median, high, high, 0.0)
        return _Basis(median, high, self.overhead(w=w)[1], self._stretch)

    def _frees(self, w: _Worker, now: float, median: float) -> float:
        """When worker `w` is expected to be free for its queue: its running call's
        end, with the typical overhead; when ends are seen as they happen and the call
        is late already, where past calls that ran at least this late ended (the
        median of those residuals; twice the lateness when none did)."""
        if w.run is None:
            return w.free_since
        late = now - w.run.end  # the residual so far
        if not self.prompt or late <= median or late > STALE_S:
            return w.run.end + median
        # as `overhead()` left them: sorted, at most a few calls old, less today's shift
        past, shift = self._sorted, self._shift(w)
        cut = bisect_right(past, late - shift)  # the longer ones on
        longer = len(past) - cut
        if not longer:
            return w.run.end + 2.0 * late
        middle = cut + longer // 2
        expected = past[middle] if longer % 2 else (past[middle - 1] + past[middle]) / 2
        return w.run.end + expected + shift

    def _cut(
        self,
        sents: Sequence[float],
        free: float,
        median: float,
        ahead: _Ahead | None = None,
        rows: Sequence[int] | None = None,
        done: int = 0,
    ) -> Iterator[tuple[int, int, float, float]]:
        """The calls a worker free from `free` makes of requests queued at `sents` (in
        order, none sent before the one ahead of it), as `BatchRule` cuts them:
        (first, requests, start, end) each, the next one starting a typical overhead
        after the end of the one before (`_then`: `done` calls of the queue were cut
        before these), and after the other stages' calls there that come first
        (`ahead`, when given). `rows`: each request's (None: 1 each)."""
        i, n = 0, len(sents)
        while i < n:
            start = max(free, sents[i])
            if self.timeout_s:
                full = self._filling(rows, i)  # the request that fills the batch
                filled = sents[full] if full < n else math.inf
                start = max(start, min(sents[i] + self.timeout_s, filled))
            waiting = bisect_right(sents, start, i, n) - i
            take = self._take(waiting)
            end = start + (self._service[take] if rows is None else self._time(rows, i, take))
            yield i, take, start, end
            done += 1
            i, free = i + take, self._then(end, median, done)
            if ahead is not None and i < n:
                later = max(free, sents[i])
                free = ahead.wait(sents[i] + self.slack, free, later, self._call_s(n - i))

    def _take(self, queued: int) -> int:
        """How many of `queued` requests a free worker's call takes, once due."""
        return min(queued, self.merge if queued > self.size else self.size)

    def _call_s(self, queued: int) -> float:
        """How long the call a worker makes of `queued` one-row requests takes."""
        return self._service[max(self._take(queued), 1)]

    def _filling(self, rows: Sequence[int] | None, first: int) -> int:
        """The index of the request that fills the batch request `first` opens: the
        planned size's worth of requests, or of rows (`rows`: each request's, when
        told), as `BatchRule` fills it (maybe past the requests there are)."""
        if rows is not None:
            total = 0
            for k in range(first, min(first + self.size, len(rows))):
                total += rows[k]
                if total >= self.size:
                    return k
        return first + self.size - 1

    def _time(self, rows: Sequence[int] | int, first: int = 0, take: int = 1) -> float:
        """Seconds for a call of `rows` rows, or of the requests `first` .. `first` +
        `take` - 1 of those whose rows `rows` lists (past the sizes planned for,
        `per_row` each: see `plan`)."""
        n = rows if isinstance(rows, int) else sum(rows[first : first + take])
        service, top = self._service, len(self._service) - 1
        if n <= top:
            return service[max(n, 0)]
        return service[top] + (n - top) * self._per_row

    def _rows(self, entries: Iterable[_Entry], more: int | None = None) -> list[int] | None:
        """The rows of `entries` (and `more`, when given, after them); None while every
        request the stage admitted had one row (the calls' times by their requests)."""
        if not self._multirow:
            return None
        rows = [e.rows for e in entries]
        if more is not None:
            rows.append(more)
        return rows

    def _closed(self, w: _Worker, free: float, median: float, ahead: _Ahead | None) -> _Cut:
        """Worker `w`'s queue cut into calls from `free`, all but the last one. A request
        appended to the queue changes its last call only (each call before took all
        that was waiting, or all it could), and while the worker runs late (`free`
        later each time) a backlog makes the same calls, later: the cut is kept, and
        each arrival cuts the last call only, until the queue is cut otherwise (a call
        begins, a request leaves; `free` moves the calls' starts past their requests'
        arrivals; `median` or the plan change). Cut whole for each arrival, a burst on 2
        workers (2 + 0.5 ms per row, SLO 1 s) cost 0.36 ms an arrival with 875 queued a
        worker, 1.2 ms with 1,750, and a burst of 2,000 took 0.6-0.9 s to send; kept,
        ~30 us (`benchmarks.admission_cost`). With other stages' calls to wait for
        (`ahead`), it is cut whole."""
        queue, cut, key = w.queue, w.cut, (median, self._busy_calls, self._calm, self._plans)
        if ahead is not None:
            return _Cut(key, free, last=free)
        if (
            cut is None
            or cut.key != key
            or not cut.low <= free - cut.free <= cut.high
            or len(queue) <= cut.first
            or queue[cut.first] is not cut.opener  # (requests before it left)
        ):
            cut = w.cut = _Cut(key, free, opener=queue[0] if queue else None, last=free)
        elif free != cut.free:
            cut.shift(free - cut.free)
        left = len(queue) - cut.first
        if left > 1:
            last, sents = _from(queue, cut.first)
            first, rows = 0, self._rows(last)
            calls = self._cut(sents, cut.last, median, None, rows, len(cut.calls))
            for first, take, start, end in calls:
                if first + take == left:
                    break
                low, high = self._room(sents, first, take, start, cut.last, rows)
                cut.low, cut.high = max(cut.low, low), min(cut.high, high)
                cut.calls.append((end, last[first].deadline, last[first].due))
                cut.last = self._then(end, median, len(cut.calls))
            cut.first += first
            cut.opener = last[first]
        return cut

    def _room(
        self,
        sents: Sequence[float],
        first: int,
        take: int,
        start: float,
        free: float,
        rows: Sequence[int] | None = None,
    ) -> tuple[float, float]:
        """How much earlier or later than `free` a worker may free for the call of
        `take` requests from `first` (of requests queued at `sents`) starting at
        `start`, and make the same call that much earlier or later: as long as it
        starts when the worker frees, with the same requests waiting (all it could
        take, or all there were)."""
        if start > free:  # when its requests came (or their batch was due)
            return 0.0, 0.0
        low = sents[first + take - 1] - start
        if self.timeout_s:
            full = self._filling(rows, first)
            due = min(sents[first] + self.timeout_s, sents[full] if full < len(sents) else math.inf)
            low = max(low, due - start)
        after = sents[first + take] - start
        return low, math.inf if after <= 0 else math.nextafter(after, -math.inf)

    def _advance(self, w: _Worker, now: float) -> None:
        """Worker `w`'s calls due by `now`: a free worker starts the call its queue
        makes once due; when ends are not seen as they happen, a call predicted to
        have ended (with the typical overhead) is taken to have, until its report."""
        median = self.overhead(w=w)[0]
        while True:
            if w.run is not None:
                # with no call timed yet, a call ends only when seen to (or reported)
                if self.prompt or w.run.end + median > now or not self._service[1]:
                    if w.run.end < now - STALE_S:  # never seen ending: cancelled, lost
                        self._end(w, w.run.end + median)
                        continue
                    return
                w.unreported.append(w.run)
                self._end(w, w.run.end + median)
            if not w.queue:
                return
            # its next call: of the first `merge` + 1 at most (more would not change it)
            heads = list(islice(w.queue, self.merge + 1))
            sents, rows = [e.sent for e in heads], self._rows(heads)
            _, take, start, end = next(self._cut(sents, w.free_since, median, None, rows))
            ahead = self._lanes.view(w.index, self)
            if ahead is not None:
                later = ahead.wait(sents[0] + self.slack, w.free_since, start, end - start)
            else:
                later = start
            if later > start:  # behind another stage's calls there
                _, take, start, end = next(self._cut(sents, later, median, None, rows))
            if start > now:
                return
            taken = [w.queue.popleft() for _ in range(take)]
            w.run = _Call({e.rid: e.rows for e in taken}, start, end)

    def _end(self, w: _Worker, at: float) -> None:
        """Worker `w`'s running call ended at `at`: it is free from then."""
        if w.run is not None:
            for rid in w.run.rids:
                self._where.pop(rid, None)
        w.run, w.free_since = None, at
        self.closed_until = -math.inf

    def _reopens(
        self,
        workers: Sequence[int],
        now: float,
        slo_s: float,
        overloaded: bool,
        window: float,
        lag: float = 0.0,
    ) -> float:
        """After a refusal: the first time, on a grid of REOPEN_STEPS steps of a
        REOPEN_GRID-th of the SLO, at which one of `workers` would admit an arrival
        if nothing but time changed (no call seen ending, no new plan, nothing
        forgotten; it is reset when one does). Arrivals before then are refused
        without a prediction each (`closed`): under overload most arrivals are, and
        the driver refusing them shares its cores with the results of those
        admitted. `lag`: how long after its arrival a request reaches the stage."""
        step = slo_s / REOPEN_GRID
        # now (k = 0) none would: it was just refused on each of them (see `admit`)
        mirrors = [self._workers.get(worker) or _Worker() for worker in workers]
        bases = [self._basis(w, overloaded) for w in mirrors]
        for k in range(1, REOPEN_STEPS):
            t = now + k * step
            for w, basis in zip(mirrors, bases):
                if self._predict(w, t, overloaded, t + lag, basis).meets(slo_s, window):
                    return t
        return now + REOPEN_STEPS * step

    def _window(self, slo_s: float, high: float, median: float, workers: int) -> float:
        """Under overload, how long before its start a request may open a call behind
        a busy worker. Overloaded (more arrivals per worker than its most efficient
        calls serve), first come, first admitted alternates long and short calls: a
        request arriving as a long call begins opens the next one, whose SLO then
        leaves it room for a few requests only, and the one after opens late and is
        long again (calls of 7-11 and 2-5 at 4 + 1 ms per row, 3x overload). Most
        arrivals are refused anyway; the ones kept are the last before a call starts,
        as many as then fit: `n` for which the arrivals expected in the window (the
        SLO less service(n) and the overhead quantile `high`) are `n`. Every admitted
        request is then near the SLO, so `high` is the SLO's percentile of the
        overhead, not `admit_quantile`'s (see `overhead`); and the work ahead of it
        may run `_stretch` late (see `_predict`) past the `median` overhead, from the
        start of the call running when the opener comes, as `_predict` charges it:
        the window leaves room for that call's stretch (taken as one of `n`, at most
        RUNNING_STRETCH_MAX of it) where `n` arrivals still come in it. Without that
        room, an opener that came as a call began left room for `n` - 1 only (4 + 1
        ms per row, SLO 15 ms, 1.5x overload, stretch 0.04-0.10: calls of 2.2-2.7
        where 3 fit; 5 runs each, interleaved, twice: 641-709 answers in time a
        second, means 675 and 674; with it, calls of 2.8-2.9, means 707 and 714,
        though one run of the 10 answered 562). Where the room would cost a smaller
        `n`, it is not taken: under slow spells, a smaller `n` cost more goodput than
        the fuller calls gave (simulated, see the tests)."""
        key = (slo_s, high, median, self._stretch, workers)
        window = self._windows.get(key)
        if window is None:
            per_worker = self.rate / max(workers, 1)
            # the latest end that meets the SLO with the stretch on at most its span
            stretched = max(
                (slo_s - median) / (1.0 + self._stretch),
                slo_s - median - self._stretch * self._stretch_span,
            )
            budget = min(slo_s - high, stretched)
            n = self.merge
            while n > 1 and per_worker * (budget - self._service[n]) < n:
                n -= 1
            plain = budget - self._service[n]
            roomy = plain - min(self._stretch, RUNNING_STRETCH_MAX) * self._service[n]
            window = max(roomy if per_worker * roomy >= n else plain, 0.0)
            if len(self._windows) > 64:  # the overhead quantile moves: old ones go
                self._windows.clear()
            self._windows[key] = window
        return window

    def worker_of(self, rid: int) -> int | None:
        """The worker an admitted request was entered on, until its call ends."""
        return self._where.get(rid)

    def closed(self, now: float) -> bool:
        """Whether an arrival now is refused for certain (see `_reopens`)."""
        return now < self.closed_until

    def routed(self, rid: int, worker: int, now: float) -> None:
        """The router sent `rid` to `worker` now: it queues there from now (it was
        entered on the worker the router was to pick, and sent at once, unless it
        waited at the driver for room)."""
        was = self._where.get(rid)
        if was is None:
            return
        queue = self._workers[was].queue
        if was == worker and queue and queue[-1].rid == rid:  # the usual: just entered
            queue[-1].sent = max(queue[-1].sent, now)
            return
        entry = self._unqueue(self._workers[was], rid)
        if entry is None:
            return
        queue = self._worker(worker).queue
        entry.sent = max(entry.sent, now, queue[-1].sent if queue else now)  # in order
        queue.append(entry)
        self._where[rid] = worker

    def finished(
        self, rid: int, now: float, ok: bool = True, passed: bool = False, call: object = None
    ) -> None:
        """Request `rid` ended at `now` (its result reached the driver): with `ok`, its
        call is seen ending (the first result of a call counts); without, once ends
        are seen as they happen (`prompt`), it leaves its call. `passed` (without
        `ok`): it was answered by later stages, so its call had ended; that ends
        the call while no call is timed (see `_predict`), before reports come.
        `call`: which call of its worker it ran in (a value no other call of that
        worker has: when it began, on the worker's clock), when known; else a result
        soon after the last end seen is taken to be of that call."""
        worker = self._where.get(rid)
        if worker is None:
            return
        w = self._workers[worker]
        if ok:
            self.prompt = True
            self._advance(w, now)
            run = w.run
            if call is not None:
                same = call == w.seen
            else:
                same = (
                    run is not None
                    and run.start == w.free_since
                    and now - run.start < 0.5 * self._service[1]
                )
            if same:
                rows = self._rows_in(w, rid)
                # of the call last seen ending (as `call` says; without it, too soon
                # for a call begun then): that call took this request as well (it
                # reached the worker before that call began, not after), and what was
                # learned of that call is of one request more. Under overload a
                # request opening a call on an idle worker often reaches it with a
                # dozen more (4 + 1 ms per row, SLO 100 ms, 3x: a call taken for 1
                # request, 5 ms, held 13 and was seen 26 ms after it began): taken for
                # calls of 1, 40% of the calls seemed 20 ms late, and the overhead
                # quantile was 39 ms. Without `call`, the rest of the results of a
                # call that a busy driver took more than half a request's service to
                # read were taken for a call of their own, 2.7 ms long, after one
                # seemingly 30-70 ms late.
                if self._take_out(w, rid):
                    w.run = None
                elif run is not None:  # begun under an earlier plan, it may hold more
                    run.end = run.start + self._time(run.rows())
                if w.learned is not None:
                    (end, took, _), (count, requests) = w.learned[1:]
                    self._learn(w, end, took, count + rows, requests + 1, amend=True)
                self.closed_until = -math.inf
                return
            w.learned = None  # this call is not the last learned, whether learned or not
            if w.run is not None and rid in w.run.rids:
                took = now - w.run.start
                self._learn(w, now, took, w.run.rows(), len(w.run.rids))
            elif any(entry.rid == rid for entry in w.queue):
                # it ran in a call not mirrored as such (it reached the worker before
                # the call began, or after): that call held the queue up to it
                while w.queue[0].rid != rid:
                    self._where.pop(w.queue.popleft().rid, None)
                w.queue.popleft()
            self._where.pop(rid, None)
            self._end(w, now)
            w.seen = call
            self._advance(w, now)
        # failed, cancelled or past its deadline: it runs no more (its call failed, or
        # it is dropped from the queue); a call all of whose requests did so is over,
        # and no stall to wait for
        elif self.prompt and self._take_out(w, rid):
            self._end(w, now)
        elif passed and not self._service[1] and w.run is not None and rid in w.run.rids:
            self._end(w, now)
            self._advance(w, now)

    def observed(
        self, worker: int, size: int, end: float, sent: float = -math.inf, rows: int | None = None
    ) -> None:
        """Worker `worker` ended a call of `size` requests (`rows` rows; None: one each)
        at `end`, the oldest of them sent at `sent` (as its report says, later; ends are
        not seen as they happen):
        the call taken to have ended there nearest that end is corrected by it, and
        those taken to have ended before it are done with (the worker ran them
        otherwise: merged, or not at all). Paired in order instead, one call more
        taken than run would pair every later report with an ever older call."""
        w = self._workers.get(worker)
        if w is None or size < 1:
            return
        while w.unreported and w.unreported[0].end < sent:
            # taken to end before this call's requests were sent: not this call. Paired
            # with it, the first call of a light load after a quiet spell seemed 0.6 s
            # late (the spell), and the overhead quantile refused 98% of that load
            w.unreported.popleft()
        if w.unreported:
            nearest = min(range(len(w.unreported)), key=lambda k: abs(w.unreported[k].end - end))
            for _ in range(nearest):
                w.unreported.popleft()
            call = w.unreported.popleft()
            self._learn(w, end, end - call.start, size if rows is None else rows, size)
            median = self.overhead(w=w)[0]
            surprise = end - (call.end + median)
            after = (*w.unreported, *([w.run] if w.run else []))
            if surprise <= 0:  # the worker is that much earlier than taken
                w.free_since += surprise
                for later in after:
                    later.start += surprise
                    later.end += surprise
                return
            # later: the calls after it start once it ended, no sooner, and those that
            # were to start later anyway (on their requests' arrival) stay. Shifted by
            # the whole surprise, a call that began after a quiet spell moved with the
            # spell's first calls, which waited for the stage to load: 0.6 s ahead,
            # and every arrival meanwhile was refused
            free = end + median
            for later in after:
                if later.start >= free:
                    return
                later.end += free - later.start
                later.start, free = free, later.end + median
            w.free_since = max(w.free_since, free)
        elif w.run is not None:
            self._learn(w, end, end - w.run.start, w.run.rows(), len(w.run.rids))
            self._end(w, end)
            self._advance(w, end)

    def loading(self, worker: int) -> None:
        """Worker `worker` is loading the stage (a cold start): its next call learned
        waited for that, and its lateness is no overhead of the runtime's. The stage's
        first calls are not learned anyway (no service times yet), but a worker that
        loads it later was: a stage class imported from a module that took 0.5 s to
        import on the second worker left one residual of 0.5 s, the overhead's tail
        under overload for the next 50 calls, and a warm stage refused 86-528 of a
        burst of 1,000 its 2 workers answered within 0.3 s, under an SLO of 1 s."""
        self._worker(worker).cold = True

    def forget(self, rid: int) -> None:
        """Request `rid` was not run after all (refused later, failed before routing)."""
        worker = self._where.get(rid)
        if worker is None:
            return
        w = self._workers[worker]
        self.closed_until = -math.inf
        if self._take_out(w, rid):  # its call never ran
            self._end(w, w.run.start)

    # --- internals -------------------------------------------------------------------

    def _learn(
        self, w: _Worker, end: float, took: float, count: int, requests: int, amend: bool = False
    ) -> None:
        """A call of `requests` requests of `count` rows on worker `w` took `took`
        seconds from its start to `end`; `amend`: that is the call last learned on `w`,
        which held that many after all (see `finished`). Its residual is against the
        rows of at most `merge` of its requests: no call is predicted longer, and a
        call of more (begun under an earlier plan, or cut otherwise than mirrored)
        made the calls behind it that much later than predicted. Against its whole
        rows, MiniLM at 5x and 3x overload answered 22% less (median 269/s against 345
        before rows were counted, 9 runs each, interleaved)."""
        judged = count if requests <= self.merge else count * self.merge // requests
        service = self._time(max(judged, 1))
        if not service:
            # no service times yet: a stage's first calls, which wait for it to load
            # (MiniLM: 0.2-0.25 s), would be taken as the runtime's overhead, and the
            # quantile at the SLO's percentile kept them for seconds (0 requests a call
            # could wait for, at 3x overload, until 200 calls had ended since)
            return
        if w.cold:
            w.cold = False
            return
        residual = took - service
        # an amended call's shift as it stood (settling it would undo `amend` below)
        shift = self._excess + w.bias if amend else self._shift(w)
        kept = (end, residual - shift, residual, service)
        latest = (end, took, judged)
        if amend and w.learned is not None:
            _replace(self._residuals, w.learned[0], kept)
            _replace(self._latest, w.learned[1], latest)
            w.latest.pop()
        else:
            self._residuals.append(kept)
            self._latest.append(latest)
            self._fresh += 1
            self._busy += 1
        w.learned = (kept, latest, (count, requests))
        if amend:
            # one request more of the call just learned: its results are read back to
            # back, and the level and bias, taken again after each (41 + 30 us with 128
            # calls in the window: 6-8% of the time the driver held the GIL at 3,300
            # requests/s in calls of 4), are taken once, when next read
            w.latest.append((end, residual - self._level))
            self._unsettled = w
            return
        self._relevel_after(end)
        w.latest.append((end, residual - self._level))
        self._rebias(w, end)

    def _relevel_after(self, end: float) -> None:
        """A call ended at `end`: take the level again, once RELEVEL_S has passed
        since the last take."""
        if end - self._leveled_at >= RELEVEL_S:
            self._leveled_at = end
            self._relevel()

    def _settle(self) -> None:
        """Take the level and the bias of the worker whose call was amended since
        (each at most every RELEVEL_S)."""
        w, self._unsettled = self._unsettled, None
        if w is not None:
            end = w.latest[-1][0]
            self._relevel_after(end)
            self._rebias(w, end)

    def _worker(self, worker: int) -> _Worker:
        w = self._workers.get(worker)
        if w is None:
            w = self._workers[worker] = _Worker(worker)
            self._lanes.join(worker, self, w)
        return w

    def leave(self) -> None:
        """The stage is gone: other stages no longer wait for its calls."""
        self._lanes.leave(self)

    def busy_until(self, w: _Worker) -> float:
        """When worker `w`'s running call ends, with the typical overhead; else when
        its last call did. Read by other stages' ledgers, without this one's lock
        (see `Lanes`)."""
        run, spread = w.run, self._spread
        if run is None:
            return w.free_since
        return run.end + (spread[0] if spread is not None else DEFAULT_OVERHEAD_S)

    def queued_calls(self, w: _Worker) -> list[tuple[float, float, float]]:
        """Worker `w`'s queue cut into calls, as (its oldest request's sent plus the
        stage's `slack`, when it is due, seconds with the typical overhead). Read as
        `busy_until` is."""
        entries, service, spread = list(w.queue), self._service, self._spread
        median = spread[0] if spread is not None else DEFAULT_OVERHEAD_S
        rows = self._rows(entries)
        size, merge, top = self.size, self.merge, len(service) - 1
        calls, i = [], 0
        while i < len(entries):
            left = len(entries) - i
            take = min(left, merge if left > size else size, top)
            head = entries[i].sent
            due = head if self._filling(rows, i) < i + take else head + self.timeout_s
            took = service[max(take, 1)] if rows is None else self._time(rows, i, max(take, 1))
            calls.append((head + self.slack, due, took + median))
            i += max(take, 1)
        return calls

    def _take_out(self, w: _Worker, rid: int) -> bool:
        """Take `rid` out of worker `w`'s running call or queue: True when that left
        the running call empty."""
        self._where.pop(rid, None)
        if w.run is None or rid not in w.run.rids:
            self._unqueue(w, rid)
            return False
        w.run.rids.pop(rid, None)
        return not w.run.rids

    def _rows_in(self, w: _Worker, rid: int) -> int:
        """The rows of request `rid`, in worker `w`'s running call or queue."""
        if not self._multirow:
            return 1
        if w.run is not None and rid in w.run.rids:
            return w.run.rids[rid]
        return next((e.rows for e in w.queue if e.rid == rid), 1)

    def _unqueue(self, w: _Worker, rid: int) -> _Entry | None:
        for entry in w.queue:
            if entry.rid == rid:
                w.queue.remove(entry)
                self.closed_until = -math.inf
                return entry
        return None

    def first_free(self, workers: Sequence[int], now: float) -> int:
        """The worker through its queued calls first, where a batch opened now starts
        soonest (among those free now, the one free longest). A batch bound to the
        worker with the fewest requests waits for it though the other frees first:
        simulated (2 workers, 11.3 + 2.1 ms per row, 375/s, batches of 6 within
        10.9 ms), p99 46-49 ms, and 42-43 with the batch on the first free."""
        best, first = workers[0], (math.inf, math.inf)
        for k in workers:
            w = self._worker(k)
            self._advance(w, now)
            median = self.overhead(w=w)[0]
            free, queue = self._frees(w, now, median), w.queue
            ahead = self._lanes.view(w.index, self)
            if ahead is not None and queue:  # as `_predict`, other stages' calls first
                head, took = queue[0].sent, self._call_s(len(queue) + 1)
                free = ahead.wait(head + self.slack, free, max(free, head), took)
            closed = self._closed(w, free, median, ahead)
            free = closed.last
            entries, sents = _from(queue, closed.first)
            done = len(closed.calls)
            for _, _, _, end in self._cut(sents, free, median, ahead, self._rows(entries), done):
                done += 1
                free = self._then(end, median, done)
            if ahead is not None:
                free = ahead.wait(now + self.slack, free, max(free, now), self._call_s(1))
            # to the nanosecond: kept (`_closed`), a cut's sums differ from a whole
            # recut's in their last bits, and workers that tie are picked in order
            soonest = (round(max(free, now), 9), round(free, 9))
            if soonest < first:
                best, first = k, soonest
        return best


class Lanes:
    """The SLO stages sharing a runtime's workers, by worker. A worker runs one call
    at a time, whichever stage it is of, the one whose oldest request is due first
    (sent plus the stage's SLO, `StageLedger.slack`): a stage's next call there starts
    once another stage's running call ends, and after that stage's queued calls due
    first (`view`). Without it, two flows' SLO stages on the same 2 workers (4 + 1 ms
    per row, SLO 25 ms, 400 requests/s each: 0.6 of what the workers serve) took each
    other's calls for their own overhead (median 5-7 ms, not 0.3) and refused 3-25% of
    their requests, where batches of 8 with no wait answered 97-98% in time.

    Each stage's ledger runs under its own lock: another's mirror of a worker is read
    without it, a field at a time (its running call, a copy of its queue)."""

    def __init__(self, unmirrored: Callable[[int, int | None], float] | None = None) -> None:
        self._lock = threading.Lock()
        self._members: dict[int, tuple[tuple[StageLedger, _Worker], ...]] = {}
        # (worker, app) -> when the worker is done with other apps' runs that no ledger
        # mirrors (stages without an SLO), as the runtime counts them
        self._unmirrored = unmirrored

    def join(self, worker: int, ledger: StageLedger, mirror: _Worker) -> None:
        """`ledger` mirrors `worker` as `mirror`."""
        with self._lock:
            self._members[worker] = (*self._members.get(worker, ()), (ledger, mirror))

    def leave(self, ledger: StageLedger) -> None:
        with self._lock:
            for worker, members in self._members.items():
                self._members[worker] = tuple(m for m in members if m[0] is not ledger)

    def view(self, worker: int, ledger: StageLedger) -> _Ahead | None:
        """What other stages run on `worker` before `ledger`'s calls there (None:
        no other stage shares it)."""
        members = self._members.get(worker, ())
        busy = self._unmirrored(worker, ledger.app) if self._unmirrored else -math.inf
        if len(members) < 2 and busy == -math.inf:
            return None
        # a stage after it in a flow runs a request's call once its input comes, which
        # its ledger only predicts (see `StageLedger.admit`): waiting for those calls
        # held back calls that had run (a first stage's residuals went to a median of
        # -4 ms, and it refused 3-5% of a light load)
        others = [
            (other, mirror)
            for other, mirror in members
            if other is not ledger and id(other) not in ledger.later
        ]
        return _Ahead(others, busy) if others or busy > -math.inf else None


class _Ahead:
    """The other stages' calls on one worker, as one prediction goes through a
    stage's calls there in order (`wait`): each call of theirs is counted once."""

    def __init__(self, others: list[tuple[StageLedger, _Worker]], busy: float) -> None:
        # when the worker is free of their running calls (or ended since: a ledger
        # mirrors its calls when next asked, which may be after they ran), and of the
        # runs no ledger mirrors (`busy`)
        self.free = max([busy] + [other.busy_until(mirror) for other, mirror in others])
        self.calls = [other.queued_calls(mirror) for other, mirror in others]
        self.margins = [FILLING_MARGIN * other.slack for other, _ in others]
        self.taken = [0] * len(others)

    def wait(self, first: float, free: float, start: float, seconds: float = 0.0) -> float:
        """When a call whose oldest request is due at `first` (sent plus its stage's
        `slack`), taking `seconds`, starts, at the earliest `start`, the worker being
        free of its stage's calls from `free`: after the running calls of the others,
        and their queued calls that are runnable by then and either due before it or
        begun before it can be (the worker runs what is runnable when it frees: a
        stage of 20 + 5 ms per row, SLO 200 ms, ran its calls of 60 ms between the
        calls of one of 1 ms and SLO 5 ms), or still filling, due before it, and late
        behind it (the worker runs those at once, short of their size: see
        FILLING_MARGIN)."""
        free = max(free, self.free)
        more = True
        while more:
            more = False
            for k, calls in enumerate(self.calls):
                if self.taken[k] < len(calls):
                    key, due, took = calls[self.taken[k]]
                    frees, margin = max(start, free), self.margins[k]
                    if due <= frees and (key < first or max(free, due) < start):
                        free = max(free, due) + took
                    elif due > frees and key < first and frees + seconds + took > key - margin:
                        free = frees + took
                    else:
                        continue
                    self.taken[k] += 1
                    more = True
        return max(start, free)


def _from(queue: deque[_Entry], first: int) -> tuple[list[_Entry], list[float]]:
    """The entries of `queue` from index `first` on, in order, and their send times
    (without walking the ones before)."""
    entries = list(islice(reversed(queue), len(queue) - first))
    entries.reverse()
    return entries, [e.sent for e in entries]


def _replace(items: deque, old: object, new: object) -> None:
    """Replace `old` (that very object), one of the last few of `items`, by `new`."""
    for k in range(len(items) - 1, max(len(items) - 9, -1), -1):
        if items[k] is old:
            items[k] = new
            return


def _quantile(ordered: list[float], q: float) -> float:
    """The `q` quantile of the non-empty sorted list `ordered` (numpy's default: linear
    between the nearest ranks)."""
    at = q * (len(ordered) - 1)
    low = int(at)
    if low + 1 >= len(ordered):
        return ordered[-1]
    return ordered[low] + (ordered[low + 1] - ordered[low]) * (at - low)
