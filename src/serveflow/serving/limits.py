"""Limits on what one request may make the server allocate or compute.

Every limit is checked before the memory it guards is spent: the body size while it
is read, the decompressed size of an `.npz` from its zip directory and every array's
size from its `.npy` header before anything is inflated, and JSON nesting, string
length, element and row counts in one pass over the parsed document before a table
is built. A request over a limit gets 413 with a message naming the limit and how to
raise it (`serveflow serve --max-...`).
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024


class LimitExceeded(Exception):
    """A request over one of the server's `Limits` (HTTP 413)."""


@dataclass(frozen=True)
class Limits:
    """What one request may hold. Defaults suit tensors of tens of MB and JSON of a
    few thousand rows; raise them per server (`serveflow serve --max-...`).

    max_body_bytes: the request body as sent (compressed, for `.npz`).
    max_decoded_bytes: an `.npz` body's arrays once inflated, or a V2 request's
        tensors once decoded, all together.
    max_elements: values in one request: array elements of an `.npz` or of V2
        tensors, or scalars (numbers, strings, booleans, nulls) of a JSON body.
    max_depth: nesting of a JSON body, counting its outer object (`{"rows":
        [{"x": [[1]]}]}` is 5 deep).
    max_string_chars: characters of one JSON string (a key or a value), or bytes of
        one V2 BYTES element sent as binary data.
    max_rows: rows of one request.
    body_timeout_s: seconds a request body may stall (no byte of it read), and its
        headers may take to come whole, before the request is answered 408 and its
        connection closed: a client sending headers only would otherwise hold its
        admission slot as long as it liked, and one sending half of them a connection.
    """

    max_body_bytes: int = 16 * MiB
    max_decoded_bytes: int = 64 * MiB
    max_elements: int = 16 * MiB
    max_depth: int = 32
    max_string_chars: int = 1 * MiB
    max_rows: int = 100_000
    body_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if name == "body_timeout_s":
                if not (isinstance(value, int | float) and 0 < value < float("inf")):
                    raise ValueError(f"Limits.{name} must be a positive number, got {value!r}")
            elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive integer, got {value!r}")


def over(what: str, size: int, limit: int, option: str) -> LimitExceeded:
    """The error for `what` measuring `size` against `limit` (raised by `--option`)."""
    return LimitExceeded(f"{what} ({size:,}) is over the limit of {limit:,} (--{option})")
