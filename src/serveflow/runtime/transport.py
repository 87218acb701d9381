"""Datagram endpoints between the processes of one machine.

Each process binds one Unix datagram socket at a filesystem path that the caller puts
inside a private directory (mode 0700, see `rundir`): only that user can reach it, as
the directory's permission is checked on every connect or send. Message boundaries are
kept. A hop costs a few tens of microseconds (see shared/notes/ipc-on-this-machine.md).

Sending: each destination gets its own connected, non-blocking socket, opened on the
first message to it. A send is then one `send` on that socket (a connected send skips
the path lookup that `sendto` would do for every message, and is a little cheaper than
the abstract-namespace `sendto` this replaced). Sends never block the caller: when the
receiver's queue is full (Linux queues only net.unix.max_dgram_qlen datagrams per
socket), the message goes to that destination's backlog, and later messages to it
follow it there, so the order per destination holds. One drainer thread per endpoint,
started on the first backlog, polls the backlogged destinations' sockets and sends as
each one has room: a receiver that does not read delays only the messages to itself.
Each destination also has its own send buffer, so large messages piling up at a stuck
receiver do not use up the buffer that sends to the others draw on.

A backlog goes out bundled: the drainer packs the messages waiting for a destination
into as few datagrams as fit (a bundle: a zero byte, then each message after its 4-byte
length), and `recv` hands them out one by one. A receiver's queue holds only
net.unix.max_dgram_qlen datagrams (10 by default): one at a time, a backlog of a few
dozen inputs needed as many wake-ups of the drainer, each waiting for the sender's GIL,
and a worker that made up its next call meanwhile ran it without them.

A process that is blocked sending cannot be waiting for another process that is blocked
sending to it, so there is no deadlock.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import stat
import threading
import time
from collections import deque

log = logging.getLogger(__name__)

MAX_DATAGRAM = 256 * 1024
BUNDLE = b"\x00"  # the first byte of a bundle; a message may not begin with it
_BUNDLE_BYTES = 64 * 1024  # a bundle stays this small: well within the receive buffer
_LENGTH = 4


def _receive_queue() -> int:
    try:
        with open("/proc/sys/net/unix/max_dgram_qlen") as f:
            return max(1, int(f.read()))
    except (OSError, ValueError):
        return 10  # Linux's default


# The most datagrams a socket's receive queue holds (net.unix.max_dgram_qlen): a
# receiver that reads this many at once may have left later ones in the backlogs of
# their senders, whose drainer sends them once it sees room.
RECEIVE_QUEUE = _receive_queue()
_BUFFER_BYTES = 4 * 1024 * 1024
_RETRY_MS = 1000  # the drainer retries its backlogs this often even without a wake-up


class PeerGone(ConnectionError):
    """The destination socket no longer exists: its process exited or died."""


def _socket() -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):  # capped by the kernel: the default works
            sock.setsockopt(socket.SOL_SOCKET, option, _BUFFER_BYTES)
    return sock


class _Destination:
    """A connected socket to one destination and the messages waiting for it."""

    __slots__ = ("queue", "sock", "to")

    def __init__(self, to: str, sock: socket.socket) -> None:
        self.to = to
        self.sock = sock
        self.queue: deque[bytes] = deque()


class Endpoint:
    """A socket bound at `path`: `recv` messages sent to it, `send` to any path."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock = _socket()  # receives only
        self._bind(path)
        os.chmod(path, 0o600)
        info = os.stat(path)
        self._inode = (info.st_dev, info.st_ino)
        # Non-blocking for good, waits in poll: a timeout per call would cost a system
        # call to switch the socket's mode each time.
        self._sock.setblocking(False)
        self._poller = select.poll()
        self._poller.register(self._sock, select.POLLIN)
        self._buffer = bytearray(MAX_DATAGRAM)
        self._view = memoryview(self._buffer)
        self._drained = True  # the last recv found no message waiting
        self._unbundled: deque[bytes] = deque()  # the rest of the last bundle received
        self.datagrams = 0  # received so far (a bundle counts once)
        # Destinations without a backlog: the hot path's one lookup. The other fields
        # change only under the lock.
        self._direct: dict[str, socket.socket] = {}
        self._destinations: dict[str, _Destination] = {}
        self._lock = threading.Lock()
        self._newly_backlogged: list[_Destination] = []
        self._drainer: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self._closed = False

    def _bind(self, path: str) -> None:
        try:
            self._sock.bind(path)
            return
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                self._sock.close()
                raise
        # A socket file left by a process that died: remove it, but only if nobody is
        # bound there.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
        except OSError:
            pass
        else:
            self._sock.close()
            raise OSError(errno.EADDRINUSE, "an endpoint is already bound there", path)
        finally:
            probe.close()
        try:
            self._sock.bind(path)
        except BaseException:
            self._sock.close()
            raise

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, to: str, data: bytes) -> None:
        """Queue `data` for the endpoint at path `to` without blocking. Raises PeerGone
        if nothing is bound there, PermissionError if this user may not reach it.

        A message that joins a backlog is dropped (with a debug log) if its destination
        disappears before it is delivered."""
        _check(data)
        sock = self._direct.get(to)
        if sock is not None:
            try:
                sock.send(data)
                return
            except OSError:  # queue full, or the peer went away: sorted out below
                pass
        self._send_slow(to, deque((data,)))

    def send_all(self, to: str, messages: list[bytes]) -> None:
        """`send` each of `messages` to `to`, in order, bundled into as few datagrams
        as fit: the receiver reads them with one system call (each gives up the GIL,
        and a busy receiver's thread then waits to get it back)."""
        for data in messages:
            _check(data)
        pending = deque(messages)
        sock = self._direct.get(to)
        if sock is not None:
            with contextlib.suppress(OSError):  # queue full, or the peer went away:
                _send_bundled(sock, pending)  # sorted out below
        if pending:
            self._send_slow(to, pending)

    def backlog(self, to: str) -> int:
        """How many messages wait for the destination at path `to` (diagnostics)."""
        destination = self._destinations.get(to)
        return 0 if destination is None else len(destination.queue)

    def delivered(self, to: str, timeout: float) -> bool:
        """Wait, up to `timeout` seconds and without holding the GIL, until nothing
        waits for the destination at path `to` in this endpoint's backlog. For a
        message that must be out before the caller holds the GIL for long."""
        deadline = time.monotonic() + timeout
        while self.backlog(to):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.001)
        return True

    def recv(self, timeout: float | None) -> bytes | None:
        """The next message, or None after `timeout` seconds (0: don't wait; None:
        wait forever). Only one thread may receive."""
        if self._unbundled:
            return self._unbundled.popleft()
        # Poll first only when the last call found nothing: while messages stream in,
        # one system call each (every call lets the process's other threads run).
        if self._drained and timeout != 0 and not self._wait(timeout):
            return None
        try:
            n = self._sock.recv_into(self._buffer)
        except BlockingIOError:
            self._drained = True
            if timeout == 0 or not self._wait(timeout):
                return None
            try:
                n = self._sock.recv_into(self._buffer)
            except BlockingIOError:
                return None
        self._drained = False
        self.datagrams += 1
        if self._buffer[0:1] != BUNDLE:
            return bytes(self._view[:n])
        self._unbundle(n)
        return self._unbundled.popleft() if self._unbundled else None

    def _unbundle(self, n: int) -> None:
        """Split the bundle of `n` bytes in the buffer into its messages; a malformed
        one (no sender of ours writes it) is dropped from where it stops making sense."""
        view, at = self._view, 1
        while at + _LENGTH <= n:
            size = int.from_bytes(view[at : at + _LENGTH], "little")
            at += _LENGTH
            if size < 1 or at + size > n:
                log.warning("dropping the rest of a malformed bundle of %d bytes", n)
                return
            self._unbundled.append(bytes(view[at : at + size]))
            at += size

    def _wait(self, timeout: float | None) -> bool:
        """Whether a datagram came within `timeout` seconds. poll(2) counts whole
        milliseconds, and Python rounds a wait up to the next one (a batch's timeout of
        0.72 ms waited 1.4 ms): the whole ones are slept, the rest (under 1 ms) is
        polled, the CPU yielded between polls."""
        if timeout is None:
            return bool(self._poller.poll(None))
        deadline = time.monotonic() + timeout
        if self._poller.poll(int(timeout * 1e3)):
            return True
        while time.monotonic() < deadline:
            os.sched_yield()
            if self._poller.poll(0):
                return True
        return False

    def close(self) -> None:
        """Close every socket, drop the backlogs and remove the socket file."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            destinations = list(self._destinations.values())
            self._destinations.clear()
            self._direct.clear()
        if self._drainer is not None:
            self._wake()
            if self._drainer is not threading.current_thread():
                self._drainer.join(timeout=5)
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
        waiting = sum(len(d.queue) for d in destinations)
        if waiting:
            log.debug("closing with %d messages undelivered", waiting)
        for destination in destinations:
            destination.sock.close()
        self._sock.close()
        with contextlib.suppress(OSError):
            info = os.lstat(self.path)
            if (info.st_dev, info.st_ino) == self._inode:
                os.unlink(self.path)

    # -- sending when the fast path could not -------------------------------------------
    def _send_slow(self, to: str, pending: deque[bytes]) -> None:
        """Send `pending` (consumed), bundled, or put what the receiver has no room for
        in the destination's backlog."""
        with self._lock:
            if self._closed:
                raise OSError(errno.EBADF, "endpoint closed")
            destination = self._destinations.get(to)
            if destination is not None and destination.queue:
                destination.queue.extend(pending)  # behind the backlog: keeps the order
                return
            for attempt in range(2):
                if destination is None:
                    destination = self._connect(to)
                try:
                    _send_bundled(destination.sock, pending)
                    self._direct[to] = destination.sock
                    return
                except BlockingIOError:
                    break
                except OSError as error:
                    # The peer this socket was connected to died (or was replaced by
                    # a new endpoint at the same path): connect again, once.
                    self._forget(destination)
                    destination = None
                    if attempt:
                        if isinstance(error, (ConnectionRefusedError, FileNotFoundError)):
                            raise PeerGone(to) from error
                        raise
            assert destination is not None
            # The receiver's queue is full: this destination gets a backlog.
            self._direct.pop(to, None)
            destination.queue.extend(pending)
            self._newly_backlogged.append(destination)
            if self._drainer is None:
                self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                self._drainer = threading.Thread(
                    target=self._drain, name="serveflow:sender", daemon=True
                )
                self._drainer.start()
        self._wake()

    def _connect(self, to: str) -> _Destination:
        sock = _socket()  # unbound: nobody replies to it
        sock.setblocking(False)
        try:
            sock.connect(to)
        except (ConnectionRefusedError, FileNotFoundError) as error:
            sock.close()
            raise PeerGone(to) from error
        except BaseException:
            sock.close()
            raise
        destination = _Destination(to, sock)
        self._destinations[to] = destination
        return destination

    def _forget(self, destination: _Destination) -> None:
        if self._destinations.get(destination.to) is destination:
            del self._destinations[destination.to]
        if self._direct.get(destination.to) is destination.sock:
            del self._direct[destination.to]
        destination.sock.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full pipe: a wake-up is pending anyway
            os.write(self._wake_w, b"\0")

    # -- the drainer thread ---------------------------------------------------------------
    def _drain(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        watched: dict[int, _Destination] = {}
        while True:
            with self._lock:
                if self._closed:
                    return
                for destination in self._newly_backlogged:
                    if destination.queue and destination.sock.fileno() not in watched:
                        watched[destination.sock.fileno()] = destination
                        poller.register(destination.sock, select.POLLOUT)
                self._newly_backlogged.clear()
            events = poller.poll(_RETRY_MS if watched else None)
            if not events:  # a missed wake-up costs at most _RETRY_MS
                ready = list(watched)
            else:
                ready = [fd for fd, _ in events if fd in watched]
                if len(ready) < len(events):
                    with contextlib.suppress(OSError):
                        os.read(self._wake_r, 4096)
            with self._lock:
                if self._closed:
                    return
                for fd in ready:
                    if self._flush(watched[fd]):
                        poller.unregister(fd)
                        del watched[fd]

    def _flush(self, destination: _Destination) -> bool:
        """Send what the destination has room for (under the lock). True when its
        backlog is gone: all sent, or dropped because the destination disappeared."""
        queue = destination.queue
        try:
            _send_bundled(destination.sock, queue)
        except BlockingIOError:
            return False
        except OSError as error:
            log.debug(
                "dropping %d messages to %s: destination gone (%s)",
                len(queue),
                destination.to,
                error,
            )
            queue.clear()
            self._forget(destination)
            return True
        if self._destinations.get(destination.to) is destination:
            self._direct[destination.to] = destination.sock
        return True


def _check(data: bytes) -> None:
    if len(data) > MAX_DATAGRAM:
        raise ValueError(f"message of {len(data)} bytes exceeds {MAX_DATAGRAM}")
    if data[:1] == BUNDLE:
        raise ValueError("a message may not begin with a zero byte (it marks a bundle)")


def _send_bundled(sock: socket.socket, queue: deque[bytes]) -> None:
    """Send `queue`'s messages on `sock` in as few datagrams as fit, taking each off
    once sent; an OSError (the receiver's queue full, the peer gone) leaves the rest."""
    while queue:
        count, data = _bundle(queue)
        sock.send(data)
        for _ in range(count):
            queue.popleft()


def _bundle(queue: deque[bytes]) -> tuple[int, bytes]:
    """The first messages of `queue` as one datagram: (how many, the datagram). One
    message alone, or one too large to share, goes as it is."""
    if len(queue) == 1 or len(queue[0]) + 1 + 2 * _LENGTH + len(queue[1]) > _BUNDLE_BYTES:
        return 1, queue[0]
    parts, size, count = [BUNDLE], 1, 0
    for data in queue:
        if size + _LENGTH + len(data) > _BUNDLE_BYTES:
            break
        parts += (len(data).to_bytes(_LENGTH, "little"), data)
        size += _LENGTH + len(data)
        count += 1
    return count, b"".join(parts)
