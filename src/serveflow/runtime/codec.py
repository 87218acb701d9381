"""Messages between processes: pickle protocol 5, large buffers through shared memory.

Small messages travel inline. Out-of-band buffers of at least `LARGE` bytes (numpy
arrays, bytearrays) are placed in files under /dev/shm and only their (name, offset,
length) travels; the receiver maps the file and unpickles straight from the mapping,
so an array is never copied through the socket. A buffer that already lives in a
mapping this process received is forwarded by reference, without any copy: an array
crossing a chain of stages is written once.

Files live in the runtime's private directory (`rundir`), named `m<request id>-<n>`
so that the owner (the driver) can remove every file of a finished request; see
`sweep`.

A message is pickled as a plain tuple, `(its type's number in messages.MESSAGES, its
fields, the state of its Table value or None)`: pickle writes and reads plain tuples,
lists and dicts in C, while a named tuple or a class instance costs a lookup by name
and Python calls each way (about 4 us per message and hop, more than the rest of the
encoding of a 10 KB request). Anything else in a message (exceptions, user values) is
pickled as it is. A user value may pickle in one process and not unpickle in another
(a class the receiver cannot import): the rest of its message is then read again by
pickle's Python unpickler, which leaves such objects out, so that the receiver can
fail the request the value belonged to rather than drop the message unread.
"""

from __future__ import annotations

import ctypes
import io
import itertools
import mmap
import os
import pickle
import time
from typing import Any

from serveflow.errors import OperatorError
from serveflow.logical.table import Table
from serveflow.runtime.messages import MESSAGES, Input, Result

LARGE = 64 * 1024  # below this, copying through the socket is cheaper than a mapping
MAX_INLINE = 128 * 1024  # a datagram must stay well under the socket buffer
# a received mapping is remembered this long for forwarding by reference; after that
# only the arrays still using it keep it mapped
FORWARD_WINDOW_S = 30.0
_INLINE, _SHARED = b"I", b"S"
_NUMBER = {kind: number for number, kind in enumerate(MESSAGES)}
# per message type: the position of its field that may hold a Table, or -1
_VALUE = [kind._fields.index("value") if "value" in kind._fields else -1 for kind in MESSAGES]


def _address(buffer: memoryview) -> int | None:
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    except (TypeError, ValueError):  # read-only: not one of our writable mappings
        return None


