"""`RayEngine`: workers as Ray actors, messages as actor calls.

Each worker is an actor (`WorkerActor`) holding the same worker loop as a local
process (`worker.Worker`, here `RayWorker`): it loads stages on demand, batches by the
same `BatchRule`, and sends each output straight to the actors of the next stages
(`deliver`, a call that returns nothing). Ray carries the message: small ones inline
in the call, large values (over Ray's ~100 KB inline limit) through the object store,
passed by reference from actor to actor and read zero-copy on the receiving node. The
driver only sends a request's table to its first stages and receives the last
stage's result: nothing in between passes through it.

What a worker tells the driver (`Hello`, `Result`, `Done`, `Located`, `Beat`,
`Stats`) waits in its outbox; the driver keeps one `outbox()` call outstanding per
actor and `ray.wait`s on all of them from one thread. An actor that dies fails that
call: `exited()` reports it and the control plane re-runs its requests elsewhere.

A cancellation (`Cancel`) is taken by the actor's event loop at once, also while the
worker thread runs a stage; when every request of the call in progress is cancelled,
`Interrupted` is raised in that thread (at its next bytecode: a call blocked in C,
such as a sleep, notices when it returns).

Ray is imported only here and in `cluster.py`: the core install does not need it.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import pickle
import queue
import sys
import threading
import time
from typing import Any

import cloudpickle
import ray

from serveflow.errors import InputError
from serveflow.optimizer.plan import Plan
from serveflow.runtime import messages as m
from serveflow.runtime import procfs
from serveflow.runtime.engine import Events, ThreadTimes
from serveflow.runtime.stage import StageExecutor
from serveflow.runtime.worker import DRIVER, Interrupted, Worker

log = logging.getLogger(__name__)

POLL_S = 0.05  # the receiver looks for new actors at least this often
STOP_TIMEOUT_S = 5.0


class PickledResult:
    """A result's value pickled by its worker: a value that cannot travel then fails
    only its request (`Worker.unsendable`), never the whole outbox."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


def _pickle(value: Any) -> bytes:
    """`value` pickled by the C pickler, or by cloudpickle when it holds what only
    cloudpickle can write (a lambda, a class defined in a function)."""
    try:
        return pickle.dumps(value, protocol=5)
    except Exception:
        return cloudpickle.dumps(value, protocol=5)


def _async_raise(thread_id: int, error: type[BaseException] | None) -> None:
    """Raise `error` in thread `thread_id` at its next bytecode (None: take back one
    not raised yet)."""
    exc = None if error is None else ctypes.py_object(error)  # None: NULL
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), exc)


