"""Admission for an SLO batching stage: each arriving request's latency, predicted from
the stage's state now, and a refusal when it would miss the SLO.

`StageLedger` mirrors what the runtime does with the requests it admitted, worker by
worker: requests routed to a worker queue there and run as one call once the worker
is free and the call is due (full at the planned batch size, or its first request has
waited the planned timeout; at once with no timeout), up to `merge` requests per call
(a worker with more than a batch queued runs up to two as one call, `BatchRule`).
Each queued call (a `Group`) has a predicted start and end. An arriving request joins
the last group of its worker while that has not started and has room, else opens a
new one after it; its predicted latency is that group's end (with the arrivals
expected to join it before it starts) plus the runtime's own overhead, less now.

The loop is closed twice:

- each finished group's observed end corrects the ledger: the groups queued behind it
  on that worker move by the surprise (a slow call delays all of them), so errors do
  not accumulate;
- the residuals (observed end - predicted end: dispatch, sockets, wake-ups, the GIL,
  timer slack, service noise) are kept over a sliding window (the last `RESIDUALS`
  calls of the last `RESIDUAL_WINDOW_S` seconds, at least `MIN_RESIDUALS`), and the
  admission adds a high quantile of them (`admit_quantile`: 0.9 for a p99 SLO). Not
  the SLO's percentile itself: the tail of the residuals is stalls of the whole
  machine or driver (a core taken away, a long GIL hold) that hit every request in
  flight alike, which no refusal avoids, while refusing on them would refuse nearly
  everything.
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

Pure computation; the controller calls it under its lock.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESIDUALS = 400  # observed calls the overhead quantile is taken over, at most
RESIDUAL_WINDOW_S = 5.0  # ... and only those of the last seconds: it settles that fast
MIN_RESIDUALS = 50  # before this many, DEFAULT_OVERHEAD_S stands in
REQUANTILE_EVERY = 8  # new residuals between recomputations of the quantiles
LEVEL_S = 0.3  # the level (see the docstring): the median residual of this many seconds,
LEVEL_CALLS = 128  # ... at most this many calls, at least LEVEL_MIN (refusing most
LEVEL_MIN = 3  # arrivals, few calls end, and a spell's calls would set it for long)
DEFAULT_OVERHEAD_S = 0.001
PROBE_EVERY_S = 0.2  # an idle worker takes one request this often whatever its prediction
REOPEN_GRID = 50  # after a refusal, admission is tried again every SLO / this ...
REOPEN_STEPS = 8  # ... this many times ahead; arrivals in between are refused outright
STALE_S = 2.0  # a group predicted to have ended this long ago, never observed, is dropped


@dataclass(eq=False)
class Group:
    """Requests queued on one worker that will run as one call."""

    opened: float
    count: int
    start: float  # predicted
    end: float  # predicted
    deadline: float  # the latest end its earliest request accepts (SLO less overhead)
    slip: float = 0.0  # how far start and end were moved while it ran past its end


@dataclass(frozen=True)
class _Prediction:
    """A request's prospects on one worker: it `joins` the last queued call (else
    opens one), making it `count` requests from `start` to `end`; `fits`: the
    requests already in that call still meet theirs; `latency`, with the overhead
    quantile `high`; `typical`, with the median overhead; `idle`: nothing runs
    before it."""

    joins: bool
    count: int
    start: float
    end: float
    fits: bool
    latency: float
    typical: float
    idle: bool
    high: float

    def meets(self, slo_s: float) -> bool:
        return (self.fits and self.latency <= slo_s) or (self.idle and self.typical <= slo_s)


@dataclass(frozen=True)
class Verdict:
    """One admission: `admit`; `latency_s`, the predicted latency with the overhead
    quantile; `worker`, the worker it was entered on."""

    admit: bool
    latency_s: float
    worker: int | None


class StageLedger:
    """The predicted queue of one SLO batching stage, per worker; see the module
    docstring. `plan(...)` sets the batching in force and the service times;
    `admit(rid, now, slo_s, ...)` predicts and enters; `routed` moves an entered
    request to the worker the router chose; `finished` / `observed` report ends."""

    def __init__(self, percentile: float = 0.99) -> None:
        self.percentile = percentile
        # a tenth of the SLO's tail share, as a quantile (0.99 -> 0.9, 0.95 -> 0.5)
        self.admit_quantile = max(0.5, 1.0 - 10.0 * (1.0 - percentile))
        self.size = 1
        self.timeout_s = 0.0
        self.merge = 1
        self.rate = 0.0
        self._service = np.zeros(2)  # seconds by requests per call (index 0 unused)
        self._queues: dict[int, deque[Group]] = {}
        self._where: dict[int, tuple[int, Group]] = {}
        # (end, the residual less the excess at its time), seconds
        self._residuals: deque[tuple[float, float]] = deque(maxlen=RESIDUALS)
        # the latest calls as (end, seconds from predicted start to end, requests)
        self._latest: deque[tuple[float, float, int]] = deque(maxlen=LEVEL_CALLS)
        self._excess = 0.0  # of the level over the window's median (see the docstring)
        self._peak = 0.0  # the highest excess since `spell_excess` was last asked
        self._fresh = REQUANTILE_EVERY  # residuals since the quantiles were computed
        self._spread: tuple[float, float] | None = None  # deviations' (median, quantile)
        self._sorted = np.zeros(0)  # the deviations, sorted, as of the cached quantiles
        self.prompt = False  # ends are reported as they happen (`finished`), not later
        self.closed_until = -math.inf  # arrivals before this are refused (`closed`)
        self._probed_at = -math.inf

    # --- configuration ---------------------------------------------------------------

    def plan(
        self, size: int, timeout_s: float, merge: int, service_s: Sequence[float], rate: float
    ) -> None:
        """The batching in force: `size` requests per batch, `timeout_s`, at most
        `merge` requests per call; `service_s[n]`: seconds for a call of n requests
        (n = 1 .. merge); `rate`: arrivals per second offered to the stage."""
        self.size, self.timeout_s = max(1, size), max(0.0, timeout_s)
        self.merge = max(self.size, merge)
        service = np.asarray(service_s, dtype=float)
        if len(service) < self.merge + 1:
            raise ValueError(f"StageLedger.plan: service_s needs {self.merge + 1} entries")
        self._service = service
        self.rate = max(0.0, rate)
        self.closed_until = -math.inf
        self._relevel()

    def overhead(self) -> tuple[float, float]:
        """(median, `admit_quantile` quantile) of the next call's residual, seconds:
        the recent residuals', with the current excess (see the module docstring)."""
        if self._fresh >= REQUANTILE_EVERY:
            self._fresh = 0
            if self._residuals:
                newest = self._residuals[-1][0]
                while (
                    len(self._residuals) > MIN_RESIDUALS
                    and self._residuals[0][0] < newest - RESIDUAL_WINDOW_S
                ):
                    self._residuals.popleft()
            self._sorted = np.sort(self._kept())
            if len(self._residuals) >= MIN_RESIDUALS:
                median, high = np.quantile(self._sorted, [0.5, self.admit_quantile])
                self._spread = (float(median), max(float(high), float(median)))
            else:
                self._spread = None
        if self._spread is None:
            return DEFAULT_OVERHEAD_S, DEFAULT_OVERHEAD_S
        return self._excess + self._spread[0], self._excess + self._spread[1]

    def residuals(self) -> np.ndarray:
        """The law of the next residual (seconds), as samples: the recent residuals,
        oldest first, with the current excess (see the module docstring)."""
        return self._kept() + self._excess

    def _kept(self) -> np.ndarray:
        return np.fromiter((d for _, d in self._residuals), float, len(self._residuals))

    def _relevel(self) -> None:
        """The excess: the level (the median residual of the calls of the last
        `LEVEL_S` seconds, at most `LEVEL_CALLS`, at least `LEVEL_MIN`, against the
        service times in force) less the window's median, when the two are further
        apart than the window's spread (its median to its `admit_quantile`)."""
        if not self._latest or self._spread is None:
            self._excess = 0.0
            return
        # plain floats and `statistics.median`: this runs after every call, on the
        # driver's receiving thread (numpy's scalars and median: 66 us for 128 calls;
        # this: 41)
        service = self._service.tolist()
        top = len(service) - 1
        newest = self._latest[-1][0]
        latest = [
            took - service[min(n, top)]
            for k, (end, took, n) in enumerate(reversed(self._latest))
            if k < LEVEL_MIN or end >= newest - LEVEL_S
        ]
        median, high = self._spread
        gap = statistics.median(latest) - median
        self._excess = gap if abs(gap) > high - median else 0.0
        self._peak = max(self._peak, self._excess)

    def spell_excess(self) -> float:
        """The highest excess (seconds; a slow spell of the machine) since the last
        call of this."""
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
    ) -> Verdict:
        """Predict request `rid`'s latency if it arrives now, on `worker` (the one the
        router will pick; None: the one of the stage's `workers` that frees first),
        and enter it there when it meets the SLO (or `enter_anyway`: it will be
        served late)."""
        if not workers:
            return Verdict(True, 0.0, None)
        if worker is None:
            worker = self._first_free(workers, now)
        queue = self._queues.get(worker)
        if queue:
            self._catch_up(queue, now)
        p = self._predict(queue, now, len(workers))
        # Even past the idle rule (see `_predict`), one every PROBE_EVERY_S probes: a
        # profile learned from a slow spell (a model's first calls) would otherwise
        # refuse everything for long.
        meets = p.meets(slo_s)
        probe = p.idle and now - self._probed_at >= PROBE_EVERY_S
        if probe and not meets and p.typical > slo_s:
            self._probed_at = now
        admit = meets or probe
        if not admit and not enter_anyway and not p.idle:
            self.closed_until = self._reopens(workers, now, slo_s)
        if admit or enter_anyway:
            deadline = now + slo_s - p.high
            last = queue[-1] if queue else None
            if p.joins:
                assert last is not None
                last.count, last.start, last.end = p.count, p.start, p.end
                last.deadline = min(last.deadline, deadline)
                group = last
            else:
                group = Group(now, 1, p.start, p.end, deadline)
                self._queues.setdefault(worker, deque()).append(group)
            self._where[rid] = (worker, group)
        return Verdict(admit, p.latency, worker)

    def _predict(self, queue: deque[Group] | None, now: float, workers: int) -> _Prediction:
        """What a request arriving now on a worker with `queue` would meet (pure)."""
        last = queue[-1] if queue else None
        median, high = self.overhead()
        joins = self._joinable(queue, now)
        if joins:
            assert queue is not None and last is not None
            count = last.count + 1
            start = self._start(queue, last.opened, count, now)
            end = start + self._service[count]
            # the requests already waiting in that call must still meet theirs
            fits = end <= last.deadline
        else:
            count = 1
            free = max(last.end, now) if last is not None else now
            start = max(free, now + self._wait(1))
            end = start + self._service[1]
            fits = True
        opened = last.opened if joins and last is not None else now
        extra = self._joiners(count, opened, start, now, workers)
        latency = start + self._service[count + extra] - now + high
        # A worker with nothing to run before this request serves it as soon as the
        # stage can: refusing it would help no other request, and the stage would
        # stop learning (no calls, no residuals) while a tail of stalls inflates its
        # overhead quantile. It is admitted when its typical latency meets the SLO.
        idle = not queue or queue[-1].end <= now or (len(queue) == 1 and queue[0].start > now)
        typical = latency - high + median
        return _Prediction(joins, count, start, end, fits, latency, typical, idle, high)

    def _joiners(self, count: int, opened: float, start: float, now: float, workers: int) -> int:
        """Requests expected to join a call of `count` requests, opened at `opened`,
        between `now` and its `start` (at most `merge` in all). With a timeout, the
        router packs one batch at a time: every arrival joins while it fills (until
        `size` or its timeout); later batches go to the least loaded worker, which is
        another while this one holds a queued call (with one worker, this one: they
        run in the same call). Without, each request goes to the least loaded worker:
        this one takes its share of them until its call starts."""
        if start <= now:
            return 0
        if self.timeout_s > 0:
            filling = min(max(opened + self.timeout_s - now, 0.0), start - now)
            joined = int(self.rate * filling) if count < self.size else 0
            joined = min(joined, max(self.size - count, 0))
            if workers == 1:
                joined += int(self.rate * (start - now - filling))
        else:
            joined = int(self.rate / workers * (start - now))
        return max(0, min(self.merge - count, joined))

    def _reopens(self, workers: Sequence[int], now: float, slo_s: float) -> float:
        """After a refusal: the first time, on a grid of REOPEN_STEPS steps of a
        REOPEN_GRID-th of the SLO, at which some worker would admit an arrival if
        nothing but time changed (no call seen ending, no new plan, nothing
        forgotten; it is reset when one does). Arrivals before then are refused
        without a prediction each (`closed`): under overload most arrivals are, and
        the driver refusing them shares its cores with the results of those
        admitted."""
        step = slo_s / REOPEN_GRID
        for k in range(REOPEN_STEPS):
            t = now + k * step
            for w in workers:
                if self._predict(self._queues.get(w), t, len(workers)).meets(slo_s):
                    return t
        return now + REOPEN_STEPS * step

    def closed(self, now: float) -> bool:
        """Whether an arrival now is refused for certain (see `_reopens`)."""
        return now < self.closed_until

    def routed(self, rid: int, worker: int, now: float) -> None:
        """The router sent `rid` to `worker`: move it there if it was entered on
        another."""
        entry = self._where.get(rid)
        if entry is None or entry[0] == worker:
            return
        self._leave(rid)
        queue = self._queues.setdefault(worker, deque())
        last = queue[-1] if queue else None
        if last is not None and self._joinable(queue, now):
            last.count += 1
            last.start = self._start(queue, last.opened, last.count, now)
            last.end = last.start + self._service[last.count]
            group = last
        else:
            free = max(last.end, now) if last is not None else now
            start = max(free, now + self._wait(1))
            group = Group(now, 1, start, start + self._service[1], entry[1].deadline)
            queue.append(group)
        self._where[rid] = (worker, group)

    def finished(self, rid: int, now: float, ok: bool = True) -> None:
        """Request `rid` ended at `now` (its result reached the driver): with `ok`, its
        call's end is observed (the first report of a call counts); without, once ends
        are seen as they happen (`prompt`), it leaves its call."""
        entry = self._where.pop(rid, None)
        if entry is None:
            return
        worker, group = entry
        queue = self._queues.get(worker)
        if ok:
            self.prompt = True
            if queue and group in queue:
                self._resolve(queue, group, now)
        elif self.prompt:
            # failed, cancelled or past its deadline: it runs no more (its call failed,
            # or it is dropped from the queue); a call all of whose requests did so is
            # over, and no stall to wait for
            group.count -= 1
            if group.count <= 0 and queue and group in queue:
                queue.remove(group)
                self.closed_until = -math.inf

    def observed(self, worker: int, size: int, end: float) -> None:
        """Worker `worker` ended a call of `size` requests at `end` (as its report
        says): the oldest groups it holds, `size` requests' worth, are resolved."""
        queue = self._queues.get(worker)
        if not queue or size < 1:
            return
        covered, last = 0, None
        for group in queue:
            covered += group.count
            last = group
            if covered >= size:
                break
        if last is not None:
            self._resolve(queue, last, end)

    def forget(self, rid: int) -> None:
        """Request `rid` was not run after all (refused later, failed before routing)."""
        self._leave(rid)

    # --- internals -------------------------------------------------------------------

    def _joinable(self, queue: deque[Group] | None, now: float) -> bool:
        """Whether a request routed to this worker now would run in its last group:
        the group has room and has not started: predicted to start later, or, when
        ends are seen as they happen, the call before it has not been seen ending
        though predicted to (the worker is still on it, and takes what queued
        meanwhile), up to the usual lateness (past that, a stalled report)."""
        if not queue or queue[-1].count >= self.merge:
            return False
        if queue[-1].start > now:
            return True
        return self.prompt and len(queue) > 1 and now <= queue[-2].end + self.overhead()[1]

    def _catch_up(self, queue: deque[Group], now: float) -> None:
        """When ends are seen as they happen, a call not seen ending by its typical end
        is still running (a stall: the worker, or the machine, was slow). Its end is
        then expected where past calls that ran at least this late ended (the median
        of those residuals; twice the lateness when none did), and the calls queued
        behind it move with it. Without this, a request arriving during a stall
        would be predicted to run at once, and admitted to be late."""
        first = queue[0]
        if not self.prompt or first.start > now:
            return
        median = self.overhead()[0]
        planned = first.end - first.slip
        late = now - planned  # the residual so far
        if late <= median or late > STALE_S:
            return
        # as `overhead()` left them: sorted, at most a few calls old, with today's excess
        past = self._sorted + self._excess
        cut = int(np.searchsorted(past, late, side="right"))  # the longer ones on
        longer = len(past) - cut
        if longer:  # their median
            middle = cut + longer // 2
            expected = float(past[middle] if longer % 2 else (past[middle - 1] + past[middle]) / 2)
        else:
            expected = 2.0 * late
        move = expected - median - first.slip
        if move <= 0:
            return
        first.slip += move
        first.end += move
        for group in list(queue)[1:]:
            group.start += move
            group.end += move

    def _wait(self, count: int) -> float:
        return self.timeout_s if count < self.size else 0.0

    def _start(self, queue: deque[Group], opened: float, count: int, now: float) -> float:
        """Start of the last group of `queue` holding `count` requests, opened at
        `opened`: once the call before it ends and once it is due."""
        before = queue[-2].end if len(queue) > 1 else now
        due = opened + self.timeout_s if count < self.size else now
        return max(before, due, now)

    def _first_free(self, workers: Sequence[int], now: float) -> int:
        best, best_end = workers[0], math.inf
        for w in workers:
            queue = self._queues.get(w)
            end = queue[-1].end if queue else now
            if end < best_end:
                best, best_end = w, end
        return best

    def _leave(self, rid: int) -> None:
        entry = self._where.pop(rid, None)
        if entry is None:
            return
        self.closed_until = -math.inf
        worker, group = entry
        group.count = max(group.count - 1, 0)
        queue = self._queues.get(worker)
        if queue and group.count == 0 and group in queue:
            queue.remove(group)

    def _resolve(self, queue: deque[Group], group: Group, end: float) -> None:
        """`group`'s call ended at `end`: learn the residual, move the groups queued
        behind it by the surprise, and drop it and those before it."""
        self.closed_until = -math.inf
        took, count = end - group.start, max(group.count, 1)  # from its predicted start
        residual = took - self._service[min(count, len(self._service) - 1)]
        self._residuals.append((end, residual - self._excess))
        self._latest.append((end, took, count))
        self._relevel()
        self._fresh += 1
        median, _ = self.overhead()
        surprise = end - group.end - median  # of which `slip` already moved those behind
        while queue:
            done = queue.popleft()
            if done is group:
                break
        for later in queue:
            later.start += surprise
            later.end += surprise
        # groups that ended long ago and were never observed (cancelled, lost)
        for other in self._queues.values():
            while other and other[0].end - other[0].slip < end - STALE_S:
                other.popleft()
