"""Checking a request table against a flow's declared schema."""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Real
from reprlib import Repr
from typing import Any

from serveflow.errors import InputError
from serveflow.logical.table import Table

_short = Repr()  # bounded, whatever the nesting
_short.maxlevel, _short.maxstring, _short.maxother = 3, 60, 60


def _accepts(expected: Any, value: Any) -> bool:
    if isinstance(value, bool) and not _names(expected, bool):
        return False  # True is an int to Python, not to a schema that says int
    if expected is float and isinstance(value, Real) and not isinstance(value, bool):
        return True  # an int where a float is declared is fine, as in Python's typing
    return isinstance(value, expected)


def _names(expected: Any, kind: type) -> bool:
    return kind in expected if isinstance(expected, tuple) else expected is kind


def _type_name(expected: Any) -> str:
    if isinstance(expected, tuple):
        return " | ".join(t.__name__ for t in expected)
    return getattr(expected, "__name__", repr(expected))


def check_schema(schema: Mapping[str, Any] | None, table: Table) -> None:
    """Raise InputError naming the first declared column that is absent or holds a
    value of the wrong type."""
    if not schema:
        return
    for name, expected in schema.items():
        if name not in table.columns:
            raise InputError(
                f"request lacks column {name!r} declared in the flow's schema "
                f"(the request has {table.columns})",
                name,
            )
        for i, value in enumerate(table.column(name)):
            if not _accepts(expected, value):
                raise InputError(
                    f"column {name!r} row {i}: expected {_type_name(expected)}, "
                    f"got {type(value).__name__} {_short.repr(value)}",
                    name,
                )
