"""Request and response bodies: JSON rows or columns, and `.npz` for tensors.

JSON in: `{"rows": [{"col": value, ...}, ...]}` or `{"columns": {"col": [v0, v1, ...]}}`.
JSON out: `{"rows": [...]}`; numpy arrays become nested lists, numpy scalars numbers.

Binary (`Content-Type: application/x-npz`, the format of `numpy.savez`): a zip of
`.npy` arrays, one member per column, the first axis indexing rows. A 1-D column
gives each row a Python scalar; an N-D column gives each row an (N-1)-D array. It
is loaded with `allow_pickle=False`: object arrays are refused, nothing is unpickled.
Send `Accept: application/x-npz` to get the output the same way.

Where a flow's schema declares `np.ndarray` for a column, JSON lists in that column
are turned into arrays (rectangular, of numbers), so one flow serves both forms.

Every body is checked against the server's `Limits` (serving.limits) before the memory
a limit guards is spent: a zip bomb is refused from its directory, not by inflating it.

JSON goes through orjson when it is installed (the `serve` extra pins it: several times
faster than the standard library on the per-request path, numpy arrays natively), and
through `json` otherwise or for what orjson gets wrong: it writes no integer over 64
bits, and reads one as a float, rounded (a body holding a float that large is read again
with `json`, which keeps such integers whole), or refuses it past 308 digits (`loads`).
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from collections.abc import Mapping
from itertools import chain, repeat
from typing import Any

import numpy as np

from serveflow.logical.table import Table
from serveflow.serving.limits import LimitExceeded, Limits, over

DEFAULT_LIMITS = Limits()

try:
    import orjson
except ImportError:  # the standard library does the same, slower
    orjson = None  # type: ignore[assignment]

INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1  # what an int column takes (OpenAPI says so)
JSON = "application/json"
NPZ = "application/x-npz"


class DecodeError(Exception):
    """A body that cannot be read as the claimed format (HTTP 400)."""


class ShapeError(Exception):
    """A well-formed body that is not a table (HTTP 422); `column`: the one at fault."""

    def __init__(self, message: str, column: str | None = None) -> None:
        super().__init__(message)
        self.column = column


class EncodeError(Exception):
    """An output that the requested format cannot represent."""


def _wants_array(expected: Any) -> bool:
    types = expected if isinstance(expected, tuple) else (expected,)
    return np.ndarray in types


def _wants_int(expected: Any) -> bool:
    types = expected if isinstance(expected, tuple) else (expected,)
    return int in types and float not in types


def _integral(value: Any) -> Any:
    """A float holding a whole number as an int, where a float is exact (under 2**53:
    larger ones may be integers out of the 64-bit range, rounded); else `value`."""
    if type(value) is float and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    return value


def _as_array(name: str, row: int, value: list[Any]) -> np.ndarray:
    """A JSON list as the array a schema's `np.ndarray` column declares: rectangular,
    of numbers (booleans, strings, nulls and ragged lists are refused)."""
    try:
        array = np.asarray(value)
    except (ValueError, OverflowError):
        array = None
    if array is None or array.dtype.kind not in "iuf":
        raise ShapeError(
            f"column {name!r} row {row}: expected (nested, rectangular) lists of numbers "
            "for an array"
        )
    return array


def _table(
    columns: Mapping[str, list[Any]], schema: Mapping[str, Any] | None, limits: Limits
) -> Table:
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ShapeError(f"columns must have equal lengths, got {lengths}")
    rows = next(iter(lengths.values()), 0)
    if rows > limits.max_rows:
        raise over("rows in the request", rows, limits.max_rows, "max-rows")
    if schema:
        columns = dict(columns)
        for name, expected in schema.items():
            if name not in columns:
                continue
            if _wants_array(expected):
                columns[name] = [
                    _as_array(name, i, v) if isinstance(v, list) else v
                    for i, v in enumerate(columns[name])
                ]
            elif _wants_int(expected):  # JSON's 2.0 is an integer, as JSON Schema says
                columns[name] = values = [_integral(v) for v in columns[name]]
                for i, v in enumerate(values):
                    if type(v) is int and not INT64_MIN <= v <= UINT64_MAX:
                        raise ShapeError(
                            f"column {name!r} row {i}: {v} is outside the 64 bits of an int "
                            "column (-2**63 to 2**64 - 1)",
                            name,
                        )
    return Table(columns)


_WIDE = 2.0**63  # orjson reads an integer beyond 64 bits as a float at least this large


def check_json_limits(data: Any, limits: Limits) -> bool:
    """Raise LimitExceeded when a parsed JSON document nests deeper than
    `limits.max_depth`, holds a string (key or value) longer than
    `limits.max_string_chars`, or more than `limits.max_elements` scalars. One pass,
    level by level, without recursion, each level's values taken together by builtins
    (a Python step per value only to pick out one type among mixed ones). True when it
    holds a float of 2**63 or more (either sign): orjson may have read an integer so,
    and the body must be read again with `json`."""
    longest = limits.max_string_chars
    level, depth, scalars, wide = [data], 1, 0, False
    while level:
        if depth > limits.max_depth:
            raise LimitExceeded(f"JSON nested deeper than {limits.max_depth} levels (--max-depth)")
        kinds = set(map(type, level))
        dicts, lists = _of(dict, level, kinds), _of(list, level, kinds)
        if dicts and max(map(len, chain.from_iterable(dicts)), default=0) > longest:
            key = max(chain.from_iterable(dicts), key=len)
            raise over("a JSON key's length", len(key), longest, "max-string-chars")
        if len(dicts) + len(lists) <= 1:  # one container (or a scalar document): no copy
            children = lists[0] if lists else list(dicts[0].values()) if dicts else level
        else:
            values = map(dict.values, dicts)
            children = list(chain(chain.from_iterable(values), chain.from_iterable(lists)))
        kinds = set(map(type, children))
        level = _of(dict, children, kinds) + _of(list, children, kinds)
        scalars += len(children) - len(level)
        texts = _of(str, children, kinds)
        if texts and max(map(len, texts)) > longest:
            text = max(texts, key=len)
            raise over("a JSON string's length", len(text), longest, "max-string-chars")
        floats = _of(float, children, kinds)
        if floats and not -_WIDE < min(floats) <= max(floats) < _WIDE:
            wide = True
        if scalars > limits.max_elements:
            raise over("values in the JSON body", scalars, limits.max_elements, "max-elements")
        depth += 1
    return wide


def _of(kind: type, values: list[Any], kinds: set[type]) -> list[Any]:
    """The members of `values` of type `kind`; `kinds`: the types among them."""
    if kind not in kinds:
        return []
    return values if len(kinds) == 1 else [v for v in values if type(v) is kind]


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is no JSON value")


def _finite(literal: str) -> float:
    value = float(literal)
    if math.isinf(value):
        raise ValueError(f"number {literal[:40]} is out of a double's range")
    return value


def loads(body: bytes | memoryview) -> Any:
    """A JSON document: by orjson when installed; by `json` when orjson refuses it
    for a number it finds infinite (it reads an integer of more than 308 digits as a
    double), and then refusing a float past a double's range as orjson does (and NaN
    and Infinity, which orjson refuses too)."""
    if orjson is None:
        return json.loads(bytes(body), parse_constant=_not_json, parse_float=_finite)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        if "infinity" not in str(error):
            raise
    data = json.loads(bytes(body), parse_constant=_not_json, parse_float=_finite)
    try:  # json takes a lone surrogate ("\ud800"), which orjson refuses: no text
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError as error:
        raise ValueError(f"no text: {error}") from None
    return data


def _parse_json(body: bytes) -> Any:
    try:
        return loads(body)
    except RecursionError:  # the standard library recurses per level
        raise LimitExceeded("JSON nested too deep to parse (--max-depth)") from None
    except (ValueError, UnicodeDecodeError) as error:  # (orjson's and json's errors)
        if "depth limit" in str(error):  # orjson stops at 1,024 levels
            raise LimitExceeded(f"JSON nested too deep to parse: {error} (--max-depth)") from None
        raise DecodeError(f"malformed JSON: {error}") from None


def _check_rows(data: dict[str, Any], limits: Limits) -> None:
    lists = [data["rows"]] if "rows" in data else data["columns"]
    if not isinstance(lists, list):
        lists = lists.values() if isinstance(lists, dict) else []
    rows = max((len(v) for v in lists if isinstance(v, list)), default=0)
    if rows > limits.max_rows:
        raise over("rows in the request", rows, limits.max_rows, "max-rows")


def _from_json(body: bytes, schema: Mapping[str, Any] | None, limits: Limits) -> Table:
    data = _parse_json(body)
    if not isinstance(data, dict) or len(data.keys() & {"rows", "columns"}) != 1:
        raise ShapeError('the body must be a JSON object with "rows" or "columns"')
    _check_rows(data, limits)  # cheap, and before the pass over every value
    if check_json_limits(data, limits) and orjson is not None:
        data = json.loads(body)
    if "rows" in data:
        rows = data["rows"]
        if not isinstance(rows, list) or not set(map(type, rows)) <= {dict}:
            raise ShapeError('"rows" must be a list of objects (one per row)')
        names = dict.fromkeys(chain.from_iterable(rows))
        return _table({n: list(map(dict.get, rows, repeat(n))) for n in names}, schema, limits)
    columns = data["columns"]
    if not isinstance(columns, dict) or not all(isinstance(v, list) for v in columns.values()):
        raise ShapeError('"columns" must be an object mapping column names to lists')
    return _table(columns, schema, limits)


_NPY_MAGIC = b"\x93NUMPY"
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError)


def read_npz(body: bytes, limits: Limits) -> dict[str, np.ndarray]:
    """The arrays of a `.npz` body by member name (".npy" dropped), read without
    pickle. Sizes are checked before anything is inflated: the zip directory's
    uncompressed sizes against `max_decoded_bytes` (inflating stops at the declared
    size), each `.npy` header's shape against `max_elements` and its member's size.
    DecodeError for what is not such an archive, LimitExceeded past a limit."""
    if body.startswith(_NPY_MAGIC):
        raise DecodeError(
            "expected a .npz archive (numpy.savez: a zip of .npy arrays, one per column), "
            "got a single .npy array"
        )
    try:
        archive = zipfile.ZipFile(io.BytesIO(body))
        infos = archive.infolist()
    except _ZIP_ERRORS as error:
        raise DecodeError(f"malformed .npz body: {error}") from None
    inflated = sum(info.file_size for info in infos)
    if inflated > limits.max_decoded_bytes:
        what = "the .npz body's arrays, inflated, in bytes"
        raise over(what, inflated, limits.max_decoded_bytes, "max-decoded-mb")
    arrays: dict[str, np.ndarray] = {}
    elements = 0
    for info in infos:
        name = info.filename.removesuffix(".npy")
        try:
            with archive.open(info) as member:
                array, count = _read_npy(name, member, info.file_size, limits, elements)
        except (DecodeError, LimitExceeded):
            raise
        except (*_ZIP_ERRORS, NotImplementedError, RuntimeError) as error:
            raise DecodeError(f"malformed .npz member {name!r}: {error}") from None
        elements += count
        arrays[name] = array
    return arrays


def _read_npy(
    name: str, member: Any, size: int, limits: Limits, elements_before: int
) -> tuple[np.ndarray, int]:
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
    else:
        raise DecodeError(f".npz member {name!r}: .npy format {version} is not supported")
    if dtype.hasobject:
        raise DecodeError(
            f".npz member {name!r} holds Python objects (dtype {dtype}); they would need "
            "pickle to load, which this server never uses"
        )
    count = math.prod(shape)
    if elements_before + count > limits.max_elements:
        what = "array elements in the .npz body"
        raise over(what, elements_before + count, limits.max_elements, "max-elements")
    nbytes = count * dtype.itemsize
    if nbytes > size:
        raise DecodeError(
            f".npz member {name!r}: its header declares {nbytes:,} bytes of data, "
            f"the member holds {size:,}"
        )
    flat = np.empty(count, dtype)
    if nbytes and member.readinto(flat.view(np.uint8)) != nbytes:
        raise DecodeError(f".npz member {name!r} is truncated")
    member.read(1)  # reaches the end: zipfile checks the member's CRC there
    return flat.reshape(shape, order="F" if fortran else "C"), count


def _from_npz(body: bytes, schema: Mapping[str, Any] | None, limits: Limits) -> Table:
    columns: dict[str, list[Any]] = {}
    for name, array in read_npz(body, limits).items():
        if array.ndim == 0:
            raise ShapeError(f"column {name!r} is a scalar; its first axis must be rows")
        if len(array) > limits.max_rows:
            raise over("rows in the request", len(array), limits.max_rows, "max-rows")
        columns[name] = array.tolist() if array.ndim == 1 else list(array)
    return _table(columns, schema, limits)


def decode_table(
    body: bytes,
    content_type: str,
    schema: Mapping[str, Any] | None,
    limits: Limits = DEFAULT_LIMITS,
) -> Table:
    """The request table from a body: DecodeError (400) when it is not one of the
    formats, ShapeError (422) when it is not a table, LimitExceeded (413) when it is
    over one of `limits`, each raised before the memory the limit guards is spent."""
    media = content_type.split(";")[0].strip().lower()
    if media == NPZ:
        return _from_npz(body, schema, limits)
    if media in ("", JSON) or media.endswith("+json"):
        return _from_json(body, schema, limits)
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
