"""Scheduling policies, independent of process mechanics (a Ray runtime reuses them).

- `Scheduler.route`: for each stage of a request, which workers of its resource class
  (cpu, gpu) run it: one where the stage is warm with the fewest requests outstanding,
  a cold one when the warm ones are busy (the stage then scales out), `replicas`
  distinct workers for competing stages, distinct workers for an anyof's branches.
  With stages' run times (`costs`), a stage of one worker goes where it is expected
  to start first: after the work other requests gave each worker (`work`: expected
  seconds, released as long runs end, so a cheap run avoids a worker busy with a long
  one whatever the counts say) and after its inputs, one hop later on another worker
  than its producer's. A request's own stages do not count against each other: its
  chain and its branches stay on one worker unless that one has other work ahead.
  (Spreading branches that filters mostly empty over workers made each request wait
  for every worker's queue: translation's untranslated texts went from 21 to 80 ms.)
  An SLO-batching stage packs its batches instead: consecutive requests go to one
  worker until its batch is full or timed out, as if one buffer fed all workers (the
  queue the batching model predicts; spread over k workers, each batch would fill k
  times slower).
- `targets`: for a stage that starts at a dynamic lookup, the worker is chosen from
  the workers the stage is warm on by rendezvous hashing of the looked-up key, so the
  same key reaches the same worker and finds its value in that worker's cache
  (locality); a busy locality stage takes one more worker, which takes over only its
  share of the keys.
- `Autoscaler`: how many workers the pool should have, from load and idleness.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from serveflow.logical.table import Table
from serveflow.optimizer.plan import Plan
from serveflow.runtime.messages import Route

StageKey = tuple[int, int]  # (app id, stage index)

COLD_PENALTY = 0.5  # a warm worker is preferred over a cold one only when as idle
BOUNDED_LOAD = 1.25  # a locality key moves off a worker this much above the average
LOADING_PENALTY = 1000.0  # one still loading the stage only when all are (seconds away)
# a worker in a call that has run over a second (`WorkerLoad.stalled`: it may run as
# long again) or running a race's loser (`held_up`) only when all are, or the others
# have this many runs (seconds) ahead
STALLED_PENALTY = 100.0
HOP_S = 2e-4  # an input sent to another worker (socket, wake-up, copy), for `costs`
DEFAULT_COST_S = 1e-3  # a stage's run time before one is measured
# A plain function's load: unpickling it imports its module and what that imports
# (half a second for the comments example's `normalize`). A run waits that much longer
# for a worker that has the stage loaded rather than go to one that must load it first
# (a model's load, seconds, is always waited out: see `_cold`).
FUNCTION_LOAD_S = 0.5


@dataclass
class WorkerLoad:
    """What the scheduler knows of one worker."""

    outstanding: int = 0  # stage runs routed to it whose request is not finished
    work: float = 0.0  # expected seconds of the runs routed to it not known to be done
    warm: set[StageKey] | None = None
    loading: set[StageKey] | None = None  # warm stages it has not finished loading
    # of those, the ones it loads in the background (their runs went to a worker that
    # has them loaded): until they are loaded it takes other runs only when all do
    background: set[StageKey] | None = None
    gpu: bool = False  # owns a GPU: runs GPU-placed stages, and only those
    loading_now: StageKey | None = None  # busy loading this stage: no other stage's runs
    silent: bool = False  # no heartbeat for a while (frozen, or holding the GIL): no runs
    stalled: bool = False  # one call running for a while: keys go to another worker
    # runs of anyof branches or competing replicas whose request was answered by
    # another, still going here: a loser's run is the slower one, it may run long yet
    losing: int = 0
    # of `work`, the runs of stages no admission ledger mirrors, by app: [seconds, from
    # when they are taken to run back to back] (see `unmirrored_until`)
    unmirrored: dict[int, list[float]] = field(default_factory=dict)

    def release(self, runs: int) -> None:
        """Stop counting `runs` runs here, their `work` already taken off. Work is
        charged only with runs: none is left once no run is (float rounding would
        leave a residue that tips later choices)."""
        self.outstanding -= runs
        if not self.outstanding:
            self.work = 0.0
            self.stalled = False  # no run of ours left there: no long call either
            self.losing = 0
            self.unmirrored = {}

    def charge_unmirrored(self, app: int, seconds: float, now: float) -> None:
        """A run of `seconds` of a stage of `app` no admission ledger mirrors."""
        held = self.unmirrored.get(app)
        if held is None or held[0] <= 0.0:
            self.unmirrored[app] = [seconds, now]
        else:
            held[0] += seconds

    def release_unmirrored(self, app: int, seconds: float, now: float) -> None:
        """Such a run is done (or no longer counted): those left run from now on."""
        held = self.unmirrored.get(app)
        if held is not None:
            held[0], held[1] = held[0] - seconds, now
            if held[0] <= 1e-9:
                del self.unmirrored[app]

    def unmirrored_until(self, app: int) -> float:
        """When the worker is taken to be done with the unmirrored runs of other apps
        than `app` (-inf: none). Read without the control plane's lock."""
        if not self.unmirrored:
            return -math.inf
        held = self.unmirrored.copy().items()
        return max((since + seconds for a, (seconds, since) in held if a != app), default=-math.inf)

    @property
    def held_up(self) -> bool:
        """In a long call, or running a loser (`losing`): a run sent here may wait long."""
        return self.stalled or self.losing > 0

    def takes(self, key: StageKey) -> bool:
        """Whether new runs of stage `key` may be routed here now."""
        return not self.silent and (self.loading_now is None or self.loading_now == key)

    def __post_init__(self) -> None:
        self.warm = self.warm if self.warm is not None else set()
        self.loading = self.loading if self.loading is not None else set()
        self.background = self.background if self.background is not None else set()


