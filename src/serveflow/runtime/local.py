"""The embedded runtime: every stage served by a pool of workers on this machine.

Workers are threads here; each holds its own warm `StageExecutor` (a model class is
instantiated once per worker, on its first request: the cold start).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

from serveflow.optimizer.plan import Plan, Stage
from serveflow.runtime.app import App
from serveflow.runtime.kvs import KVS, MemoryKVS
from serveflow.runtime.request import Request
from serveflow.runtime.stage import StageExecutor
from serveflow.runtime.stats import StageStats

log = logging.getLogger(__name__)


class StagePool:
    """A queue of (request, enqueued-at) for one stage and the workers draining it.

    A batching stage's worker takes up to `batching.size` queued requests at once,
    waiting up to `batching.timeout_ms` after the oldest for a batch to fill.
    """

    def __init__(self, stage: Stage, kvs: KVS, workers: int, app: LocalApp) -> None:
        self.stage = stage
        self.stats = StageStats()
        self._kvs = kvs
        self._app = app
        self._queue: deque[tuple[Request, float]] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"serveflow:{stage.name}:{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def workers(self) -> int:
        return len(self._threads)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit(self, request: Request) -> None:
        with self._ready:
            self._queue.append((request, time.perf_counter()))
            self._ready.notify()

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        for thread in self._threads:
            thread.join()

    def _take(self) -> list[tuple[Request, float]]:
        """The next batch of still-wanted requests; [] once closed and empty."""
        policy = self.stage.batching
        limit = policy.size if policy else 1
        wait_s = (policy.timeout_ms or 0) / 1e3 if policy else 0.0
        batch: list[tuple[Request, float]] = []
        with self._ready:
            while True:
                while self._queue and len(batch) < limit:
                    item = self._queue.popleft()
                    if item[0].wants(self.stage):  # anyof or a replica may have moved on
                        batch.append(item)
                if self._closed or len(batch) >= limit:
                    return batch
                if batch:
                    remaining = batch[0][1] + wait_s - time.perf_counter()
                    if remaining <= 0:
                        return batch
                    self._ready.wait(remaining)
                else:
                    self._ready.wait()

    def _work(self) -> None:
        executor: StageExecutor | None = None
        while batch := self._take():
            if executor is None:
                executor = StageExecutor(self.stage, self._kvs)
                self.stats.record_cold_start()
            try:
                results = executor.run([request.inputs(self.stage) for request, _ in batch])
            except Exception as error:  # a bug of ours: fail these requests, keep serving
                log.exception("stage %r crashed", self.stage.name)
                results = [error] * len(batch)
            if executor.load_error is not None:
                executor = None  # try loading again for the next batch
            done = time.perf_counter()
            self.stats.record_batch([done - enqueued for _, enqueued in batch])
            for (request, _), result in zip(batch, results):
                self._app.dispatch(request, request.complete(self.stage, result))


class LocalApp(App):
    def __init__(self, plan: Plan, runtime: LocalRuntime, owns_runtime: bool) -> None:
        super().__init__(plan, runtime, owns_runtime, runtime.max_in_flight)
        self._pools = {
            stage.id: StagePool(
                stage, runtime.kvs, max(runtime.workers_per_stage, stage.replicas), self
            )
            for stage in plan.stages
        }

    def _submit(self, request: Request) -> None:
        self.dispatch(request, request.start())

    def dispatch(self, request: Request, stages: list[Stage]) -> None:
        for stage in stages:
            for _ in range(stage.replicas):  # competing copies: first result wins
                self._pools[stage.id].submit(request)

    def stats(self) -> dict[str, dict[str, Any]]:
        figures = {}
        for pool in self._pools.values():
            entry = pool.stats.snapshot() | {"workers": pool.workers, "queue": pool.queued}
            if pool.stage.batching:
                entry |= {
                    "batch_size": pool.stage.batching.size,
                    "timeout_ms": pool.stage.batching.timeout_ms or 0.0,
                }
            figures[pool.stage.name] = entry
        return figures

    def _shutdown(self) -> None:
        for pool in self._pools.values():
            pool.close()


class LocalRuntime:
    """The embedded runtime on this machine, the default of `flow.deploy()`.

    `workers_per_stage`: workers serving each stage (at least a stage's replicas).
    `kvs`: the key-value store behind `lookup` and `app.kvs` (default: in memory).
    `max_in_flight`: requests an app holds at once; more fail fast with OverloadError.
    """

    def __init__(
        self, *, workers_per_stage: int = 2, kvs: KVS | None = None, max_in_flight: int = 10_000
    ) -> None:
        if workers_per_stage < 1:
            raise ValueError(f"workers_per_stage must be >= 1, got {workers_per_stage}")
        self.workers_per_stage = workers_per_stage
        self.max_in_flight = max_in_flight
        self.kvs: KVS = kvs if kvs is not None else MemoryKVS()
        self._apps: list[LocalApp] = []

    def deploy(self, plan: Plan, *, owns_runtime: bool = False) -> LocalApp:
        app = LocalApp(plan, self, owns_runtime)
        self._apps.append(app)
        return app

    def stop(self) -> None:
        """Stop every app deployed on this runtime."""
        apps, self._apps = self._apps, []
        for app in apps:
            app.stop()
