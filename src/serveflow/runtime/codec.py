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
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import os
import pickle
import time
from typing import Any

LARGE = 64 * 1024  # below this, copying through the socket is cheaper than a mapping
MAX_INLINE = 128 * 1024  # a datagram must stay well under the socket buffer
# a received mapping is remembered this long for forwarding by reference; after that
# only the arrays still using it keep it mapped
FORWARD_WINDOW_S = 30.0
_INLINE, _SHARED = b"I", b"S"


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

    body = pickle.dumps(message, protocol=5, buffer_callback=out_of_band)
    if not large and len(body) <= MAX_INLINE:
        return _INLINE + body
    refs = [shm.place(raw, request_id) for raw in large]
    if len(body) > MAX_INLINE:
        body_ref: Any = shm.place(memoryview(body), request_id)
    else:
        body_ref = body
    return _SHARED + pickle.dumps((refs, body_ref), protocol=5)


def decode(data: bytes | memoryview, shm: SharedMemory) -> Any:
    if data[:1] == _INLINE:
        return pickle.loads(memoryview(data)[1:])
    refs, body = pickle.loads(memoryview(data)[1:])
    if isinstance(body, tuple):
        body = shm.view(*body)
    return pickle.loads(body, buffers=[shm.view(*ref) for ref in refs])


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
