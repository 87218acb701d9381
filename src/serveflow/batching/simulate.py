"""Discrete-event simulation of a batching buffer and its workers (deterministic for
given arrival times): the ground truth the analytical model is checked against,
(`simulate_controlled`) the runtime's routing and dispatch around a batching
controller, in simulated time, for tests of its decisions, and (`predict_simulated`)
the law of greedy batching, which the analytical model has none for, and of waiting
plans under bursts it averages away, for the search.

`pull` (the runtime's semantics): one buffer; a free worker takes up to `B` queued
requests once `B` are queued or the oldest has waited `T` (at once when `T` is 0).
`push` (the model's semantics, BATCH's): the buffer dispatches a batch at `B` or at
`T` after its first request whatever the workers do; batches then queue FIFO for one
of the `k` workers.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from serveflow.batching.arrivals import MAP
from serveflow.batching.model import (
    LatencyDistribution,
    LatencyPart,
    Prediction,
    ServiceFn,
    _compact,
    noise_points,
    slow_switching,
)

GREEDY_SAMPLES = 5000  # arrivals simulated per stream for a greedy candidate
GREEDY_CYCLES = 60  # ... or, for a bursty process, for this many cycles of its phases
GREEDY_MOST = 4 * GREEDY_SAMPLES  # ... up to this many
GREEDY_WARMUP = 0.1  # share of them dropped first: the stage starts empty


def simulate(
    arrivals: np.ndarray,
    service: ServiceFn,
    max_size: int,
    timeout_s: float,
    workers: int = 1,
    mode: str = "pull",
    spread: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-request latencies (seconds, in arrival order) and the batch sizes served;
    `spread` (pull only): factors the calls' service times are multiplied by, in turn
    (a shared machine's calls vary)."""
    if mode not in ("pull", "push"):
        raise ValueError(f"simulate: mode must be 'pull' or 'push', got {mode!r}")
    if spread is not None and mode == "push":
        raise ValueError("simulate: spread is for mode='pull' only")
    if max_size < 1 or timeout_s < 0 or workers < 1:
        raise ValueError("simulate: max_size and workers must be >= 1, timeout_s >= 0")
    times = np.asarray(arrivals, dtype=float)
    svc = np.asarray(service(np.arange(1, max_size + 1)), dtype=float)
    if mode == "push":
        return _push(times, svc, max_size, timeout_s, workers)
    return _pull(times, svc, max_size, timeout_s, workers, spread)


def _push(
    times: np.ndarray, svc: np.ndarray, big: int, timeout: float, workers: int
) -> tuple[np.ndarray, np.ndarray]:
    latency = np.empty(len(times))
    sizes = []
    free = [0.0] * workers
    i, n = 0, len(times)
    while i < n:
        opened = times[i]
        j = i + 1
        while j < n and j - i < big and times[j] <= opened + timeout:
            j += 1
        dispatch = times[j - 1] if j - i == big else opened + timeout
        start = max(dispatch, heapq.heappop(free))
        done = start + svc[j - i - 1]
        heapq.heappush(free, done)
        latency[i:j] = done - times[i:j]
        sizes.append(j - i)
        i = j
    return latency, np.array(sizes)