class RayWorker(Worker):
    """The worker loop of `worker.Worker` inside an actor: messages come from the
    actor's `deliver` calls, go to other actors' `deliver` and to the driver's
    outbox poll."""

    def __init__(
        self, index: int, prefix: str, namespace: str, kvs_address: str, options: dict
    ) -> None:
        self.prefix, self.namespace = prefix, namespace
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.outbox: list[Any] = []
        self.outbox_lock = threading.Lock()
        self.wake: Any = None  # set by the actor: tells its outbox call a message waits
        self.peers: dict[int, Any] = {}
        self.early: dict[int, list[Any]] = {}  # per app not deployed yet: its messages
        self.peers_held: dict[int, list[Any]] | None = None  # see `run_batch`
        self.undeployed: set[int] = set()
        self.thread_id = 0
        self.interruptible: int | None = None  # the serial of the call that may be interrupted
        self.interrupt_lock = threading.Lock()
        super().__init__(index, "", kvs_address, options)

    def open_transport(self, directory: str) -> None:
        """No sockets or shared memory: Ray carries the messages."""

    def release_mappings(self) -> None:
        """Nothing mapped: the object store frees values once no reference is left."""

    def flush_to_driver(self) -> None:
        """Nothing to flush: the driver takes the outbox (a silent actor gets 6 s)."""

    def serve(self) -> None:
        self.thread_id = threading.get_ident()
        self.send(DRIVER, m.Hello(self.index, os.getpid(), procfs.host()))
        threading.Thread(target=self.heartbeat, name="serveflow:heartbeat", daemon=True).start()
        try:
            self.loop()
        finally:
            self.running = False
            self.post(None)  # the outbox says the worker is gone

    def handle(self, message: Any) -> None:
        """As `Worker.handle`; but Ray may run a worker's calls out of the order they
        were made (an actor with a thread of its own), so a stage's `Input` or `Load`
        can come before its app's `Deploy`: it waits for it here."""
        if isinstance(message, m.Input | m.Load) and message.app not in self.deployed:
            if message.app not in self.undeployed:
                self.early.setdefault(message.app, []).append(message)
            return
        super().handle(message)
        if isinstance(message, m.Deploy):
            for early in self.early.pop(message.app, ()):
                super().handle(early)
        elif isinstance(message, m.Undeploy):
            self.undeployed.add(message.app)
            self.early.pop(message.app, None)

    def poll(self) -> Any:
        try:
            return self.inbox.get_nowait()
        except queue.Empty:
            return None

    def held_back(self, timeout_s: float) -> Any:
        """None: the inbox has no bound, so no sender holds messages back (and this
        worker has no socket to wait on)."""
        return None

    def datagrams(self) -> int:
        return 0  # no socket (see `held_back`)

    def next_message(self, timeout: float) -> Any:
        try:
            return self.inbox.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def decode(self, data: Any) -> Any:
        if not m.well_formed(data):
            log.warning("dropping a malformed %s message", type(data).__name__)
            return None
        return data

    def read_plan(self, where: Any) -> Plan:
        return cloudpickle.loads(where)  # the bytes `RayEngine.publish` sent

    def send(self, worker: int, message: tuple, rid: int = 0) -> None:
        if worker == DRIVER:
            if isinstance(message, m.Result):
                try:
                    data = _pickle(message.value)
                except Exception as error:
                    data = _pickle(self.unsendable(message, error).value)
                message = message._replace(value=PickledResult(data))
            self.post(message)
            return
        if worker == self.index:
            self.inbox.put(message)
            return
        if self.peers_held is not None:
            self.peers_held.setdefault(worker, []).append(message)
        else:
            self.deliver(worker, [message])

    def hold(self, worker: int, message: tuple, rid: int = 0) -> None:
        self.send(worker, message, rid)  # `send` holds what goes to other workers

    def run_batch(self, plan: Plan, facts: Any, key: tuple[int, int], batch: list) -> None:
        """As `Worker.run_batch`; what the call sends to other workers goes once it
        is over, one actor call per worker (a batch's outputs in one)."""
        self.peers_held = {}
        try:
            super().run_batch(plan, facts, key, batch)
        finally:
            held, self.peers_held = self.peers_held, None
            for worker, messages in held.items():
                self.deliver(worker, messages)

    def deliver(self, worker: int, messages: list[Any]) -> None:
        peer = self.peer(worker)
        if peer is None:
            return  # gone: the driver re-runs the request
        try:
            peer.deliver.remote(messages)
        except Exception:  # an output that cannot travel fails its request alone
            for message in messages:
                try:
                    peer.deliver.remote([message])
                except Exception as error:
                    if not isinstance(message, m.Input):
                        raise
                    peer.deliver.remote([self.unsendable(message, error)])

    def post(self, message: Any) -> None:
        with self.outbox_lock:
            self.outbox.append(message)
            wake = self.wake
        if wake is not None:
            wake()

    def peer(self, worker: int) -> Any:
        """The actor of worker `worker`, or None once it is gone."""
        handle = self.peers.get(worker)
        if handle is None:
            try:
                handle = ray.get_actor(f"{self.prefix}{worker}", namespace=self.namespace)
            except ValueError:
                log.debug("worker %d is gone; dropping a message", worker)
                return None
            self.peers[worker] = handle
        return handle

    def call(self, executor: StageExecutor, inputs: list, should_stop: Any) -> list:
        with self.interrupt_lock:
            self.interruptible = self.run_serial
        try:
            return executor.run(inputs, should_stop=should_stop)
        finally:
            self.interruptible = None  # before anything that could take an exception
            with self.interrupt_lock:  # an interrupt() in progress has raised by now
                _async_raise(self.thread_id, None)  # one not raised yet is taken back

    def interrupt(self) -> None:
        """Raise `Interrupted` in the stage call that `cancel_now` found all cancelled,
        if that call is still running (never outside `call`)."""
        with self.interrupt_lock:
            if self.interruptible is not None and self.interruptible == self.interrupt_serial:
                _async_raise(self.thread_id, Interrupted)


