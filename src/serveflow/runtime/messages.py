"""The messages of the runtime's internal plane, one type each.

The control plane speaks to workers (and workers to each other) only in these; an
engine carries them (datagrams between local processes, actor calls on Ray). They are
named tuples: typed fields for readers, the cost of a tuple on the wire.

A receiver accepts only these types (`is_message`) and drops anything else with a
log line, so a malformed message can never take a receiving thread down.
"""

from __future__ import annotations

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
    `rid`, sent at `sent` (time.monotonic: the stage's latency counts from there).
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
