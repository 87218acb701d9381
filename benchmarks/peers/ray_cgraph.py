"""Ray Compiled Graphs peer: a chain of identity actors compiled into one graph.

`RayCompiledChain(stages=3)` uses Ray's fastest path (`ray.dag`): `stages` actors,
chained `InputNode -> a1.forward -> a2.forward -> a3.forward` with `.bind()`, then
`experimental_compile()`. A request is `dag.execute(payload)` (a CompiledDAGRef) and
`ray.get` on it; the payload moves over Ray's shared-memory channels, with no task
submission per request. Each actor gets `num_cpus=0` so all of them fit on a 2-core
machine (as the Ray Serve peer's deployments do).

In-flight requests: a compiled graph accepts at most `_max_inflight_executions`
executions not yet read back (Ray's default is 10). `MAX_INFLIGHT` (32) is asked for;
when this Ray's `experimental_compile` does not take it, the graph runs at Ray's
default and `max_inflight` / `note` say so.

A compiled graph is not thread-safe: `call()` runs execute + get on the caller's
thread, and `submit()` hands requests to one driver thread that keeps up to
`max_inflight` executions in the graph and reads results back in order; a lock keeps
the two apart.

Ray is started once per process (loopback, no dashboard, num_cpus=2), or reused if
already running (e.g. by the Ray Serve peer). `close()` tears the graph down and kills
the actors, each step bounded in time, and shuts Ray down only if it started it.

Requires `ray` (the `bench` extra).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

log = logging.getLogger(__name__)

MAX_INFLIGHT = 32
NUM_CPUS = 2
TEARDOWN_TIMEOUT_S = 30.0

_STOP = object()


def start_ray() -> tuple[Any, bool]:
    """The `ray` module, with a local Ray running; True when this call started it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return ray, False
    ray.init(
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        object_store_memory=256 * 1024 * 1024,
        num_cpus=NUM_CPUS,
    )
    return ray, True


def _bounded(what: str, fn: Callable[[], Any], timeout_s: float) -> bool:
    """Run `fn` on a daemon thread; False (logged) when it raised or did not return in
    `timeout_s` (it is then left behind; the thread cannot hold the process open)."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as error:  # reported below
            failed.append(error)

    thread = threading.Thread(target=run, daemon=True, name=f"ray-cgraph-{what}")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        log.warning("ray compiled graph: %s did not finish in %.0f s; left behind", what, timeout_s)
        return False
    if failed:
        log.warning("ray compiled graph: %s failed: %r", what, failed[0])
        return False
    return True


class RayCompiledChain:
    """`stages` identity actors in one compiled graph; `call(payload)` is one request."""

    def __init__(
        self,
        stages: int = 3,
        *,
        max_inflight: int = MAX_INFLIGHT,
        steps: Sequence[Callable[..., Any]] | None = None,
    ) -> None:
        """`steps`: instead of identities, one function per actor, applied to the
        payload in turn (a class is instantiated once in its actor, then called)."""
        if stages < 1:
            raise ValueError(f"stages must be >= 1, got {stages}")
        self._ray, self._owns_ray = start_ray()
        ray = self._ray
        from ray.dag import InputNode

        @ray.remote(num_cpus=0)
        class Step:
            def __init__(self, step: Callable[..., Any] | None) -> None:
                self.fn = step() if isinstance(step, type) else step

            def forward(self, payload: Any) -> Any:
                return payload if self.fn is None else self.fn(payload)

        self._actors = [Step.remote(step) for step in (steps or [None] * stages)]
        with InputNode() as inp:
            node = inp
            for actor in self._actors:
                node = actor.forward.bind(node)
        self.note: str | None = None
        try:
            self.dag = node.experimental_compile(_max_inflight_executions=max_inflight)
            self.max_inflight = max_inflight
        except TypeError as error:  # an older Ray without the argument
            from ray.dag import DAGContext

            self.max_inflight = int(DAGContext.get_current().max_inflight_executions)
            self.note = (
                f"_max_inflight_executions unsupported by ray {ray.__version__} ({error}); "
                f"throughput at Ray's limit of {self.max_inflight} in flight"
            )
            log.warning("ray compiled graph: %s", self.note)
            self.dag = node.experimental_compile()
        self.ray_version = ray.__version__
        self.ray_cpus = ray.cluster_resources().get("CPU")
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._driver: threading.Thread | None = None
        self._closed = False

    def call(self, payload: Any) -> Any:
        with self._lock:
            return self._ray.get(self.dag.execute(payload))

    def submit(self, payload: Any) -> Future[Any]:
        """One request as a concurrent.futures.Future, run by the driver thread."""
        if self._driver is None:
            self._driver = threading.Thread(target=self._drive, daemon=True, name="ray-cgraph")
            self._driver.start()
        future: Future[Any] = Future()
        self._jobs.put((future, payload))
        return future

    def _drive(self) -> None:
        """Keep up to `max_inflight` executions in the graph; read them back in order."""
        pending: deque[tuple[Future[Any], Any]] = deque()
        stopping = False
        while True:
            if not pending:
                if stopping:
                    return
                job = self._jobs.get()
                if job is _STOP:
                    return
                self._start(job, pending)
            while len(pending) < self.max_inflight and not stopping:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is _STOP:
                    stopping = True
                else:
                    self._start(job, pending)
            future, ref = pending.popleft()
            try:
                with self._lock:
                    result = self._ray.get(ref)
            except Exception as error:
                future.set_exception(error)
            else:
                future.set_result(result)

    def _start(self, job: tuple[Future[Any], Any], pending: deque[tuple[Future[Any], Any]]) -> None:
        future, payload = job
        try:
            with self._lock:
                ref = self.dag.execute(payload)
        except Exception as error:
            future.set_exception(error)
        else:
            pending.append((future, ref))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._driver is not None:
            self._jobs.put(_STOP)
            self._driver.join(timeout=30)
        ray = self._ray
        _bounded("teardown", lambda: self.dag.teardown(kill_actors=True), TEARDOWN_TIMEOUT_S)
        for actor in self._actors:
            try:
                ray.kill(actor)
            except Exception as error:  # already gone after kill_actors
                log.debug("ray.kill: %r", error)
        if self._owns_ray:
            _bounded("ray.shutdown", ray.shutdown, TEARDOWN_TIMEOUT_S)

    def __enter__(self) -> RayCompiledChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
