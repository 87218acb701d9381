"""A generic worker process of the process engine: loads stages on demand, runs them,
and forwards each result straight to the workers of the next stages (the control
plane only sees the end).

Cold start: the first task of an app on a worker unpickles its plan (the user's
functions travel with cloudpickle); the first task of a stage instantiates its model
classes. A stage left idle for `idle_unload_s` is unloaded.

The worker reads its configuration from stdin, then keeps stdin open: the driver
holds the other end, so end of file means the driver is gone and the worker exits at
once, even in the middle of a user's call.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

from serveflow.errors import DeadlineError
from serveflow.logical.operators import AnyOf
from serveflow.logical.table import Table
from serveflow.optimizer.plan import Plan, Stage
from serveflow.runtime import codec, collector
from serveflow.runtime import messages as m
from serveflow.runtime.dispatch import FILLING_MARGIN, BatchRule
from serveflow.runtime.scheduler import follows_winner, targets
from serveflow.runtime.stage import StageExecutor
from serveflow.runtime.transport import RECEIVE_QUEUE, Endpoint, PeerGone

log = logging.getLogger(__name__)

DRIVER = -1
STATS_EVERY_S = 0.25
HEARTBEAT_S = 0.5
IDLE_WAKE_S = 1.0
LOAD_SAID_WITHIN_S = 1.0  # how long a model load waits for the driver to be told of it
SPIN_S = 300e-6  # polling for the next message before sleeping (`next_message`)
# After a batching call, messages left in their senders' backlogs are waited for this
# long at least, or this share of the call, at most BACKLOG_WAIT_MAX_S (`handle_all`):
# one left behind waits a whole call, and the sender's drainer thread needs its GIL
# (held up to the 5 ms switch interval by a busy driver: a 2 ms wait let 250 ms calls
# go out with half the requests sent before them)
BACKLOG_WAIT_S = 2e-3
BACKLOG_WAIT_SHARE = 0.1
BACKLOG_WAIT_MAX_S = 0.02
CANCELS = ".cancel"  # suffix of the socket that takes only `Cancel` messages
FORGET_AFTER_S = 120.0  # inputs of a request that never completed (a lost branch)
HOUSEKEEPING_EVERY_S = 0.1  # unload idle stages at most this often
FORGET_EVERY_S = 10.0  # look for requests to forget at most this often
PR_SET_PDEATHSIG = 1
DONE_AFTER_S = 1e-3  # a stage whose calls average this long says `Done` after each one


def socket_path(directory: str, index: int, message: Any = None) -> str:
    """Where to send `message` to process `index`: cancellations go to a worker's
    second socket, read by a thread of their own while the worker runs a stage."""
    return _socket_path(directory, index, isinstance(message, m.Cancel))


@functools.lru_cache(maxsize=1024)  # asked for every message sent
def _socket_path(directory: str, index: int, cancels: bool) -> str:
    name = "driver" if index == DRIVER else f"w{index}"
    return os.path.join(directory, name + CANCELS if cancels else name)


class Interrupted(BaseException):
    """Raised in a running stage call whose requests were all cancelled (a loser of
    an anyof, a deadline passed, a client gone): as `ray.cancel` does, it unwinds the
    user's code at the next bytecode or interrupted system call. A BaseException, so
    that user code catching Exception does not swallow it."""


@dataclass(frozen=True)
class StageFacts:
    """What the hot path asks of one stage of a plan, worked out once per plan."""

    stage: Stage
    inputs: tuple[int, ...]  # `stage.inputs`
    anyof: bool  # starts with an anyof: runnable on its first success
    competing: bool  # `plan.competing`: the driver counts its runs until told `Done`
    late_inputs: bool  # may get inputs for a run already started (`late_inputs`)
    located: bool  # its worker is known only once its lookup key is (`Located`)
    to_driver: bool  # its output is the plan's: sent to the driver as the `Result`
    consumers: tuple[int, ...]  # the stages reading its output
    # per input op: the copies of it that reach this run (its stage's replicas; 1 for
    # the request, and where each copy has a run of this stage of its own)
    replicas: dict[int, int]
    # its SLO (seconds; None without one): a request's run here is due this long
    # after its input was sent, and a worker runs the due calls earliest due first
    slack: float | None = None
    # its consumers in its own anyof branch: their input counts as sent when this
    # run's was, so that a worker shared by the branches runs the branch sent first
    # through to its end before the others (not the next branch's first stage, whose
    # input came before this run ended: the fast branch then waited for the slow one)
    chained: frozenset[int] = frozenset()

    @classmethod
    def of(cls, plan: Plan) -> list[StageFacts]:
        return [
            cls(
                stage,
                stage.inputs,
                isinstance(stage.ops[0], AnyOf),
                plan.competing(index),
                late_inputs(plan, index),
                plan.located(index),
                stage.output == plan.output,
                plan.consumer_indices(index),
                {
                    i: plan.stage_of(i).replicas if i and not follows_winner(plan, index) else 1
                    for i in stage.inputs
                },
                stage.batching.slo_ms / 1e3 if stage.batching and stage.batching.slo_ms else None,
                frozenset(
                    c
                    for _, branches in plan.anyof_races
                    for branch in branches
                    if index in branch
                    for c in plan.consumer_indices(index)
                    if c in branch
                ),
            )
            for index, stage in enumerate(plan.stages)
        ]


@dataclass(slots=True)
class Task:
    """One request's inputs to one stage; runnable once `ready`."""

    app: int
    rid: int
    attempt: int
    index: int
    route: m.Route
    deadline: float | None
    created: float  # when its first input was sent
    began: float | None = None  # when the request's first stage run began, once known
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

    def ready(self, stage: StageFacts) -> bool:
        values = [self.inputs.get(i) for i in stage.inputs]
        if stage.anyof:  # one success, or every input failed
            return any(isinstance(v, Table) for v in values) or None not in values
        return None not in values or any(isinstance(v, BaseException) for v in values)