@dataclass
class OpenBatch:
    """The batch a packed stage is filling: on `worker`, `count` requests so far, the
    first sent at `opened_at`; it goes at `size` requests or `timeout_s` after that."""

    worker: int
    count: int
    opened_at: float
    size: int = 0
    timeout_s: float = 0.0

    def open(self, now: float) -> bool:
        return self.count < self.size and now - self.opened_at < self.timeout_s


class Scheduler:
    """Routing for one runtime. `spread_at`: outstanding runs per worker past which a
    locality stage takes one more worker."""

    def __init__(self, spread_at: float = 2.0) -> None:
        self.spread_at = spread_at
        self._open: dict[StageKey, OpenBatch] = {}
        self._opened: dict[StageKey, dict[int, float]] = {}  # worker -> its last batch
        self._facts: dict[int, PlanFacts] = {}  # by app id
        self._loads: list[tuple[int, StageKey]] = []  # (worker, stage) to load: `loads`
        # stages held to fewer workers than the pool take the highest-numbered ones
        # (`ControlPlane._confine`), the others the lowest first
        self.high: set[StageKey] = set()

    def rank(self, key: StageKey, worker: int) -> int:
        """Where `worker` comes in the order stage `key` takes workers in (see `high`)."""
        return -worker if key in self.high else worker

    def route(
        self,
        app_id: int,
        plan: Plan,
        workers: Mapping[int, WorkerLoad],
        table: Any = None,
        caps: Mapping[int, int] | None = None,
        packs: Mapping[int, tuple[int, float]] | None = None,
        now: float = 0.0,
        expected: Mapping[int, float | None] | None = None,
        costs: Sequence[float | None] | None = None,
        room: int | None = None,
        placed: Mapping[int, int] | None = None,
    ) -> tuple[Route, list[tuple[int, int]]] | None:
        """Pick workers for every stage of one request (whose table is `table`) and
        count the runs known now as outstanding: returns the route and those (stage,
        worker) charges, or None when some stage has no worker of its resource class,
        or (`room`: the runs a worker may hold) none with room for a plain plan's.
        `caps` limits some stages (by index) to that many workers; `packs` gives some
        stages' (batch size, timeout seconds) to pack batches by, at time `now`;
        `expected` some stages' typical run time in seconds (None: not known yet);
        `costs` every stage's (None: not known yet), to route single-worker stages by
        expected finish time (else by outstanding runs); the caller adds each charged
        run's cost to its worker's `work` and takes it off once the run is done.
        `placed`: packed stages whose worker admission picked (by index)."""
        facts = self._facts.get(app_id)
        if facts is None or facts.plan is not plan:
            facts = self._facts[app_id] = PlanFacts.of(plan)
        everyone = workers  # with those that have no room
        if facts.plain is not None and room is not None:
            workers = _with_room(workers, facts.plain, room)
            if not workers:
                return None  # the request waits at the driver (late binding)
        if facts.plain is not None and not packs and not caps:
            routed = self._route_plain(app_id, facts, workers, costs, everyone)
            if routed is not None:
                return routed
        elif (
            facts.plain is not None
            and packs
            and len(packs) == len(plan.stages)
            and (not caps or caps.keys() <= packs.keys())
        ):
            routed = self._route_packed(app_id, facts, workers, caps, packs, now, placed)
            if routed is not None:
                return routed
        pools = {}  # by resource class: gpu or not
        for gpu in set(facts.gpu):
            pool = {w: load for w, load in workers.items() if load.gpu == gpu}
            if not pool:
                return None
            pools[gpu] = pool
        held = any(load.silent or load.loading_now for load in workers.values())
        order: Iterable[int] = range(len(plan.stages))
        if facts.branches:
            # An anyof's branches go to distinct workers, the one expected fastest
            # first: it gets the least loaded worker (others may be busy with earlier
            # losers).
            speed = expected or {}
            branches = sorted(facts.branches, key=lambda b: (speed.get(b[-1]) or 0.0, b))
            first = [i for b in branches for i in b]
            order = first + [i for i in order if i not in first]
        route: list[tuple[int, ...]] = [()] * len(plan.stages)
        finish = [0.0] * len(plan.stages)  # expected, from now (with `costs`)
        for index in order:
            stage, key, pool = plan.stages[index], (app_id, index), pools[facts.gpu[index]]
            if held:  # a worker busy loading another stage, or silent, takes nothing
                pool = {w: load for w, load in pool.items() if load.takes(key)}
                if not pool:
                    return None  # wait for one (the autoscaler counts it as missing)
            if any(load.background for load in pool.values()):
                # it loads them before anything sent after: a run there would wait
                pool = {w: load for w, load in pool.items() if not load.background} or pool
            racing = index in facts.racing  # by outstanding runs: a loser counts until Done
            if racing:
                rivals = _rivals(plan, index, route)
                if rivals:
                    others = {w: load for w, load in pool.items() if w not in rivals}
                    if all(load.held_up for load in others.values()):
                        # all busy with losers or long calls, or none (as many branches
                        # as workers): the branch known to win is through with its
                        # worker when it does. Else an anyof's stage went to the least
                        # loaded worker, a slow branch's as likely as not, and waited
                        # for its call (2 s of a loser; CI, stops 44, 60, 65 and 67)
                        winner = _winner(plan, index, route, expected or {})
                        others.update((w, pool[w]) for w in winner)
                    pool = others or pool
            cap = caps.get(index) if caps else None
            if facts.follows[index]:
                chosen: list[int] = []
            elif stage.locality_key:
                chosen = self._locality(key, pool, stage.replicas)
                if index in facts.located:  # its key is known: pick the worker now
                    for w in chosen:
                        workers[w].warm.add(key)  # all of them stay candidates
                    by_key = ranked(plan, index, chosen, table)
                    if stage.replicas > 1:  # competing replicas: the top-ranked ones
                        chosen = by_key[: stage.replicas]
                    else:
                        chosen = self._bounded(by_key, pool)
            elif packs and index in packs:
                hint = placed.get(index) if placed else None  # admission's pick, if any
                if hint in pool:
                    chosen = [self._join(key, hint, *packs[index], now)]
                else:
                    chosen = [self._pack(key, pool, cap, *packs[index], now)]
            elif costs is not None and stage.replicas == 1 and cap is None and not racing:
                cost = costs[index] or DEFAULT_COST_S
                producers = facts.producers[index]
                w, start = _earliest(key, pool, producers, route, finish, cost)
                if key not in pool[w].warm or key in pool[w].loading:
                    ready = self._cold(key, pool, w)
                    if ready:
                        warm, then = _earliest(key, ready, producers, route, finish, cost)
                        if then <= start + facts.load_s[index]:
                            pool[w].background.add(key)
                            w, start = warm, then
                    elif _wait_for_room(key, everyone, start + facts.load_s[index]):
                        pool[w].background.add(key)
                        return None
                finish[index] = start + cost
                chosen = [w]
            elif stage.replicas == 1 and cap is None and not racing:
                (w,) = self._least_loaded(key, pool, 1)
                if math.isinf(facts.load_s[index]) and (
                    key not in pool[w].warm or key in pool[w].loading
                ):
                    ready = self._cold(key, pool, w)
                    if ready:
                        pool[w].background.add(key)
                        (w,) = self._least_loaded(key, ready, 1)
                    elif _wait_for_room(key, everyone, math.inf):
                        pool[w].background.add(key)
                        return None
                chosen = [w]
            else:
                chosen = self._least_loaded(key, pool, stage.replicas, cap, rank=self.rank)
            for w in chosen:
                workers[w].warm.add(key)
            route[index] = tuple(chosen)
            if costs is not None and not finish[index]:  # routed otherwise: when it ends
                start = max((finish[p] for p in facts.producers[index]), default=0.0)
                for w in chosen:
                    start = max(start, workers[w].work)
                finish[index] = start + (costs[index] or DEFAULT_COST_S)
        final = tuple(route)
        charges = [(index, w) for index in facts.charged for w in final[index]]
        for index in facts.located:
            charges.extend((index, w) for w in final[index])
        for _, w in charges:
            workers[w].outstanding += 1
        return final, charges

    def _route_plain(
        self,
        app_id: int,
        facts: PlanFacts,
        workers: Mapping[int, WorkerLoad],
        costs: Sequence[float | None] | None = None,
        everyone: Mapping[int, WorkerLoad] | None = None,
    ) -> tuple[Route, list[tuple[int, int]]] | None:
        """`route` for a plan whose stages each run once, on the least loaded worker of
        one resource class (no replicas, races, locality or packing: most plans),
        with one pass over the workers per stage. None when some worker takes no
        runs now or loads a stage in the background, or none is of the class: the
        general path sorts that out. With
        `costs`, least loaded is the least expected `work` (a cold worker: half a run
        more), as the general path's `_earliest` for a request's first stage; the
        request's later stages then stay on that worker. A stage goes to a worker
        that has loaded it while one has and is expected to start it within the
        stage's load time of the cold one (a model: always; see `_cold`)."""
        pool = _plain_pool(workers, facts.plain)
        if pool is None:
            return None
        route = []
        for index, load_s in enumerate(facts.load_s):
            key = (app_id, index)
            best, start = self._plain_pick(key, pool, costs, index)
            cold = key not in pool[best].warm or key in pool[best].loading
            if cold and (costs is not None or math.isinf(load_s)):
                ready = self._cold(key, pool, best)
                if ready:
                    warm, then = self._plain_pick(key, ready, costs, index)
                    if then <= start + load_s:
                        pool[best].background.add(key)  # later stages: elsewhere too
                        pool = {w: load for w, load in pool.items() if not load.background}
                        best = warm
                elif everyone is not None and _wait_for_room(key, everyone, start + load_s):
                    pool[best].background.add(key)
                    return None  # the general path sees it too, and waits
            pool[best].warm.add(key)
            route.append((best,))
        return _charged(route, workers)

    def _route_packed(
        self,
        app_id: int,
        facts: PlanFacts,
        workers: Mapping[int, WorkerLoad],
        caps: Mapping[int, int] | None,
        packs: Mapping[int, tuple[int, float]],
        now: float,
        placed: Mapping[int, int] | None,
    ) -> tuple[Route, list[tuple[int, int]]] | None:
        """`route` for a plain plan whose stages all pack batches (SLO stages, each
        planned): each to the worker admission placed it on, else as `_pack` picks, as
        the general path routes them, with one pass over the workers. None as
        `_route_plain`: the general path sorts that out."""
        pool = _plain_pool(workers, facts.plain)
        if pool is None:
            return None
        route = []
        for index, (size, timeout_s) in sorted(packs.items()):  # every stage packs
            key, hint = (app_id, index), placed.get(index) if placed else None
            if hint in pool:
                w = self._join(key, hint, size, timeout_s, now)
            else:
                w = self._pack(key, pool, caps.get(index) if caps else None, size, timeout_s, now)
            pool[w].warm.add(key)
            route.append((w,))
        return _charged(route, workers)

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
        worker = self._least_loaded(key, workers, 1, cap, opened, self.rank)[0]
        self._open[key] = OpenBatch(worker, 1, now, size, timeout_s)
        opened[worker] = now
        return worker

    def _join(self, key: StageKey, worker: int, size: int, timeout_s: float, now: float) -> int:
        """`_pack` for a request admission placed on `worker` (where `next_pack` said,
        or where a call is filling): it joins the open batch there, or opens one
        there when none is open."""
        batch = self._open.get(key)
        if batch is not None and batch.open(now):
            if batch.worker == worker:
                batch.count += 1
            return worker
        self._open[key] = OpenBatch(worker, 1, now, size, timeout_s)
        self._opened.setdefault(key, {})[worker] = now
        return worker

    def next_pack(
        self,
        key: StageKey,
        workers: Mapping[int, WorkerLoad],
        cap: int | None,
        size: int,
        timeout_s: float,
        now: float,
        first_free: Callable[[list[int]], int | None] | None = None,
    ) -> int | None:
        """The worker `_pack` would give a request of packed stage `key` now (None:
        no worker takes it), without routing it: what admission predicts for, and
        where routing then sends it. A request that opens a batch goes to the one of
        the stage's warm, unhindered workers that `first_free` (admission's ledger)
        expects to be through its queue first, where it says (None: the least
        loaded), not the one with the fewest requests: the batch waits for its worker
        while another may be free (see `StageLedger.first_free`)."""
        batch = self._open.get(key)
        if batch is not None and batch.open(now):  # the usual case, per arrival
            load = workers.get(batch.worker)
            if load is not None and load.takes(key):
                return batch.worker
        pool = {w: load for w, load in workers.items() if load.takes(key)}
        if not pool:
            return None
        opened = self._opened.get(key, {})
        ranked = self._least_loaded(key, pool, len(pool), cap, opened, self.rank)
        loaded = [w for w in ranked if key in pool[w].warm and key not in pool[w].loading]
        if loaded and ranked[0] not in loaded:
            # the stage scales out to a worker that has not loaded it: the load is asked
            # for now, and a loaded worker takes the request. Sent there, it waited for
            # the load (min 1, max 4 workers, 3,000/s at an SLO of 100 ms, a model
            # loading in 2 s: 300 answered up to 2 s late as the pool grew)
            took = self._cold(key, pool, ranked[0])
            ranked = [w for w in ranked if w in took] or ranked
        ready = [w for w in loaded if not pool[w].held_up]
        free = first_free(ready) if first_free is not None and len(ready) > 1 else None
        return ranked[0] if free is None else free

    def loads(self) -> list[tuple[int, StageKey]]:
        """The (worker, stage) loads routing asked for since the last call: the caller
        sends each worker a `Load` for them. Each stays in that worker's `loading` (runs
        go elsewhere while another worker has the stage) until it reports the load."""
        loads, self._loads = self._loads, []
        return loads

    def _cold(self, key: StageKey, pool: Mapping[int, WorkerLoad], w: int) -> dict[int, WorkerLoad]:
        """Worker `w`, picked for a run of stage `key`, has not loaded it: the load is
        asked for now if it was not yet (see `loads`), and the workers of `pool` that
        have loaded it and are in no long call are returned to take the run instead
        (empty: none has, `w` takes it, or the run waits for room on one that has:
        `_wait_for_room`). A load can take seconds (a model; a plain function's unpickling
        imports its module, FUNCTION_LOAD_S): a run sent to a cold worker waits for
        it, and every later run sent there would too, while a warm worker would have
        run them; the load runs meanwhile, off the requests' path."""
        load = pool[w]
        if key not in load.warm:  # else its load was asked for already
            load.warm.add(key)
            load.loading.add(key)
            self._loads.append((w, key))
        return {
            v: other
            for v, other in pool.items()
            if key in other.warm and key not in other.loading and not other.held_up
        }

    @staticmethod
    def _plain_pick(
        key: StageKey,
        pool: Mapping[int, WorkerLoad],
        costs: Sequence[float | None] | None,
        index: int,
    ) -> tuple[int, float]:
        """The worker for a run of stage `key` and when it is expected to start (0.0
        without `costs`: the least loaded one)."""
        if costs is None:
            return Scheduler._least_loaded(key, pool, 1)[0], 0.0
        return _earliest(key, pool, (), (), (), costs[index] or DEFAULT_COST_S)

    def forget(self, app_id: int) -> None:
        """Drop an undeployed app's open batches."""
        for key in [k for k in self._open if k[0] == app_id]:
            del self._open[key]
            self._opened.pop(key, None)
        self._facts.pop(app_id, None)

    @staticmethod
    def _least_loaded(
        key: StageKey,
        workers: Mapping[int, WorkerLoad],
        n: int,
        cap: int | None = None,
        since: Mapping[int, float] | None = None,
        rank: Callable[[StageKey, int], int] | None = None,
    ) -> list[int]:
        """The `n` workers with the fewest outstanding runs (warm ones first; among
        equals, the one given work longest ago by `since`, else the lowest index)."""
        if n == 1 and cap is None and since is None:  # the usual case, on the hot path
            best, best_score = -1, math.inf
            for w, load in workers.items():
                score = load.outstanding + (
                    LOADING_PENALTY
                    if key in load.loading
                    else 0.0
                    if key in load.warm
                    else COLD_PENALTY
                )
                if load.held_up:
                    score += STALLED_PENALTY
                if score < best_score or (score == best_score and w < best):
                    best, best_score = w, score
            return [best]
        pool: Iterable[int] = workers
        if cap is not None:
            warm = [w for w in workers if key in workers[w].warm]
            if len(warm) >= cap:
                # Stable (the stage keeps its workers), those still loading (a spare,
                # a worker a plan is adding) last.
                by = rank or (lambda _, w: w)  # see `Scheduler.rank`
                pool = sorted(warm, key=lambda w: (key in workers[w].loading, by(key, w)))[:cap]
        order = since or {}
        ranked = []
        for w in pool:
            load = workers[w]
            if key in load.loading:
                score = load.outstanding + LOADING_PENALTY
            else:
                score = load.outstanding + (0.0 if key in load.warm else COLD_PENALTY)
            if load.held_up:
                score += STALLED_PENALTY
            ranked.append((score, order.get(w, -math.inf), w))
        ranked.sort()
        return [w for _, _, w in ranked[:n]]

    @staticmethod
    def _bounded(ranked: list[int], pool: Mapping[int, WorkerLoad]) -> list[int]:
        """The first worker in a key's rendezvous ranking with room (consistent
        hashing with bounded loads: below 1.25x the candidates' average load, this
        run included; not in a long call): a key keeps meeting its worker and its
        cache, unless that one is busy while others are not."""
        bound = math.ceil(
            BOUNDED_LOAD * (sum(pool[w].outstanding for w in ranked) + 1) / len(ranked)
        )
        for w in ranked:
            if pool[w].outstanding < bound and not pool[w].held_up:
                return [w]
        return [min(ranked, key=lambda w: (pool[w].held_up, pool[w].outstanding))]

    def _locality(self, key: StageKey, pool: Mapping[int, WorkerLoad], n: int) -> list[int]:
        """The workers a locality stage's keys are hashed over: those it is warm on
        (at first, every worker of the pool), plus the least loaded other one while
        all of them are busy: a hot stage spreads, and rendezvous hashing moves only
        the new worker's share of keys to it."""
        warm = [w for w in pool if key in pool[w].warm]
        others = [w for w in pool if key not in pool[w].warm]
        if not warm:
            return sorted(pool)
        busy = all(pool[w].outstanding >= self.spread_at or pool[w].held_up for w in warm)
        if others and (len(warm) < n or busy):
            warm += self._least_loaded(key, {w: pool[w] for w in others}, max(1, n - len(warm)))
        return sorted(warm)


