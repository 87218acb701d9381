"""`Flow` and `Stream`: the user-facing dataflow builder. Builds a DAG of operators."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from serveflow.errors import FlowError
from serveflow.logical.operators import (
    AGGREGATES,
    JOIN_HOWS,
    Agg,
    AnyOf,
    Batching,
    Filter,
    GroupBy,
    Join,
    Lookup,
    Map,
    Op,
    Source,
    Union,
)

if TYPE_CHECKING:
    from serveflow.optimizer.plan import Plan
    from serveflow.optimizer.rules import Rules
    from serveflow.runtime.app import App, Runtime

SOURCE_ID = 0
# What may follow `groupby` while the stream is grouped.
_GROUPED_OK = (Filter, Agg)


def _fn_name(fn: Any, kind: str) -> str:
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return kind if name == "<lambda>" else name


class Stream:
    """The output of one operator; every operator method returns a new Stream."""

    def __init__(self, flow: Flow, op_id: int, grouped_by: str | None = None) -> None:
        self.flow = flow
        self.op_id = op_id
        self.grouped_by = grouped_by

    def map(
        self,
        fn: Callable[..., Any],
        *,
        names: list[str] | tuple[str, ...] | None = None,
        col: str | None = None,
        batching: bool | Batching = False,
        high_variance: bool = False,
        gpu: bool = False,
        name: str | None = None,
    ) -> Stream:
        """Row mode `fn(row)`; with `col`, `fn(value)` replaces that column; with
        `batching`, `fn(table)` (or `fn(list_of_values)` with `col`) returns one
        result per row. A class is instantiated once per worker and then called."""
        if not callable(fn):
            raise FlowError(f"map: fn must be callable, got {fn!r}")
        if names is not None:
            if isinstance(names, str) or not all(isinstance(n, str) for n in names):
                raise FlowError(f"map: names must be a list of strings, got {names!r}")
            if col is not None and len(names) != 1:
                raise FlowError(f"map: with col={col!r} give one name, got {list(names)}")
        if batching is True:
            batching = Batching()
        elif not isinstance(batching, Batching):
            if batching is not False:
                raise FlowError(f"map: batching must be a bool or sf.Batching, got {batching!r}")
            batching = None
        return self._add(
            Map,
            (self,),
            name or _fn_name(fn, "map"),
            fn=fn,
            names=tuple(names) if names is not None else None,
            col=col,
            batching=batching,
            high_variance=high_variance,
            gpu=gpu,
        )

    def filter(
        self, pred: Callable[..., Any], *, group: bool = False, name: str | None = None
    ) -> Stream:
        """Keep rows where `pred(row)` is true; `group=True` on a grouped stream calls
        `pred(table)` per group and keeps or drops whole groups."""
        if not callable(pred):
            raise FlowError(f"filter: pred must be callable, got {pred!r}")
        if group and self.grouped_by is None:
            raise FlowError("filter(group=True) needs a grouped stream: call groupby(col) first")
        return self._add(Filter, (self,), name or _fn_name(pred, "filter"), pred=pred, group=group)

    def groupby(self, col: str) -> Stream:
        if not isinstance(col, str):
            raise FlowError(f"groupby: col must be a column name, got {col!r}")
        return self._add(GroupBy, (self,), f"groupby_{col}", col=col)

    def agg(self, fn: str, col: str) -> Stream:
        if fn not in AGGREGATES:
            raise FlowError(f"agg: unknown function {fn!r}; use one of {', '.join(AGGREGATES)}")
        if not isinstance(col, str):
            raise FlowError(f"agg: col must be a column name, got {col!r}")
        return self._add(Agg, (self,), f"{fn}_{col}", fn=fn, col=col)

    def lookup(self, key: str, *, dynamic: bool = False, into: str | None = None) -> Stream:
        """Add a column from the key-value store; with `dynamic`, `key` names the
        column holding each row's key. A missing key gives None."""
        if not isinstance(key, str):
            raise FlowError(f"lookup: key must be a string, got {key!r}")
        into = into or (f"{key}_value" if dynamic else key)
        return self._add(Lookup, (self,), f"lookup_{into}", key=key, dynamic=dynamic, into=into)

    def join(self, other: Stream, *, on: str | None = None, how: str = "inner") -> Stream:
        """`on=None` joins rows derived from the same input row (same qid)."""
        if how not in JOIN_HOWS:
            raise FlowError(f"join: unknown how={how!r}; use one of {', '.join(JOIN_HOWS)}")
        if on is not None and not isinstance(on, str):
            raise FlowError(f"join: on must be a column name or None, got {on!r}")
        return self._add(Join, (self, other), f"join_{on or 'qid'}", on=on, how=how)

    def union(self, *others: Stream) -> Stream:
        if not others:
            raise FlowError("union: give at least one other stream")
        return self._add(Union, (self, *others), "union")

    def anyof(self, *others: Stream) -> Stream:
        """Per request, the output of whichever input finishes first."""
        if not others:
            raise FlowError("anyof: give at least one other stream")
        return self._add(AnyOf, (self, *others), "anyof")

    def extend(self, other: Flow) -> Stream:
        """Append `other`'s operators after this stream; returns `other`'s output."""
        if not isinstance(other, Flow):
            raise FlowError(f"extend: expected a sf.Flow, got {type(other).__name__}")
        if other is self.flow:
            raise FlowError("extend: a flow cannot extend itself")
        output = other.output_op()
        streams: dict[int, Stream] = {SOURCE_ID: self}
        for op in other.ops.values():
            if op.id == SOURCE_ID:
                continue
            inputs = tuple(streams[i] for i in op.inputs)
            fields = {f.name: getattr(op, f.name) for f in dataclasses.fields(op)}
            del fields["id"], fields["inputs"], fields["name"]
            streams[op.id] = inputs[0]._add(type(op), inputs, op.name, **fields)
        return streams[output]

    def _add(self, cls: type[Op], inputs: tuple[Stream, ...], name: str, **fields: Any) -> Stream:
        kind = cls.kind
        for stream in inputs:
            if not isinstance(stream, Stream):
                raise FlowError(f"{kind}: expected a stream, got {type(stream).__name__}")
            if stream.flow is not self.flow:
                raise FlowError(f"{kind}: cannot combine streams of different flows")
            if stream.grouped_by is not None and not issubclass(cls, _GROUPED_OK):
                raise FlowError(
                    f"{kind}: not allowed on a grouped stream; follow groupby with agg or filter"
                )
        flow = self.flow
        op_id = len(flow.ops)
        if any(op.name == name for op in flow.ops.values()):
            name = f"{name}_{op_id}"  # names key per-stage stats: keep them unique
        op = cls(id=op_id, inputs=tuple(s.op_id for s in inputs), name=name, **fields)
        flow.ops[op.id] = op
        grouped = fields["col"] if cls is GroupBy else self.grouped_by if cls is Filter else None
        return Stream(flow, op.id, grouped)


