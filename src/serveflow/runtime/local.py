"""The embedded runtime: a serverless pool of worker processes on this machine.

The driver (this process) routes each request when it arrives: `Scheduler` picks the
workers of every stage, the request table goes to the first stages' workers, and
from there results travel worker to worker (`worker.py`); only the final result comes
back. A monitor thread replaces dead workers (re-running their requests), scales the
pool with `Autoscaler`, and removes shared-memory files of finished requests.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cloudpickle

from serveflow.errors import OperatorError, OverloadError
from serveflow.optimizer.plan import Plan
from serveflow.runtime import codec, worker
from serveflow.runtime.app import App
from serveflow.runtime.kvs import KVS, open_kvs
from serveflow.runtime.request import Request
from serveflow.runtime.scheduler import Autoscaler, Scheduler, WorkerLoad, charged, targets
from serveflow.runtime.stats import StageStats
from serveflow.runtime.transport import Endpoint, PeerGone

if TYPE_CHECKING:
    from serveflow.batching.controller import BatchingController, Decision
    from serveflow.runtime.planner import PlannerProcess

log = logging.getLogger(__name__)

MONITOR_EVERY_S = 0.1
PLAN_EVERY_S = 0.1
RESPLIT_EVERY_S = 5.0
SWEEP_EVERY_S = 2.0
START_TIMEOUT_S = 60.0
WORKER_MAIN = (
    "import sys, json; from serveflow.runtime.worker import main; main(*json.loads(sys.argv[1]))"
)
MAX_FAILED_STARTS = 3  # consecutive workers dying before ready: stop trying


@dataclass
class WorkerProcess:
    """The driver's handle on one worker process."""

    index: int
    process: Any
    ready: bool = False
    load: WorkerLoad = field(default_factory=WorkerLoad)
    queued: dict[tuple[int, int], int] = field(default_factory=dict)
    active_at: float = field(default_factory=time.monotonic)
    busy_since: float | None = None  # running a stage since (from its heartbeat)
    retiring: bool = False
    killed_for: str = ""


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


class LocalApp(App):
    """A plan deployed on a `LocalRuntime`."""

    def __init__(self, app_id: int, plan: Plan, runtime: LocalRuntime, owns: bool) -> None:
        super().__init__(plan, runtime, owns, runtime.max_in_flight)
        self.id = app_id
        self.active: dict[int, Request] = {}
        self.stage_stats = [StageStats() for _ in plan.stages]
        self.sources = tuple(i for i, s in enumerate(plan.stages) if 0 in s.inputs)
        # stage runs a worker may hold before requests wait at the driver; room for
        # the largest batch so that batching stages can fill their batches
        largest_batch = max((s.batching.size for s in plan.stages if s.batching), default=0)
        self.worker_cap = max(runtime.worker_queue, 2 * largest_batch)
        # SLO-aware batching stages: a controller each, its choices pushed to workers
        self.controllers: dict[int, BatchingController] = {}
        adaptive = [i for i, s in enumerate(plan.stages) if s.batching and s.batching.adaptive]
        if adaptive:  # imported here: scipy is too slow to import in every worker
            from serveflow.batching.controller import BatchingController

            searcher = runtime.planner().search
            self.controllers = {
                i: BatchingController(
                    plan.stages[i].batching,
                    runtime.max_workers,
                    held_workers=runtime.min_workers,
                    searcher=searcher,
                )
                for i in adaptive
            }
        self.decisions: dict[int, Decision] = {}
        self._runtime = runtime

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

    def _submit(self, request: Request) -> None:
        self._runtime.start(self, request)

    def stats(self) -> dict[str, dict[str, Any]]:
        return self._runtime.stage_figures(self)

    def _shutdown(self) -> None:
        self._runtime.undeploy(self)


