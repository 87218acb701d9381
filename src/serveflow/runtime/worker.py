"""A generic worker process: loads stages on demand, runs them, and forwards each
result straight to the workers of the next stages (the driver only sees the end).

Cold start: the first task of an app on a worker unpickles its plan (the user's
functions travel with cloudpickle); the first task of a stage instantiates its model
classes. A stage left idle for `idle_unload_s` is unloaded.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

from serveflow.logical.operators import AnyOf
from serveflow.logical.table import Table
from serveflow.optimizer.plan import Plan, Stage
from serveflow.runtime import codec
from serveflow.runtime.scheduler import Route, targets
from serveflow.runtime.stage import StageExecutor
from serveflow.runtime.transport import Endpoint, PeerGone, address

log = logging.getLogger(__name__)

DRIVER = -1
STATS_EVERY_S = 0.25
HEARTBEAT_S = 0.5
IDLE_WAKE_S = 1.0
BACKLOG_MERGE = 2  # planned batches a worker may run as one call when they queue up
FORGET_AFTER_S = 120.0  # inputs of a request that never completed (a lost branch)


def worker_address(token: str, index: int) -> bytes:
    return address(token, "driver" if index == DRIVER else f"w{index}")


@dataclass
class Task:
    """One request's inputs to one stage; runnable once `ready`."""

    app: int
    rid: int
    attempt: int
    index: int
    route: Route
    deadline: float | None
    created: float  # when its first input was sent
    inputs: dict[int, Any] = field(default_factory=dict)
    failures: dict[int, int] = field(default_factory=dict)

    def add(self, op_id: int, value: Any, producer_replicas: int) -> None:
        """Record an input; a competing replica's later copy is ignored, and a failure
        counts only once every replica of the producer has failed."""
        if isinstance(self.inputs.get(op_id), Table):
            return
        if not isinstance(value, Table):
            self.failures[op_id] = self.failures.get(op_id, 0) + 1
            if self.failures[op_id] < producer_replicas:
                return
        self.inputs[op_id] = value

    def ready(self, stage: Stage) -> bool:
        values = [self.inputs.get(i) for i in stage.inputs]
        if isinstance(stage.ops[0], AnyOf):  # one success, or every input failed
            return any(isinstance(v, Table) for v in values) or None not in values
        return None not in values or any(isinstance(v, BaseException) for v in values)


@dataclass
class StageCounters:
    requests: int = 0
    batches: int = 0
    cold_starts: int = 0
    latencies: list[float] = field(default_factory=list)
    # batching stages: (size, run s, end, each request's latency from arrival here)
    batch_log: list[tuple[int, float, float, list[float]]] = field(default_factory=list)