def _earliest(
    key: StageKey,
    pool: Mapping[int, WorkerLoad],
    producers: tuple[int, ...],
    route: Sequence[tuple[int, ...]],
    finish: Sequence[float],
    cost: float,
) -> tuple[int, float]:
    """The worker where a run of stage `key` costing `cost` seconds is expected to
    start (so finish) first, and when: once the worker is through its `work` and the
    run's inputs are there (their producers' `finish`, one hop later from another
    worker); a cold worker costs half a run more, one still loading it
    LOADING_PENALTY, one in a long call STALLED_PENALTY. Among equals, the one with
    the fewest outstanding runs, then the lowest index. On the hot path: plain loops."""
    best, best_start, best_outstanding = -1, math.inf, 0
    for w, load in pool.items():
        start = 0.0
        for p in producers:
            at = finish[p] if w in route[p] or not route[p] else finish[p] + HOP_S
            if at > start:
                start = at
        if load.work > start:
            start = load.work
        if load.loading and key in load.loading:
            start += LOADING_PENALTY
        elif key not in load.warm:
            start += COLD_PENALTY * cost
        if load.held_up:
            start += STALLED_PENALTY
        if start < best_start or (
            start == best_start and (load.outstanding, w) < (best_outstanding, best)
        ):
            best, best_start, best_outstanding = w, start, load.outstanding
    return best, best_start


