"""`ControlPlane`: every runtime policy, over an engine that only carries them out.

It tracks requests (the stage runs outstanding on each worker, competing replicas and
anyof branches, retries, deadlines, cancellation), routes them (`Scheduler`: warm
stage, load, locality, resource classes), admits them (in-flight bound, SLO
shedding), sizes the pool (`Autoscaler`), runs the batching controllers and keeps
the stats. It talks to workers only through an `Engine` and the typed messages of
`messages.py`, so the embedded runtime (processes) and the Ray runtime (actors)
share all of it.

A request's path: `App.run` -> `start` (admission) -> `_route` (workers for every
stage; or the wait line when no worker has room) -> `Input` to the first stages'
workers; from there results travel worker to worker and the last stage's `Result`
comes back to `on_message`, which settles the future; `finish` releases the
request's load and routes requests waiting for room.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from serveflow.errors import InputError, OperatorError, OverloadError
from serveflow.logical.flow import SOURCE_ID
from serveflow.optimizer.placement import place
from serveflow.optimizer.plan import Plan
from serveflow.runtime import codec, collector, silence
from serveflow.runtime import messages as m
from serveflow.runtime.app import App
from serveflow.runtime.engine import Engine, ThreadTimes
from serveflow.runtime.kvs import KVS
from serveflow.runtime.request import Request
from serveflow.runtime.scheduler import (
    DEFAULT_COST_S,
    Autoscaler,
    Scheduler,
    WorkerLoad,
    targets,
)

if TYPE_CHECKING:
    from serveflow.batching.admission import Lanes
    from serveflow.batching.controller import BatchingController, Decision
    from serveflow.runtime.planner import PlannerProcess
    from serveflow.runtime.scheduler import StageKey
    from serveflow.runtime.stats import StageStats

log = logging.getLogger(__name__)

MONITOR_EVERY_S = 0.1
PLAN_EVERY_S = 0.1
RESPLIT_EVERY_S = 5.0
SWEEP_EVERY_S = 2.0
START_TIMEOUT_S = 60.0
MAX_FAILED_STARTS = 3  # consecutive workers dying before ready: stop trying
ORPHAN_GRACE_S = 0.2  # a heartbeat this much after a run was orphaned was sent after it
SILENT_S = 2.0  # a worker not heard from this long (heartbeats every 0.5 s) gets no runs
HEARTBEAT_TIMEOUT_S = 1.5  # default: a worker not heard from this long is killed, replaced
LOADING_SILENT_S = 30.0  # the same while its last heartbeat said it was loading a stage
# a silent worker the engine sees neither stopped nor wedged (`silence.wedged`: judged
# over the second half of its allowance) gets this many times longer: it may be starved
WEDGED_FACTOR = 4
LATE_ROUND_S = 0.25  # a monitor round this late: the driver itself stalled (see _monitor)
HELD_BUSY_S = 4.0  # a stage without an SLO held off some workers: its load over this ...
HELD_FITS = 0.7  # ... fits on the workers left while it keeps less of them busy
HELD_KEEP = 0.85  # ... and stays held below this
QUIET_S = 5.0  # a stage with no arrival this long holds no other stage off its workers
STALLED_S = 1.0  # a call running this long: new runs go to other workers (STALLED_PENALTY)


@dataclass
class WorkerState:
    """What the control plane knows of one worker."""

    index: int
    device: int | None = None  # the GPU it owns
    ready: bool = False
    load: WorkerLoad = field(default_factory=WorkerLoad)
    queued: dict[tuple[int, int], int] = field(default_factory=dict)
    active_at: float = field(default_factory=time.monotonic)
    busy_since: float | None = None  # running a stage since (from its heartbeat)
    heard_at: float = field(default_factory=time.monotonic)  # its last heartbeat or report
    beat_at: float = 0.0  # its last heartbeat (which says whether it runs a stage)
    retiring: bool = False
    killed_for: str = ""
    # (when, its threads then) while silent: the start of the window `silence.wedged` judges
    threads_mark: tuple[float, dict[int, ThreadTimes]] | None = None


def check_pool(min_workers: int, max_workers: int) -> None:
    if not 1 <= min_workers <= max_workers:
        raise ValueError(f"need 1 <= min_workers <= max_workers: {min_workers}, {max_workers}")


def _expected(expected: dict[int, float | None], index: int) -> float:
    """A stage's typical run time for ordering anyof branches; 0 for a stage that is
    no branch or not measured yet (tried first: it may be the fastest)."""
    return expected.get(index) or 0.0


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


class DeployedApp(App):
    """A plan deployed on a control plane."""

    def __init__(self, app_id: int, plan: Plan, control: ControlPlane, owns: bool) -> None:
        super().__init__(plan, control, owns, control.max_in_flight)
        self.id = app_id
        self.active: dict[int, Request] = {}
        # imported here: numpy, which it needs, adds a third to every worker's start
        from serveflow.runtime.stats import StageStats

        self.stage_stats = [StageStats() for _ in plan.stages]
        self.sources = tuple(i for i, s in enumerate(plan.stages) if 0 in s.inputs)
        # stage runs a worker may hold before requests wait at the driver: room for a
        # running call and the one filling behind it, each of up to BACKLOG_MERGE of
        # the largest batches (a controller plans up to SIZE_LADDER's top, and runs two
        # as one call under a backlog). Admission counts on them being at the worker,
        # not held here: with room for one such call, an overload's calls of 66 behind
        # calls of 66 (20 + 5 ms per row, SLO 500 ms) waited here, and 18-43% of the
        # requests answered missed the SLO, by up to 170 ms.
        largest_batch = max((s.batching.size for s in plan.stages if s.batching), default=0)
        adaptive = [s.batching for s in plan.stages if s.batching and s.batching.adaptive]
        if adaptive:
            from serveflow.batching.controller import BACKLOG_MERGE, SIZE_LADDER

            largest_batch = max(largest_batch, *(b.max_size or SIZE_LADDER[-1] for b in adaptive))
            largest_batch *= BACKLOG_MERGE
        self.worker_cap = max(control.worker_queue, 2 * largest_batch)
        # each anyof branch's stages by its head, whose latency orders the branches
        self.branch_of = {i: b[-1] for _, branches in plan.anyof_races for b in branches for i in b}
        self.competing = frozenset(i for i in range(len(plan.stages)) if plan.competing(i))
        self.output_index = plan.index_of(plan.output)
        # workers the plan needs at once: competing replicas; an anyof's branches and
        # one more for the anyof itself (behind a branch, it would wait for the branch)
        self.width = max(
            [s.replicas for s in plan.stages] + [len(g) + 1 for g in plan.anyof_groups]
        )
        # SLO-aware batching stages: a controller each, its choices pushed to workers
        self.controllers: dict[int, BatchingController] = {}
        adaptive = [i for i, s in enumerate(plan.stages) if s.batching and s.batching.adaptive]
        if adaptive:  # imported here: scipy is too slow to import in every worker
            from serveflow.batching.controller import BatchingController

            planner = control.planner()
            planner.start()
            self.controllers = {
                i: BatchingController(
                    plan.stages[i].batching,
                    control.max_workers,
                    held_workers=control.min_workers,
                    searcher=planner.search,
                    fitter=planner.fit,
                    lanes=control.lanes(),
                )
                for i in adaptive
            }
            for controller in self.controllers.values():
                controller.ledger.app = app_id
        # each SLO stage's SLO stages upstream (a request reaches it once they ran)
        self.slo_before = {i: self._upstream(i) & self.controllers.keys() for i in self.controllers}
        if plan.slo_ms and plan.slo_stages:
            last = max(plan.slo_stages)
            if plan.stages[last].output == plan.output:
                self.controllers[last].flow_slo_s = plan.slo_ms / 1e3
        for i, before in self.slo_before.items():
            for j in before:
                self.controllers[j].ledger.later.add(id(self.controllers[i].ledger))
        self.decisions: dict[int, Decision] = {}
        # waiting for a stage's first timed call: added under the stage controller's
        # lock (`_admit`), each taken out once (`dict.pop`) to be judged or refused
        self.held: dict[int, Request] = {}
        self._control = control

    def hold_timer(self, request: Request, when: float, action: Callable[[], None]) -> None:
        """Call `action` at `when` (time.monotonic), on the app's deadline thread, unless
        `release_hold(request)` is called first."""
        request.hold_timer = self._deadlines.add(when, action)

    def release_hold(self, request: Request) -> None:
        if request.hold_timer is not None:  # freed now, not at a loose SLO's end
            self._deadlines.cancel(request.hold_timer)
            request.hold_timer = None

    def _upstream(self, index: int) -> set[int]:
        """The stages whose output stage `index` reads, directly or not."""
        found: set[int] = set()
        todo = [index]
        while todo:
            for op in self.plan.stages[todo.pop()].inputs:
                if op != SOURCE_ID and (i := self.plan.index_of(op)) not in found:
                    found.add(i)
                    todo.append(i)
        return found

    def told_of(self, lost: frozenset[int]) -> list[tuple[int, int]]:
        """(anyof stage, branch head) for each anyof left to answer a request whose
        `lost` stages (`Plan.lost_with`) include that branch's head."""
        return [
            (consumer, branch[-1])
            for consumer, branches in self.plan.anyof_races
            if consumer not in lost
            for branch in branches
            if branch[-1] in lost
        ]

    def answers_without(self, lost: frozenset[int]) -> bool:
        """Whether a request can still be answered without its `lost` stages (and
        every anyof left to answer can be told which branch failed: not a locality
        stage, whose worker only its input's key names)."""
        return self.output_index not in lost and not any(
            self.plan.located(consumer) for consumer, _ in self.told_of(lost)
        )

    def resplit_slo(self) -> None:
        """Share the flow's SLO by each stage's service time at its current batch size."""
        service = {}
        for index in self.plan.slo_stages:
            profile, decision = self.controllers[index].profile, self.decisions.get(index)
            if profile.ready and decision is not None:
                service[index] = float(profile.predict([decision.max_size])[0]) * 1e3
        if len(service) < 2 or self.plan.slo_ms is None:
            return
        from serveflow.optimizer.slo import assign_slo

        shares = assign_slo(self.plan, self.plan.slo_ms, service)
        for index in service:
            share = shares.stages[index].batching.slo_ms  # type: ignore[union-attr]
            controller = self.controllers[index]
            if abs(share - controller.policy.slo_ms) > 0.05 * controller.policy.slo_ms:
                controller.retarget(share)

    def explain(self) -> str:
        """The plan, plus the live choices of SLO-aware batching stages."""
        lines = [self.plan.explain()]
        for index, controller in self.controllers.items():
            now = controller.snapshot()
            lines.append(
                f"live: stage {index + 1} {self.plan.stages[index].name!r}: "
                f"batch_size={now['batch_size']}, timeout_ms={now['timeout_ms']:.1f}, "
                f"workers={now['workers']}, arrival_rate={now['arrival_rate']:.1f}/s, "
                f"p{now['percentile'] * 100:g} predicted={_ms(now['predicted_p_ms'])} "
                f"measured={_ms(now['measured_p_ms'])} (slo {now['slo_ms']:g} ms)"
            )
        return "\n".join(lines)

    def shed_error(self, index: int, starting: bool = False, rows: int = 0) -> OverloadError:
        """The refusal of SLO batching stage `index`; `starting`: by a request that
        waited for its first call (`ControlPlane._await_timing`); `rows`: of a
        request whose rows alone outlast the SLO."""
        stage = self.plan.stages[index]
        slo = f"its SLO of {stage.batching.slo_ms:g} ms"
        if rows:
            return OverloadError(
                f"stage {stage.name!r} cannot run {rows:,} rows within {slo}; "
                "request shed (send fewer rows per request)"
            )
        if starting:
            return OverloadError(
                f"stage {stage.name!r} ran no call within {slo} (its workers are "
                "starting it); request shed"
            )
        return OverloadError(f"stage {stage.name!r} cannot meet {slo} at this load; request shed")

    @property
    def sheds_at_once(self) -> bool:
        return any(
            c.policy.adaptive and c.policy.on_overload == "shed" for c in self.controllers.values()
        )

    def refuses_outright(self) -> OverloadError | None:
        # as `ControlPlane._admit` would: its first SLO stage, unless in an anyof branch
        index = next(iter(self.controllers), None)
        if index is None or index in self.branch_of:
            return None
        if not self.controllers[index].refuses_outright(time.monotonic()):
            return None
        return self.shed_error(index)

    def _submit(self, request: Request) -> None:
        self._control.start(self, request)

    def _finish(self, request: Request, failed: bool) -> None:
        self._control.finish(self, request, failed)

    def stats(self) -> dict[str, dict[str, Any]]:
        return self._control.stage_figures(self)

    def workers_of(self, index: int) -> int:
        """The workers stage `index` is warm on now: `stats()`'s "workers", without
        the percentiles over every recent latency that `stats()` computes."""
        return self._control.stage_workers(self, index)

    def _shutdown(self) -> None:
        self._control.undeploy(self)


