"""Request and response bodies: JSON rows or columns, and `.npz` for tensors.

JSON in: `{"rows": [{"col": value, ...}, ...]}` or `{"columns": {"col": [v0, v1, ...]}}`.
JSON out: `{"rows": [...]}`; numpy arrays become nested lists, numpy scalars numbers.

Binary (`Content-Type: application/x-npz`, the format of `numpy.savez`): a zip of
`.npy` arrays, one member per column, the first axis indexing rows. A 1-D column
gives each row a Python scalar; an N-D column gives each row an (N-1)-D array. It
is loaded with `allow_pickle=False`: object arrays are refused, nothing is unpickled.
Send `Accept: application/x-npz` to get the output the same way.

Where a flow's schema declares `np.ndarray` for a column, JSON lists in that column
are turned into arrays, so one flow serves both forms.

JSON goes through orjson when it is installed (the `serve` extra pins it: several times
faster than the standard library on the per-request path, numpy arrays natively), and
through `json` otherwise or for what orjson refuses (integers over 64 bits).
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from serveflow.logical.table import Table

try:
    import orjson
except ImportError:  # the standard library does the same, slower
    orjson = None  # type: ignore[assignment]

JSON = "application/json"
NPZ = "application/x-npz"


class DecodeError(Exception):
    """A body that cannot be read as the claimed format (HTTP 400)."""


class ShapeError(Exception):
    """A well-formed body that is not a table (HTTP 422)."""


class EncodeError(Exception):
    """An output that the requested format cannot represent."""


def _wants_array(expected: Any) -> bool:
    types = expected if isinstance(expected, tuple) else (expected,)
    return np.ndarray in types


def _table(columns: Mapping[str, list[Any]], schema: Mapping[str, Any] | None) -> Table:
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ShapeError(f"columns must have equal lengths, got {lengths}")
    if schema:
        columns = dict(columns)
        for name, expected in schema.items():
            if name in columns and _wants_array(expected):
                columns[name] = [np.asarray(v) if isinstance(v, list) else v for v in columns[name]]
    return Table(columns)


def _from_json(body: bytes, schema: Mapping[str, Any] | None) -> Table:
    try:
        data = orjson.loads(body) if orjson is not None else json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:  # orjson's is a subclass
        raise DecodeError(f"malformed JSON: {error}") from None
    if not isinstance(data, dict) or len(data.keys() & {"rows", "columns"}) != 1:
        raise ShapeError('the body must be a JSON object with "rows" or "columns"')
    if "rows" in data:
        rows = data["rows"]
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ShapeError('"rows" must be a list of objects (one per row)')
        names = list(dict.fromkeys(name for row in rows for name in row))
        return _table({n: [row.get(n) for row in rows] for n in names}, schema)
    columns = data["columns"]
    if not isinstance(columns, dict) or not all(isinstance(v, list) for v in columns.values()):
        raise ShapeError('"columns" must be an object mapping column names to lists')
    return _table(columns, schema)


def _from_npz(body: bytes, schema: Mapping[str, Any] | None) -> Table:
    columns: dict[str, list[Any]] = {}
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as archive:
            for name in archive.files:
                array = archive[name]
                if array.ndim == 0:
                    raise ShapeError(f"column {name!r} is a scalar; its first axis must be rows")
                columns[name] = array.tolist() if array.ndim == 1 else list(array)
    except ShapeError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as error:
        raise DecodeError(f"malformed .npz body: {error}") from None
    except AttributeError:  # np.load read a bare .npy, not an archive
        raise DecodeError("expected a .npz archive (numpy.savez), got a single .npy") from None
    return _table(columns, schema)


def decode_table(body: bytes, content_type: str, schema: Mapping[str, Any] | None) -> Table:
    """The request table from a body; DecodeError or ShapeError when it is not one."""
    media = content_type.split(";")[0].strip().lower()
    if media == NPZ:
        return _from_npz(body, schema)
    if media in ("", JSON) or media.endswith("+json"):
        return _from_json(body, schema)
    raise DecodeError(f"unsupported Content-Type {media!r}; send {JSON} or {NPZ}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, set | frozenset):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_ORJSON_OPTIONS = (orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS) if orjson else 0


def encode_json(data: Any) -> bytes:
    """JSON bytes; numpy values as (nested) lists and numbers. EncodeError otherwise."""
    if orjson is not None:
        try:
            return orjson.dumps(data, default=_jsonable, option=_ORJSON_OPTIONS)
        except TypeError:  # e.g. an int over 64 bits: let the standard library try
            pass
    try:
        return json.dumps(data, default=_jsonable, ensure_ascii=False).encode()
    except (TypeError, ValueError) as error:
        raise EncodeError(f"the output cannot be sent as JSON: {error}") from None


def encode_table(table: Table, accept: str) -> tuple[bytes, str]:
    """The output table as (body, media type), `.npz` if `accept` asks for it."""
    if NPZ in accept.lower():
        return encode_npz(table), NPZ
    return encode_json({"rows": table.to_rows()}), JSON


def encode_npz(table: Table) -> bytes:
    buffer = io.BytesIO()
    arrays = {}
    for name in table.columns:
        values = table.column(name)
        try:
            array = np.stack(values) if values and isinstance(values[0], np.ndarray) else None
        except ValueError:
            array = None
        if array is None:
            array = np.asarray(values)
        if array.dtype == object:
            raise EncodeError(
                f"output column {name!r} holds values .npz cannot store without pickling "
                f"(mixed types, None or ragged arrays); ask for {JSON} instead"
            )
        arrays[name] = array
    np.savez(buffer, **arrays)
    return buffer.getvalue()