@dataclass
class StageCounters:
    requests: int = 0
    batches: int = 0
    cold_starts: int = 0
    latencies: list[float] = field(default_factory=list)
    service: list[float] = field(default_factory=list)  # each call's run time
    stopped: list[float] = field(default_factory=list)  # calls cut short: how long they ran
    # batching stages: (requests, run s, end, each request's latency from arrival here,
    # rows)
    batch_log: list[tuple[int, float, float, list[float], int]] = field(default_factory=list)
    # calls by the rows they ran: rows -> [calls, gather ns, run ns, scatter ns]
    executions: dict[int, list[int]] = field(default_factory=dict)


class Worker:
    def __init__(self, index: int, directory: str, kvs_address: str, options: dict) -> None:
        from serveflow.runtime.cache import CachedKVS
        from serveflow.runtime.kvs import open_kvs

        self.index = index
        self.open_transport(directory)
        self.kvs = CachedKVS(open_kvs(kvs_address), options["cache_bytes"])
        self.idle_unload_s: float = options["idle_unload_s"]
        self.deployed: dict[int, str] = {}  # app -> its plan file
        self.plans: dict[int, Plan] = {}
        self.facts: dict[int, list[StageFacts]] = {}  # app -> per stage
        self.loosest = 0.0  # see `_find_loosest`
        self.executors: dict[tuple[int, int], tuple[StageExecutor, float]] = {}
        self.loaded_at: dict[tuple[int, int], float] = {}  # when each stage finished loading
        self.waiting: dict[tuple[int, int, int, int], Task] = {}
        # tasks started whose stage may still get inputs for them (a competing
        # replica's copy, an anyof's other branches, a join's input after the other
        # one failed): those inputs are dropped
        self.started: dict[tuple[int, int, int, int], float] = {}
        self.next_housekeeping = self.next_forget = 0.0
        self.queues: dict[tuple[int, int], deque[Task]] = {}
        self.counters: dict[tuple[int, int], StageCounters] = {}
        self.unloaded: list[tuple[int, int]] = []
        # stages to load in the background (`Load`), one at a time once the runs ready
        # have run: the driver sends their runs elsewhere meanwhile, but the runs it
        # sent here just before should not wait for them
        self.loads: deque[tuple[int, int]] = deque()
        self.busy_since: float | None = None
        self.loading: tuple[int, int] | None = None  # the stage being loaded
        self.told_loading = False  # the last heartbeat said so
        self.beat_lock = threading.Lock()
        # (app, rid, attempt, stage) of each `Cancel` -> when (see `cancelled`).
        # Written by the cancel thread too: changes under `cancel_lock`.
        self.cancelled: dict[tuple[int, int, int | None, int | None], float] = {}
        self.cancel_lock = threading.Lock()
        self.in_call: list[Task] = []  # the tasks of the stage call in progress
        self.run_serial = 0  # counts stage calls
        self.interrupt_serial = -1  # the call to interrupt
        self.rule = BatchRule()
        self.call_s: dict[tuple[int, int], float] = {}  # per stage: calls' moving average
        self.dirty = False  # something to report to the driver
        # ... now, not at the next STATS_EVERY_S: a batching stage's first timed call,
        # that the driver's admission may hold requests for (`ControlPlane._await_timing`)
        self.report_now = False
        self.timed: set[tuple[int, int]] = set()  # batching stages with a call reported
        self.held: dict[str, list[bytes]] | None = None  # a batch's messages (`hold`)
        self.running = True

    def open_transport(self, directory: str) -> None:
        """This worker's sockets in the run directory, and its shared-memory files."""
        self.directory = directory
        self.endpoint = Endpoint(socket_path(directory, self.index))
        self.cancels = Endpoint(socket_path(directory, self.index, m.Cancel(0, 0)))
        self.shm = codec.SharedMemory(directory)

    # -- messages ---------------------------------------------------------------------
    def serve(self) -> None:
        self.send(DRIVER, m.Hello(self.index, os.getpid()))
        threading.Thread(target=self.heartbeat, name="serveflow:heartbeat", daemon=True).start()
        signal.signal(signal.SIGUSR1, self.on_interrupt)
        main = threading.main_thread().ident
        threading.Thread(
            target=self.watch_cancels, args=(main,), name="serveflow:cancels", daemon=True
        ).start()
        self.loop()
        with self.beat_lock:
            self.endpoint.close()
        self.cancels.close()

    def loop(self) -> None:
        """Take messages and run stages until told to `Exit`."""
        next_report = 0.0
        while self.running:
            wait = self.run_ready()
            if self.loads:
                app, stage = self.loads.popleft()
                try:
                    self.load(app, stage)
                except Exception:  # e.g. a plan that cannot be read here
                    log.exception("failed to load stage %d of app %d", stage, app)
                wait = 0.0  # messages and runs first, then the next load
            now = time.monotonic()
            if self.dirty and (now >= next_report or self.report_now):
                self.report()
                next_report = now + STATS_EVERY_S
            if self.dirty:
                wait = min(wait if wait is not None else STATS_EVERY_S, next_report - now)
            # wake at least every IDLE_WAKE_S to unload idle stages
            self.handle_all(
                self.next_message(IDLE_WAKE_S if wait is None else min(wait, IDLE_WAKE_S))
            )
        self.report()

    def handle_all(self, data: bytes | None, backlog_s: float = 0.0) -> None:
        """Handle `data` (a message, or None) and every message waiting after it. Each
        time a socket's whole queue's worth was read (RECEIVE_QUEUE: 10 by default),
        the messages its senders may hold back are waited for, up to `backlog_s`: they
        were sent before the next call is made up, and would otherwise wait for the
        one after."""
        read = self.datagrams()  # a bundle fills one place of the queue
        while data is not None:
            message = self.decode(data)
            try:
                if message is not None:
                    self.handle(message)
            except Exception:  # a bug of ours, or an app undeployed meanwhile
                log.exception("failed to handle a %s message", type(message).__name__)
            data = self.poll()
            if data is None and backlog_s and self.datagrams() - read >= RECEIVE_QUEUE:
                read = self.datagrams()
                data = self.held_back(backlog_s)

    def poll(self) -> Any:
        """The next message if one is waiting, else None."""
        return self.endpoint.recv(0)

    def datagrams(self) -> int:
        """Datagrams read so far (a bundle of messages counts once)."""
        return self.endpoint.datagrams

    def held_back(self, timeout_s: float) -> Any:
        """A message its sender's backlog held back while our socket's queue was full,
        if one comes within `timeout_s`, else None."""
        return self.endpoint.recv(timeout_s)

    def next_message(self, timeout: float) -> bytes | None:
        """The next message, or None after `timeout` seconds. For its first SPIN_S
        this polls, yielding the CPU to anything else runnable between polls, rather
        than sleeping: in a busy pipeline the next input comes within that, and then
        neither this worker nor its sender pays for a wake-up (tens of microseconds
        each on a virtual machine; 3-stage chain, sequential: median 0.26 -> 0.16 ms)."""
        now = time.monotonic()
        deadline = now + max(0.0, timeout)
        spin_until = min(now + SPIN_S, deadline)
        data = self.endpoint.recv(0)
        while data is None and time.monotonic() < spin_until:
            os.sched_yield()
            data = self.endpoint.recv(0)
        if data is None:
            data = self.endpoint.recv(max(0.0, deadline - time.monotonic()))
        return data

    def decode(self, data: bytes) -> Any:
        """A message, or None (logged) for anything else: never raises."""
        try:
            message = codec.decode(data, self.shm)
        except Exception:  # e.g. the files of a finished request were removed
            log.debug("dropping a message that cannot be read", exc_info=True)
            return None
        if not m.well_formed(message):
            log.warning("dropping a malformed %s message", type(message).__name__)
            return None
        if type(message) is m.Input and type(message.value) is codec.Unreadable:
            problem = f"cannot be read by the process it was sent to: {message.value}"
            try:
                plan = self.plan(message.app)
            except Exception:  # a plan that cannot be read: the operator stays unnamed
                plan = None
            failure = codec.value_failure(plan, message, problem)
            message = message._replace(value=failure)
        return message

    def heartbeat(self) -> None:
        """Tell the driver, every HEARTBEAT_S, since when a stage call has been running
        and which stage is loading: it routes around a worker busy loading a model,
        and one it stops hearing from (frozen, or the GIL held in C code); it kills a
        worker whose call runs past the runtime's stage timeout."""
        while self.running:
            time.sleep(HEARTBEAT_S)
            with self.beat_lock:
                if not self.running:  # the endpoint is closing
                    return
                self.send(DRIVER, m.Beat(self.index, self.busy_since, self.loading))
                self.told_loading = self.loading is not None

    def handle(self, message: Any) -> None:
        match message:
            case m.Input():
                self.accept(message)
            case m.Deploy(app, path):
                self.deployed[app] = path
            case m.Policy(app, stage, size, timeout_s):
                self.rule.set_policy((app, stage), size, timeout_s)
            case m.Load(app, stage):  # warm a stage before its requests come
                self.loads.append((app, stage))
            case m.Cancel():
                self.cancel(message)
            case m.Undeploy(app):
                self.forget_app(app)
            case m.Exit():
                self.running = False
            case _:
                log.warning("dropping a %s message: not for a worker", type(message).__name__)

    def cancel(self, message: m.Cancel) -> None:
        key = (message.app, message.rid, message.attempt, message.stage)
        with self.cancel_lock:
            self.cancelled[key] = time.monotonic()

    def watch_cancels(self, main: int) -> None:
        """Take cancellations as they come, also while the main thread runs a stage;
        interrupt a call once every request in it is cancelled."""
        while True:
            try:
                data = self.cancels.recv(None)
            except OSError:
                return  # closed
            message = self.decode(data) if data is not None else None
            if isinstance(message, m.Cancel):
                self.cancel_now(message, lambda: signal.pthread_kill(main, signal.SIGUSR1))

    def cancel_now(self, message: m.Cancel, interrupt: Any) -> None:
        """Record a cancellation (from any thread); `interrupt()` the stage call in
        progress when every request in it is now cancelled."""
        self.cancel(message)
        serial, in_call = self.run_serial, self.in_call
        if in_call and all(self.is_cancelled(t) for t in in_call):
            self.interrupt_serial = serial
            interrupt()

    def on_interrupt(self, signum: int, frame: Any) -> None:
        if self.in_call and self.interrupt_serial == self.run_serial:
            raise Interrupted

    def is_cancelled(self, task: Task) -> bool:
        return bool(self.cancelled) and cancelled(
            self.cancelled, task.app, task.rid, task.attempt, task.index
        )

    def send(self, worker: int, message: tuple, rid: int = 0) -> None:
        self.transmit(socket_path(self.directory, worker, message), [self.encode(message, rid)])

    def hold(self, worker: int, message: tuple, rid: int = 0) -> None:
        """`send`, but within a batch (`run_batch`) held until the call's messages go
        out together, bundled: one datagram per destination, not one per request (a
        busy driver's receiving thread waits for the GIL after each datagram)."""
        if self.held is None:
            self.send(worker, message, rid)
            return
        path = socket_path(self.directory, worker, message)
        self.held.setdefault(path, []).append(self.encode(message, rid))

    def encode(self, message: tuple, rid: int) -> bytes:
        try:
            return codec.encode(message, self.shm, rid)
        except Exception as error:  # an output that cannot travel fails its request
            if not isinstance(message, m.Input | m.Result):
                raise
            return codec.encode(self.unsendable(message, error), self.shm, rid)

    def transmit(self, path: str, data: list[bytes]) -> None:
        try:
            self.endpoint.send_all(path, data)
        except PeerGone:  # that worker died; the driver re-runs the request
            log.debug("%s is gone; dropping %d messages", path, len(data))

    def flush_to_driver(self) -> None:
        """Wait (up to LOAD_SAID_WITHIN_S) until what waits for the driver is sent: a
        backlog (the driver's queue was full) is sent by a thread that needs the GIL,
        which a model load may then hold for seconds."""
        self.endpoint.delivered(socket_path(self.directory, DRIVER), LOAD_SAID_WITHIN_S)

    def unsendable(self, message: m.Input | m.Result, error: Exception) -> Any:
        """`message` carrying, instead of its value, an OperatorError naming the
        operator whose output could not be pickled."""
        problem = (
            f"cannot be sent to another process (it must pickle): {type(error).__name__}: {error}"
        )
        return message._replace(
            value=codec.value_failure(self.plans.get(message.app), message, problem)
        )

    # -- tasks ------------------------------------------------------------------------
    def plan(self, app: int) -> Plan | None:
        plan = self.plans.get(app)
        if plan is None and app in self.deployed:
            try:
                plan = self.plans[app] = self.read_plan(self.deployed[app])
                self.facts[app] = StageFacts.of(plan)
                self._find_loosest()
            except FileNotFoundError:  # undeployed since
                self.deployed.pop(app, None)
        return plan

    def read_plan(self, where: Any) -> Plan:
        """The plan a `Deploy` names (raises FileNotFoundError once it is undeployed):
        a file the driver wrote in the run directory, nothing else."""
        if not isinstance(where, str) or os.path.dirname(where) != self.directory:
            raise ValueError(f"not a plan file of this runtime: {where!r}")
        with open(where, "rb") as file:
            return cloudpickle.load(file)

    def accept(self, message: m.Input) -> None:
        """An input of stage `index` for one request, sent at `sent` (its latency at
        this stage counts from there, including time spent unread in our socket)."""
        app, rid, attempt, index = message.app, message.rid, message.attempt, message.stage
        facts = self.facts.get(app)
        if facts is None and self.plan(app) is not None:
            facts = self.facts[app]
        key = (app, rid, attempt, index)
        if facts is None or key in self.started:
            return  # an undeployed app, a loser of a race already decided
        stage = facts[index]
        if self.cancelled and cancelled(self.cancelled, app, rid, attempt, index):
            if stage.competing:  # the driver counts the run until told
                self.send(DRIVER, m.Done(self.index, app, rid, attempt, index))
            return
        if stage.late_inputs:
            task = self.waiting.get(key)
            if task is None:
                task = Task(app, rid, attempt, index, message.route, message.deadline, message.sent)
                self.waiting[key] = task
            if message.began is not None and (task.began is None or message.began < task.began):
                task.began = message.began  # the earliest of its inputs' first runs
            task.add(message.op, message.value, stage.replicas.get(message.op, 1))
            if not task.ready(stage):
                return
            del self.waiting[key]
            self.started[key] = time.monotonic()
        else:  # its one input: runnable now
            task = Task(
                app, rid, attempt, index, message.route, message.deadline, message.sent,
                message.began,
            )  # fmt: skip
            task.inputs[message.op] = message.value
        queue = self.queues.get((app, index))
        if queue is None:
            queue = self.queues[(app, index)] = deque()
        queue.append(task)

    def cancel_rivals(self, plan: Plan, task: Task) -> None:
        """This stage run won an anyof race (the first success reaches the anyof):
        the other branches' runs are dropped, or interrupted if running. Sent from
        here, not from the anyof's worker, which may be busy."""
        for consumer, branches in plan.anyof_races:
            heads = [b[-1] for b in branches]
            if task.index in heads and consumer in plan.consumer_indices(task.index):
                for branch in branches:
                    if branch[-1] != task.index:
                        for loser in branch:
                            for worker in task.route[loser]:
                                cancel = m.Cancel(task.app, task.rid, loser, task.attempt)
                                self.cancel_run(worker, cancel)

    def cancel_run(self, worker: int, message: m.Cancel) -> None:
        """Cancel a stage run: here at once (a queued run must not start before the
        message would arrive), elsewhere by message."""
        if worker == self.index:
            self.cancel(message)
        else:
            self.send(worker, message)

    def _find_loosest(self) -> None:
        """The longest SLO of the stages deployed here (0 without any): a run of a
        stage without an SLO is due that long after it was sent, so that it runs
        before no SLO stage's request sent before it. At 0 (at once), another flow's
        runs of 100 ms went before the queued requests of a stage with an SLO of
        25 ms, which admission had admitted ahead of them."""
        self.loosest = max(
            (f.slack for facts in self.facts.values() for f in facts if f.slack is not None),
            default=0.0,
        )

    def run_ready(self) -> float | None:
        """Run every runnable batch, the one whose oldest request is due first first
        (its input's send plus its stage's SLO, `StageFacts.slack`, or the longest
        SLO here for a stage without one: `_find_loosest`; a request's anyof
        branches sharing this worker in the order they were sent), including those
        that running others made ready here; returns how long the loop may sleep
        (None: until a message comes), shorter when a partial batch is waiting for
        its timeout. Earliest due, not oldest: a flow with an SLO of 20 ms sharing 2
        workers with one of 100 ms (4 + 1 ms per row each, 400 requests/s each)
        waited behind the other's requests that came first, and refused 29-37%.
        And a batch still filling that is due first runs now, short of its size, when
        the call due next would make it late (its call's time after that one's ends
        past its due, less FILLING_MARGIN): a call is not cut short, and a flow of 10 +
        2 ms per row, SLO 36 ms, beside one of SLO 120 ms (calls of 5-12: 20-34 ms) on
        2 workers waited behind such a call begun while its batch waited its last few
        milliseconds (at 80 and 150 requests/s, 2-5% of its answers late)."""
        while True:
            wait: float | None = None
            best: tuple[int, int] | None = None
            first = math.inf
            take = 0
            filling: tuple[tuple[int, int], float, float] | None = None  # (key, due, slack)
            now = time.monotonic()
            for key, queue in self.queues.items():
                if not queue:
                    continue
                facts = self.facts[key[0]][key[1]]
                slack = self.loosest if facts.slack is None else facts.slack
                due = queue[0].created + slack
                if due >= first:
                    continue
                count, remaining = self.rule.due(
                    key,
                    facts.stage,
                    len(queue),
                    queue[0].created,
                    now,
                    lambda queue=queue: sum(_rows(t.inputs) for t in queue),
                )
                if count:
                    best, take, first = key, count, due
                else:
                    wait = remaining if wait is None else min(wait, remaining)
                    if filling is None or due < filling[1]:
                        filling = key, due, slack
            if best is not None and filling is not None and filling[1] < first:
                key, due, slack = filling
                ends = now + self.call_s.get(best, 0.0) + self.call_s.get(key, 0.0)
                if ends > due - FILLING_MARGIN * slack:
                    limit = self.rule.limits(key, self.facts[key[0]][key[1]].stage)[0]
                    best, take, first = key, min(limit, len(self.queues[key])), due
            if best is None:
                break
            queue = self.queues[best]
            batch = [queue.popleft() for _ in range(take)]
            facts = self.facts[best[0]][best[1]]
            began = time.monotonic()
            self.run_batch(self.plans[best[0]], facts, best, batch)
            if facts.stage.batching is not None:
                # What came during the call joins the queues before the next call is
                # made up. Else the next call takes only the requests read before this
                # one, and those sent meanwhile (which the driver's admission counted
                # in it) wait a whole call more: 80 ms calls of 11-12 requests under
                # an SLO of 125 ms answered them in 160.
                call_s = time.monotonic() - began
                backlog_s = min(
                    max(BACKLOG_WAIT_S, BACKLOG_WAIT_SHARE * call_s), BACKLOG_WAIT_MAX_S
                )
                self.handle_all(self.poll(), backlog_s)
                # Back to the loop before the next call: under a steady stream the
                # queues never empty, and staying here held off the stats reports
                # (no requests counted, no batches for the controller, for as long as
                # a flood lasted), loads, unmapping and an `Exit`.
                wait = 0.0
                break
        self.housekeeping()
        return wait

    def run_batch(
        self, plan: Plan, facts: StageFacts, key: tuple[int, int], batch: list[Task]
    ) -> None:
        now = time.monotonic()
        live = [
            t
            for t in batch
            if (t.deadline is None or t.deadline > now) and not self.is_cancelled(t)
        ]
        if facts.stage.batching:  # dropped late: the batching controller counts them
            expired = [t for t in batch if t.deadline is not None and t.deadline <= now]
            if expired:
                counters = self.counters.setdefault(key, StageCounters())
                counters.batch_log.append((0, 0.0, now, [now - t.created for t in expired], 0))
                self.dirty = True
        self.held = {}
        try:
            if live:
                self.run_live(plan, facts, key, live)
        finally:
            # The driver counts competing runs until they end, and the expected seconds
            # of a long stage's runs (even a quick one: an input its filter emptied);
            # other runs it releases with their request.
            if facts.competing or self.call_s.get(key, 0.0) >= DONE_AFTER_S:
                for t in batch:
                    self.hold(DRIVER, m.Done(self.index, t.app, t.rid, t.attempt, t.index))
            held, self.held = self.held, None
            for path, data in held.items():
                self.transmit(path, data)

    def run_live(
        self, plan: Plan, facts: StageFacts, key: tuple[int, int], live: list[Task]
    ) -> None:
        stage = facts.stage
        counters = self.counters.get(key)
        if counters is None:
            counters = self.counters[key] = StageCounters()
        executor = self.executor(key, stage)
        self.busy_since = started = time.monotonic()  # after any cold start

        def should_stop(position: int) -> bool:
            task = live[position]
            expired = task.deadline is not None and time.monotonic() > task.deadline
            return expired or self.is_cancelled(task)

        self.run_serial += 1
        try:
            self.in_call = live
            # a cancellation taken after `live` was (while the main thread loaded the
            # stage, or waited for the GIL) found no call to interrupt; one taken
            # from here on finds this one (`cancel_now` records before it looks)
            if all(self.is_cancelled(t) for t in live):
                raise Interrupted
            results = self.call(executor, [t.inputs for t in live], should_stop)
        except Interrupted:
            results = [stopped(stage) for _ in live]
        except Exception as error:  # a bug of ours: fail these requests, keep serving
            log.exception("stage %r crashed", stage.name)
            results = [error] * len(live)
        finally:
            self.in_call = []
            self.busy_since = None
        done = time.monotonic()
        if executor.load_error is None:
            self.executors[key] = (executor, done)
        self.dirty = True
        counters.requests += len(live)
        counters.batches += 1
        # runs stopped early (cancelled, past their deadline) are no latencies, and
        # their run time is only a lower bound of the stage's
        cut = False
        for task, result in zip(live, results):
            if isinstance(result, DeadlineError):
                cut = True
            else:
                counters.latencies.append(done - task.created)
        (counters.stopped if cut else counters.service).append(done - started)
        rows = sum(_rows(task.inputs) for task in live)
        if rows and executor.load_error is None:  # else the call ran no rows
            gather_ns, scatter_ns = int(executor.gather_s * 1e9), int(executor.scatter_s * 1e9)
            run_ns = max(int((done - started) * 1e9) - gather_ns - scatter_ns, 0)
            execution = counters.executions.setdefault(rows, [0, 0, 0, 0])
            execution[0] += 1
            execution[1] += gather_ns
            execution[2] += run_ns
            execution[3] += scatter_ns
        average = self.call_s.get(key)  # of the call alone, not a cold start before it
        took = done - started
        self.call_s[key] = took if average is None else average + 0.2 * (took - average)
        if stage.batching and executor.load_error is None:
            # For the batching controller: the service time of the call alone (not of
            # one stopped early: it ran less), and the latencies of requests sent once
            # the stage was loaded (a cold start is no consequence of its batching
            # choices).
            loaded_at = self.loaded_at.get(key, 0.0)
            latencies = [done - t.created for t in live if t.created >= loaded_at]
            size, service_s = (0, 0.0) if cut else (len(live), done - started)
            counters.batch_log.append((size, service_s, done, latencies, rows if size else 0))
            if size and key not in self.timed:
                self.timed.add(key)
                self.report_now = True
        for task, result in zip(live, results):
            if task.began is None:  # a first stage: the request's queueing ends here
                task.began = started
            self.forward(plan, facts, task, result)

    def load(self, app: int, stage: int) -> None:
        """Load a stage (a `Load`): unpickle its app's plan if not yet, build its
        executor."""
        plan = self.plan(app)
        if plan is not None and 0 <= stage < len(plan.stages):
            self.executor((app, stage), plan.stages[stage])

    def call(self, executor: StageExecutor, inputs: list, should_stop: Any) -> list:
        """One stage call (interrupted by raising `Interrupted` in it)."""
        return executor.run(inputs, should_stop=should_stop)

    def executor(self, key: tuple[int, int], stage: Stage) -> StageExecutor:
        """The stage's executor, loaded now if it is not (a cold start)."""
        loaded = self.executors.get(key)
        if loaded is not None:
            return loaded[0]
        with self.beat_lock:  # said before the load, which may hold the GIL throughout
            self.loading = key
            self.send(DRIVER, m.Beat(self.index, self.busy_since, key))
            self.told_loading = True
        self.flush_to_driver()  # said before the load starts, not only queued
        try:
            executor = StageExecutor(stage, self.kvs)
            collector.settle()  # the stage's model lives as long as the worker
        finally:
            with self.beat_lock:
                self.loading = None
                if self.told_loading:  # the driver routes around us until told
                    self.send(DRIVER, m.Beat(self.index, self.busy_since, None))
                    self.told_loading = False
        self.counters.setdefault(key, StageCounters()).cold_starts += 1
        self.dirty = True
        if executor.load_error is None:  # else tried again with the next request
            self.loaded_at[key] = now = time.monotonic()
            self.executors[key] = (executor, now)
        return executor

    def forward(self, plan: Plan, stage: StageFacts, task: Task, result: Any) -> None:
        if stage.to_driver:
            result_message = m.Result(task.app, task.rid, task.attempt, result, task.began)
            self.hold(DRIVER, result_message, task.rid)
        for consumer in stage.consumers:
            message = m.Input(
                task.app,
                task.rid,
                task.attempt,
                consumer,
                stage.stage.output,
                result,
                task.route,
                task.deadline,
                task.created if consumer in stage.chained else time.monotonic(),
                task.began,
            )
            chosen = targets(plan, consumer, task.route, result)
            if self.facts[task.app][consumer].located:
                for worker in chosen:  # the driver counts it against that worker
                    located = m.Located(task.app, task.rid, task.attempt, consumer, worker)
                    self.hold(DRIVER, located)
            for worker in chosen or (self.index,):
                if worker == self.index:
                    self.accept(message)
                else:
                    self.hold(worker, message, task.rid)
        if plan.anyof_races and isinstance(result, Table):
            self.cancel_rivals(plan, task)

    # -- upkeep -----------------------------------------------------------------------
    def report(self) -> None:
        stages = {
            key: (
                c.requests,
                c.batches,
                c.cold_starts,
                c.latencies,
                c.batch_log,
                c.service,
                c.stopped,
                c.executions,
            )
            for key, c in self.counters.items()
            if c.requests or c.cold_starts
        }
        queued = {key: len(q) for key, q in self.queues.items() if q}
        self.send(DRIVER, m.Stats(self.index, stages, queued, self.unloaded))
        self.counters.clear()
        self.unloaded = []
        self.dirty = bool(queued)
        self.report_now = False

    def housekeeping(self) -> None:
        now = time.monotonic()
        if now < self.next_housekeeping:
            return
        self.next_housekeeping = now + HOUSEKEEPING_EVERY_S
        for key, (_, used) in list(self.executors.items()):
            if now - used > self.idle_unload_s:
                del self.executors[key]  # unload an idle stage: its models are freed
                self.unloaded.append(key)
                self.dirty = True
        self.release_mappings()
        if now < self.next_forget:
            return
        if len(self.started) + len(self.cancelled) > 10_000 or len(self.waiting) > 1_000:
            self.next_forget = now + FORGET_EVERY_S
            limit = now - FORGET_AFTER_S
            self.started = {k: t for k, t in self.started.items() if t > limit}
            with self.cancel_lock:
                self.cancelled = {k: t for k, t in self.cancelled.items() if t > limit}
            self.waiting = {k: t for k, t in self.waiting.items() if t.created > limit}

    def release_mappings(self) -> None:
        """Unmap shared-memory values no longer forwarded: else they pin memory."""
        self.shm.forget_older_than(codec.FORWARD_WINDOW_S)

    def forget_app(self, app: int) -> None:
        self.deployed.pop(app, None)
        self.plans.pop(app, None)
        self.facts.pop(app, None)
        self._find_loosest()
        self.rule.forget(app)
        for mapping in (self.executors, self.loaded_at, self.queues, self.counters, self.call_s):
            for key in [k for k in mapping if k[0] == app]:
                del mapping[key]