class WorkerActor:
    """A Ray actor running one `RayWorker` on a thread of its own; its event loop
    takes messages (`deliver`) and hands the driver what the worker has said
    (`outbox`)."""

    def __init__(
        self,
        index: int,
        prefix: str,
        namespace: str,
        kvs_address: str,
        options: dict,
        paths: list[str],
    ) -> None:
        # the driver's import paths that exist here: its modules (the user's functions
        # pickled by reference) import as they do in local worker processes
        sys.path[:0] = [p for p in paths if p not in sys.path and os.path.isdir(p)]
        logging.basicConfig(level=options.get("log_level", logging.WARNING))
        self.worker = RayWorker(index, prefix, namespace, kvs_address, options)
        self.event: Any = None
        threading.Thread(target=self.worker.serve, name="serveflow:worker", daemon=True).start()

    @ray.method(num_returns=0)  # nothing to wait for: no return object to track
    async def deliver(self, messages: list[Any]) -> None:
        """Take `messages`, in order."""
        for message in messages:
            if isinstance(message, m.Cancel):
                self.worker.cancel_now(message, self.worker.interrupt)
            else:
                self.worker.inbox.put(message)

    async def outbox(self) -> tuple[list[Any], bool]:
        """What the worker said since the last call, once it has said something;
        True when the worker loop ended (an `Exit`)."""
        worker = self.worker
        if self.event is None:
            self.event = asyncio.Event()
            loop, event = asyncio.get_running_loop(), self.event
            with worker.outbox_lock:
                worker.wake = lambda: loop.call_soon_threadsafe(event.set)
        while True:
            with worker.outbox_lock:
                messages, worker.outbox = worker.outbox, []
                self.event.clear()
            if messages:
                closed = messages[-1] is None
                return [x for x in messages if x is not None], closed
            await self.event.wait()


