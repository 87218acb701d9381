"""What each operator does to tables: pure functions, run inside a worker."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from serveflow.errors import MissingColumnError
from serveflow.logical.operators import Agg, Filter, GroupBy, Join, Lookup, Map, Op, Union
from serveflow.logical.table import Table, new_qids
from serveflow.runtime.kvs import KVS


class ShapeError(ValueError):
    """A user function returned the wrong number of values."""


class Stopped(Exception):
    """Raised between row calls when the request's `stop()` said to give up."""


Stop = Callable[[], bool] | None


def apply(
    op: Op, inputs: Sequence[Table], fn: Callable[..., Any] | None, kvs: KVS, stop: Stop = None
) -> Table:
    """Run `op` on its input tables; `fn` is the op's loaded function (map, filter).

    `stop`, if given, is asked before every call of `fn` in a row-by-row map or filter;
    when it returns True the op raises `Stopped`.
    """
    match op:
        case Map():
            return run_map(op, fn, inputs[0], stop)
        case Filter():
            return run_filter(op, fn, inputs[0], stop)
        case GroupBy():
            column(inputs[0], op.col)  # a missing group column is an input error now
            return Table._make(inputs[0]._columns, inputs[0]._qids, group_by=op.col)
        case Agg():
            return run_agg(op, inputs[0])
        case Lookup():
            return run_lookup(op, inputs[0], kvs)
        case Join():
            return run_join(op, inputs[0], inputs[1])
        case Union():
            return Table.concat(inputs)
    raise TypeError(f"no execution rule for operator {op.describe()}")


def column(table: Table, name: str) -> list[Any]:
    """A column's values, not copied: read them, never change them. An empty table has
    nothing to read, so any column is empty."""
    values = table._columns.get(name)
    if values is None:
        if len(table._qids):
            raise MissingColumnError(name, table.columns)
        return []
    return values


def _each(fn: Callable[..., Any], items: Iterable[Any], stop: Stop) -> list[Any]:
    """`fn` of each item, asking `stop()` before every call."""
    if stop is None:
        return list(map(fn, items))
    results = []
    for item in items:
        if stop():
            raise Stopped
        results.append(fn(item))
    return results


def _replace_column(table: Table, name: str, values: list[Any], new_name: str) -> Table:
    """`table` with column `name` replaced by `values` under `new_name`, order kept."""
    if new_name == name or name not in table._columns:  # not there: an empty table
        return Table._make({**table._columns, new_name: values}, table._qids)
    columns = {
        (new_name if c == name else c): (values if c == name else v)
        for c, v in table._columns.items()
    }
    return Table._make(columns, table._qids)


_SEQUENCES = (tuple, list)  # the usual multi-values, known without `_is_multi`


def _is_multi(value: Any) -> bool:
    return hasattr(value, "__len__") and not isinstance(value, (str, bytes, dict))


def _to_columns(op: Map, results: list[Any]) -> dict[str, list[Any]]:
    """One result per row -> the columns `op.names` (default "0", "1", ...)."""
    names = op.names
    if names is None:
        if not results:
            return {}
        if not isinstance(results[0], tuple):
            return {"0": results}
        names = tuple(str(i) for i in range(len(results[0])))
    if len(names) == 1:
        return {names[0]: results}
    for value in results:
        if (type(value) not in _SEQUENCES and not _is_multi(value)) or len(value) != len(names):
            got = f"{len(value)} values" if _is_multi(value) else f"one value {value!r}"
            raise ShapeError(f"returned {got} for names {list(names)}")
    return {name: [value[i] for value in results] for i, name in enumerate(names)}


def _one_per_row(results: Any, rows: int) -> list[Any]:
    """A batch function's results as a list with one entry per input row."""
    if isinstance(results, Table):
        values = list(results._columns.values())
        results = values[0] if len(values) == 1 else list(zip(*values))
    results = list(results)
    if len(results) != rows:
        raise ShapeError(f"returned {len(results)} results for {rows} rows")
    return results


