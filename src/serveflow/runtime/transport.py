"""Datagram endpoints between the processes of one machine.

Each process binds one Unix datagram socket in the abstract namespace (no file to
clean up; it disappears with the process). Any process can send to any address;
message boundaries are kept. A hop costs a few tens of microseconds (see
shared/notes/ipc-on-this-machine.md), half of what a broker-style library adds.

Sends never block the caller: when the receiver's queue is full, the message goes to
a backlog drained by a sender thread. A process that is blocked sending cannot be
waiting for another process that is blocked sending to it, so there is no deadlock.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections import deque

log = logging.getLogger(__name__)

MAX_DATAGRAM = 256 * 1024
_BUFFER_BYTES = 4 * 1024 * 1024


def address(token: str, name: str) -> bytes:
    return f"\0serveflow-{token}-{name}".encode()


class PeerGone(ConnectionError):
    """The destination socket no longer exists: its process exited or died."""


def _socket() -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):  # capped by the kernel: the default works
            sock.setsockopt(socket.SOL_SOCKET, option, _BUFFER_BYTES)
    return sock


class Endpoint:
    """A bound socket: `recv` messages sent to `addr`, `send` to any address."""

    def __init__(self, addr: bytes) -> None:
        self.addr = addr
        self._sock = _socket()  # receives only; its timeout changes per call
        self._sock.bind(addr)
        self._out = _socket()  # sends only, never blocks; unbound: nobody replies to it
        self._out.setblocking(False)
        self._buffer = bytearray(MAX_DATAGRAM)
        self._backlog: deque[tuple[bytes, bytes]] = deque()
        self._backlog_ready = threading.Condition()
        self._sender: threading.Thread | None = None
        self._closed = False

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, to: bytes, data: bytes) -> None:
        """Queue `data` for `to` without blocking. Raises PeerGone if nobody is there."""
        if len(data) > MAX_DATAGRAM:
            raise ValueError(f"message of {len(data)} bytes exceeds {MAX_DATAGRAM}")
        if not self._backlog:
            try:
                self._out.sendto(data, to)
                return
            except BlockingIOError:
                pass
            except (ConnectionRefusedError, FileNotFoundError) as error:
                raise PeerGone(to) from error
        with self._backlog_ready:
            self._backlog.append((to, data))
            if self._sender is None:
                self._sender = threading.Thread(
                    target=self._drain_backlog, name="serveflow:sender", daemon=True
                )
                self._sender.start()
            self._backlog_ready.notify()

    def recv(self, timeout: float | None) -> bytes | None:
        """The next message, or None after `timeout` seconds (0: don't wait; None:
        wait forever). Only one thread may receive."""
        self._sock.settimeout(timeout)
        try:
            n = self._sock.recv_into(self._buffer)
        except (TimeoutError, BlockingIOError):
            return None
        return bytes(self._buffer[:n])

    def close(self) -> None:
        with self._backlog_ready:
            self._closed = True
            self._backlog_ready.notify()
        self._sock.close()
        self._out.close()

    def _drain_backlog(self) -> None:
        sock = _socket()  # blocking; unbound is fine, nobody replies to the sender
        while True:
            with self._backlog_ready:
                while not self._backlog and not self._closed:
                    self._backlog_ready.wait()
                if self._closed:
                    return
                to, data = self._backlog[0]
            try:
                sock.sendto(data, to)
            except OSError:
                log.debug("dropping a message to %r: peer gone", to)
            with self._backlog_ready:
                self._backlog.popleft()