class RayEngine:
    """Starts `WorkerActor`s (`num_cpus` each, `num_gpus=1` for a GPU worker) named
    `<prefix><index>` in `namespace`, carries messages to them and reports theirs."""

    def __init__(
        self,
        kvs_address: str,
        options: dict[str, Any],
        *,
        namespace: str,
        num_cpus: float,
        owns_ray: bool,
    ) -> None:
        self._kvs_address = kvs_address
        self._options = options
        self._namespace = namespace
        self._num_cpus = num_cpus
        self._owns_ray = owns_ray
        self._prefix = f"serveflow-{os.getpid()}-{id(self):x}-w"
        self._actor = ray.remote(WorkerActor)
        self._handles: dict[int, Any] = {}
        self._polls: dict[Any, int] = {}  # outstanding outbox calls
        self._pids: dict[int, int] = {}
        self._local_pids: dict[int, int] = {}  # of the actors on this machine
        self._gone: dict[int, str] = {}
        self._lock = threading.Lock()
        self._receiver: threading.Thread | None = None
        self._closing = False
        self._receiver_id = 0
        self._events: Events | None = None
        self._held: dict[int, list[Any]] | None = None  # see `send`

    def start(self, events: Events) -> None:
        self._events = events
        self._receiver = threading.Thread(
            target=self._receive, args=(events,), name="serveflow:ray-receiver", daemon=True
        )
        self._receiver.start()

    def start_worker(self, index: int, device: int | None) -> None:
        try:
            handle = self._actor.options(
                name=f"{self._prefix}{index}",
                namespace=self._namespace,
                num_cpus=self._num_cpus,
                num_gpus=0 if device is None else 1,
                max_restarts=0,
                max_concurrency=1000,
            ).remote(
                index,
                self._prefix,
                self._namespace,
                self._kvs_address,
                self._options,
                [p for p in sys.path if p],
            )
            poll = handle.outbox.remote()
        except Exception as error:  # reported as a worker that exited
            log.exception("cannot start worker %d", index)
            with self._lock:
                self._gone[index] = f"could not start: {error}"
            return
        with self._lock:
            self._handles[index] = handle
            self._polls[poll] = index

    def send(self, worker: int, message: Any, rid: int = 0) -> None:
        """Deliver now; or, from the receiver thread while it hands the control plane
        a batch of worker messages (results settle futures, whose callbacks start
        requests), once the batch is handled: one call per worker for all of them."""
        if self._held is not None and threading.get_ident() == self._receiver_id:
            self._held.setdefault(worker, []).append(message)
            return
        handle = self._handles.get(worker)
        if handle is not None:  # else gone: `exited` reports it
            handle.deliver.remote([message])

    def _deliver_held(self) -> None:
        held, self._held = self._held or {}, None
        for worker, messages in held.items():
            handle = self._handles.get(worker)
            if handle is None:
                continue
            try:
                handle.deliver.remote(messages)
            except Exception:  # one that cannot travel: alone, it fails only its request
                for message in messages:
                    try:
                        handle.deliver.remote([message])
                    except Exception as error:
                        self._unsendable(message, error)

    def _unsendable(self, message: Any, error: Exception) -> None:
        """Fail the request whose table could not be sent, as `ControlPlane._route`
        does when `send` raises."""
        if not isinstance(message, m.Input) or self._events is None:
            log.exception("cannot send a %s to a worker", type(message).__name__)
            return
        failure = InputError(
            f"the request cannot be sent to a worker: {type(error).__name__}: {error}"
        )
        self._events.on_message(m.Result(message.app, message.rid, message.attempt, failure))

    def publish(self, app: int, plan: Plan) -> m.Deploy:
        """The plan's bytes travel in the `Deploy` itself (through the object store
        when large, as any actor call's argument)."""
        return m.Deploy(app, cloudpickle.dumps(plan))

    def unpublish(self, app: int) -> None:
        """Nothing kept: each worker holds the plans it was sent."""

    def kill(self, index: int) -> None:
        handle = self._handles.get(index)
        if handle is not None:
            ray.kill(handle, no_restart=True)

    def exited(self) -> dict[int, str]:
        with self._lock:
            gone, self._gone = self._gone, {}
        return gone

    def worker_pids(self) -> list[int]:
        with self._lock:
            return [self._pids[i] for i in self._handles if i in self._pids]

    def suspended(self, index: int) -> bool:
        """Whether an actor on this machine is stopped; False (unknown) for one on
        another node (its late heartbeats then get longer)."""
        with self._lock:
            pid = self._local_pids.get(index)
        return pid is not None and procfs.stopped(pid)

    def threads(self, index: int) -> dict[int, ThreadTimes] | None:
        """Unknown: this engine cannot tell when it has read every message an actor
        sent (`caught_up_at`), so a silent actor that is not stopped gets the longer
        allowance."""
        return None

    def caught_up_at(self) -> float:
        return time.monotonic()  # not used: threads are unknown

    def sweep(self, keep: set[int]) -> None:
        """Nothing to do: Ray frees a value once no reference to it is left."""

    def stop(self) -> None:
        with self._lock:
            handles = dict(self._handles)
        for handle in handles.values():
            handle.deliver.remote([m.Exit()])
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            with self._lock:
                if not self._handles:
                    break
            time.sleep(0.02)
        self._closing = True
        if self._receiver is not None:
            self._receiver.join()
        for handle in handles.values():
            ray.kill(handle, no_restart=True)
        if self._owns_ray:
            ray.shutdown()

    # -- the receiver ---------------------------------------------------------------------
    def _receive(self, events: Events) -> None:
        self._receiver_id = threading.get_ident()
        while not self._closing:
            with self._lock:
                polls = list(self._polls)
            if not polls:
                time.sleep(POLL_S)
                continue
            ready, rest = ray.wait(polls, num_returns=1, timeout=POLL_S)
            if ready and rest:
                ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            self._held = {}
            try:
                for poll in ready:
                    self._take(poll, events)
            finally:
                self._deliver_held()

    def _take(self, poll: Any, events: Events) -> None:
        with self._lock:
            index = self._polls.pop(poll)
        try:
            messages, closed = ray.get(poll)
        except Exception as error:  # the actor died (killed, crashed, its node left)
            why = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            closed, messages = True, []
            with self._lock:
                self._gone[index] = why
        for message in messages:
            self._report(index, message, events)
        with self._lock:
            if closed:
                handle = self._handles.pop(index, None)
                self._pids.pop(index, None)
                self._local_pids.pop(index, None)
                self._gone.setdefault(index, "exited")
            else:
                self._polls[self._handles[index].outbox.remote()] = index
                handle = None
        if handle is not None:  # its loop ended: the actor goes too
            ray.kill(handle, no_restart=True)

    def _report(self, index: int, message: Any, events: Events) -> None:
        if isinstance(message, m.Hello):
            with self._lock:
                self._pids[index] = message.pid
                if message.host and message.host == procfs.host():
                    self._local_pids[index] = message.pid
        elif isinstance(message, m.Result) and isinstance(message.value, PickledResult):
            message = message._replace(value=pickle.loads(message.value.data))
        try:
            events.on_message(message)
        except Exception:  # never let one bad message stop every request
            log.exception("failed to handle %s from a worker", type(message).__name__)
