"""Scheduling policies, independent of process mechanics (a Ray runtime reuses them).

- `Scheduler.route`: for each stage of a request, which workers run it: one where the
  stage is warm with the fewest requests outstanding, a cold one when the warm ones are
  busy (the stage then scales out), `replicas` distinct workers for competing stages.
  An SLO-batching stage packs its batches instead: consecutive requests go to one
  worker until its batch is full or timed out, as if one buffer fed all workers (the
  queue the batching model predicts; spread over k workers, each batch would fill k
  times slower).
- `targets`: for a stage that starts at a dynamic lookup, the worker is chosen from
  the candidates by a stable hash of the looked-up key, so the same key always reaches
  the same worker and finds its value in that worker's cache (locality).
- `Autoscaler`: how many workers the pool should have, from load and idleness.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from serveflow.logical.table import Table
from serveflow.optimizer.plan import Plan

Route = tuple[tuple[int, ...], ...]  # per stage index: the worker indices that run it
StageKey = tuple[int, int]  # (app id, stage index)

COLD_PENALTY = 0.5  # a warm worker is preferred over a cold one only when as idle
LOADING_PENALTY = 1000.0  # one still loading the stage only when all are (seconds away)


@dataclass
class WorkerLoad:
    """What the scheduler knows of one worker."""

    outstanding: int = 0  # stage runs routed to it whose request is not finished
    warm: set[StageKey] | None = None
    loading: set[StageKey] | None = None  # warm stages it has not finished loading

    def __post_init__(self) -> None:
        self.warm = self.warm if self.warm is not None else set()
        self.loading = self.loading if self.loading is not None else set()


@dataclass
class OpenBatch:
    """The batch a packed stage is filling: on `worker`, `count` requests so far, the
    first sent at `opened_at`."""

    worker: int
    count: int
    opened_at: float


class Scheduler:
    def __init__(self) -> None:
        self._open: dict[StageKey, OpenBatch] = {}
        self._opened: dict[StageKey, dict[int, float]] = {}  # worker -> its last batch

    def route(
        self,
        app_id: int,
        plan: Plan,
        workers: Mapping[int, WorkerLoad],
        caps: Mapping[int, int] | None = None,
        packs: Mapping[int, tuple[int, float]] | None = None,
        now: float = 0.0,
    ) -> Route:
        """Pick workers for every stage of one request and count them as outstanding.
        `caps` limits some stages (by index) to that many workers; `packs` gives some
        stages' (batch size, timeout seconds) to pack batches by, at time `now`."""
        route = []
        for index, stage in enumerate(plan.stages):
            key = (app_id, index)
            cap = (caps or {}).get(index)
            if follows_winner(plan, index):
                chosen: list[int] = []
            elif stage.locality_key:
                chosen = self._candidates(key, workers)
            elif packs and index in packs:
                chosen = [self._pack(key, workers, cap, *packs[index], now)]
            else:
                chosen = self._least_loaded(key, workers, stage.replicas, cap)
            for w in chosen:
                workers[w].warm.add(key)
            route.append(tuple(chosen))
        for _, w in charged(plan, route):
            workers[w].outstanding += 1
        return tuple(route)

    def _pack(
        self,
        key: StageKey,
        workers: Mapping[int, WorkerLoad],
        cap: int | None,
        size: int,
        timeout_s: float,
        now: float,
    ) -> int:
        """The worker of the stage's open batch while it has room and time (the
        worker dispatches it when full or `timeout_s` after its first request was
        sent), else the least loaded one, where a new batch opens."""
        batch = self._open.get(key)
        if (
            batch is not None
            and batch.worker in workers
            and batch.count < size
            and now - batch.opened_at < timeout_s
        ):
            batch.count += 1
            return batch.worker
        # Among workers as loaded, the one given a batch longest ago frees first.
        opened = self._opened.setdefault(key, {})
        worker = self._least_loaded(key, workers, 1, cap, opened)[0]
        self._open[key] = OpenBatch(worker, 1, now)
        opened[worker] = now
        return worker

    def forget(self, app_id: int) -> None:
        """Drop an undeployed app's open batches."""
        for key in [k for k in self._open if k[0] == app_id]:
            del self._open[key]
            self._opened.pop(key, None)

    @staticmethod
    def _least_loaded(
        key: StageKey,
        workers: Mapping[int, WorkerLoad],
        n: int,
        cap: int | None = None,
        since: Mapping[int, float] | None = None,
    ) -> list[int]:
        """The `n` workers with the fewest outstanding runs (warm ones first; among
        equals, the one given work longest ago by `since`, else the lowest index)."""

        def score(w: int) -> float:
            load = workers[w]
            if key in load.loading:
                return load.outstanding + LOADING_PENALTY
            return load.outstanding + (0.0 if key in load.warm else COLD_PENALTY)

        pool = list(workers)
        warm = [w for w in pool if key in workers[w].warm]
        if cap is not None and len(warm) >= cap:
            # Stable (the stage keeps its workers), those still loading (a spare, a
            # worker a plan is adding) last.
            pool = sorted(warm, key=lambda w: (key in workers[w].loading, w))[:cap]
        since = since or {}
        return sorted(pool, key=lambda w: (score(w), since.get(w, -math.inf), w))[:n]

    @staticmethod
    def _candidates(key: StageKey, workers: Mapping[int, WorkerLoad]) -> list[int]:
        """Stable membership for key hashing: the warm workers, or all when none is."""
        warm = sorted(w for w, load in workers.items() if key in load.warm)
        return warm or sorted(workers)


