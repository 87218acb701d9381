"""One timer thread for all request deadlines (a thread per request would not scale)."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

MAX_WAIT_S = 60.0  # the timer wakes at least this often: a far deadline is no wait error
# Cancelled entries are dropped from the heap once they are this many and at least half
# of it. Left until their time, each request answered within its deadline kept a list
# tracked by the garbage collector for the whole deadline (10 s at 1,600 answers a
# second: 16,000), and every full collection of the driver walked them all, holding the
# GIL while requests were in flight (a batching_regimes cell, driver frozen after set-up
# as `serveflow serve` does: full collections of 6-14 ms over 17-28k objects, two in
# 14 s; none with the compaction).
COMPACT_AT = 256


class Deadlines:
    """Calls `action()` at `when` (time.monotonic) unless the entry is done by then."""

    def __init__(self) -> None:
        self._heap: list[list] = []  # [when, order, action or None once cancelled]
        self._cancelled = 0  # entries in the heap cancelled (about: see `cancel`)
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="serveflow:deadlines", daemon=True)
        self._thread.start()

    def add(self, when: float, action: Callable[[], None]) -> list:
        """Schedule `action`; returns the entry to `cancel` it with."""
        entry = [when, next(self._order), action]
        with self._wake:
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:
                self._wake.notify()
        return entry

    def cancel(self, entry: list) -> None:
        """Drop an entry's action (what it holds is freed now, not at its time), and
        the heap's cancelled entries once they are many (see COMPACT_AT)."""
        if entry[2] is None:
            return
        entry[2] = None
        self._cancelled += 1  # unlocked: a count off by a few only moves a compaction
        if self._cancelled >= COMPACT_AT and 2 * self._cancelled >= len(self._heap):
            with self._wake:
                self._heap = [e for e in self._heap if e[2] is not None]
                heapq.heapify(self._heap)
                self._cancelled = 0

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and (not self._heap or self._heap[0][0] > time.monotonic()):
                    wait = self._heap[0][0] - time.monotonic() if self._heap else MAX_WAIT_S
                    self._wake.wait(min(wait, MAX_WAIT_S))
                if self._closed:
                    return
                entry = heapq.heappop(self._heap)
                action, entry[2] = entry[2], None  # a `cancel` from now on is a no-op
                if action is None:
                    self._cancelled = max(0, self._cancelled - 1)
                    continue
            try:
                action()
            except Exception:  # one failing action must not stop every later deadline
                log.exception("a deadline's action failed")