@dataclass(frozen=True)
class PlanFacts:
    """What routing needs to know of a plan, worked out once, not for every request."""

    plan: Plan
    gpu: tuple[bool, ...]  # per stage: placed on GPU workers
    branches: tuple[tuple[int, ...], ...]  # the branches of anyof races (their stages)
    racing: frozenset[int]  # stages that avoid rivals' workers: branches, anyofs
    follows: tuple[bool, ...]  # per stage: `follows_winner`
    producers: tuple[tuple[int, ...], ...]  # per stage: the stages whose output it reads
    charged: tuple[int, ...]  # stages whose chosen workers are charged (`charged`)
    located: tuple[int, ...]  # locality stages fed by the request: charged by key
    # per stage: its expected load time; inf for a model (`_loads_model`): seconds, so
    # a worker that has it loaded is always worth waiting for
    load_s: tuple[float, ...]
    # the resource class (gpu or not) of every stage, when each stage runs once on one
    # worker that nothing else constrains (`Scheduler._route_plain`); else None
    plain: bool | None

    @classmethod
    def of(cls, plan: Plan) -> PlanFacts:
        stages = range(len(plan.stages))
        branches = tuple(b for _, race in plan.anyof_races for b in race)
        return cls(
            plan,
            gpu=tuple(stage.placement == "gpu" for stage in plan.stages),
            branches=branches,
            racing=frozenset(i for b in branches for i in b)
            | {consumer for consumer, _ in plan.anyof_races},
            follows=tuple(follows_winner(plan, i) for i in stages),
            producers=tuple(
                tuple(plan.index_of(op) for op in plan.stages[i].inputs if op) for i in stages
            ),
            charged=tuple(i for i in stages if not plan.stages[i].locality_key),
            located=tuple(
                i for i in stages if plan.stages[i].locality_key and plan.feeds_from_request(i)
            ),
            load_s=tuple(
                math.inf if _loads_model(stage) else FUNCTION_LOAD_S for stage in plan.stages
            ),
            plain=_plain(plan),
        )