class Flow(Stream):
    """A pipeline: the stream of request tables, and the DAG built from it.

    `schema` maps input column names to types; requests are validated against it
    before any work is done.
    """

    def __init__(self, name: str, schema: Mapping[str, type | tuple[type, ...]] | None = None):
        if not isinstance(name, str) or not name:
            raise FlowError(f"Flow: name must be a non-empty string, got {name!r}")
        self.name = name
        self.schema = dict(schema) if schema else None
        self.ops: dict[int, Op] = {SOURCE_ID: Source(id=SOURCE_ID, inputs=(), name="request")}
        super().__init__(self, SOURCE_ID)

    def output_op(self) -> int:
        """The single sink of the DAG; FlowError for an empty or diverging flow."""
        if len(self.ops) == 1:
            raise FlowError(f"flow {self.name!r} is empty: add at least one operator")
        consumed = {i for op in self.ops.values() for i in op.inputs}
        sinks = [op for op in self.ops.values() if op.id not in consumed]
        if len(sinks) != 1:
            names = ", ".join(op.describe() for op in sinks)
            raise FlowError(
                f"flow {self.name!r} has {len(sinks)} outputs ({names}); "
                "join, union or anyof the branches into one"
            )
        return sinks[0].id

    def optimize(self, rules: Rules | None = None) -> Plan:
        from serveflow.optimizer import optimize

        return optimize(self, rules)

    def deploy(
        self,
        rules: Rules | None = None,
        runtime: Runtime | None = None,
        *,
        slo_ms: float | None = None,
    ) -> App:
        """Optimize and start serving; `runtime=None` starts a `sf.LocalRuntime()`
        that the returned app owns and stops with it. `slo_ms`: a latency budget for
        the whole flow, split across its batching stages (each then SLO-aware)."""
        from serveflow.optimizer import optimize
        from serveflow.optimizer.slo import assign_slo
        from serveflow.runtime.local import LocalRuntime

        owns = runtime is None
        runtime = LocalRuntime() if runtime is None else runtime
        try:
            plan = optimize(self, rules, gpus=bool(getattr(runtime, "gpus", None)))
            if slo_ms is not None:
                plan = assign_slo(plan, slo_ms)
            return runtime.deploy(plan, owns_runtime=owns)
        except BaseException:
            if owns:
                runtime.stop()
            raise

    def __repr__(self) -> str:
        return f"Flow({self.name!r}, {len(self.ops) - 1} operators)"