def _pull(
    times: np.ndarray,
    svc: np.ndarray,
    big: int,
    timeout: float,
    workers: int,
    spread: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    latency = np.empty(len(times))
    sizes = []
    free = [0.0] * workers  # heap of the times workers become free
    queue: deque[int] = deque()
    i, n, now = 0, len(times), 0.0
    # Each step admits an arrival, dispatches a batch, or waits for a timeout or a
    # worker (then dispatches): at most 4 steps per request.
    for _ in range(4 * n + 4):
        if i >= n and not queue:
            break
        worker_free = free[0] <= now
        if queue and worker_free and (len(queue) >= big or now >= times[queue[0]] + timeout):
            size = min(big, len(queue))
            heapq.heappop(free)
            factor = spread[len(sizes) % len(spread)] if spread is not None else 1.0
            done = now + svc[size - 1] * factor
            heapq.heappush(free, done)
            for _ in range(size):
                k = queue.popleft()
                latency[k] = done - times[k]
            sizes.append(size)
            continue
        next_arrival = times[i] if i < n else math.inf
        if queue and not worker_free:
            wake = free[0]
        elif queue:
            wake = times[queue[0]] + timeout
        else:
            wake = math.inf
        if next_arrival <= wake:
            now = max(now, next_arrival)
            queue.append(i)
            i += 1
        else:
            now = max(now, wake)
    if i < n or queue:
        raise RuntimeError("simulate: step bound reached before every request was served")
    return latency, np.array(sizes)


@dataclass(frozen=True)
class Stream:
    """Arrival times a greedy plan is simulated on: `rate` per second, carrying a
    `share` of all arrivals over a `time_share` of the time."""

    rate: float
    share: float
    time_share: float
    times: np.ndarray
    before: np.ndarray | None = None  # what each arrival spent before, in its latency


def greedy_streams(arrivals: MAP, samples: int = GREEDY_SAMPLES, seed: int = 0) -> list[Stream]:
    """What `predict_simulated` simulates for `arrivals`: the process itself, or, when
    its phases are long (`model.slow_switching`), one Poisson stream per phase at
    that phase's rate, as the analytic model solves it (a few phases in a few
    thousand arrivals would say little of their mix). The process itself for at
    least GREEDY_CYCLES cycles of its phases (up to GREEDY_MOST arrivals): its p99 is
    its longest bursts', and 5,000 arrivals of one with bursts of 893/s between
    114/s, switching 1.14/5.13 a second (18 bursts), put greedy calls' p99 at
    144-277 ms by the seed. The same draws (`seed`) for every candidate: their
    differences are then the plans', not the samples'."""
    rng = np.random.default_rng(seed)
    if not slow_switching(arrivals):
        stays = 1.0 / np.maximum(-np.diag(arrivals.d0) - arrivals.phase_rates, 1e-12)
        cycle = arrivals.rate * float(stays.sum()) if arrivals.phases > 1 else 0.0
        count = max(samples, min(int(GREEDY_CYCLES * cycle), GREEDY_MOST))
        return [Stream(arrivals.rate, 1.0, 1.0, arrivals.sample(count, rng, by_stays=True))]
    theta = arrivals._stationary()
    rates = arrivals.phase_rates
    shares = theta * rates / float(theta @ rates)
    return [
        Stream(rate, share, time, np.cumsum(rng.exponential(1 / rate, samples)))
        for rate, share, time in zip(rates.tolist(), shares.tolist(), theta.tolist())
        if rate > 0 and share > 0
    ]


def predict_simulated(
    streams: list[Stream],
    service: ServiceFn,
    max_size: int,
    workers: int,
    *,
    timeout_s: float = 0.0,
    merge: int | None = None,
    noise: np.ndarray | None = None,
) -> Prediction:
    """The latency law of a plan simulated on `streams` (`greedy_streams`) as the
    runtime routes and runs it (`_calls`): greedy batching (`timeout_s` 0: a free
    worker takes what is queued for it, up to `max_size` requests), which the buffer
    model has no law for, or a plan that waits up to `timeout_s` for `max_size`,
    where bursts outrun its calls and the model's renewal approximation averages
    them away. Either way up to `merge` requests run as one call when more than
    `max_size` wait. `noise`: samples of an extra latency added to every request,
    as `model.predict` adds them. A stream the workers do not keep up with puts its
    share at infinite latency. Under load greedy batches grow until the workers keep
    up, so they run busy nearly all the time: `utilization` is then close to 1, and
    stable while a worker's full calls outrun its arrivals."""
    merge = max(merge or max_size, max_size)
    svc = np.asarray(service(np.arange(1, merge + 1)), dtype=float)
    points = noise_points(noise)
    parts, lost, busy, utilization = [], 0.0, 0.0, 0.0
    pmf = np.zeros(merge)
    for stream in streams:
        latency, sizes, span = _calls(stream.times, svc, max_size, timeout_s, merge, workers)
        if stream.before is not None:
            latency = latency + stream.before
        if len(sizes) == 0:
            continue
        stream_busy = float(svc[sizes - 1].sum()) / len(stream.times)
        stream_util = float(svc[sizes - 1].sum()) / (workers * span)
        busy += stream.share * stream_busy
        utilization += stream.time_share * min(stream_util, 1.0)
        counts = np.bincount(sizes, minlength=merge + 1)[1:]
        pmf += stream.share / sizes.mean() * counts / counts.sum()
        if stream.rate * svc[-1] / merge >= workers:  # more than full calls serve
            lost += stream.share
            continue
        values = latency[int(GREEDY_WARMUP * len(latency)) :]
        masses = np.full(len(values), stream.share / len(values))
        if points is not None:
            values = (values[:, None] + points[0][None, :]).ravel()
            masses = (masses[:, None] * points[1][None, :]).ravel()
        parts.append(LatencyPart(*_compact(values, masses)))
    pmf /= max(pmf.sum(), 1e-300)
    mean_batch = float(np.arange(1, merge + 1) @ pmf)
    law = LatencyDistribution(tuple(parts), lost) if parts else None
    return Prediction(max_size, timeout_s, workers, law, pmf, mean_batch, busy, utilization)


def _calls(
    times: np.ndarray, svc: np.ndarray, size: int, timeout: float, merge: int, workers: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Batching on per-worker queues: latencies, call sizes, and the time until the
    last call ended. A worker starts a call once it is free and its queue holds
    `size` requests, or its oldest has waited `timeout`. Greedy (`timeout` 0), each
    request goes to the worker with the fewest outstanding; else batches do, one
    filling at a time, until it holds `size` or its first has waited `timeout`."""
    arrived, took = times.tolist(), svc.tolist()
    latency = [0.0] * len(arrived)
    sizes: list[int] = []
    free = [0.0] * workers  # when each worker's call ends
    running = [0] * workers  # requests in that call
    queues: list[deque[int]] = [deque() for _ in range(workers)]
    filling, count, opened = 0, size, -math.inf  # the batch being filled

    def advance(w: int, now: float) -> None:  # run the calls w starts by `now`
        queue = queues[w]
        while queue:
            full = len(queue) >= size
            ready = arrived[queue[size - 1]] if full else arrived[queue[0]] + timeout
            start = max(free[w], ready)
            if start > now:
                return
            take = min(len(queue), merge if len(queue) > size else size)
            done = start + took[take - 1]
            for _ in range(take):
                k = queue.popleft()
                latency[k] = done - arrived[k]
            free[w], running[w] = done, take
            sizes.append(take)

    for i, now in enumerate(arrived):
        best, fewest, first = 0, math.inf, math.inf
        for w in range(workers):
            if queues[w] and free[w] <= now:
                advance(w, now)
            outstanding = len(queues[w]) + (running[w] if free[w] > now else 0)
            if outstanding < fewest or (outstanding == fewest and free[w] < first):
                best, fewest, first = w, outstanding, free[w]
        if timeout and count < size and now - opened < timeout:
            best, count = filling, count + 1
        elif timeout:
            filling, count, opened = best, 1, now
        queues[best].append(i)
    for w in range(workers):
        advance(w, math.inf)
    span = max(max(free) - arrived[0], 1e-9)
    return np.array(latency), np.array(sizes, dtype=int), span


@dataclass
class Served:
    """What `simulate_controlled` saw: per request (arrival order) its latency in
    seconds, or NaN when refused; `refused_at`, how long after arrival each refusal
    was decided (0: at once, the simulation has no admission cost); the batch sizes
    run; the decisions in force over time as (time, Decision)."""

    latencies: np.ndarray
    sizes: np.ndarray
    decisions: list

    @property
    def refused(self) -> np.ndarray:
        return np.isnan(self.latencies)


def simulate_controlled(
    arrivals: np.ndarray,
    service: ServiceFn,
    controller: Any,
    workers: int,
    *,
    send_s: float = 0.0,
    reply_s: float = 0.0,
    noise: Callable[[int], float] | None = None,
    plan_every_s: float = 0.1,
    pace: Callable[[float], float] | None = None,
    speeds: Sequence[float] | None = None,
) -> Served:
    """The runtime around a `BatchingController`, in simulated time: each arrival is
    offered to the controller (`refuses_outright`, else `on_arrival` and `admit`),
    routed as the runtime's scheduler packs batches (one filling at a time, on the one
    of the decision's workers the controller expects to free first, else the least
    loaded; a new one when it is full or its timeout has passed), reaches its worker
    `send_s` later, and runs as `BatchRule` says (full, or its oldest has waited the
    timeout since it was sent; more than a batch queued: up to two batches as one call).
    A call of n requests takes `service([n])` plus `noise(n)` seconds (none by default),
    times `pace(start)` when given (the machine's speed over time: a call started in a
    slow spell of a shared machine takes longer), times `speeds[w]` on worker w when
    given (one worker slower than the others: it shares its core); its results reach the
    driver `reply_s` later, where the controller hears of them (`finished`,
    `on_batch_done`). The controller is asked for its decision every `plan_every_s`, its
    searches run inline."""
    times = np.asarray(arrivals, dtype=float)
    n = len(times)
    latencies = np.full(n, np.nan)
    sizes: list[int] = []
    decisions: list = []
    queues: list[deque[tuple[int, float]]] = [deque() for _ in range(workers)]
    busy_until = [0.0] * workers
    outstanding = [0] * workers
    opened_at = [-math.inf] * workers  # when each worker was last given a batch
    open_batch: list = [None]  # [worker, count, opened, size, timeout] of the filling batch
    events: list[tuple[float, int, int, Any]] = []  # (time, kind, seq, data)
    seq = itertools.count()
    ARRIVE, WAKE, PLAN, DONE, REPLY = 0, 1, 2, 3, 4
    for i, t in enumerate(times):
        heapq.heappush(events, (float(t), ARRIVE, next(seq), i))
    end_time = float(times[-1]) if n else 0.0
    heapq.heappush(events, (0.0, PLAN, next(seq), None))
    decision = controller.decision(0.0)
    decisions.append((0.0, decision))

    def limits() -> tuple[int, float, int]:
        size = decision.max_size
        merge = 2 * size
        if controller.policy.max_size:
            merge = min(merge, controller.policy.max_size)
        return size, decision.timeout_s, max(merge, size)

    def try_run(w: int, now: float) -> None:
        if busy_until[w] > now or not queues[w]:
            return
        size, timeout, merge = limits()
        queue = queues[w]
        oldest = queue[0][1]
        if timeout and len(queue) < size and oldest + timeout > now:
            heapq.heappush(events, (oldest + timeout, WAKE, next(seq), w))
            return
        take = min(len(queue), merge if len(queue) > size else size)
        batch = [queue.popleft() for _ in range(take)]
        took = float(service(np.array([take]))[0]) + (noise(take) if noise else 0.0)
        if pace is not None:
            took *= pace(now)
        if speeds is not None:
            took *= speeds[w]
        busy_until[w] = now + took
        sizes.append(take)
        heapq.heappush(events, (now + took, DONE, next(seq), (w, batch, took)))

    while events:
        now, kind, _, data = heapq.heappop(events)
        if kind == ARRIVE:
            i = data
            if controller.refuses_outright(now):
                continue
            controller.on_arrival(now)
            size, timeout, _ = limits()
            pool = list(range(min(decision.workers, workers)))
            batch = open_batch[0]
            filling = (
                batch is not None
                and batch[0] in pool
                and batch[1] < size
                and now - batch[2] < timeout
            )
            w = batch[0] if filling else controller.first_free(pool, now)
            if w is None:
                w = min(pool, key=lambda k: (outstanding[k], opened_at[k]))
            if not controller.admit(now, i, pool, w):
                continue
            placed = controller.placed(i, w)
            if placed != w:  # admission picked another worker (under overload)
                w, filling = placed, False
            if filling:
                batch[1] += 1
            else:
                open_batch[0] = [w, 1, now, size, timeout]
                opened_at[w] = now
            controller.routed(i, w, now)
            outstanding[w] += 1
            heapq.heappush(events, (now + send_s, WAKE, next(seq), (w, i, now)))
        elif kind == WAKE:
            if isinstance(data, tuple):  # a request reaching its worker
                w, i, sent = data
                queues[w].append((i, sent))
            else:
                w = data
            try_run(w, now)
        elif kind == DONE:
            w, batch, took = data
            heapq.heappush(events, (now + reply_s, REPLY, next(seq), (w, batch, took, now)))
            try_run(w, now)
        elif kind == REPLY:  # the driver hears of a call when its results arrive
            w, batch, took, ended = data
            each = []
            for i, sent in batch:
                latencies[i] = now - times[i]
                each.append(ended - sent)
                outstanding[w] -= 1
                controller.finished(i, now, call=ended - took)
            controller.on_batch_done(len(batch), took, ended, each)
        elif kind == PLAN:
            decision = controller.decision(now)
            if not decisions or decisions[-1][1] != decision:
                decisions.append((now, decision))
            if now < end_time:
                heapq.heappush(events, (now + plan_every_s, PLAN, next(seq), None))
            for w in range(workers):
                try_run(w, now)
    return Served(latencies, np.array(sizes), decisions)