def _plain_pool(workers: Mapping[int, WorkerLoad], gpu: bool) -> dict[int, WorkerLoad] | None:
    """The workers of class `gpu` a plain plan's fast paths route to, when none of
    `workers` is silent, loading now or loading a stage in the background (None:
    the general path sorts those out), and some is of that class."""
    pool = {}
    for w, load in workers.items():
        if load.silent or load.loading_now or load.background:
            return None
        if load.gpu == gpu:
            pool[w] = load
    return pool or None


def _charged(
    route: list[tuple[int]], workers: Mapping[int, WorkerLoad]
) -> tuple[Route, list[tuple[int, int]]]:
    """A fast path's route, each stage's run counted as outstanding on its worker."""
    charges = []
    for index, (w,) in enumerate(route):
        workers[w].outstanding += 1
        charges.append((index, w))
    return tuple(route), charges


def _with_room(workers: Mapping[int, WorkerLoad], gpu: bool, room: int) -> dict[int, WorkerLoad]:
    """The workers of class `gpu` a plain plan's request may go to now: those below
    `room` outstanding runs and in no long call, or, when every one with room is in a
    long call and so are all the others, those with room; none (the request waits for
    room) when the only ones with room are in long calls while others are not. A
    request is never routed onto a full worker because another one had room: while
    a worker is in a long call, the whole wait line would go to the other one."""
    pool = {w: load for w, load in workers.items() if load.gpu == gpu}
    free = {w: load for w, load in pool.items() if load.outstanding < room}
    running = {w: load for w, load in free.items() if not load.held_up}
    if running or any(not load.held_up for load in pool.values()):
        return running
    return free


