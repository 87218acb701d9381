"""The messages of the runtime's internal plane, one type each.

The control plane speaks to workers (and workers to each other) only in these; an
engine carries them (datagrams between local processes, actor calls on Ray). They are
named tuples: typed fields for readers, the cost of a tuple on the wire.

A receiver accepts only these types (`is_message`), a worker only with fields it can
act on (`well_formed`), and drops anything else with a log line, so a malformed
message can never take a receiving thread down.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, NamedTuple

Route = tuple[tuple[int, ...], ...]  # per stage index: the worker indices that run it

# -- control plane -> worker ---------------------------------------------------------------


class Deploy(NamedTuple):
    """A plan to serve as app `app`: cloudpickled, in the file at `path` that the
    process engine wrote (kept until the app is undeployed), or the bytes themselves
    (the Ray engine)."""

    app: int
    path: Any


class Undeploy(NamedTuple):
    app: int


class Load(NamedTuple):
    """Load (warm) a stage before its requests come."""

    app: int
    stage: int


class Policy(NamedTuple):
    """The batch size and timeout a batching controller chose for a stage."""

    app: int
    stage: int
    size: int
    timeout_s: float


class Cancel(NamedTuple):
    """Drop a request's queued work (its running work stops after the operator call
    in progress): every stage of it, or only `stage` (an anyof's losing branch); of
    every attempt, or only `attempt` (one re-run since, which must go on)."""

    app: int
    rid: int
    stage: int | None = None
    attempt: int | None = None


class Exit(NamedTuple):
    """Finish and exit (a retired worker, or the runtime stopping)."""


# -- control plane or worker -> worker -----------------------------------------------------


class Input(NamedTuple):
    """The output of op `op` (0: the request table) for stage `stage` of request
    `rid`, sent at `sent` (time.monotonic: the stage's latency counts from there; in
    an anyof branch, when the branch's run before it was sent: `StageFacts.chained`).
    `began`: when the request's first stage run began (None in the driver's inputs)."""

    app: int
    rid: int
    attempt: int
    stage: int
    op: int
    value: Any  # a Table, or the exception the request failed with upstream
    route: Route
    deadline: float | None
    sent: float
    began: float | None = None


# -- worker -> control plane ---------------------------------------------------------------


class Hello(NamedTuple):
    worker: int
    pid: int
    host: str = ""  # procfs.host(): where `pid` means this process


class Result(NamedTuple):
    """The request's output (a Table) or the exception it failed with; `began`: when
    its first stage run began (time.monotonic), None if no stage ran."""

    app: int
    rid: int
    attempt: int
    value: Any
    began: float | None = None


class Done(NamedTuple):
    """A competing run (a replica, an anyof branch) ended or was dropped: its worker is
    free of it."""

    worker: int
    app: int
    rid: int
    attempt: int
    stage: int


class Located(NamedTuple):
    """A locality stage's run, whose key only a worker knew, was sent to `target`."""

    app: int
    rid: int
    attempt: int
    stage: int
    target: int


class Beat(NamedTuple):
    """Sent every heartbeat: since when the worker has been running a stage call
    (None: idle), and the (app, stage) it is loading, if any."""

    worker: int
    busy_since: float | None
    loading: tuple[int, int] | None = None


class Stats(NamedTuple):
    """Figures since the last report: per (app, stage) `(requests, batches, cold
    starts, latencies, batch log, service times, stopped calls' times, executions)`
    (executions: the calls by the rows each ran, `rows -> [calls, gather ns, run ns,
    scatter ns]`), queue lengths, stages unloaded."""

    worker: int
    stages: dict
    queued: dict
    unloaded: list


MESSAGES = (
    Deploy, Undeploy, Load, Policy, Cancel, Exit, Input,
    Hello, Result, Done, Located, Beat, Stats,
)  # fmt: skip
_TYPES = frozenset(MESSAGES)


def is_message(value: object) -> bool:
    """Whether a decoded value is one of the runtime's messages, with as many fields."""
    return type(value) in _TYPES


def well_formed(value: object) -> bool:
    """Whether a decoded value is a message whose fields a worker can act on: ids
    that are integers, times that are numbers, a batch size of at least one, a plan
    that is a path or bytes. (Other fields are only looked up, and a value that
    matches nothing is ignored where it is used.)"""
    kind = type(value)
    if kind is Input:
        app, rid, attempt, stage, op, _, route, deadline, sent, began = value  # type: ignore[misc]
        if (  # the hot path: the types the runtime sends, checked exactly
            type(app) is type(rid) is type(attempt) is type(stage) is type(op) is int
            and type(route) is tuple
            and type(sent) is float
            and (deadline is None or type(deadline) is float)
            and (began is None or type(began) is float)
        ):
            return True
        return (
            _ints(app, rid, attempt, stage, op)
            and type(route) is tuple
            and _time(sent)
            and (deadline is None or _time(deadline))
            and (began is None or _time(began))
        )
    if kind is Policy:
        _, _, size, timeout_s = value  # type: ignore[misc]
        return (
            _ints(size) and size >= 1 and isinstance(timeout_s, Real) and 0 <= timeout_s < math.inf
        )
    if kind is Deploy:
        return _ints(value.app) and isinstance(value.path, str | bytes)  # type: ignore[attr-defined]
    return kind in _TYPES


def _ints(*values: object) -> bool:
    return all(isinstance(v, Integral) for v in values)


def _time(value: object) -> bool:
    return isinstance(value, Real)