class Worker:
    def __init__(self, index: int, token: str, kvs_address: str, options: dict) -> None:
        from serveflow.runtime.cache import CachedKVS
        from serveflow.runtime.kvs import open_kvs

        self.index = index
        self.token = token
        self.endpoint = Endpoint(worker_address(token, index))
        self.shm = codec.SharedMemory(token)
        self.kvs = CachedKVS(open_kvs(kvs_address), options["cache_bytes"])
        self.idle_unload_s: float = options["idle_unload_s"]
        self.blobs: dict[int, bytes] = {}
        self.plans: dict[int, Plan] = {}
        self.executors: dict[tuple[int, int], tuple[StageExecutor, float]] = {}
        self.loaded_at: dict[tuple[int, int], float] = {}  # when each stage finished loading
        self.waiting: dict[tuple[int, int, int, int], Task] = {}
        self.started: dict[tuple[int, int, int, int], float] = {}
        self.queues: dict[tuple[int, int], deque[Task]] = {}
        self.counters: dict[tuple[int, int], StageCounters] = {}
        self.unloaded: list[tuple[int, int]] = []
        self.busy_since: float | None = None
        self.cancelled: dict[tuple[int, int], float] = {}  # (app, rid) that finished
        # (app, stage) -> (batch size, timeout s) chosen by the driver's controller
        self.overrides: dict[tuple[int, int], tuple[int, float]] = {}
        self.dirty = False  # something to report to the driver
        self.running = True

    # -- messages ---------------------------------------------------------------------
    def serve(self) -> None:
        self.parent = os.getppid()
        self.send(DRIVER, ("hello", self.index, os.getpid()))
        threading.Thread(target=self.heartbeat, name="serveflow:heartbeat", daemon=True).start()
        next_report = 0.0
        while self.running:
            wait = self.run_ready()
            now = time.monotonic()
            if self.dirty and now >= next_report:
                self.report()
                next_report = now + STATS_EVERY_S
            if self.dirty:
                wait = min(wait if wait is not None else STATS_EVERY_S, next_report - now)
            # wake at least every IDLE_WAKE_S: unload idle stages, notice a dead driver
            data = self.endpoint.recv(IDLE_WAKE_S if wait is None else max(0.0, min(wait, 1.0)))
            if os.getppid() != self.parent:
                return  # the driver died: nobody will read our results
            while data is not None:
                try:
                    self.handle(codec.decode(data, self.shm))
                except Exception:  # e.g. the files of a finished request were removed
                    log.debug("dropping a message that cannot be read", exc_info=True)
                data = self.endpoint.recv(0)
        self.report()
        self.endpoint.close()

    def heartbeat(self) -> None:
        """Tell the driver since when a stage has been running (None once it ended):
        the driver kills a worker whose stage runs past the runtime's stage timeout."""
        sent = None
        while self.running:
            time.sleep(HEARTBEAT_S)
            busy_since = self.busy_since
            if busy_since is not None or sent is not None:
                self.send(DRIVER, ("beat", self.index, busy_since))
                sent = busy_since

    def handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "input":
            self.accept(*message[1:])
        elif kind == "deploy":
            self.blobs[message[1]] = message[2]
        elif kind == "policy":
            _, app, index, size, timeout_s = message
            self.overrides[(app, index)] = (size, timeout_s)
        elif kind == "load":  # warm a stage before its requests come
            plan = self.plan(message[1])
            if plan is not None:
                self.executor((message[1], message[2]), plan.stages[message[2]])
        elif kind == "cancel":
            self.cancelled[(message[1], message[2])] = time.monotonic()
        elif kind == "undeploy":
            self.forget_app(message[1])
        elif kind == "exit":
            self.running = False

    def send(self, worker: int, message: tuple, rid: int = 0) -> None:
        try:
            data = codec.encode(message, self.shm, rid)
            self.endpoint.send(worker_address(self.token, worker), data)
        except PeerGone:  # that worker died; the driver re-runs the request
            log.debug("worker %d is gone; dropping a message", worker)

    # -- tasks ------------------------------------------------------------------------
    def plan(self, app: int) -> Plan | None:
        plan = self.plans.get(app)
        if plan is None and app in self.blobs:
            plan = self.plans[app] = cloudpickle.loads(self.blobs[app])
        return plan

    def accept(
        self,
        app: int,
        rid: int,
        attempt: int,
        index: int,
        op_id: int,
        value: Any,
        route: Route,
        deadline: float | None,
        sent: float,
    ) -> None:
        """An input of stage `index` for one request, sent at `sent` (its latency at
        this stage counts from there, including time spent unread in our socket)."""
        plan = self.plan(app)
        key = (app, rid, attempt, index)
        if plan is None or key in self.started or (app, rid) in self.cancelled:
            return  # undeployed app, a loser of a race already decided, a finished request
        task = self.waiting.get(key)
        if task is None:
            task = self.waiting[key] = Task(app, rid, attempt, index, route, deadline, sent)
        producer = plan.stage_of(op_id).replicas if op_id else 1
        task.add(op_id, value, producer)
        stage = plan.stages[index]
        if task.ready(stage):
            del self.waiting[key]
            self.started[key] = time.monotonic()
            self.queues.setdefault((app, index), deque()).append(task)

    def run_ready(self) -> float | None:
        """Run every runnable batch, including those that running others made ready
        here; returns how long the loop may sleep (None: until a message comes),
        shorter when a partial batch is waiting for its timeout."""
        ran = True
        while ran:
            ran = False
            wait: float | None = None
            for key, queue in list(self.queues.items()):
                while queue:
                    plan = self.plans[key[0]]
                    stage = plan.stages[key[1]]
                    limit, timeout_s = self.batch_limits(key, stage)
                    if timeout_s and len(queue) < limit:
                        # The oldest request's wait counts from when it was sent, as
                        # in the model: also while it sat unread behind a running batch.
                        remaining = queue[0].created + timeout_s - time.monotonic()
                        if remaining > 0:
                            wait = remaining if wait is None else min(wait, remaining)
                            break
                    batch = [queue.popleft() for _ in range(self.batch_take(key, stage, limit))]
                    self.run_batch(plan, stage, key, batch)
                    ran = True
        self.housekeeping()
        return wait

    def batch_limits(self, key: tuple[int, int], stage: Stage) -> tuple[int, float]:
        """(most requests per call, longest wait for a batch to fill) of a stage."""
        if key in self.overrides:
            return self.overrides[key]
        policy = stage.batching
        return (policy.size, (policy.timeout_ms or 0) / 1e3) if policy else (1, 0.0)

    def batch_take(self, key: tuple[int, int], stage: Stage, limit: int) -> int:
        """How many queued requests the next call of a stage takes: up to its batch
        size, or, for a controller-planned stage with more than a batch queued (a
        backlog: a step in load, a slow spell), up to `BACKLOG_MERGE` batches in one
        call, which drains it faster (one call's fixed cost for several batches)."""
        queued = len(self.queues[key])
        if key in self.overrides and queued > limit:
            most = BACKLOG_MERGE * limit
            if stage.batching is not None and stage.batching.max_size:
                most = min(most, stage.batching.max_size)
            return min(queued, most)
        return min(limit, queued)

    def run_batch(self, plan: Plan, stage: Stage, key: tuple[int, int], batch: list[Task]) -> None:
        now = time.monotonic()
        live = [
            t
            for t in batch
            if (t.deadline is None or t.deadline > now) and (t.app, t.rid) not in self.cancelled
        ]
        expired = [t for t in batch if t.deadline is not None and t.deadline <= now]
        if expired and stage.batching:  # dropped late: the batching controller counts them
            counters = self.counters.setdefault(key, StageCounters())
            counters.batch_log.append((0, 0.0, now, [now - t.created for t in expired]))
            self.dirty = True
        try:
            if live:
                self.run_live(plan, stage, key, live)
        finally:
            if stage.replicas > 1:  # the driver counts competing runs until they end
                for t in batch:
                    self.send(DRIVER, ("done", self.index, t.app, t.rid, t.attempt, t.index))

    def run_live(self, plan: Plan, stage: Stage, key: tuple[int, int], live: list[Task]) -> None:
        counters = self.counters.setdefault(key, StageCounters())
        executor = self.executor(key, stage)
        self.busy_since = started = time.monotonic()  # after any cold start
        try:
            results = executor.run([t.inputs for t in live])
        except Exception as error:  # a bug of ours: fail these requests, keep serving
            log.exception("stage %r crashed", stage.name)
            results = [error] * len(live)
        finally:
            self.busy_since = None
        done = time.monotonic()
        if executor.load_error is None:
            self.executors[key] = (executor, done)
        self.dirty = True
        counters.requests += len(live)
        counters.batches += 1
        counters.latencies.extend(done - t.created for t in live)
        if stage.batching and executor.load_error is None:
            # For the batching controller: the service time of the call alone, and the
            # latencies of requests sent once the stage was loaded (a cold start is no
            # consequence of its batching choices).
            loaded_at = self.loaded_at.get(key, 0.0)
            latencies = [done - t.created for t in live if t.created >= loaded_at]
            counters.batch_log.append((len(live), done - started, done, latencies))
        for task, result in zip(live, results):
            self.forward(plan, task, result)

    def executor(self, key: tuple[int, int], stage: Stage) -> StageExecutor:
        """The stage's executor, loaded now if it is not (a cold start)."""
        loaded = self.executors.get(key)
        if loaded is not None:
            return loaded[0]
        executor = StageExecutor(stage, self.kvs)
        self.counters.setdefault(key, StageCounters()).cold_starts += 1
        self.dirty = True
        if executor.load_error is None:  # else tried again with the next request
            self.loaded_at[key] = now = time.monotonic()
            self.executors[key] = (executor, now)
        return executor

    def forward(self, plan: Plan, task: Task, result: Any) -> None:
        stage = plan.stages[task.index]
        if stage.output == plan.output:
            message = ("result", task.app, task.rid, task.attempt, result)
            self.send(DRIVER, message, task.rid)
        for consumer in plan.consumer_indices(task.index):
            message = (
                "input",
                task.app,
                task.rid,
                task.attempt,
                consumer,
                stage.output,
                result,
                task.route,
                task.deadline,
                time.monotonic(),
            )
            for worker in targets(plan, consumer, task.route, result) or (self.index,):
                if worker == self.index:
                    self.accept(*message[1:])
                else:
                    self.send(worker, message, task.rid)

    # -- upkeep -----------------------------------------------------------------------
    def report(self) -> None:
        stages = {
            key: (c.requests, c.batches, c.cold_starts, c.latencies, c.batch_log)
            for key, c in self.counters.items()
            if c.requests or c.cold_starts
        }
        queued = {key: len(q) for key, q in self.queues.items() if q}
        self.send(DRIVER, ("stats", self.index, stages, queued, self.unloaded))
        self.counters.clear()
        self.unloaded = []
        self.dirty = bool(queued)

    def housekeeping(self) -> None:
        now = time.monotonic()
        for key, (_, used) in list(self.executors.items()):
            if now - used > self.idle_unload_s:
                del self.executors[key]  # unload an idle stage: its models are freed
                self.unloaded.append(key)
                self.dirty = True
        self.shm.forget_older_than(codec.FORWARD_WINDOW_S)  # else mappings pin memory
        if len(self.started) + len(self.cancelled) > 10_000 or len(self.waiting) > 1_000:
            limit = now - FORGET_AFTER_S
            self.started = {k: t for k, t in self.started.items() if t > limit}
            self.cancelled = {k: t for k, t in self.cancelled.items() if t > limit}
            self.waiting = {k: t for k, t in self.waiting.items() if t.created > limit}

    def forget_app(self, app: int) -> None:
        self.blobs.pop(app, None)
        self.plans.pop(app, None)
        for mapping in (self.executors, self.loaded_at, self.queues, self.counters, self.overrides):
            for key in [k for k in mapping if k[0] == app]:
                del mapping[key]


def main(index: int, token: str, kvs_address: str, options: dict) -> None:
    """Entry point of a worker process."""
    logging.basicConfig(level=options.get("log_level", logging.WARNING))
    Worker(index, token, kvs_address, options).serve()