def _wait_for_room(key: StageKey, everyone: Mapping[int, WorkerLoad], by: float) -> bool:
    """Whether a run of stage `key` that would wait for a load on a cold worker (until
    `by`, in expected seconds) should rather wait at the driver for room on a worker
    that has the stage loaded, expected to be through its work before then."""
    return any(
        key in load.warm and key not in load.loading and not load.held_up and load.work <= by
        for load in everyone.values()
    )


def _loads_model(stage: Any) -> bool:
    """Whether loading `stage` constructs a class given to map or filter (a model, whose
    load can take seconds), as `StageExecutor` does; plain functions load at once."""
    return any(
        inspect.isclass(getattr(op, "fn", None) or getattr(op, "pred", None)) for op in stage.ops
    )


def _plain(plan: Plan) -> bool | None:
    """See `PlanFacts.plain`."""
    classes = {stage.placement == "gpu" for stage in plan.stages}
    if (
        len(classes) != 1
        or plan.anyof_races
        or any(
            stage.replicas != 1 or stage.locality_key or follows_winner(plan, i)
            for i, stage in enumerate(plan.stages)
        )
    ):
        return None
    return classes.pop()


def _rivals(plan: Plan, index: int, route: Sequence[tuple[int, ...]]) -> set[int]:
    """Workers stage `index` should avoid: those of the other branches of its anyof
    race, or, for an anyof's own stage, those of its branches (a branch that keeps
    running would hold up the anyof behind it)."""
    rivals: set[int] = set()
    for consumer, branches in plan.anyof_races:
        for branch in branches:
            if index == consumer or (index not in branch and any(index in b for b in branches)):
                rivals.update(w for i in branch for w in route[i])
    return rivals


