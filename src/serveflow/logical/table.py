"""Tables of rows: the unit of every request. Columnar, any Python value in a cell.

Every row carries a request-row id (`qid`) assigned when the table is built; rows
derived from it keep it, which is how joins and batching line rows up.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from serveflow.errors import MissingColumnError

# Counters start at a random point of a 63-bit space so qids made in different
# processes (driver, workers) do not collide in practice.
_next_qid = itertools.count(random.getrandbits(62)).__next__


def new_qids(n: int) -> list[int]:
    return [_next_qid() for _ in range(n)]


class Row(Mapping[str, Any]):
    """A read-only view of one row; `row.qid` is its request-row id.

    Rows of one table share `names` (column -> position in `values`), so making a
    row builds no dict.
    """

    __slots__ = ("_names", "_values", "qid")

    def __init__(self, names: dict[str, int], values: tuple[Any, ...], qid: int) -> None:
        self._names = names
        self._values = values
        self.qid = qid

    def __getitem__(self, column: str) -> Any:
        try:
            return self._values[self._names[column]]
        except KeyError:
            raise MissingColumnError(column, list(self._names)) from None

    def __contains__(self, column: object) -> bool:
        return column in self._names

    def get(self, column: str, default: Any = None) -> Any:
        i = self._names.get(column)
        return default if i is None else self._values[i]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"Row({dict(zip(self._names, self._values))!r}, qid={self.qid})"


class Table:
    """Named columns of equal length plus one qid per row.

    `group_by` is set on the stream right after `groupby(col)`; it is per request
    state, so it is never carried across a merge of several requests.
    """

    __slots__ = ("_columns", "_qids", "group_by")

    def __init__(self, columns: Mapping[str, Iterable[Any]] | None = None) -> None:
        cols = {str(name): list(values) for name, values in (columns or {}).items()}
        lengths = {name: len(values) for name, values in cols.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"Table columns must have equal lengths, got {lengths}")
        self._columns = cols
        self._qids = new_qids(next(iter(lengths.values()), 0))
        self.group_by: str | None = None

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]]) -> Table:
        """Build from mappings; a column absent from some rows is None there."""
        rows = list(rows)
        names = list(dict.fromkeys(name for row in rows for name in row))
        return cls({name: [row.get(name) for row in rows] for name in names})

    @classmethod
    def _make(
        cls, columns: dict[str, list[Any]], qids: list[int], group_by: str | None = None
    ) -> Table:
        """Internal constructor: trusted columns and qids, no copy, no new ids."""
        table = cls.__new__(cls)
        table._columns = columns
        table._qids = qids
        table.group_by = group_by
        return table

    @classmethod
    def concat(cls, tables: Sequence[Table]) -> Table:
        """Rows of all tables in order; columns are the union, missing cells None."""
        names = list(dict.fromkeys(name for t in tables for name in t._columns))
        columns = {
            name: [v for t in tables for v in t._columns.get(name, [None] * len(t))]
            for name in names
        }
        return cls._make(columns, [q for t in tables for q in t._qids])

    def split(self, sizes: Sequence[int]) -> list[Table]:
        """Inverse of `concat`: consecutive pieces of the given row counts."""
        if sum(sizes) != len(self):
            raise ValueError(f"cannot split {len(self)} rows into pieces of {list(sizes)}")
        bounds = list(itertools.accumulate(sizes, initial=0))
        return [self.slice(start, stop) for start, stop in itertools.pairwise(bounds)]

    def slice(self, start: int, stop: int) -> Table:
        columns = {name: values[start:stop] for name, values in self._columns.items()}
        return Table._make(columns, self._qids[start:stop], self.group_by)

    def take(self, indices: Sequence[int]) -> Table:
        """The rows at `indices`, in that order, keeping their qids and grouping."""
        columns = {name: [values[i] for i in indices] for name, values in self._columns.items()}
        return Table._make(columns, [self._qids[i] for i in indices], self.group_by)

    @property
    def columns(self) -> list[str]:
        return list(self._columns)

    @property
    def qids(self) -> list[int]:
        return list(self._qids)

    def column(self, name: str) -> list[Any]:
        try:
            return list(self._columns[name])
        except KeyError:
            raise MissingColumnError(name, self.columns) from None

    def to_rows(self) -> list[dict[str, Any]]:
        return [dict(zip(self._columns, values)) for values in self._row_values()]

    def _row_values(self) -> Iterator[tuple[Any, ...]]:
        return zip(*self._columns.values()) if self._columns else iter([()] * len(self))

    def __iter__(self) -> Iterator[Row]:
        names = {name: i for i, name in enumerate(self._columns)}
        return map(Row, itertools.repeat(names), self._row_values(), self._qids)

    def __len__(self) -> int:
        return len(self._qids)

    def __repr__(self) -> str:
        grouped = f", grouped by {self.group_by!r}" if self.group_by else ""
        return f"Table({len(self)} rows, columns={self.columns}{grouped})"