def charged(plan: Plan, route: Route) -> Iterable[tuple[int, int]]:
    """(stage index, worker) of the stage runs a route counts against its workers. The
    candidates of a locality stage are not counted: only one of them, known once the
    key is, will run it."""
    for index, chosen in enumerate(route):
        if not plan.stages[index].locality_key:
            for w in chosen:
                yield index, w


def follows_winner(plan: Plan, index: int) -> bool:
    """Whether stage `index` runs where its competing producer's winning copy ran: that
    worker is free the moment it wins, while a route fixed in advance could put the
    stage behind the losing copy, which keeps running."""
    stage = plan.stages[index]
    inputs = stage.inputs
    return (
        len(inputs) == 1
        and inputs[0] != 0
        and not stage.locality_key
        and plan.stage_of(inputs[0]).replicas > 1
    )


def targets(plan: Plan, index: int, route: Route, table: Any) -> tuple[int, ...]:
    """The workers to send stage `index`'s input to; () means the sender itself."""
    stage, chosen = plan.stages[index], route[index]
    if not stage.locality_key or not chosen:
        return chosen
    keys = table._columns.get(stage.locality_key) if isinstance(table, Table) else None
    start = zlib.crc32(str(keys[0]).encode()) % len(chosen) if keys else 0
    return tuple(chosen[(start + i) % len(chosen)] for i in range(min(stage.replicas, len(chosen))))


@dataclass(frozen=True)
class Autoscaler:
    """Grow the pool while workers average more than `target_in_flight` outstanding
    stage runs; retire a worker idle for `idle_s` seconds. Stays within limits."""

    min_workers: int
    max_workers: int
    target_in_flight: float = 2.0
    idle_s: float = 10.0

    def plan(
        self,
        outstanding: Iterable[int],
        waiting: int,
        starting: int,
        idle_for: Mapping[int, float],
        *,
        retiring: int = 0,
        usable: int | None = None,
    ) -> tuple[int, list[int]]:
        """(workers to start, workers to retire), from the stage runs outstanding on
        each ready worker, requests waiting for room, workers starting and workers
        still exiting (they count against `max_workers` until gone). `usable`: how
        many workers the deployed stages can use at most (stages capped by a batching
        controller), None when unbounded: growth past it would only hold idle workers."""
        loads = list(outstanding)
        size = len(loads) + starting
        if size < self.min_workers:
            return self.min_workers - size, []
        demand = sum(loads) + waiting
        busy = bool(loads) and demand / len(loads) > self.target_in_flight
        if busy:  # enough workers for the demand at once, not one at a time
            limit = min(self.max_workers - retiring, usable or self.max_workers)
            want = min(limit, math.ceil(demand / self.target_in_flight))
            return max(0, want - size), []
        idle = [w for w, seconds in sorted(idle_for.items()) if seconds >= self.idle_s]
        if idle and size > self.min_workers:
            return 0, idle[:1]
        return 0, []