def cancelled(keys: dict, app: int, rid: int, attempt: int, stage: int) -> bool:
    """Whether `keys` (`Cancel`s as (app, rid, attempt, stage), None: every one)
    cancel this run."""
    return (
        (app, rid, None, None) in keys
        or (app, rid, attempt, None) in keys
        or (app, rid, attempt, stage) in keys
    )


def _rows(inputs: dict[int, Any]) -> int:
    """Rows a request brings to a stage: its largest input table (a join's inputs may
    differ; an anyof's branches agree)."""
    return max((len(v) for v in inputs.values() if isinstance(v, Table)), default=0)


def late_inputs(plan: Plan, index: int) -> bool:
    """Whether stage `index` may get an input for a request after its run started:
    from a producer's competing replicas, or a second input (an anyof's other
    branches, a join's other side after one side failed)."""
    inputs = plan.stages[index].inputs
    return len(inputs) > 1 or any(plan.stage_of(i).replicas > 1 for i in inputs if i)


def stopped(stage: Stage) -> DeadlineError:
    return DeadlineError(
        f"stage {stage.name!r} stopped: the request was cancelled or passed its deadline"
    )


def watch_driver() -> None:
    """Exit as soon as the driver is gone: it holds our stdin open while it lives."""
    while sys.stdin.buffer.read(4096):
        pass
    os._exit(0)


def die_with_parent(parent: int) -> None:
    """Be killed when the driver's thread that started us ends, even while user
    code holds the GIL (Linux's parent-death signal; the stdin watch needs the GIL)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the stdin watch remains
        return
    if os.getppid() != parent:  # it died before we asked
        os._exit(0)


def main() -> None:
    """Entry point of a worker process: its configuration is one JSON line on stdin."""
    config = json.loads(sys.stdin.buffer.readline())
    die_with_parent(config["parent"])
    options = config["options"]
    logging.basicConfig(level=options.get("log_level", logging.WARNING))
    threading.Thread(target=watch_driver, name="serveflow:watchdog", daemon=True).start()
    Worker(config["index"], config["dir"], config["kvs"], options).serve()
    logging.shutdown()
    os._exit(0)  # not a normal exit: the watchdog thread is blocked reading stdin