class LocalRuntime:
    """Runs plans on a pool of worker processes on this machine (the default runtime).

    min_workers / max_workers: pool size limits (the pool has at least as many workers
        as the most replicated stage).
    kvs: store behind `lookup` and `app.kvs`: None (an LMDB store in a temporary
        directory, shared by the workers), "lmdb:///path", "redis://host:port/db", or a
        store object.
    max_in_flight: requests an app holds at once; more fail fast with OverloadError.
    worker_queue: stage runs routed to one worker before further requests wait at the
        driver for room (raised to fit batching stages' batches).
    retries: times a request is re-run when a worker dies under it (user functions
        should be idempotent).
    idle_s: a worker idle this long is retired (above min_workers).
    idle_unload_s: a stage unused this long on a worker is unloaded.
    cache_bytes: per-worker cache of looked-up values.
    target_in_flight: stage runs per worker above which the pool grows.
    stage_timeout_s: a worker running one batch longer than this is killed and its
        requests re-run (None: no limit). Guards against user code that hangs.
    """

    def __init__(
        self,
        *,
        min_workers: int = 1,
        max_workers: int | None = None,
        kvs: str | KVS | None = None,
        max_in_flight: int = 10_000,
        worker_queue: int = 8,
        retries: int = 2,
        idle_s: float = 10.0,
        idle_unload_s: float = 60.0,
        cache_bytes: int = 256 << 20,
        target_in_flight: float = 2.0,
        stage_timeout_s: float | None = None,
    ) -> None:
        max_workers = max_workers or max(4, 2 * (os.cpu_count() or 1))
        if not 1 <= min_workers <= max_workers:
            raise ValueError(f"need 1 <= min_workers <= max_workers: {min_workers}, {max_workers}")
        self.min_workers = min_workers
        self.max_workers = max_workers
        self.max_in_flight = max_in_flight
        self.worker_queue = worker_queue
        self.retries = retries
        self.stage_timeout_s = stage_timeout_s
        self.kvs: KVS = open_kvs(kvs)
        if self.kvs.address == "memory":
            raise ValueError(
                "kvs='memory' is private to one process; workers need a shared store: "
                "None (LMDB), 'lmdb:///path' or 'redis://host:port/db'"
            )
        self._options = {"cache_bytes": cache_bytes, "idle_unload_s": idle_unload_s}
        self._autoscaler = Autoscaler(min_workers, max_workers, target_in_flight, idle_s)
        self._scheduler = Scheduler()
        self._token = secrets.token_hex(4)
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._workers: dict[int, WorkerProcess] = {}
        self._apps: dict[int, LocalApp] = {}
        self._blobs: dict[int, bytes] = {}
        self._next_index = itertools.count()
        self._next_app = itertools.count(1)
        self._endpoint: Endpoint | None = None
        self._shm = codec.SharedMemory(self._token)
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._failed_starts = 0
        self._unrouted: deque[tuple[LocalApp, Request]] = deque()
        # competing runs by (app, request, attempt, stage, worker): "running" (request
        # active), "done" (run ended first), "orphan" (request ended first: the run
        # still holds its worker until the worker says "done")
        self._replicas: dict[tuple[int, int, int, int, int], str] = {}
        self._planner: PlannerProcess | None = None  # searches batching plans, once needed

    def planner(self) -> PlannerProcess:
        """The process that searches batching plans (out of the driver's GIL)."""
        from serveflow.runtime.planner import PlannerProcess

        with self._lock:
            if self._planner is None:
                self._planner = PlannerProcess()
            return self._planner

    # -- deployment ---------------------------------------------------------------------
    def deploy(self, plan: Plan, *, owns_runtime: bool = False) -> LocalApp:
        with self._lock:
            if self._stopping:
                raise RuntimeError("this LocalRuntime is stopped")
            self._ensure_started()
            app = LocalApp(next(self._next_app), plan, self, owns_runtime)
            self._apps[app.id] = app
            self._blobs[app.id] = cloudpickle.dumps(plan)
            for w in self._workers.values():
                if w.ready:
                    self._send(w.index, ("deploy", app.id, self._blobs[app.id]))
            need = max(self.min_workers, *(s.replicas for s in plan.stages))
            deadline = time.monotonic() + START_TIMEOUT_S
            while sum(w.ready for w in self._workers.values()) < min(need, self.max_workers):
                if self._failed_starts >= MAX_FAILED_STARTS:
                    raise RuntimeError("worker processes fail to start; see the log above")
                self._spawn_missing(need)
                if not self._changed.wait(max(0.0, deadline - time.monotonic())):
                    raise RuntimeError("worker processes did not start in time")
        return app

    def undeploy(self, app: LocalApp) -> None:
        with self._lock:
            self._apps.pop(app.id, None)
            self._blobs.pop(app.id, None)
            self._scheduler.forget(app.id)
            for w in self._workers.values():
                w.load.warm -= {k for k in w.load.warm if k[0] == app.id}
                w.load.loading -= {k for k in w.load.loading if k[0] == app.id}
                if w.ready:
                    self._send(w.index, ("undeploy", app.id))

    # -- requests -----------------------------------------------------------------------
    def start(self, app: LocalApp, request: Request) -> None:
        if app.controllers and not self._admit(app, request):
            return
        with self._lock:
            app.active[request.id] = request
            self._route(app, request)
        request.future.add_done_callback(lambda _: self._finish(app, request))

    def _admit(self, app: LocalApp, request: Request) -> bool:
        """Ask each SLO-aware batching stage whether this request can still meet its
        SLO; a refusal sheds the request with OverloadError naming the stage."""
        now = time.monotonic()
        with self._lock:
            waiting = sum(1 for a, _ in self._unrouted if a is app)
            queued = {
                i: waiting + sum(w.queued.get((app.id, i), 0) for w in self._workers.values())
                for i in app.controllers
            }
        for index, controller in app.controllers.items():
            controller.on_arrival(now)
            if not controller.admit(now, queued[index], 0.0):
                stage = app.plan.stages[index]
                request.settle(
                    OverloadError(
                        f"stage {stage.name!r} cannot meet its SLO of "
                        f"{stage.batching.slo_ms:g} ms at this load; request shed"
                    )
                )
                return False
        return True

    def _route(self, app: LocalApp, request: Request) -> None:
        """(Re)start a request: pick workers for every stage, send the table to the
        first stages. Called with the lock held."""
        loads = {i: w.load for i, w in self._workers.items() if w.ready and not w.retiring}
        if not loads or min(w.outstanding for w in loads.values()) >= app.worker_cap:
            # Late binding: wait here, not in a worker's queue, until a worker has room;
            # new workers from the autoscaler then take their share of the backlog.
            request.route = ()
            self._unrouted.append((app, request))
            return
        caps = {i: d.workers for i, d in app.decisions.items()}
        packs = {i: (d.max_size, d.timeout_s) for i, d in app.decisions.items()}
        request.route = self._scheduler.route(
            app.id, app.plan, loads, caps, packs, time.monotonic()
        )
        for index, chosen in enumerate(request.route):
            if app.plan.stages[index].replicas > 1:
                for w in chosen:
                    self._replicas[(app.id, request.id, request.attempt, index, w)] = "running"
        for index in app.sources:
            message = (
                "input",
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
            for w in targets(app.plan, index, request.route, request.table):
                self._send(w, message, request.id)

    def _finish(self, app: LocalApp, request: Request) -> None:
        with self._lock:
            if app.active.pop(request.id, None) is not None:
                self._release(app, request)
                self._route_waiting()

    def _route_waiting(self) -> None:
        """Route requests waiting for room, oldest first, while workers have room."""
        waiting = len(self._unrouted)
        while waiting and self._unrouted:
            waiting -= 1
            app, request = self._unrouted.popleft()
            if not request.future.done():
                self._route(app, request)
                if not request.route:
                    return  # still no room; it went back to the end of the line

    def _release(self, app: LocalApp, request: Request) -> None:
        """Stop counting a finished (or re-routed) request's stage runs against its
        workers. A competing replica still running keeps its worker counted until that
        worker says it is done, so new requests avoid the worker busy with a loser;
        queued losers are cancelled."""
        cancel = set()
        for index, w in charged(app.plan, request.route):
            key = (app.id, request.id, request.attempt, index, w)
            state = self._replicas.pop(key, None)
            if state == "running":
                self._replicas[key] = "orphan"  # released when its worker is done
                cancel.add(w)
            elif state is None and w in self._workers:
                self._workers[w].load.outstanding -= 1
        for w in cancel:
            self._send(w, ("cancel", app.id, request.id))

    def _on_done(self, index: int, app_id: int, rid: int, attempt: int, stage: int) -> None:
        """A worker finished (or dropped) a competing replica's run."""
        with self._lock:
            key = (app_id, rid, attempt, stage, index)
            state = self._replicas.get(key)
            if state is None or state == "done" or index not in self._workers:
                return
            self._workers[index].load.outstanding -= 1
            if state == "running":
                self._replicas[key] = "done"  # already released when the request ends
            else:
                del self._replicas[key]
                self._route_waiting()

    def _retry(self, app: LocalApp, request: Request, lost: WorkerProcess) -> None:
        self._release(app, request)
        request.attempt += 1
        if request.attempt > self.retries:
            why = lost.killed_for or f"exit code {lost.process.returncode}"
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

    def _send(self, index: int, message: tuple, rid: int = 0) -> None:
        assert self._endpoint is not None
        try:
            data = codec.encode(message, self._shm, rid)
            self._endpoint.send(worker.worker_address(self._token, index), data)
        except PeerGone:  # the monitor notices the death and re-runs its requests
            log.debug("worker %d is gone", index)

    # -- messages from workers ------------------------------------------------------------
    def _receive(self) -> None:
        assert self._endpoint is not None
        while True:
            try:
                data = self._endpoint.recv(None)
            except OSError:
                return  # closed by stop()
            if data is None:
                continue
            try:
                message = codec.decode(data, self._shm)
            except Exception:  # a request already swept; nothing waits for it
                log.debug("undecodable message", exc_info=True)
                continue
            if message[0] == "exit":
                return
            try:
                self._on_message(message)
            except Exception:  # never let one bad message stop every request
                log.exception("failed to handle %r from a worker", message[0])

    def _on_message(self, message: tuple) -> None:
        kind = message[0]
        if kind == "result":
            _, app_id, rid, _attempt, value = message
            app = self._apps.get(app_id)
            request = app.active.get(rid) if app else None
            if request is not None:
                request.settle(value)
        elif kind == "stats":
            self._on_stats(*message[1:])
        elif kind == "done":
            self._on_done(*message[1:])
        elif kind == "beat":
            _, index, busy_since = message
            with self._lock:
                if index in self._workers:
                    self._workers[index].busy_since = busy_since
        elif kind == "hello":
            self._on_hello(message[1])

    def _on_hello(self, index: int) -> None:
        with self._lock:
            w = self._workers.get(index)
            if w is None:
                return
            for app_id, blob in self._blobs.items():
                self._send(index, ("deploy", app_id, blob))
            for app in self._apps.values():
                for stage_index, d in app.decisions.items():
                    self._send(index, ("policy", app.id, stage_index, d.max_size, d.timeout_s))
            w.ready = True
            self._failed_starts = 0
            self._changed.notify_all()
            self._route_waiting()

    def _on_stats(self, index: int, stages: dict, queued: dict, unloaded: list) -> None:
        with self._lock:
            w = self._workers.get(index)
            if w is None:
                return
            w.queued = queued
            w.load.warm -= set(unloaded)
            if stages or queued:
                w.active_at = time.monotonic()
            for (app_id, stage_index), counts in stages.items():
                app = self._apps.get(app_id)
                if app is None:
                    continue
                requests, batches, cold_starts, latencies, batch_log = counts
                if cold_starts:
                    w.load.loading.discard((app_id, stage_index))
                sizes = [size for size, _, _, _ in batch_log if size]
                app.stage_stats[stage_index].add(requests, batches, cold_starts, latencies, sizes)
                controller = app.controllers.get(stage_index)
                for size, service_s, end, each in batch_log if controller else ():
                    controller.on_batch_done(size, service_s, end, each)

    # -- the pool -----------------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self._endpoint is not None:
            return
        self._endpoint = Endpoint(worker.worker_address(self._token, worker.DRIVER))
        threads = ((self._receive, "receiver"), (self._monitor, "monitor"), (self._plan, "planner"))
        for target, name in threads:
            thread = threading.Thread(target=target, name=f"serveflow:{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self._spawn_missing(self.min_workers)

    def _spawn_missing(self, need: int) -> None:
        for _ in range(need - len(self._workers)):
            self._spawn()

    def _spawn(self) -> None:
        """Start a worker: a fresh interpreter (never a re-import of the user's main
        module, unlike multiprocessing), finding the user's modules on our sys.path."""
        if self._failed_starts >= MAX_FAILED_STARTS:
            return
        index = next(self._next_index)
        config = [index, self._token, self.kvs.address, self._options]
        process = subprocess.Popen(
            [sys.executable, "-c", WORKER_MAIN, json.dumps(config)],
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        )
        self._workers[index] = WorkerProcess(index, process)

    def _monitor(self) -> None:
        next_sweep = time.monotonic() + SWEEP_EVERY_S
        while not self._stopping:
            time.sleep(MONITOR_EVERY_S)
            with self._lock:
                if self._stopping:
                    return
                self._kill_stuck()
                self._replace_dead()
                self._autoscale()
                if time.monotonic() >= next_sweep:
                    keep = {rid for app in self._apps.values() for rid in app.active}
                    codec.sweep(self._token, keep)
                    self._shm.forget_older_than(codec.FORWARD_WINDOW_S)
                    next_sweep = time.monotonic() + SWEEP_EVERY_S

    def _plan(self) -> None:
        """Ask SLO-aware batching controllers for their choices (a search can take a
        second, so not under the lock) and push changes to the workers; re-split a
        flow-level SLO by the service times measured so far."""
        next_split = time.monotonic() + RESPLIT_EVERY_S
        while not self._stopping:
            time.sleep(PLAN_EVERY_S)
            if time.monotonic() >= next_split:
                next_split = time.monotonic() + RESPLIT_EVERY_S
                for app in list(self._apps.values()):
                    app.resplit_slo()
            for app in list(self._apps.values()):
                for index, controller in app.controllers.items():
                    decision = controller.decision(time.monotonic())
                    with self._lock:
                        before = app.decisions.get(index)
                        app.decisions[index] = decision
                        self._prewarm(app, index, decision.held)
                        if before is None or (before.max_size, before.timeout_s) != (
                            decision.max_size,
                            decision.timeout_s,
                        ):
                            message = (
                                "policy",
                                app.id,
                                index,
                                decision.max_size,
                                decision.timeout_s,
                            )
                            for w in self._workers.values():
                                if w.ready:
                                    self._send(w.index, message)

    def _prewarm(self, app: LocalApp, index: int, count: int) -> None:
        """Load stage `index` on the `count` workers its capped routing will use, before
        requests reach them: a model loading on the request path would miss the SLO.
        Called with the lock held."""
        key = (app.id, index)
        ready = [w for w in self._workers.values() if w.ready and not w.retiring]
        ready.sort(key=lambda w: (key not in w.load.warm, w.index))
        for w in ready[:count]:
            if key not in w.load.warm:
                w.load.warm.add(key)
                w.load.loading.add(key)  # routed elsewhere until its report says loaded
                self._send(w.index, ("load", app.id, index))

    def _kill_stuck(self) -> None:
        """Kill a worker whose stage has run longer than `stage_timeout_s` (its
        requests are then re-run elsewhere, or fail once out of retries)."""
        if self.stage_timeout_s is None:
            return
        now = time.monotonic()
        for w in self._workers.values():
            if w.busy_since is not None and now - w.busy_since > self.stage_timeout_s:
                w.killed_for = f"a stage ran longer than stage_timeout_s={self.stage_timeout_s:g}"
                log.warning("worker %d: %s; killing it", w.index, w.killed_for)
                w.process.kill()
                w.busy_since = None

    def _replace_dead(self) -> None:
        for index, w in list(self._workers.items()):
            if w.process.poll() is None:
                continue
            del self._workers[index]
            for key in [k for k in self._replicas if k[4] == index]:
                del self._replicas[key]
            if w.retiring:
                continue
            log.warning("worker %d exited with code %s", index, w.process.returncode)
            if not w.ready:
                self._failed_starts += 1
                self._changed.notify_all()
            for app in self._apps.values():
                for request in list(app.active.values()):
                    if index in request.workers():
                        self._retry(app, request, w)
        self._spawn_missing(self.min_workers)

    def _autoscale(self) -> None:
        now = time.monotonic()
        ready = [w for w in self._workers.values() if w.ready and not w.retiring]
        starting = sum(not w.ready for w in self._workers.values())
        idle = {
            w.index: now - w.active_at for w in ready if w.load.outstanding == 0 and not w.queued
        }
        floor = max(
            [1]
            + [s.replicas for a in self._apps.values() for s in a.plan.stages]
            + [  # a controller's plan and its spare (warm-up keeps to what the pool holds)
                d.held
                for a in self._apps.values()
                for d in a.decisions.values()
                if d.predicted_ms is not None
            ]
        )
        loads = [w.load.outstanding for w in ready]
        retiring = sum(w.retiring for w in self._workers.values())
        add, retire = self._autoscaler.plan(
            loads, len(self._unrouted), starting, idle, retiring=retiring, usable=self._usable()
        )
        add = max(add, min(floor, self.max_workers - retiring) - len(ready) - starting)
        for _ in range(add):
            self._spawn()
        for index in retire:
            if len(ready) > floor:
                self._workers[index].retiring = True
                self._send(index, ("exit",))

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
    def stage_figures(self, app: LocalApp) -> dict[str, dict[str, Any]]:
        figures = {}
        with self._lock:
            for index, stage in enumerate(app.plan.stages):
                key = (app.id, index)
                entry = app.stage_stats[index].snapshot()
                entry["workers"] = sum(key in w.load.warm for w in self._workers.values())
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
        with self._lock:
            return [w.process.pid for w in self._workers.values() if w.process.poll() is None]

    # -- shutdown -----------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every app (draining in-flight requests), then the workers; removes
        every process and shared-memory file this runtime made."""
        for app in list(self._apps.values()):
            app.stop()
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            workers = list(self._workers.values())
            for w in workers:
                self._send(w.index, ("exit",))
        for w in workers:
            try:
                w.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                w.process.kill()
                w.process.wait()
        if self._endpoint is not None:
            self._send(worker.DRIVER, ("exit",))  # wakes the receiver thread
            for thread in self._threads:
                thread.join()
            self._endpoint.close()
        if self._planner is not None:
            self._planner.close()
        codec.sweep(self._token)
        self.kvs.close()