def _winner(
    plan: Plan, index: int, route: Sequence[tuple[int, ...]], speed: Mapping[int, float | None]
) -> tuple[int, ...]:
    """For an anyof's own stage `index`, the workers of the branch known to answer
    first by `speed` (each branch's expected run time, `Scheduler.route`): the only one
    not losing a race still going (math.inf), or one measured faster than all others;
    () when none is known or `index` is no anyof's."""
    for consumer, branches in plan.anyof_races:
        if consumer == index:
            live = {b[-1]: speed.get(b[-1]) for b in branches}
            live = {head: took for head, took in live.items() if took != math.inf}
            times = list(live.values())
            if len(live) > 1 and (None in times or times.count(min(times)) > 1):  # type: ignore[type-var]
                return ()
            return route[min(live, key=lambda head: live[head] or 0.0)] if live else ()
    return ()


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
    """The workers to send stage `index`'s input to; () means the sender itself. A
    locality stage's input goes to the candidates that rank highest for its key by
    rendezvous hashing: one key always meets the same worker (and its cache) while
    the candidates stay, and a new candidate takes only its share of keys."""
    stage, chosen = plan.stages[index], route[index]
    if not stage.locality_key or len(chosen) <= stage.replicas:
        return chosen
    return tuple(ranked(plan, index, chosen, table)[: stage.replicas])