def run_map(op: Map, fn: Callable[..., Any], table: Table, stop: Stop = None) -> Table:
    if op.batching is not None:
        results = fn(column(table, op.col) if op.col else table)
        if isinstance(results, Table) and op.col is None and op.names is None:
            _one_per_row(results, len(table))
            return Table._make(results._columns, table._qids)
        results = _one_per_row(results, len(table))
    else:
        results = _each(fn, column(table, op.col) if op.col is not None else table, stop)
    if op.col is not None:
        return _replace_column(table, op.col, results, op.names[0] if op.names else op.col)
    return Table._make(_to_columns(op, results), table._qids)


def _groups(table: Table) -> dict[Any, list[int]]:
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, key in enumerate(table._columns[table.group_by]):
        groups[key].append(i)
    return groups


def run_filter(op: Filter, pred: Callable[..., Any], table: Table, stop: Stop = None) -> Table:
    if op.group:
        groups = list(_groups(table).values())
        kept = _each(lambda rows: pred(table.take(rows)), groups, stop)
        keep = sorted(i for rows, ok in zip(groups, kept) if ok for i in rows)
    else:
        keep = [i for i, ok in enumerate(_each(pred, table, stop)) if ok]
    return table if len(keep) == len(table) else table.take(keep)


def _aggregate(fn: str, values: list[Any]) -> Any:
    if fn == "count":
        return len(values)
    present = [v for v in values if v is not None]  # outer joins leave None behind
    if fn == "sum":
        return sum(present)
    if not present:
        return None
    if fn == "avg":
        return sum(present) / len(present)
    return min(present) if fn == "min" else max(present)


def run_agg(op: Agg, table: Table) -> Table:
    values = column(table, op.col)
    key = table.group_by
    if key is None:
        qid = table._qids[0] if len(table) else new_qids(1)[0]
        return Table._make({op.col: [_aggregate(op.fn, values)]}, [qid])
    groups = _groups(table)
    name = op.col if op.col != key else f"{op.fn}_{op.col}"
    columns = {
        key: list(groups),
        name: [_aggregate(op.fn, [values[i] for i in rows]) for rows in groups.values()],
    }
    return Table._make(columns, [table._qids[rows[0]] for rows in groups.values()])


def run_lookup(op: Lookup, table: Table, kvs: KVS) -> Table:
    if not len(table):
        values: list[Any] = []
    elif op.dynamic:
        keys = [str(k) for k in column(table, op.key)]
        distinct = list(dict.fromkeys(keys))
        found = dict(zip(distinct, kvs.get_many(distinct)))
        values = [found[k] for k in keys]
    else:
        values = [kvs.get(op.key)] * len(table)
    return Table._make({**table._columns, op.into: values}, table._qids, table.group_by)


def run_join(op: Join, left: Table, right: Table) -> Table:
    """Rows matched on qid or `op.on`; left rows first, then right-only rows (outer).

    Shared columns take the left value; in a right-only row they take the right one.
    """
    if op.on is None:
        left_keys, right_keys = left._qids, right._qids
    else:
        left_keys, right_keys = column(left, op.on), column(right, op.on)
    matches: dict[Any, list[int]] = defaultdict(list)
    for j, key in enumerate(right_keys):
        matches[key].append(j)
    pairs: list[tuple[int | None, int | None]] = []
    for i, key in enumerate(left_keys):
        if key in matches:
            pairs.extend((i, j) for j in matches[key])
        elif op.how != "inner":
            pairs.append((i, None))
    if op.how == "outer":
        matched = {j for _, j in pairs if j is not None}
        pairs.extend((None, j) for j in range(len(right)) if j not in matched)

    def value(name: str, i: int | None, j: int | None) -> Any:
        if i is not None and name in left._columns:
            return left._columns[name][i]
        return None if j is None or name not in right._columns else right._columns[name][j]

    names = list(dict.fromkeys(left.columns + right.columns))
    columns = {name: [value(name, i, j) for i, j in pairs] for name in names}
    qids = [left._qids[i] if i is not None else right._qids[j] for i, j in pairs]
    return Table._make(columns, qids)
