"""`StageExecutor`: a stage loaded on a worker, run for one or more requests at once."""

from __future__ import annotations

import inspect
import time
import traceback
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from serveflow.errors import DeadlineError, InputError, OperatorError
from serveflow.logical.operators import AnyOf, Filter, Map, Op
from serveflow.logical.table import Table
from serveflow.optimizer.plan import Stage
from serveflow.runtime.kvs import KVS
from serveflow.runtime.operators import Stopped, apply

# One request's values by op id: a Table, or the exception that request failed with.
Values = dict[int, Any]


def request_error(op: Op, error: Exception) -> Exception:
    """What a request fails with when `op` raised `error` on it."""
    if isinstance(error, InputError):
        return error
    text = "".join(traceback.format_exception(error))
    message = f"operator {op.name!r} ({op.kind}) failed: {type(error).__name__}: {error}"
    return OperatorError(message, op.name, text)


class StageExecutor:
    """Holds a stage warm: its functions loaded and model classes instantiated once
    (the cold start), then runs it on batches of requests."""

    def __init__(self, stage: Stage, kvs: KVS) -> None:
        self.stage = stage
        self.kvs = kvs
        self.fns: dict[int, Any] = {}
        self.load_error: Exception | None = None
        for op in stage.ops:
            fn = op.fn if isinstance(op, Map) else op.pred if isinstance(op, Filter) else None
            try:
                self.fns[op.id] = fn() if inspect.isclass(fn) else fn
            except Exception as error:  # a model that fails to load fails its requests
                self.load_error = request_error(op, error)
                break
        # (op, its loaded function, whether its requests are merged into one call)
        self.steps = [
            (op, self.fns.get(op.id), bool(stage.batching and isinstance(op, Map) and op.batching))
            for op in stage.ops
        ]
        self.output = stage.output
        # Of the last `run`: seconds spent merging the requests' rows into one table
        # for a batching map, and splitting its output back per request.
        self.gather_s = 0.0
        self.scatter_s = 0.0

    def run(
        self, requests: Sequence[Values], *, should_stop: Callable[[int], bool] | None = None
    ) -> list[Any]:
        """Each request's stage output (a Table) or the exception it failed with.

        `requests` hold the stage's input tables by op id. A batching map gets the
        rows of all requests in one call; if that call fails, the requests are
        retried one by one so that only the failing one fails.

        `should_stop(i)`, if given, is asked for request `requests[i]` before each
        operator and between the rows of a row-by-row map or filter; once it returns
        True the rest of that request's work is skipped and it fails with a
        `DeadlineError`.
        """
        if self.load_error is not None:
            return [self.load_error] * len(requests)
        values = [dict(r) for r in requests]
        self.gather_s = self.scatter_s = 0.0
        stopped: dict[int, DeadlineError] = {}  # request position -> what it fails with
        for op, fn, merged in self.steps:
            if merged:
                self._run_merged(op, fn, values, stopped, should_stop)
                continue
            for k, v in enumerate(values):  # a plain loop: this is the hot path
                if k in stopped:
                    continue
                if should_stop is not None and should_stop(k):
                    stopped[k] = self._stopped(op)
                    continue
                out = self._run_one(op, fn, list(map(v.get, op.inputs)), k, should_stop)
                if isinstance(out, Stopped):
                    stopped[k] = self._stopped(op)
                else:
                    v[op.id] = out
        return [stopped[k] if k in stopped else v[self.output] for k, v in enumerate(values)]

    def _stopped(self, op: Op) -> DeadlineError:
        return DeadlineError(
            f"stage {self.stage.name!r} stopped: deadline passed or request cancelled "
            f"at operator {op.name!r} ({op.kind})"
        )

    def _run_one(
        self,
        op: Op,
        fn: Any,
        inputs: list[Any],
        k: int = 0,
        should_stop: Callable[[int], bool] | None = None,
    ) -> Any:
        """The op's output for request `k`, the failure it passes on, or `Stopped`."""
        if isinstance(op, AnyOf):  # the first input that is there and succeeded
            for value in inputs:
                if isinstance(value, Table):
                    return value
            return next(e for e in inputs if e is not None)
        for value in inputs:
            # an upstream failure passes through: a join runs once one input failed,
            # while its other input may not be there yet (None)
            if isinstance(value, BaseException):
                return value
        try:
            stop = None if should_stop is None else partial(should_stop, k)
            return apply(op, inputs, fn, self.kvs, stop)
        except Stopped as signal:
            return signal
        except Exception as error:
            return request_error(op, error)

    def _run_merged(
        self,
        op: Op,
        fn: Any,
        values: list[Values],
        stopped: dict[int, DeadlineError],
        should_stop: Callable[[int], bool] | None,
    ) -> None:
        """A batching map: one call for the rows of all requests not stopped (asked
        first). If it fails, each is retried alone, unless it has been stopped since."""
        for k in range(len(values)):
            if k not in stopped and should_stop is not None and should_stop(k):
                stopped[k] = self._stopped(op)
        live = [k for k in range(len(values)) if k not in stopped]
        inputs = [values[k].get(op.inputs[0]) for k in live]  # a map has one input
        tables = [t for t in inputs if isinstance(t, Table)]
        if len(tables) < 2:
            outputs = [self._run_one(op, fn, [t]) for t in inputs]
        else:
            started = time.perf_counter()
            table = Table.concat(tables)
            self.gather_s += time.perf_counter() - started
            try:
                merged = apply(op, [table], fn, self.kvs)
            except Exception:
                outputs = [
                    Stopped() if should_stop and should_stop(k) else self._run_one(op, fn, [t])
                    for k, t in zip(live, inputs)
                ]
            else:
                started = time.perf_counter()
                pieces = iter(merged.split([len(t) for t in tables]))
                self.scatter_s += time.perf_counter() - started
                outputs = [next(pieces) if isinstance(t, Table) else t for t in inputs]
        for k, out in zip(live, outputs):
            if isinstance(out, Stopped):
                stopped[k] = self._stopped(op)
            else:
                values[k][op.id] = out