def ranked(plan: Plan, index: int, candidates: Sequence[int], table: Any) -> list[int]:
    """Locality stage `index`'s candidates in rendezvous order for the key its input
    `table` looks up (as given without one)."""
    column = plan.stages[index].locality_key
    keys = table._columns.get(column) if isinstance(table, Table) and column else None
    if not keys:
        return list(candidates)
    key = str(keys[0]).encode()
    return sorted(candidates, key=lambda w: _rendezvous(key, w), reverse=True)


def _rendezvous(key: bytes, worker: int) -> bytes:
    return hashlib.blake2b(key, digest_size=8, salt=worker.to_bytes(8, "little")).digest()


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
        unavailable: int = 0,
    ) -> tuple[int, list[int]]:
        """(workers to start, workers to retire), from the stage runs outstanding on
        each ready worker, requests waiting for room, workers starting and workers
        still exiting (they count against `max_workers` until gone). `usable`: how
        many workers the deployed stages can use at most (stages capped by a batching
        controller), None when unbounded: growth past it would only hold idle workers.
        `unavailable`: ready workers that take no new runs now (busy loading a model,
        silent): they count against `max_workers` but give no room."""
        loads = list(outstanding)
        size = len(loads) + starting + unavailable
        if size < self.min_workers:
            return self.min_workers - size, []
        demand = sum(loads) + waiting
        busy = demand / len(loads) > self.target_in_flight if loads else waiting > 0
        if busy:  # enough workers for the demand at once, not one at a time
            limit = min(self.max_workers - retiring, usable or self.max_workers)
            want = min(limit, unavailable + math.ceil(demand / self.target_in_flight))
            return max(0, want - size), []
        idle = [w for w, seconds in sorted(idle_for.items()) if seconds >= self.idle_s]
        if idle and size > self.min_workers:
            return 0, idle[:1]
        return 0, []
