"""Logical operator nodes: plain data describing what to compute, nothing executes here."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

AGGREGATES = ("count", "sum", "min", "max", "avg")
JOIN_HOWS = ("inner", "left", "outer")


OBJECTIVES = ("cost", "latency")
OVERLOAD_ACTIONS = ("shed", "serve")


@dataclass(frozen=True)
class Batching:
    """How a `batching` map collects rows of concurrent requests into one call.

    Fixed policy (no `slo_ms`), like Ray Serve's `@serve.batch`: a batch is dispatched
    when it holds `max_size` requests (default 32) or when its oldest request has
    waited `timeout_ms`; None or 0 dispatches whatever is queued at once
    (opportunistic batching, as in Cloudflow).

    SLO policy (`slo_ms` set): a controller (`serveflow.batching.BatchingController`)
    picks batch size, timeout and workers itself so that the `percentile` latency of the
    stage stays within `slo_ms`; `max_size`/`timeout_ms`, when also given, cap its
    choices. `objective="cost"` takes the configuration of least worker-seconds per
    request meeting the SLO; `"latency"` the lowest predicted latency within
    `cost_budget_ms` worker-milliseconds per request (default: 1.5x the cheapest
    configuration meeting the SLO). When no configuration meets the SLO within the
    stage's workers, `on_overload="shed"` rejects requests that would miss it and
    `"serve"` serves them late; both are counted.
    """

    max_size: int | None = None
    timeout_ms: float | None = None
    slo_ms: float | None = None
    percentile: float = 0.99
    objective: str = "cost"
    on_overload: str = "shed"
    cost_budget_ms: float | None = None

    def __post_init__(self) -> None:
        if self.max_size is not None and (
            isinstance(self.max_size, bool)
            or not isinstance(self.max_size, int)
            or self.max_size < 1
        ):
            raise ValueError(f"Batching.max_size must be a positive int, got {self.max_size!r}")
        if self.timeout_ms is not None and not _non_negative(self.timeout_ms):
            raise ValueError(
                f"Batching.timeout_ms must be a finite number >= 0, got {self.timeout_ms!r}"
            )
        if self.slo_ms is not None and not (_non_negative(self.slo_ms) and self.slo_ms > 0):
            raise ValueError(f"Batching.slo_ms must be a finite number > 0, got {self.slo_ms!r}")
        if not (_non_negative(self.percentile) and 0.0 < self.percentile < 1.0):
            raise ValueError(
                f"Batching.percentile must be a fraction in (0, 1), got {self.percentile!r}"
            )
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"Batching.objective must be one of {OBJECTIVES}, got {self.objective!r}"
            )
        if self.on_overload not in OVERLOAD_ACTIONS:
            raise ValueError(
                f"Batching.on_overload must be one of {OVERLOAD_ACTIONS}, got {self.on_overload!r}"
            )
        if self.cost_budget_ms is not None and not (
            _non_negative(self.cost_budget_ms) and self.cost_budget_ms > 0
        ):
            raise ValueError(
                f"Batching.cost_budget_ms must be a finite number > 0, got {self.cost_budget_ms!r}"
            )

    @property
    def size(self) -> int:
        """The batch-size cap: `max_size`, or 32 when not given."""
        return self.max_size or 32

    @property
    def adaptive(self) -> bool:
        """True when a controller picks batch size, timeout and workers (an SLO is set)."""
        return self.slo_ms is not None

    def describe(self) -> str:
        wait = f"timeout_ms={self.timeout_ms:g}" if self.timeout_ms else "no wait (opportunistic)"
        if not self.adaptive:
            return f"max_size={self.size}, {wait}"
        caps = f"max_size<={self.size}" + (
            f", timeout_ms<={self.timeout_ms:g}" if self.timeout_ms else ""
        )
        return (
            f"adaptive, SLO p{self.percentile * 100:g} <= {self.slo_ms:g} ms, "
            f"objective={self.objective}, on_overload={self.on_overload}, {caps}"
        )


def _non_negative(value: object) -> bool:
    """A finite number >= 0 (an infinite SLO or timeout left a stage's requests
    waiting for ever: no worker takes a policy with an infinite wait)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < math.inf


@dataclass(frozen=True)
class Op:
    """A node of the logical DAG. `inputs` are ids of upstream nodes (0 = the request)."""

    id: int
    inputs: tuple[int, ...]
    name: str

    kind = "op"

    def describe(self) -> str:
        return self.kind if self.name == self.kind else f"{self.kind} {self.name}"


@dataclass(frozen=True)
class Source(Op):
    kind = "source"


@dataclass(frozen=True)
class Map(Op):
    fn: Callable[..., Any] = None  # type: ignore[assignment]
    names: tuple[str, ...] | None = None
    col: str | None = None
    batching: Batching | None = None
    high_variance: bool = False
    gpu: bool = False

    kind = "map"


@dataclass(frozen=True)
class Filter(Op):
    pred: Callable[..., Any] = None  # type: ignore[assignment]
    group: bool = False

    kind = "filter"


@dataclass(frozen=True)
class GroupBy(Op):
    col: str = ""

    kind = "groupby"

    def describe(self) -> str:
        return f"groupby {self.col!r}"


@dataclass(frozen=True)
class Agg(Op):
    fn: str = "count"
    col: str = ""

    kind = "agg"

    def describe(self) -> str:
        return f"agg {self.fn}({self.col})"


@dataclass(frozen=True)
class Lookup(Op):
    key: str = ""
    dynamic: bool = False
    into: str = ""

    kind = "lookup"

    def describe(self) -> str:
        what = f"key from column {self.key!r}" if self.dynamic else f"key {self.key!r}"
        return f"lookup {what} into {self.into!r}"


@dataclass(frozen=True)
class Join(Op):
    on: str | None = None
    how: str = "inner"

    kind = "join"

    def describe(self) -> str:
        on = f"on {self.on!r}" if self.on else "on qid"
        return f"join {self.how} {on}"


@dataclass(frozen=True)
class Union(Op):
    kind = "union"


@dataclass(frozen=True)
class AnyOf(Op):
    kind = "anyof"