class ControlPlane:
    """Runs plans on an engine's workers; see the module docstring.

    min_workers / max_workers: CPU pool size limits (the pool has at least as many
        workers as the widest stage: competing replicas, anyof branches).
    gpus: the GPU devices, one worker each, which run the GPU-placed stages.
    max_in_flight: requests an app holds at once; more fail fast with OverloadError.
    worker_queue: stage runs routed to one worker before further requests wait at the
        driver for room (raised to fit batching stages' batches).
    retries: times a request is re-run when a worker dies under it.
    idle_s: a worker idle this long is retired (above min_workers).
    target_in_flight: stage runs per worker above which the pool grows.
    stage_timeout_s: a worker running one batch longer than this is killed and its
        requests re-run (None: no limit).
    heartbeat_timeout_s: a worker not heard from this long (heartbeats every 0.5 s)
        that the engine sees stopped (SIGSTOP) or wedged (native code holding the
        GIL, computing or blocked: `silence.wedged`) is killed, its requests re-run
        elsewhere and a new worker started; one neither (starved by an oversubscribed
        machine: its threads wait for a core) after WEDGED_FACTOR times as long;
        while it said it was loading a stage, after LOADING_SILENT_S. None: never (a
        silent worker is only routed around).
    """

    def __init__(
        self,
        engine: Engine,
        kvs: KVS,
        *,
        min_workers: int,
        max_workers: int,
        gpus: list[int],
        max_in_flight: int,
        worker_queue: int,
        retries: int,
        idle_s: float,
        target_in_flight: float,
        stage_timeout_s: float | None,
        heartbeat_timeout_s: float | None = HEARTBEAT_TIMEOUT_S,
    ) -> None:
        check_pool(min_workers, max_workers)
        if heartbeat_timeout_s is not None and not heartbeat_timeout_s > 0:
            raise ValueError(f"heartbeat_timeout_s: a positive number, got {heartbeat_timeout_s}")
        self.engine = engine
        self.kvs = kvs
        self.gpus = gpus
        self.min_workers = min_workers
        self.max_workers = max_workers
        self.max_in_flight = max_in_flight
        self.worker_queue = worker_queue
        self.retries = retries
        self.stage_timeout_s = stage_timeout_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._driver_late_until = 0.0  # heartbeats are not judged before this
        self._autoscaler = Autoscaler(min_workers, max_workers, target_in_flight, idle_s)
        self._scheduler = Scheduler(spread_at=target_in_flight)
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._workers: dict[int, WorkerState] = {}
        # the loads of the workers requests may be routed to (ready, not retiring), and
        # of those the CPU ones: worked out again after a worker is ready, retires or ends
        self._routable: dict[int, WorkerLoad] | None = None
        self._held: dict[StageKey, int] = {}  # stages without an SLO held off: `_confine`
        self._pools: dict[bool | None, dict[int, WorkerLoad]] = {}  # see `_pool`
        self._apps: dict[int, DeployedApp] = {}
        self._deploys: dict[int, m.Deploy] = {}
        self._next_index = itertools.count()
        self._next_app = itertools.count(1)
        self._threads: list[threading.Thread] = []
        self._started = False
        self._stopping = False
        self._failed_starts = 0
        self._unrouted: deque[tuple[DeployedApp, Request]] = deque()
        # competing runs (they may go on after their request ended) charged to workers
        # and not known to be done, by (app, request, attempt, stage, worker): how many
        # (a stage behind competing copies runs once per copy that reaches it). Those
        # of ended requests are orphaned (since when) and hold their worker until it
        # says they are done or its heartbeat shows them over (`_release_orphans`).
        self._competing: dict[tuple[int, int, int, int, int], int] = {}
        self._orphaned: dict[tuple[int, int, int, int, int], float] = {}
        self._planner: PlannerProcess | None = None  # searches batching plans, once needed
        self._lanes: Lanes | None = None  # see `lanes`

    def lanes(self) -> Lanes:
        """The calls every SLO stage runs on each worker, shared by their ledgers."""
        from serveflow.batching.admission import Lanes

        with self._lock:
            if self._lanes is None:
                self._lanes = Lanes(self._unmirrored_until)
            return self._lanes

    def _unmirrored_until(self, worker: int, app: int) -> float:
        """When `worker` is done with the runs of stages of other apps than `app` that
        no admission ledger mirrors (-inf: none). Read without the lock."""
        state = self._workers.get(worker)
        return state.load.unmirrored_until(app) if state is not None else -math.inf

    def planner(self) -> PlannerProcess:
        """The process that searches batching plans (out of the driver's GIL)."""
        from serveflow.runtime.planner import PlannerProcess

        with self._lock:
            if self._planner is None:
                self._planner = PlannerProcess()
            return self._planner

    # -- deployment ---------------------------------------------------------------------
    def deploy(self, plan: Plan, *, owns_runtime: bool = False) -> DeployedApp:
        plan = place(plan, bool(self.gpus))  # placement is what this runtime has
        collector.deploying()
        with self._lock:
            if self._stopping:
                raise RuntimeError(f"this {type(self).__name__} is stopped")
            self._ensure_started()
            app = DeployedApp(next(self._next_app), plan, self, owns_runtime)
            self._apps[app.id] = app
            self._deploys[app.id] = self.engine.publish(app.id, plan)
            for w in self._workers.values():
                if w.ready:
                    self.engine.send(w.index, self._deploys[app.id])
            need = min(max(self.min_workers, app.width), self.max_workers)
            deadline = time.monotonic() + START_TIMEOUT_S
            while self._cpu_ready() < need or self._gpus_missing():
                if self._failed_starts >= MAX_FAILED_STARTS:
                    raise RuntimeError("workers fail to start; see the log above")
                self._spawn_missing(need)
                if not self._changed.wait(max(0.0, deadline - time.monotonic())):
                    raise RuntimeError("workers did not start in time")
        return app

    def undeploy(self, app: DeployedApp) -> None:
        with self._lock:
            self._apps.pop(app.id, None)
            self._deploys.pop(app.id, None)
            self._scheduler.forget(app.id)
            for controller in app.controllers.values():
                controller.ledger.leave()
            for w in self._workers.values():
                w.load.warm -= {k for k in w.load.warm if k[0] == app.id}
                w.load.loading -= {k for k in w.load.loading if k[0] == app.id}
                w.load.background -= {k for k in w.load.background if k[0] == app.id}
                if w.ready:
                    self.engine.send(w.index, m.Undeploy(app.id))
            self.engine.unpublish(app.id)

    def _cpu_ready(self) -> int:
        return sum(w.ready and w.device is None for w in self._workers.values())

    def _gpus_missing(self) -> bool:
        """Whether a deployed app places stages on GPUs whose workers are not ready."""
        if not any(s.placement == "gpu" for a in self._apps.values() for s in a.plan.stages):
            return False
        ready = {w.device for w in self._workers.values() if w.ready}
        return not set(self.gpus) <= ready

    # -- requests -----------------------------------------------------------------------
    def start(self, app: DeployedApp, request: Request) -> None:
        if app.controllers:
            admitted = self._admit(app, request)
            if admitted is None:
                self._await_timing(app, request)
            if not admitted:
                return
        with self._lock:
            if request.ended:  # a deadline already passed, or cancelled
                return
            app.active[request.id] = request
            self._route(app, request)

    def _admit(self, app: DeployedApp, request: Request) -> bool | None:
        """Ask each SLO-aware batching stage whether this request can still meet its
        SLO, predicted from where the router would send it and what is queued there.
        A refusal sheds the request with OverloadError naming the stage, at once;
        unless another branch of an anyof can still answer it: then only the refusing
        branch is dropped (`request.lost`, see `_drop_lost`). None: a stage has no
        call timed yet to judge it by, and the request waits for one (`_await_timing`)."""
        now = time.monotonic()
        # a request that waited for a first timed call (`_await_timing`): the wait counts
        began = request.submitted if request.held is not None else now
        # ... and so does what its caller spends on it outside the runtime (`App.run`)
        start = began - request.outside
        places = None
        # Before anything is entered, whether a stage (not in an anyof branch: refused
        # there, the other branches answer) has no call timed yet and its workers full:
        # the request waits for one. Seen and held under that stage's lock, which its
        # reports and ends are learned under: one in between would miss the request.
        untimed = [i for i, c in app.controllers.items() if not c.timed and i not in app.branch_of]
        if untimed:
            with self._lock:
                places = {i: self._next_place(app, i, now) for i in app.controllers}
            for index in untimed:

                def hold(index: int = index) -> None:
                    request.held = index
                    app.held[request.id] = request

                if app.controllers[index].awaits_timing(now, places[index][0], hold):
                    return None
        leaves: dict[int, float] = {}  # when the request is expected out of each stage admitted
        due: dict[int, float] = {}  # when the flow's SLO's shares up to each stage end
        admitted: list[int] = []
        refused_at: list[int] = []
        lost: frozenset[int] = frozenset()
        for index, controller in app.controllers.items():
            if index in lost:  # downstream of a refusal: this request will not come
                continue
            refused = controller.refuses_outright(now)
            outlasting = 0  # the rows of a request refused for them alone
            if not refused:
                if places is None:
                    with self._lock:
                        places = {i: self._next_place(app, i, now) for i in app.controllers}
                workers, worker, spill = places[index]
                controller.on_arrival(began, request.outside)
                # it reaches this stage once the SLO stages before it ran
                before = app.slo_before[index]
                arrives = (
                    max((leaves[i] for i in before if i in leaves), default=now) if before else now
                )
                budget = None
                if index in app.plan.slo_stages:
                    # a share of the flow's SLO: what the stages before it left of theirs
                    # is its too (the flow's SLO is what is promised)
                    due[index] = max((due[i] for i in before if i in due), default=start)
                    due[index] += controller.policy.slo_ms / 1e3
                    budget = due[index] - arrives
                elif start < now:
                    budget = controller.policy.slo_ms / 1e3 - (arrives - start)
                # the request's rows, where the stage reads them as sent
                rows = len(request.table) if SOURCE_ID in app.plan.stages[index].inputs else 1
                if controller.refuses_rows(rows, budget):
                    leave, outlasting = None, rows
                else:
                    leave = controller.admit_at(
                        now, request.id, workers, worker, arrives, budget, rows, spill
                    )
                refused = leave is None
                if not refused:
                    leaves[index] = leave
                if not refused and worker is not None:  # routing follows it there
                    placed = controller.placed(request.id, worker)
                    request.placed = {**(request.placed or {}), index: placed}
            if not refused:
                admitted.append(index)
                continue
            refused_at.append(index)
            error = app.shed_error(index, rows=outlasting)
            # in no anyof branch: the request is lost, without working it out each time
            if index not in app.branch_of or not app.answers_without(
                lost := app.plan.lost_with(refused_at)
            ):
                for other in admitted:
                    app.controllers[other].forget(request.id)
                request.settle(error)
                return False
            request.shed = request.shed or error
        for index in admitted:
            if index in lost:  # upstream in a dropped branch
                app.controllers[index].forget(request.id)
        request.lost = lost
        return True

    def _next_place(
        self, app: DeployedApp, index: int, now: float
    ) -> tuple[list[int], int | None, list[int]]:
        """An SLO stage's workers (as its plan caps them), the one a request routed
        now would go to, and the other workers that have it loaded, where admission
        may place a request the planned ones would refuse (none while `_confine`
        keeps the stage off some). Called with the lock held."""
        key = (app.id, index)
        pool = self._pool(app.plan.stages[index].placement == "gpu")
        decision = app.decisions.get(index)
        if decision is None:
            return sorted(pool), None, []
        worker = self._scheduler.next_pack(
            key,
            pool,
            decision.workers,
            decision.max_size,
            decision.timeout_s,
            now,
            lambda ready: app.controllers[index].first_free(ready, now),
        )
        # not those still loading it while others have (a request there waits for the load)
        ready = [w for w, load in pool.items() if key in load.warm and key not in load.loading]
        warm = ready or [w for w, load in pool.items() if key in load.warm] or list(pool)
        warm.sort(reverse=key in self._scheduler.high)  # its `rank` (see `_confine`)
        loaded = [w for w in warm[decision.workers :] if w in ready]
        if key in self._scheduler.high or app.controllers[index].confined_to is not None:
            loaded = []  # held off some workers
        return warm[: decision.workers], worker, loaded

    def _pool(self, gpu: bool | None) -> dict[int, WorkerLoad]:
        """The loads of the workers routing may use now (ready, not retiring): those
        with a GPU or not (`gpu`), or all (None). Kept until a worker comes or goes.
        Called with the lock held."""
        if self._routable is None:
            self._routable = {
                i: w.load for i, w in self._workers.items() if w.ready and not w.retiring
            }
            self._pools = {}
        pool = self._pools.get(gpu)
        if pool is None:
            pool = self._routable
            if gpu is not None:
                pool = {w: load for w, load in pool.items() if load.gpu == gpu}
            self._pools[gpu] = pool
        return pool

    def _route(self, app: DeployedApp, request: Request) -> bool:
        """(Re)start a request: pick workers for every stage, send the table to the
        first stages; or put it in the wait line. False when it waits for lack of room
        on every worker (later requests would too). Called with the lock held."""
        routable = self._pool(None)
        routed = None
        expected = self._branch_times(app)
        costs = [stats.typical_s for stats in app.stage_stats]
        room = any(load.outstanding < app.worker_cap for load in self._pool(False).values())
        if room:
            caps = packs = None
            if app.decisions:
                caps = {i: d.workers for i, d in app.decisions.items()}
                packs = {i: (d.max_size, d.timeout_s) for i, d in app.decisions.items()}
            held = {i: n for (a, i), n in self._held.items() if a == app.id}  # `_confine`
            if held:
                caps = {**(caps or {}), **held}
            routed = self._scheduler.route(
                app.id,
                app.plan,
                routable,
                request.table,
                caps,
                packs,
                time.monotonic(),
                expected,
                costs,
                app.worker_cap,
                request.placed,
            )
        try:
            return self._send(app, request, routed, expected, costs, room)
        finally:  # after the inputs: a worker runs those it has before a load
            for w, (app_id, index) in self._scheduler.loads():  # off the requests' path
                self.engine.send(w, m.Load(app_id, index))

    def _send(
        self,
        app: DeployedApp,
        request: Request,
        routed: tuple[m.Route, list[tuple[int, int]]] | None,
        expected: dict[int, float | None],
        costs: list[float | None],
        room: bool,
    ) -> bool:
        """`_route`'s second half: count and send a routed request's inputs, or put
        an unrouted one in the wait line (returns whether there was room)."""
        if routed is None:
            # Late binding: wait here, not in a worker's queue, until a worker has room;
            # new workers from the autoscaler then take their share of the backlog.
            request.route, request.charges = (), []
            self._unrouted.append((app, request))
            return room
        request.route, request.charges = routed
        if request.lost:
            self._drop_lost(app, request)
        for index, w in request.charges:
            self._charge_work(app, request, index, w, costs[index])
        for index, controller in app.controllers.items():  # admission follows it there
            if request.route[index] and index not in request.lost:
                controller.routed(request.id, request.route[index][0], time.monotonic())
        for index, w in request.charges:
            if index in app.competing:
                key = (app.id, request.id, request.attempt, index, w)
                self._competing[key] = self._competing.get(key, 0) + 1
        # anyof branches sharing a worker run in the order sent: the fastest known first
        sources = app.sources
        if len(sources) > 1:
            sources = tuple(sorted(sources, key=lambda i: _expected(expected, i)))
        for index in sources:
            if index in request.lost:
                continue
            message = m.Input(
                app.id,
                request.id,
                request.attempt,
                index,
                0,
                request.table,
                request.route,
                request.deadline,
                time.monotonic(),
            )
            try:
                for w in targets(app.plan, index, request.route, request.table):
                    self.engine.send(w, message, request.id)
            except Exception as error:  # e.g. a value in the table that does not pickle
                request.settle(
                    InputError(
                        f"the request cannot be sent to a worker: {type(error).__name__}: {error}"
                    )
                )
                break
        return True

    def _drop_lost(self, app: DeployedApp, request: Request) -> None:
        """A request whose anyof branch refused it: that branch's workers drop its runs
        (before its inputs are sent), and the anyof takes the branch as failed, with
        the refusal, so that it answers with the other branches (or fails, with the
        refusal, when they all fail)."""
        plan, now = app.plan, time.monotonic()
        for index, w in request.charges:  # routed there, not to be run: not counted
            if index in request.lost:
                self._workers[w].load.release(1)
        request.charges = [(i, w) for i, w in request.charges if i not in request.lost]
        for index in request.lost:
            for w in request.route[index]:
                self.engine.send(w, m.Cancel(app.id, request.id, index, request.attempt))
        for consumer, head in app.told_of(request.lost):
            producer = plan.stages[head]
            message = m.Input(
                app.id,
                request.id,
                request.attempt,
                consumer,
                producer.output,
                request.shed,
                request.route,
                request.deadline,
                now,
            )
            for w in request.route[consumer]:
                for _ in range(producer.replicas):  # a failure counts once all copies failed
                    self.engine.send(w, message, request.id)

    def _await_timing(self, app: DeployedApp, request: Request) -> None:
        """Keep a request that arrived before a stage's first call was timed (`_admit`
        returned None) until a worker reports one (`_resume`), then judge it as it
        would have been, its wait counted; refused once its SLO has passed waiting.
        Judged blind, a burst sent to a fresh deployment (300 requests at once, a
        stage of microseconds, an SLO of 200 ms or of hours) was refused all but one
        merged call's worth a worker: 294 of 300."""
        index = request.held
        controller = app.controllers[index]

        def refuse() -> None:
            if app.held.pop(request.id, None) is None:  # judged meanwhile
                return
            if request.settle(app.shed_error(index, starting=True)):
                controller.refused_waiting(time.monotonic())

        app.hold_timer(
            request, request.submitted - request.outside + controller.policy.slo_ms / 1e3, refuse
        )
        if request.id not in app.held:  # judged meanwhile, by a report's thread
            app.release_hold(request)

    def _resume(self, app: DeployedApp) -> None:
        """Judge the requests held for a first timed call (`_await_timing`) again, in
        order: after a worker's report of calls, and a request's end (a stage whose
        calls all fail is never timed, and its requests are judged as before)."""
        for request in list(app.held.values()):
            if app.held.pop(request.id, None) is not None:
                app.release_hold(request)
                if not request.ended:
                    self.start(app, request)

    def finish(self, app: DeployedApp, request: Request, failed: bool) -> None:
        """A request ended (`Request.on_end`): release its load, cancel its work if it
        failed, route requests waiting for room."""
        now = time.monotonic()
        with self._lock:
            if app.active.pop(request.id, None) is None:
                return
            if failed:
                # a deadline, a client gone, a failure: its queued work is dropped and
                # running work stops after the operator call in progress
                for w in request.workers():
                    self.engine.send(w, m.Cancel(app.id, request.id))
            self._release(app, request)
            self._route_waiting()
        # the admission ledgers have locks of their own: not under this one, which
        # every arrival's admission and routing waits for
        plan = app.plan
        for index, controller in app.controllers.items():
            # the end of a stage whose output is the flow's is seen here, now; and
            # which of its calls it was, when the request ran no stage before it
            final = plan.stages[index].output == plan.output
            call = request.began if final and plan.feeds_from_request(index) else None
            controller.finished(request.id, now, final and not failed, not failed, call)
        if app.held:
            self._resume(app)

    def _route_waiting(self) -> None:
        """Route requests waiting for room, oldest first, while workers have room."""
        waiting = len(self._unrouted)
        while waiting and self._unrouted:
            waiting -= 1
            app, request = self._unrouted.popleft()
            if not request.ended and not self._route(app, request):
                # no room anywhere: it waits at the head of the line again (at the
                # end, requests would overtake it on every try: a long tail)
                self._unrouted.appendleft(self._unrouted.pop())
                return

    def _release(self, app: DeployedApp, request: Request, retried: bool = False) -> None:
        """Stop counting a finished (or `retried`) request's stage runs against its
        workers. A competing run not known to be done keeps its worker counted (it
        is orphaned) until that worker says it is done, so new requests avoid the
        worker busy with a loser; queued losers are cancelled. A retried request's
        attempt so far is cancelled wherever it ran, that attempt only (the next one
        must go on)."""
        now = time.monotonic()
        for (index, w), cost in request.work.items():
            self._uncharge_work(app, index, w, cost, now)
        cancel = set()
        for index, w in request.charges:
            if index in app.competing:
                key = (app.id, request.id, request.attempt, index, w)
                if key in self._competing and key not in self._orphaned:
                    self._orphaned[key] = time.monotonic()
                    self._workers[w].load.losing += 1
                    cancel.add(w)
            elif w in self._workers:
                self._workers[w].load.release(1)
        request.charges, request.work = [], {}
        if retried:
            cancel = {w for w in request.workers() if w in self._workers}
        for w in cancel:
            self.engine.send(
                w, m.Cancel(app.id, request.id, None, request.attempt if retried else None)
            )

    def _branch_times(self, app: DeployedApp) -> dict[int, float | None]:
        """For every stage of an anyof branch of `app`, its branch's expected run time,
        to order the branches by (the fastest gets the least loaded worker, and runs
        first on a worker it shares): math.inf while a run of the branch is still going
        after losing a race (another branch answered first: it is the slower now), or
        while a stage of it has only had calls cut short (it lost every race so far:
        how long it ran before the cut says nothing of its speed; tried last), else the
        sum of its stages' typical run times, None while one has not run (tried first:
        it may be the fastest). Called with the lock held."""
        losing = {key[3] for key in self._orphaned if key[0] == app.id}
        times: dict[int, float | None] = {}
        for _, branches in app.plan.anyof_races:
            for branch in branches:
                stats = [app.stage_stats[i] for i in branch]
                runs = [s.typical_s for s in stats]
                took = None if None in runs else sum(runs)  # type: ignore[arg-type]
                if losing.intersection(branch) or (
                    took is not None and not all(s.completed for s in stats)
                ):
                    took = math.inf
                times.update(dict.fromkeys(branch, took))
        return times

    def _charge_work(
        self, app: DeployedApp, request: Request, index: int, w: int, cost: float | None
    ) -> None:
        """Count a run's expected seconds against worker `w` until it is done."""
        cost = cost or DEFAULT_COST_S
        request.work[(index, w)] = request.work.get((index, w), 0.0) + cost
        load = self._workers[w].load
        load.work += cost
        if index not in app.controllers:  # other apps' SLO stages wait for it (`Lanes`)
            load.charge_unmirrored(app.id, cost, time.monotonic())

    def _uncharge_work(self, app: DeployedApp, index: int, w: int, cost: float, now: float) -> None:
        """A run `_charge_work` counted is done (or no longer counted)."""
        state = self._workers.get(w)
        if state is not None:
            state.load.work -= cost
            if index not in app.controllers:
                state.load.release_unmirrored(app.id, cost, now)

    def _on_done(self, message: m.Done) -> None:
        """A worker finished (or dropped) a run: a competing one, or a long one (its
        expected seconds no longer count against the worker)."""
        app = self._apps.get(message.app)
        request = app.active.get(message.rid) if app else None
        if app is not None and request is not None and request.attempt == message.attempt:
            cost = request.work.pop((message.stage, message.worker), None)
            if cost is not None:
                self._uncharge_work(app, message.stage, message.worker, cost, time.monotonic())
        key = (message.app, message.rid, message.attempt, message.stage, message.worker)
        runs = self._competing.get(key)
        if not runs:  # not competing, or not charged (yet: a `Located` may come later)
            return
        if runs > 1:
            self._competing[key] = runs - 1
        else:
            del self._competing[key]
            self._unorphan(key)
        w = self._workers.get(message.worker)
        if w is not None:
            w.load.release(1)
        if self._unrouted:
            self._route_waiting()  # room again

    def _on_located(self, message: m.Located) -> None:
        """A worker sent a locality stage's run to `target`: count it there."""
        app = self._apps.get(message.app)
        request = app.active.get(message.rid) if app else None
        worker = self._workers.get(message.target)
        if request is None or request.attempt != message.attempt or worker is None:
            return
        request.charges.append((message.stage, message.target))
        worker.load.outstanding += 1
        self._charge_work(
            app, request, message.stage, message.target, app.stage_stats[message.stage].typical_s
        )
        if message.stage in app.competing:
            key = (app.id, request.id, request.attempt, message.stage, message.target)
            self._competing[key] = self._competing.get(key, 0) + 1

    def _retry(self, app: DeployedApp, request: Request, lost: WorkerState, why: str) -> None:
        self._release(app, request, retried=True)
        request.attempt += 1
        if request.attempt > self.retries:
            request.settle(
                OperatorError(
                    f"worker {lost.index} died while running this request ({why}); "
                    f"gave up after {self.retries} retries",
                    "worker",
                )
            )
            return
        log.warning("worker %d died; re-running request %d", lost.index, request.id)
        self._route(app, request)

    # -- messages from workers ------------------------------------------------------------
    def on_message(self, message: Any) -> None:
        match message:
            case m.Result(app_id, rid, _, value, began):
                app = self._apps.get(app_id)
                request = app.active.get(rid) if app else None
                if request is not None:
                    if isinstance(began, float):
                        request.began = began
                    if type(value) is codec.Unreadable:
                        problem = f"cannot be read by the process it was sent to: {value}"
                        value = codec.value_failure(app.plan, message, problem)
                    request.settle(value)  # its book-keeping first (`finish`)
            case m.Stats():
                self._on_stats(message)
            case m.Done():
                with self._lock:
                    self._on_done(message)
            case m.Located():
                with self._lock:
                    self._on_located(message)
            case m.Beat(index, busy_since, loading):
                self._on_beat(index, busy_since, loading)
            case m.Hello(index, _):
                self._on_hello(index)

    def _on_beat(self, index: Any, busy_since: Any, loading: Any) -> None:
        if not isinstance(busy_since, float | None) or not (
            loading is None or (isinstance(loading, tuple) and len(loading) == 2)
        ):
            log.warning("dropping a malformed heartbeat from worker %r", index)
            return
        with self._lock:
            w = self._workers.get(index)
            if w is None:
                return
            w.busy_since = busy_since
            w.heard_at = w.beat_at = time.monotonic()
            available = w.load.loading_now is None and not w.load.silent
            if loading is None and w.load.loading_now is not None:
                # it loaded that stage: routing sends it that stage's runs now, not once
                # its next report (up to STATS_EVERY_S later) counts the cold start
                w.load.loading.discard(w.load.loading_now)
                w.load.background.discard(w.load.loading_now)
            w.load.loading_now, w.load.silent = loading, False
            if not available and loading is None:
                self._route_waiting()  # it takes runs again
            app = self._apps.get(loading[0]) if loading is not None else None
            controller = app.controllers.get(loading[1]) if app is not None else None
        if controller is not None:  # its ledger has a lock of its own: not under this one
            controller.loading(index)

    def _on_hello(self, index: int) -> None:
        with self._lock:
            w = self._workers.get(index)
            if w is None:
                return
            w.heard_at = time.monotonic()  # a slow start is no silence
            for deploy in self._deploys.values():
                self.engine.send(index, deploy)
            for app in self._apps.values():
                for stage_index, d in app.decisions.items():
                    self.engine.send(index, m.Policy(app.id, stage_index, d.max_size, d.timeout_s))
            w.ready = True
            self._routable = None
            self._failed_starts = 0
            self._changed.notify_all()
            self._route_waiting()

    def _on_stats(self, message: m.Stats) -> None:
        if not isinstance(message.stages, dict) or not isinstance(message.queued, dict):
            log.warning("dropping malformed stats from worker %r", message.worker)
            return
        with self._lock:
            w = self._workers.get(message.worker)
            if w is None:
                return
            w.heard_at = time.monotonic()
            w.queued = message.queued
            w.load.warm -= set(message.unloaded)
            if message.stages or message.queued:
                w.active_at = time.monotonic()
            reports = []
            for (app_id, stage_index), counts in message.stages.items():
                app = self._apps.get(app_id)
                if app is None:
                    continue
                cold_starts = counts[2]
                if cold_starts:
                    w.load.loading.discard((app_id, stage_index))
                    w.load.background.discard((app_id, stage_index))
                reports.append((app, stage_index, counts))
        # Figures and controllers have locks of their own: a long batch log (a controller
        # refitting its service profile) holds no admission or result back.
        for app, stage_index, counts in reports:
            requests, batches, cold_starts, latencies, batch_log, service, stopped, runs = counts
            sizes = [call[0] for call in batch_log if call[0]]
            stats = app.stage_stats[stage_index]
            stats.add(requests, batches, cold_starts, latencies, sizes, service, stopped, runs)
            controller = app.controllers.get(stage_index)
            # the ends of a stage whose output is the flow's are seen as they happen
            final = app.plan.stages[stage_index].output == app.plan.output
            worker = None if final else message.worker
            if controller is not None and batch_log:
                controller.on_batches_done(batch_log, worker)
                if app.held:
                    self._resume(app)

    # -- the pool -----------------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self._started:
            return
        self._started = True
        self.engine.start(self)
        threads = ((self._monitor, "monitor"), (self._plan, "planner"))
        for target, name in threads:
            thread = threading.Thread(target=target, name=f"serveflow:{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self._spawn_missing(self.min_workers)

    def _spawn_missing(self, need: int) -> None:
        for _ in range(need - sum(w.device is None for w in self._workers.values())):
            self._spawn()
        if any(s.placement == "gpu" for a in self._apps.values() for s in a.plan.stages):
            held = {w.device for w in self._workers.values()}
            for device in self.gpus:
                if device not in held:
                    self._spawn(device)

    def _spawn(self, device: int | None = None) -> None:
        if self._failed_starts >= MAX_FAILED_STARTS:
            return
        index = next(self._next_index)
        self._workers[index] = WorkerState(index, device, load=WorkerLoad(gpu=device is not None))
        self.engine.start_worker(index, device)

    def _monitor(self) -> None:
        next_sweep = time.monotonic() + SWEEP_EVERY_S
        last = time.monotonic()
        while not self._stopping:
            time.sleep(MONITOR_EVERY_S)
            with self._lock:
                if self._stopping:
                    return
                now = time.monotonic()
                if now - last > MONITOR_EVERY_S + LATE_ROUND_S:
                    # this process was not scheduled for a while: the heartbeats that
                    # arrived meanwhile are still unread, no worker is to blame
                    self._driver_late_until = now + SILENT_S
                last = now
                try:
                    self._watch_workers()
                    self._kill_stuck()
                    self._replace_dead()
                    self._autoscale()
                    if time.monotonic() >= next_sweep:
                        keep = {rid for app in self._apps.values() for rid in app.active}
                        keep |= {key[1] for key in self._competing}  # losers may still read
                        self.engine.sweep(keep)
                        next_sweep = time.monotonic() + SWEEP_EVERY_S
                except Exception:  # a bug of ours: log it, keep watching the pool
                    log.exception("the runtime's monitor failed a round")

    def _plan(self) -> None:
        """Ask SLO-aware batching controllers for their choices (a search can take a
        second, so not under the lock) and push changes to the workers; re-split a
        flow-level SLO by the service times measured so far."""
        next_split = time.monotonic() + RESPLIT_EVERY_S
        while not self._stopping:
            time.sleep(PLAN_EVERY_S)
            try:
                if time.monotonic() >= next_split:
                    next_split = time.monotonic() + RESPLIT_EVERY_S
                    for app in list(self._apps.values()):
                        app.resplit_slo()
                self._confine()
                for app in list(self._apps.values()):
                    for index, controller in app.controllers.items():
                        self._decide(app, index, controller.decision(time.monotonic()))
            except Exception:  # a bug of ours: log it, keep planning (else plans stop)
                log.exception("the runtime's planning failed a round")

    def _decide(self, app: DeployedApp, index: int, decision: Decision) -> None:
        """Adopt a controller's decision: prewarm its workers, push a new batching
        policy to the workers."""
        with self._lock:
            before = app.decisions.get(index)
            app.decisions[index] = decision
            self._prewarm(app, index, decision.held)
            chosen = (decision.max_size, decision.timeout_s)
            if before is None or (before.max_size, before.timeout_s) != chosen:
                policy = m.Policy(app.id, index, *chosen)
                for w in self._workers.values():
                    if w.ready:
                        self.engine.send(w.index, policy)

    def _confine(self) -> None:
        """Keep the calls of one request of a stage that outlast another stage's
        (tighter) SLO off that stage's workers: a worker runs one call at a time, and
        no request of the tighter stage is in time behind such a call. A flow of 1 +
        0.2 ms per row, SLO 5 ms, on 2 workers next to one of 20 + 5 ms per row, SLO
        200 ms, answered 64-90% in time: both workers were often in calls of 60 ms.
        The stage with the long calls plans on all workers but one, the
        highest-numbered (`Scheduler.high`), and the tighter stages on those its plan
        leaves, the lowest (sharing the others, a request sent there was late whenever
        a long call began before it reached the worker); each unless no plan on as
        many meets its SLO: then on all. Calls a few times shorter than the tighter SLO
        are better shared: an SLO of 100 ms held to 1 of 2 workers next to one of 20
        ms (4 + 1 ms per row, 400 requests/s each) left the tight flow 0.69-0.97 in
        time, against 0.93-0.98. Between apps only: the stages of one flow under its
        SLO share one budget (a stage's share is no promise of its own), and a flow of
        1 + 0.2 then 20 + 5 ms per row so held refused more (0.79-0.91 in time, not
        0.84-0.94). A tighter stage with no arrival in QUIET_S holds nothing off (a
        plan on fewer workers may refuse what all would serve: see `confine`).
        A stage without an SLO (a fixed batching policy, or none) is held off by its
        calls' typical run time, and only while it fits there (`_hold`): it has no
        admission, and a load past those workers would queue without bound."""
        now = time.monotonic()
        with self._lock:
            # (key, controller or None, gpu, SLO ms, workers planned on: see `held`)
            stages: list[tuple[StageKey, BatchingController | None, bool, float, int]] = []
            figures: dict[StageKey, StageStats] = {}
            sizes: dict[StageKey, int] = {}  # the batch size of fixed-policy stages
            for app in self._apps.values():
                for index, stage in enumerate(app.plan.stages):
                    key, gpu = (app.id, index), stage.placement == "gpu"
                    controller = app.controllers.get(index)
                    figures[key] = app.stage_stats[index]
                    if controller is None:  # no SLO: held off by its calls' typical time
                        if (
                            stage.replicas == 1
                            and not stage.locality_key
                            and not (index in app.branch_of or index in app.competing)
                        ):  # (not those whose workers routing picks otherwise)
                            stages.append((key, None, gpu, math.inf, 0))
                            if stage.batching:
                                sizes[key] = stage.batching.size
                        continue
                    slo_ms = controller.policy.slo_ms or math.inf
                    planned = getattr(app.decisions.get(index), "workers", 1)
                    stages.append((key, controller, gpu, slo_ms, planned))
            pools = {gpu: len(self._pool(gpu)) for _, _, gpu, _, _ in stages}
        singles = {
            key: controller.single_s() if controller else figures[key].typical_s
            for key, controller, _, _, _ in stages
        }
        quiet = {key for key, c, _, _, _ in stages if c and c.idle_for(now) > QUIET_S}
        high = {
            key
            for key, _, gpu, slo_ms, _ in stages
            if pools[gpu] > 1
            and singles[key] is not None
            and any(
                singles[key] * 1e3 > other_slo_ms
                for other, _, other_gpu, other_slo_ms, _ in stages
                if other[0] != key[0]
                and other_gpu == gpu
                and other_slo_ms < slo_ms
                and other not in quiet
            )
        }
        held = self._hold(stages, high, pools, figures, sizes, now)
        high -= {key for key, c, _, _, _ in stages if c is None and key not in held}
        for key, controller, gpu, slo_ms, _ in stages:
            if controller is None:
                continue
            # the most workers the long calls it waits for are planned on
            taken = max(
                (
                    held.get(other, planned)
                    for other, _, other_gpu, _, planned in stages
                    if other in high
                    and other[0] != key[0]
                    and other_gpu == gpu
                    and singles[other] * 1e3 > slo_ms
                ),
                default=0,
            )
            if key in high:
                controller.confine(pools[gpu] - 1)
            else:
                controller.confine(pools[gpu] - taken if 0 < taken < pools[gpu] else None)
        with self._lock:
            self._scheduler.high = high
            self._held = held
            for (app_id, index), count in held.items():  # loaded where routing sends it
                if app_id in self._apps:
                    self._prewarm(self._apps[app_id], index, count)

    def _hold(
        self,
        stages: list[tuple[StageKey, BatchingController | None, bool, float, int]],
        high: set[StageKey],
        pools: dict[bool, int],
        figures: dict[StageKey, StageStats],
        sizes: dict[StageKey, int],
        now: float,
    ) -> dict[StageKey, int]:
        """Of the stages without an SLO `_confine` would hold off, those held (to all
        workers but one): of each pool, all or none. All when, with the SLO stages held
        there, their calls of the last HELD_BUSY_S kept less than HELD_FITS of those
        workers busy (HELD_KEEP while held already: a load near the line does not flip).
        Each alone was not enough: three stages of 60 ms calls at 6.5/s each (0.39 of a
        worker) went to one worker together, and their requests queued without bound.
        And not some: one left to spread still met the tighter stage's requests (of a
        5 ms SLO flow, 56% in time, as with none held), and those held waited longer.
        A batching stage counts at most what its requests need in full batches
        (`StageStats.busy_in`): batches of up to 8 with no wait at 20 + 5 ms per row
        kept 1.4 workers busy at 100/s spread in calls of 1-2, and were never held from
        35/s on (the 5 ms flow next to them: 0.50-0.71 in time at 35-60/s; held, 0.96)."""
        # only those `high` names count (a pass over 4 s of calls each, every round)
        load = {key: figures[key].busy(now, HELD_BUSY_S) for key, *_ in stages if key in high}
        for key, size in sizes.items():
            # batched: what its requests need in full batches. Spread, its calls are
            # smaller than held; held with no wait, a worker runs whatever is queued as
            # soon as it is free, busy all the time at a load it keeps up with
            if key in high:
                full = figures[key].busy_in(now, HELD_BUSY_S, size)
                if full is not None:
                    load[key] = min(load[key], full)
        held: dict[StageKey, int] = {}
        for gpu, size in pools.items():
            candidates = [k for k, c, g, _, _ in stages if not c and g == gpu and k in high]
            busy = sum(load[k] for k, _, g, _, _ in stages if g == gpu and k in high)
            share = HELD_KEEP if any(k in self._held for k in candidates) else HELD_FITS
            if candidates and busy <= share * (size - 1):
                held.update((key, size - 1) for key in candidates)
        return held

    def _prewarm(self, app: DeployedApp, index: int, count: int) -> None:
        """Load stage `index` on the `count` workers its capped routing will use, before
        requests reach them: a model loading on the request path would miss the SLO.
        Called with the lock held."""
        key = (app.id, index)
        gpu = app.plan.stages[index].placement == "gpu"
        ready = [
            w for w in self._workers.values() if w.ready and not w.retiring and w.load.gpu == gpu
        ]
        if key in self._scheduler.high:  # the highest-numbered: see `_confine`
            ready.sort(key=lambda w: self._scheduler.rank(key, w.index))
        else:
            ready.sort(key=lambda w: (key not in w.load.warm, w.index))
        for w in ready[:count]:
            if key not in w.load.warm:
                w.load.warm.add(key)
                w.load.loading.add(key)  # routed elsewhere until its report says loaded
                self.engine.send(w.index, m.Load(app.id, index))

    def _watch_workers(self) -> None:
        """Mark workers not heard from (frozen, holding the GIL) and those in a long
        call, from their heartbeats: routing avoids them."""
        now = time.monotonic()
        heard_again = False
        for w in self._workers.values():
            if w.ready:
                silent = now - w.heard_at > SILENT_S
                heard_again |= w.load.silent and not silent
                w.load.silent = silent
                # from the last heartbeat, so up to HEARTBEAT_S late to see a call end;
                # but a worker none of whose runs is left is in no long call of ours
                w.load.stalled = (
                    w.load.outstanding > 0
                    and w.busy_since is not None
                    and now - w.busy_since > STALLED_S
                )
        if heard_again | self._release_orphans(now):
            self._route_waiting()  # room again: route what waits for it

    def _release_orphans(self, now: float) -> bool:
        """Stop counting orphaned runs (of requests that ended while the run was
        thought to go on) once their worker's heartbeat, sent a while after, shows
        no call that started before: those runs ended, or never began (a lost
        branch's later stages never receive their input, so no `Done` comes for
        them). True if any was released."""
        released = False
        for key, since in list(self._orphaned.items()):
            w = self._workers.get(key[4])
            if w is not None and not (
                w.beat_at > since + ORPHAN_GRACE_S
                and (w.busy_since is None or w.busy_since > since)
            ):
                continue
            self._unorphan(key)
            runs = self._competing.pop(key, 0)
            if runs and w is not None:
                w.load.release(runs)
                released = True
        return released

    def _unorphan(self, key: tuple[int, int, int, int, int]) -> None:
        """Stop taking competing run `key` for a loser still going on its worker."""
        if self._orphaned.pop(key, None) is not None:
            w = self._workers.get(key[4])
            if w is not None and w.load.losing:
                w.load.losing -= 1

    def _kill_stuck(self) -> None:
        """Kill a worker whose stage has run longer than `stage_timeout_s`, or that has
        not been heard from for `heartbeat_timeout_s` (frozen, stopped, or holding the
        GIL in native code): its requests are then re-run elsewhere (or fail once out
        of retries) and `_replace_dead` starts another worker."""
        now = time.monotonic()
        limit = self.stage_timeout_s
        judge_silence = now >= self._driver_late_until
        for w in self._workers.values():
            if w.killed_for or not w.ready:
                continue
            silent_for = now - w.heard_at
            allowed = self._silence_allowed(w)
            stopped = silent_for > allowed and self.engine.suspended(w.index)
            wedged = None if stopped else self._keeps_heartbeats_out(w, now, allowed)
            if not (stopped or wedged):
                # neither stopped nor seen wedged: more likely starved of CPU by an
                # oversubscribed machine (or not judged yet); give it longer
                allowed *= WEDGED_FACTOR
            if limit is not None and w.busy_since is not None and now - w.busy_since > limit:
                w.killed_for = f"a stage ran longer than stage_timeout_s={limit:g}"
            elif judge_silence and silent_for > allowed:
                how = "stopped" if stopped else f"wedged: {wedged}" if wedged else "silent"
                w.killed_for = f"no heartbeat for {silent_for:.1f} s ({how})"
            elif limit is not None and w.load.outstanding and silent_for > max(limit, SILENT_S):
                w.killed_for = f"it stopped answering for longer than stage_timeout_s={limit:g}"
            else:
                continue
            log.warning("worker %d: %s; killing it", w.index, w.killed_for)
            self.engine.kill(w.index)

    def _keeps_heartbeats_out(self, w: WorkerState, now: float, allowed: float) -> str | None:
        """Why silent worker `w` is wedged (`silence.wedged`), judged from its threads
        over the second half of its allowance, once the engine has handled every
        message sent until then; else None (not yet judged, or maybe starved). A model
        load is announced before it starts (and allowed LOADING_SILENT_S)."""
        if now - w.heard_at < allowed / 2:
            return None
        threads = self.engine.threads(w.index)
        if threads is None:
            return None
        if w.threads_mark is None or w.threads_mark[0] < w.heard_at:  # silent since
            w.threads_mark = (now, threads)
            return None
        since = now - w.threads_mark[0]
        caught_up = self.engine.caught_up_at() >= w.threads_mark[0]  # (pings the engine)
        if since <= 0 or not caught_up:
            return None
        return silence.wedged(w.threads_mark[1], threads, since)

    def _silence_allowed(self, w: WorkerState) -> float:
        if self.heartbeat_timeout_s is None:
            return float("inf")
        if w.load.loading_now is not None:  # a model load may hold the GIL for long
            return max(self.heartbeat_timeout_s, LOADING_SILENT_S)
        return self.heartbeat_timeout_s

    def _replace_dead(self) -> None:
        for index, why in self.engine.exited().items():
            w = self._workers.pop(index, None)
            if w is None:
                continue
            self._routable = None
            for key in [k for k in self._competing if k[4] == index]:
                del self._competing[key]
                self._orphaned.pop(key, None)
            if w.retiring:
                continue
            log.warning("worker %d ended: %s", index, why)
            if not w.ready:
                self._failed_starts += 1
                self._changed.notify_all()
            for app in self._apps.values():
                for request in list(app.active.values()):
                    if index in request.workers():
                        self._retry(app, request, w, w.killed_for or why)
        self._spawn_missing(self.min_workers)

    def _autoscale(self) -> None:
        now = time.monotonic()
        cpu = [w for w in self._workers.values() if w.device is None]
        ready = [w for w in cpu if w.ready and not w.retiring]
        starting = sum(not w.ready for w in cpu)
        idle = {
            w.index: now - w.active_at for w in ready if w.load.outstanding == 0 and not w.queued
        }
        # workers an anyof or replicas need at once, besides those busy with losers
        losers = len({key[4] for key in self._orphaned})
        floor = max(
            [1]
            + [a.width + losers for a in self._apps.values() if a.width > 1]
            + [  # a controller's plan and its spare (warm-up keeps to what the pool holds)
                d.held
                for a in self._apps.values()
                for d in a.decisions.values()
                if d.predicted_ms is not None
            ]
        )
        # busy loading a model or silent: no room for new runs
        taking = [w for w in ready if not (w.load.silent or w.load.loading_now)]
        loads = [w.load.outstanding for w in taking]
        retiring = sum(w.retiring for w in cpu)
        waiting = len(self._unrouted)
        add, retire = self._autoscaler.plan(
            loads,
            waiting,
            starting,
            idle,
            retiring=retiring,
            usable=self._usable(),
            unavailable=len(ready) - len(taking),
        )
        add = max(add, min(floor, self.max_workers - retiring) - len(ready) - starting)
        for _ in range(add):
            self._spawn()
        for index in retire:
            if len(ready) > floor:
                self._workers[index].retiring = True
                self._routable = None
                self.engine.send(index, m.Exit())
        self._spawn_missing(0)  # GPU workers that died

    def _usable(self) -> int | None:
        """Workers the deployed apps can use at most: bounded only when every stage of
        every app is held to a worker count by its batching controller."""
        total = 0
        for app in self._apps.values():
            if len(app.decisions) < len(app.plan.stages):
                return None
            total += sum(d.held for d in app.decisions.values())
        return total or None

    # -- figures ------------------------------------------------------------------------
    def stage_workers(self, app: DeployedApp, index: int) -> int:
        with self._lock:
            return self._warm_on(app, index)

    def _warm_on(self, app: DeployedApp, index: int) -> int:
        return sum((app.id, index) in w.load.warm for w in self._workers.values())

    def stage_figures(self, app: DeployedApp) -> dict[str, dict[str, Any]]:
        figures = {}
        # the percentiles first, not under the lock every worker's message needs
        snapshots = [stats.snapshot() for stats in app.stage_stats]
        with self._lock:
            for index, stage in enumerate(app.plan.stages):
                key = (app.id, index)
                entry = snapshots[index]
                entry["workers"] = self._warm_on(app, index)
                entry["queue"] = sum(w.queued.get(key, 0) for w in self._workers.values())
                if index in app.sources:  # requests waiting at the driver for room
                    entry["queue"] += sum(1 for a, _ in self._unrouted if a is app)
                if stage.batching:
                    entry["batch_size"] = stage.batching.size
                    entry["timeout_ms"] = stage.batching.timeout_ms or 0.0
                if index in app.controllers:
                    live = app.controllers[index].snapshot()
                    entry |= {k: v for k, v in live.items() if k not in ("workers",)}
                    entry["workers_target"] = live["workers"]
                figures[stage.name] = entry
        return figures

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (for operations and tests)."""
        return self.engine.worker_pids()

    # -- shutdown -----------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every app (draining in-flight requests), then the workers; removes
        every process and file this runtime made."""
        for app in list(self._apps.values()):
            app.stop()
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        for thread in self._threads:
            thread.join()
        self.engine.stop()
        if self._planner is not None:
            self._planner.close()
        self.kvs.close()
