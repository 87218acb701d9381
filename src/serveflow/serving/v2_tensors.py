"""Tensors of the Open Inference Protocol (KServe V2) to and from serveflow tables.

A flow is a model. Each input tensor is a column: its first dimension indexes rows, the
other dimensions are each cell's array shape (a 1-D tensor gives Python scalars, an N-D
one gives each row an (N-1)-D numpy array). `BYTES` elements become `str`, or `bytes`
where the flow's schema declares the column `bytes` (or the bytes are not UTF-8).
Outputs are the output table's columns: a column of numbers, bools, strings or
equally shaped arrays is one tensor, rows first.

Protocol-neutral: the HTTP front (`v2.py`) and the gRPC one (`v2_grpc.py`) both call
`check_limits`, `columns_from_tensors` and `tensor_from_column`. Nothing here unpickles
anything. The server's `Limits` hold as for `/v1`: `check_limits` judges the declared
shapes (elements, rows, decoded bytes) before anything is converted, and a BYTES element
longer than `max_string_chars` (bytes, or characters of a JSON string) is refused before
it is copied.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from serveflow.serving.limits import Limits, over

# V2 datatype -> numpy dtype (little-endian, as the binary extension sends them).
NUMPY_TYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
DATATYPES = [*NUMPY_TYPES, "BYTES"]
_BY_KIND_SIZE = {(dt.kind, dt.itemsize): name for name, dt in NUMPY_TYPES.items()}
# What a declared schema type means as a V2 datatype (metadata and config).
SCHEMA_DATATYPES: dict[Any, str] = {
    bool: "BOOL",
    int: "INT64",
    float: "FP64",
    str: "BYTES",
    bytes: "BYTES",
}


DEFAULT_LIMITS = Limits()


class TensorError(ValueError):
    """A tensor that is malformed or does not fit the flow (HTTP 400, INVALID_ARGUMENT)."""


class OutputError(ValueError):
    """An output column that no V2 tensor can carry (HTTP 500, INTERNAL)."""


@dataclass(frozen=True)
class InputTensor:
    """One request input: `data` is raw little-endian bytes (binary data, gRPC raw
    contents) or a (nested) list of values (JSON data, gRPC typed contents)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes | Sequence[Any]


