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


class Deadlines:
    """Calls `action()` at `when` (time.monotonic) unless the entry is done by then."""

    def __init__(self) -> None:
        self._heap: list[list] = []  # [when, order, action or None once cancelled]
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

    @staticmethod
    def cancel(entry: list) -> None:
        """Drop an entry's action (what it holds is freed now, not at its time)."""
        entry[2] = None

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
                _, _, action = heapq.heappop(self._heap)
            if action is None:
                continue
            try:
                action()
            except Exception:  # one failing action must not stop every later deadline
                log.exception("a deadline's action failed")
