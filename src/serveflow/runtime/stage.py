"""`StageExecutor`: a stage loaded on a worker, run for one or more requests at once."""

from __future__ import annotations

import inspect
import traceback
from collections.abc import Sequence
from typing import Any

from serveflow.errors import InputError, OperatorError
from serveflow.logical.operators import AnyOf, Filter, Map, Op
from serveflow.logical.table import Table
from serveflow.optimizer.plan import Stage
from serveflow.runtime.kvs import KVS
from serveflow.runtime.operators import apply

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

    def run(self, requests: Sequence[Values]) -> list[Any]:
        """Each request's stage output (a Table) or the exception it failed with.

        `requests` hold the stage's input tables by op id. A batching map gets the
        rows of all requests in one call; if that call fails, the requests are
        retried one by one so that only the failing one fails.
        """
        if self.load_error is not None:
            return [self.load_error] * len(requests)
        values = [dict(r) for r in requests]
        for op in self.stage.ops:
            inputs = [[v.get(i) for i in op.inputs] for v in values]
            if self.stage.batching and isinstance(op, Map) and op.batching:
                outputs = self._run_merged(op, inputs)
            else:
                outputs = [self._run_one(op, args) for args in inputs]
            for v, out in zip(values, outputs):
                v[op.id] = out
        return [v[self.stage.output] for v in values]

    def _run_one(self, op: Op, inputs: list[Any]) -> Any:
        tables = [t for t in inputs if isinstance(t, Table)]
        if isinstance(op, AnyOf):  # the first input that is there and succeeded
            return tables[0] if tables else next(e for e in inputs if e is not None)
        if len(tables) < len(inputs):
            return next(e for e in inputs if not isinstance(e, Table))
        try:
            return apply(op, tables, self.fns.get(op.id), self.kvs)
        except Exception as error:
            return request_error(op, error)

    def _run_merged(self, op: Op, inputs: list[list[Any]]) -> list[Any]:
        live = [i for i, args in enumerate(inputs) if isinstance(args[0], Table)]
        if len(live) < 2:
            return [self._run_one(op, args) for args in inputs]
        tables = [inputs[i][0] for i in live]
        try:
            merged = apply(op, [Table.concat(tables)], self.fns[op.id], self.kvs)
        except Exception:
            return [self._run_one(op, args) for args in inputs]
        outputs = [args[0] for args in inputs]  # failures pass through
        for i, piece in zip(live, merged.split([len(t) for t in tables])):
            outputs[i] = piece
        return outputs