@dataclass(frozen=True)
class OutputTensor:
    """One response output: `array` holds numbers (numpy) or, for BYTES, bytes objects
    in a flat object array; `shape` is rows first."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    array: np.ndarray

    def raw(self) -> bytes:
        """The binary-data form: little-endian values, or length-prefixed BYTES."""
        if self.datatype == "BYTES":
            return serialize_bytes(self.array)
        return self.array.tobytes()

    def json_data(self) -> list[Any]:
        """The JSON form: a flat row-major list (BYTES as UTF-8 strings)."""
        if self.datatype != "BYTES":
            return self.array.reshape(-1).tolist()
        try:
            return [value.decode() for value in self.array]
        except UnicodeDecodeError:
            raise OutputError(
                f"output {self.name!r} holds bytes that are not UTF-8; ask for it as "
                "binary data (parameters: binary_data)"
            ) from None


def serialize_bytes(values: Sequence[bytes] | np.ndarray) -> bytes:
    """BYTES elements as the protocol sends them: each a 4-byte little-endian length
    followed by its bytes."""
    return b"".join(struct.pack("<I", len(value)) + value for value in values)


def deserialize_bytes(
    raw: bytes, name: str, count: int | None = None, max_length: int | None = None
) -> list[bytes]:
    """The elements of a length-prefixed BYTES buffer; TensorError if it is cut short
    or holds more than `count` elements, LimitExceeded for an element over `max_length`
    bytes (both before the element is copied)."""
    values, offset, view = [], 0, memoryview(raw)
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise TensorError(f"input {name!r}: BYTES data ends inside an element length")
        if count is not None and len(values) == count:
            raise TensorError(f"input {name!r}: BYTES data holds more than {count} elements")
        (length,) = struct.unpack_from("<I", raw, offset)
        if max_length is not None and length > max_length:
            what = f"the length in bytes of a BYTES element of input {name!r}"
            raise over(what, length, max_length, "max-string-chars")
        offset += 4
        if offset + length > len(raw):
            raise TensorError(
                f"input {name!r}: a BYTES element of {length} bytes runs past the data"
            )
        values.append(bytes(view[offset : offset + length]))
        offset += length
    return values


def _flatten(data: Sequence[Any]) -> list[Any]:
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list | tuple):
                stack.append(iter(value))
                break
            flat.append(value)
        else:
            stack.pop()
    return flat


def _wants_bytes(expected: Any) -> bool:
    types = expected if isinstance(expected, tuple) else (expected,)
    return bytes in types and str not in types


def _bytes_cells(tensor: InputTensor, count: int, keep_bytes: bool, longest: int) -> list[Any]:
    if isinstance(tensor.data, bytes | bytearray | memoryview):
        elements: list[Any] = deserialize_bytes(bytes(tensor.data), tensor.name, count, longest)
    else:
        elements = _flatten(tensor.data)
    if len(elements) != count:
        raise TensorError(
            f"input {tensor.name!r}: shape {list(tensor.shape)} needs {count} elements, "
            f"got {len(elements)}"
        )
    values: list[Any] = []
    for element in elements:
        if isinstance(element, str | bytes) and len(element) > longest:
            what = f"the length of a BYTES element of input {tensor.name!r}"
            raise over(what, len(element), longest, "max-string-chars")
        if isinstance(element, str):
            values.append(element.encode() if keep_bytes else element)
        elif isinstance(element, bytes):
            if keep_bytes:
                values.append(element)
            else:
                try:
                    values.append(element.decode())
                except UnicodeDecodeError:
                    values.append(element)  # not text: the schema check names the column
        else:
            raise TensorError(
                f"input {tensor.name!r}: BYTES elements must be strings, got "
                f"{type(element).__name__}"
            )
    if len(tensor.shape) == 1:
        return values
    array = np.empty(count, dtype=object)
    array[:] = values
    return list(array.reshape(tensor.shape))


_JSON_KINDS = {"b": {bool}, "i": {int}, "u": {int}, "f": {int, float}}  # by numpy kind


def _numeric_array(tensor: InputTensor, count: int) -> np.ndarray:
    dtype = NUMPY_TYPES[tensor.datatype]
    if isinstance(tensor.data, bytes | bytearray | memoryview):
        if len(tensor.data) != count * dtype.itemsize:
            raise TensorError(
                f"input {tensor.name!r}: shape {list(tensor.shape)} of {tensor.datatype} "
                f"needs {count * dtype.itemsize} bytes, got {len(tensor.data)}"
            )
        return np.frombuffer(tensor.data, dtype=dtype).reshape(tensor.shape)
    flat = _flatten(tensor.data)
    if len(flat) != count:
        raise TensorError(
            f"input {tensor.name!r}: shape {list(tensor.shape)} needs {count} elements, "
            f"got {len(flat)}"
        )
    # as the JSON API's schema check: no bool for a number, no string or fraction for
    # an integer (numpy would take true as 1, "7" as 7 and 1.9 as 1)
    kinds = set(map(type, flat))
    if not kinds <= _JSON_KINDS[dtype.kind]:
        wrong = sorted(k.__name__ for k in kinds - _JSON_KINDS[dtype.kind])
        what = {"b": "true or false", "f": "numbers"}.get(dtype.kind, "integers")
        raise TensorError(
            f"input {tensor.name!r}: {tensor.datatype} data must be {what}, got {', '.join(wrong)}"
        )
    try:
        return np.asarray(flat, dtype=dtype).reshape(tensor.shape)
    except (TypeError, ValueError, OverflowError) as error:
        raise TensorError(
            f"input {tensor.name!r}: data is not {tensor.datatype}: {error}"
        ) from None


def column_from_tensor(
    tensor: InputTensor, expected: Any = None, limits: Limits = DEFAULT_LIMITS
) -> list[Any]:
    """The rows of one input tensor (`expected`: the column's schema type, if any).
    LimitExceeded for a BYTES element over `limits.max_string_chars`."""
    if tensor.datatype not in DATATYPES:
        raise TensorError(
            f"input {tensor.name!r}: unsupported datatype {tensor.datatype!r} "
            f"(supported: {', '.join(DATATYPES)})"
        )
    if not tensor.shape or any(d < 0 for d in tensor.shape):
        raise TensorError(
            f"input {tensor.name!r}: shape {list(tensor.shape)} must have at least one "
            "dimension (the rows), none negative"
        )
    count = math.prod(tensor.shape)
    if tensor.datatype == "BYTES":
        return _bytes_cells(tensor, count, _wants_bytes(expected), limits.max_string_chars)
    array = _numeric_array(tensor, count)
    return array.tolist() if array.ndim == 1 else list(array)


def check_limits(tensors: Sequence[InputTensor], limits: Limits) -> None:
    """LimitExceeded when the inputs' declared shapes are over `limits`: elements of
    all inputs (or values a flat list holds, if more), rows (the first dimension), and
    bytes once decoded (numeric: elements times the datatype's size; BYTES: the raw
    data). Converts nothing; `columns_from_tensors` calls it first. Malformed shapes
    are left for `column_from_tensor` to name."""
    elements = decoded = 0
    for tensor in tensors:
        shape = tensor.shape
        if not shape or any(not isinstance(d, int) or d < 0 for d in shape):
            continue
        if shape[0] > limits.max_rows:
            raise over(f"rows of input {tensor.name!r}", shape[0], limits.max_rows, "max-rows")
        count = math.prod(shape)
        raw = isinstance(tensor.data, bytes | bytearray | memoryview)
        if not raw:  # JSON nests its lists (counted by check_json_limits); gRPC's are flat
            count = max(count, len(tensor.data))
        elements += count
        if elements > limits.max_elements:
            what = "tensor elements in the request"
            raise over(what, elements, limits.max_elements, "max-elements")
        dtype = NUMPY_TYPES.get(tensor.datatype)
        if dtype is not None:
            decoded += count * dtype.itemsize
        elif raw:  # BYTES: its elements are at most the data they come in
            decoded += len(tensor.data)
        if decoded > limits.max_decoded_bytes:
            what = "bytes of the request's tensors, decoded"
            raise over(what, decoded, limits.max_decoded_bytes, "max-decoded-mb")


def columns_from_tensors(
    tensors: Sequence[InputTensor],
    schema: Mapping[str, Any] | None,
    limits: Limits = DEFAULT_LIMITS,
) -> dict[str, list[Any]]:
    """The request table's columns; TensorError naming the input at fault,
    LimitExceeded past `limits` (see `check_limits`, which it calls first)."""
    check_limits(tensors, limits)
    columns: dict[str, list[Any]] = {}
    rows: dict[str, int] = {}
    for tensor in tensors:
        if tensor.name in columns:
            raise TensorError(f"input {tensor.name!r} is given twice")
        expected = schema.get(tensor.name) if schema else None
        columns[tensor.name] = column_from_tensor(tensor, expected, limits)
        rows[tensor.name] = tensor.shape[0]
    if len(set(rows.values())) > 1:
        raise TensorError(f"inputs must have the same first dimension (rows), got {rows}")
    return columns


def _as_bytes(value: Any) -> bytes | None:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes | np.bytes_):
        return bytes(value)
    if isinstance(value, np.str_):
        return str(value).encode()
    return None


def tensor_from_column(name: str, values: Sequence[Any], empty_datatype: str) -> OutputTensor:
    """One output column as a tensor. `empty_datatype` types a column with no rows.
    OutputError when the values do not make one tensor (mixed types, None, ragged
    arrays, objects)."""
    if not values:
        return OutputTensor(name, empty_datatype, (0,), np.empty(0, NUMPY_TYPES.get(
            empty_datatype, np.dtype(object))))  # fmt: skip
    first = values[0]
    if isinstance(first, np.ndarray):
        try:
            array = np.stack(values)
        except (ValueError, TypeError) as error:
            raise OutputError(
                f"output {name!r}: its arrays do not stack into one tensor ({error})"
            ) from None
    elif _as_bytes(first) is not None:
        array = np.empty(len(values), dtype=object)
        array[:] = values
    else:
        try:
            array = np.asarray(values)
        except ValueError as error:
            raise OutputError(f"output {name!r}: ragged rows ({error})") from None
        if array.dtype.kind in "fO" and all(type(v) is int for v in values):
            array = _integers(name, values)  # numpy made floats (or objects) of them
    if array.dtype.kind in "OUS":
        flat = [_as_bytes(v) for v in array.reshape(-1)]
        if any(v is None for v in flat):
            bad = next(v for v in array.reshape(-1) if _as_bytes(v) is None)
            raise OutputError(
                f"output {name!r} holds {type(bad).__name__} {bad!r:.60} among its values; "
                "a V2 tensor carries numbers, bools, strings or equally shaped arrays"
            )
        encoded = np.empty(len(flat), dtype=object)
        encoded[:] = flat
        return OutputTensor(name, "BYTES", array.shape, encoded)
    datatype = _BY_KIND_SIZE.get((array.dtype.kind, array.dtype.itemsize))
    if datatype is None:
        raise OutputError(f"output {name!r}: numpy dtype {array.dtype} has no V2 datatype")
    return OutputTensor(
        name, datatype, array.shape, array.astype(NUMPY_TYPES[datatype], copy=False)
    )


def _integers(name: str, values: Sequence[int]) -> np.ndarray:
    """Python ints past int64 as UINT64, when they all fit it; OutputError when no
    64-bit datatype holds them all (numpy took [2**64 - 1, 0] as floats, rounded)."""
    low, high = min(values), max(values)
    for dtype in (np.int64, np.uint64):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return np.asarray(values, dtype=dtype)
    raise OutputError(
        f"output {name!r} holds integers from {str(low)[:40]} to {str(high)[:40]}: no 64-bit "
        "integer datatype holds them all"
    )


def schema_datatype(expected: Any) -> str | None:
    """The V2 datatype a declared schema type stands for; None when it does not say
    (np.ndarray: any numeric type)."""
    return SCHEMA_DATATYPES.get(expected)
