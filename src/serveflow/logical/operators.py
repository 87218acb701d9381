"""Logical operator nodes: plain data describing what to compute, nothing executes here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

AGGREGATES = ("count", "sum", "min", "max", "avg")
JOIN_HOWS = ("inner", "left", "outer")


@dataclass(frozen=True)
class Batching:
    """How a `batching` map collects rows of concurrent requests into one call.

    `max_size`: most requests merged into one call (default 32).
    `timeout_ms`: how long a partial batch may wait for more requests; None or 0
    dispatches whatever is queued at once (opportunistic batching, as in Cloudflow).
    """

    max_size: int | None = None
    timeout_ms: float | None = None

    def __post_init__(self) -> None:
        if self.max_size is not None and (not isinstance(self.max_size, int) or self.max_size < 1):
            raise ValueError(f"Batching.max_size must be a positive int, got {self.max_size!r}")
        if self.timeout_ms is not None and self.timeout_ms < 0:
            raise ValueError(f"Batching.timeout_ms must be >= 0, got {self.timeout_ms!r}")

    @property
    def size(self) -> int:
        return self.max_size or 32

    def describe(self) -> str:
        wait = f"timeout_ms={self.timeout_ms:g}" if self.timeout_ms else "no wait (opportunistic)"
        return f"max_size={self.size}, {wait}"


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
