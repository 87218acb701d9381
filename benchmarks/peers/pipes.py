"""The raw floor: a chain of identity worker processes linked by pipes.

driver -> w1 -> w2 -> ... -> wN -> driver, each link a `multiprocessing.Pipe` carrying
raw bytes (`send_bytes`/`recv_bytes`, no pickling of the payload). Every message is an
8-byte request id followed by the payload, so several requests can be in flight. The
driver sends from the caller's thread and receives on a dedicated thread (a single
thread doing both can deadlock once pipe buffers fill).

This is what any multi-process runtime must at least pay per hop on this machine: a
serveflow request that crosses N stages unfused cannot beat N+1 of these hand-offs.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import struct
import threading
from concurrent.futures import Future
from multiprocessing.connection import Connection

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<q")
_STOP = -1


def _identity_worker(inbox: Connection, outbox: Connection) -> None:
    """Forward every message unchanged until the stop id arrives (then forward it)."""
    while True:
        message = inbox.recv_bytes()
        outbox.send_bytes(message)
        if _HEADER.unpack_from(message)[0] == _STOP:
            return


class PipeChain:
    """`stages` identity processes in a chain; `call(payload)` is one round trip."""

    def __init__(self, stages: int = 3) -> None:
        if stages < 1:
            raise ValueError(f"stages must be >= 1, got {stages}")
        ctx = mp.get_context("spawn")  # never fork a process that may host Ray threads
        links = [ctx.Pipe(duplex=False) for _ in range(stages + 1)]  # (reader, writer)
        self._processes = [
            ctx.Process(
                target=_identity_worker,
                args=(links[i][0], links[i + 1][1]),
                name=f"pipe-floor-{i}",
                daemon=True,
            )
            for i in range(stages)
        ]
        for process in self._processes:
            process.start()
        self._send = links[0][1]
        self._recv = links[-1][0]
        self._send_lock = threading.Lock()
        self._ids = itertools.count()
        self._pending: dict[int, Future[bytes]] = {}
        self._pending_lock = threading.Lock()
        self._receiver = threading.Thread(target=self._receive, daemon=True, name="pipe-floor-rx")
        self._receiver.start()
        self._closed = False

    def _receive(self) -> None:
        while True:
            try:
                message = self._recv.recv_bytes()
            except (EOFError, OSError):
                return
            (rid,) = _HEADER.unpack_from(message)
            if rid == _STOP:
                return
            with self._pending_lock:
                future = self._pending.pop(rid)
            future.set_result(message)

    def submit(self, payload: bytes) -> Future[bytes]:
        """Send one request through the chain; the future holds the returned message."""
        rid = next(self._ids)
        future: Future[bytes] = Future()
        with self._pending_lock:
            self._pending[rid] = future
        with self._send_lock:
            self._send.send_bytes(_HEADER.pack(rid) + payload)
        return future

    def call(self, payload: bytes) -> bytes:
        return self.submit(payload).result(timeout=30)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._send_lock:
            self._send.send_bytes(_HEADER.pack(_STOP))
        self._receiver.join(timeout=10)
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                log.warning("pipe floor worker %s did not stop; terminating", process.name)
                process.terminate()
                process.join(timeout=5)
        self._send.close()
        self._recv.close()

    def __enter__(self) -> PipeChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