class SharedMemory:
    """This process's view of the shared-memory files: the ones it mapped (to forward
    their buffers by reference) and a counter for the ones it creates."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._count = itertools.count()
        # name -> (mapping, base address, size, mapped at); entries only help forwarding,
        # dropping one never unmaps memory an array still uses.
        self._mapped: dict[str, tuple[mmap.mmap, int, int, float]] = {}

    def place(self, buffer: memoryview, request_id: int) -> tuple[str, int, int]:
        """Where `buffer` is in shared memory: its existing place, or a new file."""
        address = _address(buffer)
        if address is not None:
            for name, (_, base, size, _) in list(self._mapped.items()):
                if base <= address and address + buffer.nbytes <= base + size:
                    return name, address - base, buffer.nbytes
        name = f"m{request_id}-{os.getpid()}.{next(self._count)}"
        path = os.path.join(self.directory, name)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, max(buffer.nbytes, 1))
            with mmap.mmap(fd, max(buffer.nbytes, 1)) as mapping:
                mapping[: buffer.nbytes] = buffer.cast("B")
        finally:
            os.close(fd)
        return name, 0, buffer.nbytes

    def view(self, name: str, offset: int, length: int) -> memoryview:
        entry = self._mapped.get(name)
        if entry is None:
            if "/" in name or not name.startswith("m"):
                raise ValueError(f"not a shared-memory file of this runtime: {name!r}")
            fd = os.open(os.path.join(self.directory, name), os.O_RDWR | os.O_NOFOLLOW)
            try:
                mapping = mmap.mmap(fd, 0)
            finally:
                os.close(fd)
            entry = (mapping, _address(memoryview(mapping)) or 0, len(mapping), time.monotonic())
            self._mapped[name] = entry
        return memoryview(entry[0])[offset : offset + length]

    def forget_older_than(self, seconds: float) -> None:
        """Stop tracking old mappings (they stay mapped while arrays use them)."""
        limit = time.monotonic() - seconds
        for name in [n for n, e in list(self._mapped.items()) if e[3] < limit]:
            self._mapped.pop(name, None)


def encode(message: Any, shm: SharedMemory, request_id: int = 0) -> bytes:
    large: list[memoryview] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        raw = buffer.raw()
        if raw.nbytes < LARGE:
            return True  # keep in band
        large.append(raw)
        return False

    body = pickle.dumps(_plain(message), protocol=5, buffer_callback=out_of_band)
    if not large and len(body) <= MAX_INLINE:
        return _INLINE + body
    refs = [shm.place(raw, request_id) for raw in large]
    if len(body) > MAX_INLINE:
        body_ref: Any = shm.place(memoryview(body), request_id)
    else:
        body_ref = body
    return _SHARED + pickle.dumps((refs, body_ref), protocol=5)


def decode(data: bytes | memoryview, shm: SharedMemory) -> Any:
    """The message, or whatever else was sent (the receiver drops it). An `Input` or
    `Result` whose value does not unpickle here comes with `Unreadable` as its value."""
    if data[:1] == _INLINE:
        body: Any = memoryview(data)[1:]
        buffers: list[memoryview] | None = None
    else:
        refs, body = pickle.loads(memoryview(data)[1:])
        if isinstance(body, tuple):
            body = shm.view(*body)
        buffers = [shm.view(*ref) for ref in refs]
    try:
        return _message(pickle.loads(body, buffers=buffers))
    except Exception as error:
        try:
            message = _message(_Salvager(io.BytesIO(body), buffers=buffers).load())
        except Exception:
            raise error from None
        if type(message) not in (Input, Result):
            raise
        return message._replace(value=Unreadable(f"{type(error).__name__}: {error}"))


class Unreadable(Exception):
    """Stands for the value of a received message that did not unpickle in this
    process (a class it cannot import, a constructor that raises here); the text
    says why. The receiver fails the request with `value_failure`."""


def value_failure(plan: Any, message: Any, problem: str) -> OperatorError:
    """An OperatorError naming the operator whose output `message` (an `Input` or a
    `Result` of `plan`, None if unknown) carries, for a value that `problem`."""
    try:
        stage = plan.stage_of(message.op) if type(message) is Input else plan.output_stage
        name = stage.ops[-1].name
    except (AttributeError, LookupError):  # no plan, or no such operator in it
        name = "?"
    return OperatorError(f"operator {name!r} returned a value that {problem}", name)


def _missing(*args: Any, **kwargs: Any) -> Any:
    raise TypeError("a class or function this process cannot import")


class _Salvager(pickle._Unpickler):  # type: ignore[name-defined]
    """pickle's Python unpickler, in which an object that cannot be built here (its
    class not importable, its constructor or setstate raising) becomes None, so that
    the rest of the message (which request it belongs to) can still be read."""

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except Exception:
            return _missing


def _tolerant(load: Any, consumed: int) -> Any:
    """`load` (an opcode that builds an object from the top `consumed` stack entries)
    leaving None in their place when building fails."""

    def tolerant(self: _Salvager) -> None:
        bottom = len(self.stack) - consumed
        try:
            load(self)
        except Exception:
            del self.stack[bottom:]
            self.stack.append(None)

    return tolerant


for _opcode, _consumed in (
    (pickle.REDUCE, 2),
    (pickle.BUILD, 2),
    (pickle.NEWOBJ, 2),
    (pickle.NEWOBJ_EX, 3),
):
    _Salvager.dispatch[_opcode[0]] = _tolerant(_Salvager.dispatch[_opcode[0]], _consumed)


def _plain(message: Any) -> tuple:
    """A message as plain tuples (see the module docstring)."""
    number = _NUMBER[type(message)]
    value = _VALUE[number]
    if value < 0 or type(message[value]) is not Table:
        return number, tuple(message), None
    table = message[value]
    fields = (*message[:value], None, *message[value + 1 :])
    return number, fields, (table._columns, table._qids, table.group_by)


def _message(plain: Any) -> Any:
    """The message `_plain` made, or `plain` itself if it is no such tuple."""
    if type(plain) is not tuple or len(plain) != 3:
        return plain
    number, fields, table = plain
    if type(number) is not int or not 0 <= number < len(MESSAGES) or type(fields) is not tuple:
        return plain
    kind = MESSAGES[number]
    if len(fields) != len(kind._fields):
        return plain
    if table is not None:
        value = _VALUE[number]
        if value < 0 or type(table) is not tuple or len(table) != 3:
            return plain
        fields = (*fields[:value], Table._make(*table), *fields[value + 1 :])
    return tuple.__new__(kind, fields)


def sweep(directory: str, keep: set[int]) -> int:
    """Remove the shared-memory files of requests not in `keep`. Returns how many."""
    removed = 0
    for name in os.listdir(directory):
        if not name.startswith("m"):
            continue
        try:
            if int(name[1:].split("-", 1)[0]) in keep:
                continue
            os.unlink(os.path.join(directory, name))
            removed += 1
        except (ValueError, FileNotFoundError):
            pass
    return removed
