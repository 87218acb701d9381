"""`Request`: one request's progress through a plan. Runtime-agnostic: it says which
stages can run next; a runtime decides where they run."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, InvalidStateError
from typing import Any

from serveflow.logical.flow import SOURCE_ID
from serveflow.logical.operators import AnyOf
from serveflow.logical.table import Table
from serveflow.optimizer.plan import Plan, Stage


class Request:
    """Tracks stage outputs of one request and resolves its future.

    A stage is dispatched once its inputs are there (for a stage that starts with
    `anyof`: once one input succeeded), and only while its output is still needed:
    when `anyof` or a competing replica has already moved on, queued copies are
    dropped via `wants`.
    """

    def __init__(self, plan: Plan, table: Table) -> None:
        self.plan = plan
        self.table = table
        self.future: Future[Table] = Future()
        self.created = time.perf_counter()
        self._outputs: dict[int, Any] = {SOURCE_ID: table}
        self._dispatched: set[int] = set()
        self._failures: dict[int, int] = {}
        self._lock = threading.Lock()

    def start(self) -> list[Stage]:
        """The stages to dispatch first."""
        with self._lock:
            ready = self._advance()
        self._settle()
        return ready

    def inputs(self, stage: Stage) -> dict[int, Any]:
        with self._lock:
            return {i: self._outputs[i] for i in stage.inputs if i in self._outputs}

    def wants(self, stage: Stage) -> bool:
        """Whether running `stage` can still change this request's result."""
        with self._lock:
            return self._needed(stage)

    def complete(self, stage: Stage, result: Any) -> list[Stage]:
        """Record a stage's output (a Table or an exception); returns the stages that
        became ready. A competing replica's later result is ignored; a failure counts
        only once every replica has failed."""
        with self._lock:
            if stage.output in self._outputs or self.plan.output in self._outputs:
                return []
            if not isinstance(result, Table):
                self._failures[stage.id] = self._failures.get(stage.id, 0) + 1
                if self._failures[stage.id] < stage.replicas:
                    return []
            self._outputs[stage.output] = result
            ready = self._advance()
        self._settle()  # outside the lock: future callbacks may call back into us
        return ready

    def fail(self, error: BaseException) -> None:
        with self._lock:
            self._outputs.setdefault(self.plan.output, error)
        self._settle()

    def _advance(self) -> list[Stage]:
        ready = []
        progressed = True
        while progressed and self.plan.output not in self._outputs:
            progressed = False
            for stage in self.plan.stages:
                if stage.id in self._dispatched or not self._needed(stage):
                    continue
                inputs = [self._outputs.get(i) for i in stage.inputs]
                if isinstance(stage.ops[0], AnyOf):  # needs one success, or all failed
                    runnable = None not in inputs or any(isinstance(x, Table) for x in inputs)
                else:
                    failed = next((x for x in inputs if isinstance(x, BaseException)), None)
                    if failed is not None:  # fails without running
                        self._dispatched.add(stage.id)
                        self._outputs[stage.output] = failed
                        progressed = True
                        continue
                    runnable = None not in inputs
                if runnable:
                    self._dispatched.add(stage.id)
                    ready.append(stage)
        return [] if self.plan.output in self._outputs else ready

    def _settle(self) -> None:
        result = self._outputs.get(self.plan.output)
        if result is None:
            return
        try:
            if isinstance(result, Table):
                self.future.set_result(result)
            else:
                self.future.set_exception(result)
        except InvalidStateError:  # already failed (deadline, shutdown) or cancelled
            pass

    def _needed(self, stage: Stage) -> bool:
        if self.future.done() or stage.output in self._outputs:
            return False
        if stage.output == self.plan.output:
            return True
        return any(
            c.id not in self._dispatched and self._needed(c)
            for c in self.plan.consumers(stage.output)
        )
